"""What a run leaves in OUTPUT_DIR: PNGs, one JSON-lines manifest per shard, and `index.html`.

Crash safety (a pod can be SIGKILLed at any instant): every file is written under a temporary
name and renamed, so a reader never sees half a file; the PNG is renamed into place *before* its
manifest line is appended, and it carries the same record in a text chunk. So on restart an
item is finished exactly when its PNG exists, and a PNG whose manifest line was lost is put back
into the manifest from its own embedded record.
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

from jobs import atomic
from jobs.errors import BadInput

PNG_TEXT_KEY = "parameters"
MANIFEST_GLOB = "manifest-*.jsonl"


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
    """The image as PNG bytes, with its generation record embedded as JSON text."""
    info = PngInfo()
    info.add_text(PNG_TEXT_KEY, json.dumps(record, ensure_ascii=False))
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", pnginfo=info)
    return buffer.getvalue()


def read_png_record(path: Path) -> dict[str, Any] | None:
    """The record embedded in one of our PNGs, or None if it has none (or is not ours)."""
    try:
        with Image.open(path) as image:
            text = image.text.get(PNG_TEXT_KEY)  # type: ignore[attr-defined]
        return json.loads(text) if text else None
    except (OSError, ValueError):
        return None


class Manifest:
    """One shard's JSON-lines manifest: a record per finished image, plus skipped prompt records."""

    def __init__(self, output_dir: Path, shard_index: int):
        self.path = output_dir / f"manifest-{shard_index:05d}.jsonl"
        self._drop_torn_last_line()
        self.records = read_records(self.path)

    def append(self, record: dict[str, Any]) -> None:
        """Append one line and fsync it: after a crash the file ends with whole lines or a torn last one."""
        with open(self.path, "a", encoding="utf-8") as file:
            file.write(json.dumps(record, ensure_ascii=False) + "\n")
            file.flush()
            os.fsync(file.fileno())
        self.records.append(record)

    def _drop_torn_last_line(self) -> None:
        """A kill mid-append leaves a partial last line: cut it, its PNG will be recovered."""
        if not self.path.exists():
            return
        data = self.path.read_bytes()
        if data and not data.endswith(b"\n"):
            os.truncate(self.path, data.rfind(b"\n") + 1)


def listed_ids(output_dir: Path) -> set[str]:
    """Ids of the images in any shard's manifest (an earlier run may have had another shard layout)."""
    return {r["id"] for path in output_dir.glob(MANIFEST_GLOB) for r in read_records(path) if "id" in r}


def read_records(path: Path) -> list[dict[str, Any]]:
    """A manifest's whole lines; a last line without its newline is still being written (or was torn)."""
    if not path.exists():
        return []
    complete_lines = path.read_bytes().split(b"\n")[:-1]  # bytes: a torn line may end mid-character
    return [json.loads(line) for line in complete_lines if line.strip()]


def write_gallery(output_dir: Path, title: str) -> Path:
    """index.html over every shard's manifest (one entry per image id), written atomically."""
    images: dict[str, dict[str, Any]] = {}
    skipped: dict[str, dict[str, Any]] = {}
    for manifest in sorted(output_dir.glob(MANIFEST_GLOB)):
        for record in read_records(manifest):
            if "skipped" in record:
                skipped[record["skipped"]] = record
            else:
                images[record["id"]] = record
    cards = "\n".join(_card(images[item_id]) for item_id in sorted(images))
    skipped_list = "".join(
        f"<li>{html.escape(where)}: {html.escape(record['reason'])}</li>" for where, record in sorted(skipped.items())
    )
    page = GALLERY.format(
        title=html.escape(title),
        count=len(images),
        cards=cards,
        skipped=f"<h2>Skipped records</h2><ul>{skipped_list}</ul>" if skipped else "",
    )
    path = output_dir / "index.html"
    atomic.write_bytes(path, page.encode("utf-8"))
    return path


def _card(record: dict[str, Any]) -> str:
    details = f"seed {record['seed']} · {record['scheduler']} {record['steps']} steps · cfg {record['guidance_scale']}"
    if record.get("nsfw_filtered"):
        details += " · blacked out by the safety checker"
    if record.get("lora"):
        details += f" · LoRA {record['lora']} × {record['lora_scale']}"
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
<p>{count} images</p>
<main>
{cards}
</main>
{skipped}
</html>
"""
