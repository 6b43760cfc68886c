"""What a run leaves in OUTPUT_DIR: PNGs, one JSON-lines manifest per shard, and a paged gallery.

Crash safety (a pod can be SIGKILLed at any instant): every file is written under a temporary
name and renamed (jobs/atomic.py), so a reader never sees half a file; the PNG is renamed into
place *before* its manifest line is appended, and it carries the same record. So on restart an
item is finished exactly when its PNG exists, and a PNG whose manifest line was lost is put back
into the manifest from its own record. OVERWRITE appends a newer record for an id: the latest counts.

A PNG carries A1111's "infotext" under `parameters` (what the web UI's PNG Info, Civitai and most
viewers read) and our whole record as JSON under `pai-diffusion` (what recovery reads).
"""

from __future__ import annotations

import html
import io
import json
import os
from pathlib import Path
from typing import Any
from urllib.parse import quote

from PIL import Image
from PIL.PngImagePlugin import PngInfo

from jobs import __version__, atomic
from jobs.errors import BadInput

INFOTEXT_KEY = "parameters"
RECORD_KEY = "pai-diffusion"
MANIFEST_GLOB = "manifest-*.jsonl"
GALLERY_PAGE_SIZE = 300
# A1111's names for the samplers (jobs/models.py's SCHEDULERS).
A1111_SAMPLERS = {
    "dpm++": "DPM++ 2M",
    "pndm": "PNDM",
    "ddim": "DDIM",
    "euler": "Euler",
    "euler_a": "Euler a",
    "unipc": "UniPC",
}


def check_writable(folder: Path) -> None:
    """Create OUTPUT_DIR and prove we can write there, before any model is loaded."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
        probe = folder / f".write-test-{os.getpid()}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as error:
        raise BadInput(f"OUTPUT_DIR {folder}: not writable ({error.strerror or error})") from None


def png_with_record(image: Image.Image, record: dict[str, Any]) -> bytes:
    """The image as PNG bytes, with A1111's infotext and our record embedded (iTXt: Chinese text too)."""
    info = PngInfo()
    info.add_text(INFOTEXT_KEY, infotext(record))
    info.add_text(RECORD_KEY, json.dumps(record, ensure_ascii=False))
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", pnginfo=info)
    return buffer.getvalue()


def infotext(record: dict[str, Any]) -> str:
    """A1111's format: the prompt, `Negative prompt: ...`, then one line of `Key: value` pairs."""
    lines = [record["prompt"]]
    if record.get("negative_prompt"):
        lines.append(f"Negative prompt: {record['negative_prompt']}")
    settings = {
        "Steps": record["steps"],
        "Sampler": A1111_SAMPLERS.get(record["scheduler"], record["scheduler"]),
        "CFG scale": record["guidance_scale"],
        "Seed": record["seed"],
        "Size": f"{record['width']}x{record['height']}",
        "Model": record["model"].rstrip("/").rsplit("/", 1)[-1],
    }
    if record.get("strength") is not None:
        settings["Denoising strength"] = record["strength"]
    if record.get("loras"):
        hashes = ", ".join(f"{Path(lora['path']).stem}: {lora['sha256'][:12]}" for lora in record["loras"])
        settings["Lora hashes"] = json.dumps(hashes, ensure_ascii=False)  # quoted: it holds commas
    settings["Version"] = f"pai-diffusion-jobs {__version__}"
    lines.append(", ".join(f"{key}: {value}" for key, value in settings.items()))
    return "\n".join(lines)


def read_png_record(path: Path) -> dict[str, Any] | None:
    """The record embedded in one of our PNGs (or, from before infotext, the JSON under `parameters`),
    or None if it has none or is not ours."""
    try:
        with Image.open(path) as image:
            text = image.text.get(RECORD_KEY) or image.text.get(INFOTEXT_KEY)  # type: ignore[attr-defined]
        record = json.loads(text) if text else None
    except (OSError, ValueError):
        return None
    return record if isinstance(record, dict) and "id" in record else None


class Ledger:
    """What every shard's manifest in OUTPUT_DIR holds (an earlier run may have had another shard
    layout): each image id's latest record, and the skipped prompt records. Read once; `refresh`
    reads again only a manifest that changed since (another shard appended to it), and what this
    run appends is added as it is written."""

    def __init__(self, output_dir: Path):
        self.output_dir = output_dir
        self.images: dict[str, dict[str, Any]] = {}
        self.skipped: dict[str, dict[str, Any]] = {}
        self.versions: dict[Path, tuple[int, int]] = {}  # each manifest's size and mtime as read
        self.refresh()

    def refresh(self) -> None:
        for path in sorted(self.output_dir.glob(MANIFEST_GLOB)):
            if self.versions.get(path) != _version(path):
                self.versions[path] = _version(path)
                for record in read_records(path):
                    self.add(record)

    def add(self, record: dict[str, Any]) -> None:
        if "skipped" in record:
            self.skipped[record["skipped"]] = record
        elif record.get("rendered_at", 0) >= self.images.get(record["id"], {}).get("rendered_at", 0):
            self.images[record["id"]] = record  # OVERWRITE appends a newer record for an id


class Manifest:
    """One shard's JSON-lines manifest: a record per finished image, plus skipped prompt records."""

    def __init__(self, output_dir: Path, shard_index: int, ledger: Ledger):
        self.path = output_dir / f"manifest-{shard_index:05d}.jsonl"
        self.ledger = ledger
        self._drop_torn_last_line()

    def append(self, record: dict[str, Any]) -> None:
        """Append one line and fsync it: after a crash the file ends with whole lines or a torn last one."""
        with open(self.path, "a", encoding="utf-8") as file:
            file.write(json.dumps(record, ensure_ascii=False) + "\n")
            file.flush()
            os.fsync(file.fileno())
        self.ledger.add(record)
        self.ledger.versions[self.path] = _version(self.path)

    def _drop_torn_last_line(self) -> None:
        """A kill mid-append leaves a partial last line: cut it, its PNG will be recovered."""
        if not self.path.exists() or self.path.stat().st_size == 0:
            return
        with open(self.path, "rb") as file:
            file.seek(-1, os.SEEK_END)
            if file.read(1) == b"\n":
                return
        data = self.path.read_bytes()
        os.truncate(self.path, data.rfind(b"\n") + 1)
        self.ledger.versions[self.path] = _version(self.path)


def _version(path: Path) -> tuple[int, int]:
    stat = path.stat()
    return stat.st_size, stat.st_mtime_ns


def read_records(path: Path) -> list[dict[str, Any]]:
    """A manifest's whole lines; a last line without its newline is still being written (or was torn)."""
    if not path.exists():
        return []
    complete_lines = path.read_bytes().split(b"\n")[:-1]  # bytes: a torn line may end mid-character
    return [json.loads(line) for line in complete_lines if line.strip()]


def write_gallery(output_dir: Path, title: str, ledger: Ledger, per_page: int = GALLERY_PAGE_SIZE) -> Path:
    """index.html, index-2.html, ... over every shard's images, `per_page` a page (a night of 100,000
    images still opens in a browser), each page written atomically; returns the first page."""
    ledger.refresh()  # other shards may have finished since this one started
    images, skipped = ledger.images, ledger.skipped
    ids = sorted(images)
    pages = max(1, -(-len(ids) // per_page))
    skipped_list = "".join(
        f"<li>{html.escape(where)}: {html.escape(record['reason'])}</li>" for where, record in sorted(skipped.items())
    )
    for page in range(1, pages + 1):
        cards = "\n".join(_card(images[item_id]) for item_id in ids[(page - 1) * per_page : page * per_page])
        content = GALLERY.format(
            title=html.escape(title),
            count=f"{len(ids)} images" + (f", page {page} of {pages}" if pages > 1 else ""),
            pages=_page_links(page, pages),
            cards=cards,
            skipped=f"<h2>Skipped records</h2><ul>{skipped_list}</ul>" if skipped and page == 1 else "",
        )
        atomic.write_bytes(output_dir / _page_name(page), content.encode("utf-8"))
    return output_dir / _page_name(1)


def _page_name(page: int) -> str:
    return "index.html" if page == 1 else f"index-{page}.html"


def _page_links(page: int, pages: int) -> str:
    if pages == 1:
        return ""
    links = [
        f"<b>{number}</b>" if number == page else f'<a href="{_page_name(number)}">{number}</a>'
        for number in range(1, pages + 1)
    ]
    return f"<nav>{' '.join(links)}</nav>"


def _card(record: dict[str, Any]) -> str:
    details = f"seed {record['seed']} · {record['scheduler']} {record['steps']} steps · cfg {record['guidance_scale']}"
    if record.get("nsfw_filtered"):
        details += " · blacked out by the safety checker"
    for lora in record.get("loras") or []:
        details += f" · LoRA {lora['path']} × {lora['scale']}"
    negative = record.get("negative_prompt")
    return (
        f'<figure><a href="{quote(record["file"])}"><img src="{quote(record["file"])}" loading="lazy" '
        f'width="{record["width"]}" height="{record["height"]}" alt="{html.escape(record["prompt"], quote=True)}"></a>'
        f"<figcaption><b>{html.escape(record['prompt'])}</b>"
        + (f"<br><s>{html.escape(negative)}</s>" if negative else "")
        + f"<br><small>{html.escape(record['id'])} · {html.escape(details)}</small></figcaption></figure>"
    )


GALLERY = """<!doctype html>
<html lang="zh">
<meta charset="utf-8">
<title>{title}</title>
<style>
body {{ font-family: system-ui, sans-serif; margin: 2rem; background: #fafafa; color: #222; }}
main {{ display: grid; grid-template-columns: repeat(auto-fill, minmax(220px, 1fr)); gap: 1rem; }}
figure {{ margin: 0; background: #fff; border-radius: 8px; padding: .5rem; box-shadow: 0 1px 3px #0002; }}
img {{ width: 100%; height: auto; image-rendering: pixelated; border-radius: 4px; }}
figcaption {{ font-size: .9rem; margin-top: .4rem; overflow-wrap: anywhere; }}
small {{ color: #666; }}
</style>
<h1>{title}</h1>
<p>{count}</p>
{pages}
<main>
{cards}
</main>
{pages}
{skipped}
</html>
"""
