"""Prompt sources turned into work items: what to render, under which stable id, with which settings.

An item's id comes from where its prompt came from (the record's line or `id`, the input image's
name, or for a single PROMPT the prompt itself) and never from the shard layout or batch size, so
the same item gets the same seed, the same file name and the same pixels however the work is split
or restarted. A record may set its own steps, size and sampler, as A1111's prompts-from-file does.
Input images are decoded whole here, on a thread pool, so a bad one fails before the model loads.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import re
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import yaml
from PIL import Image
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from jobs import text
from jobs.config import InferenceConfig
from jobs.errors import BadInput
from jobs.models import SCHEDULERS

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".webp", ".bmp"}


class PromptRecord(BaseModel):
    """One record of a `.jsonl` or `.yaml` prompts file; unset fields take the job's settings."""

    model_config = ConfigDict(extra="forbid")

    prompt: str = Field(min_length=1)
    negative_prompt: str | None = None
    seed: int | None = Field(None, ge=0, lt=2**63)
    num_images: int | None = Field(None, ge=1, le=1000)
    guidance_scale: float | None = Field(None, ge=0.0, le=50.0)
    num_inference_steps: int | None = Field(None, ge=1, le=1000)
    width: int | None = Field(None, ge=8, le=4096, multiple_of=8)
    height: int | None = Field(None, ge=8, le=4096, multiple_of=8)
    scheduler: Literal[tuple(SCHEDULERS)] | None = None  # type: ignore[valid-type]
    image: Path | None = None
    id: str | None = Field(None, pattern=r"^[\w.-]+$", max_length=200, description="Names the output files.")


@dataclass(frozen=True)
class Source:
    """One record as read, before it is checked, so that a bad one can be skipped on its own."""

    where: str  # e.g. "prompts.jsonl line 3", for error messages
    default_id: str  # the id of its items when the record has no `id`
    data: Any  # a parsed record, or a JSON line still to parse


@dataclass(frozen=True)
class InputImage:
    """An img2img input, decoded whole: its size, and its content's hash (part of its items' requests)."""

    path: Path
    size: tuple[int, int]
    sha256: str


@dataclass(frozen=True)
class WorkItem:
    """One image to render, with every setting it is rendered with."""

    id: str
    prompt: str
    negative_prompt: str | None
    seed: int
    guidance_scale: float
    steps: int
    scheduler: str
    width: int  # for img2img, the input fitted to the size asked for
    height: int
    image: InputImage | None  # img2img's input


@dataclass(frozen=True)
class Skipped:
    """A bad record passed over because SKIP_INVALID is set."""

    where: str
    reason: str


@dataclass(frozen=True)
class Work:
    items: list[WorkItem]  # every item of the run, in a stable order
    skipped: list[Skipped]


def plan(config: InferenceConfig, edits_images: bool, resolution: int) -> Work:
    """Read and check the prompt source; raise BadInput on the first bad record unless SKIP_INVALID.
    For img2img (`edits_images`) every record names its input image; for generate none may.
    `resolution` is the model's size, for what neither the record nor the job sets."""
    records: list[tuple[Source, PromptRecord]] = []
    skipped: list[Skipped] = []

    def skip_or_raise(source: Source, error: BadInput) -> None:
        if not config.skip_invalid:
            raise error
        skipped.append(Skipped(source.where, str(error).removeprefix(f"{source.where}: ")))

    for source in _read_sources(config):
        try:
            records.append((source, _check_record(source, config, edits_images)))
        except BadInput as error:
            skip_or_raise(source, error)
    images = check_images([record.image for _, record in records if record.image is not None])
    items: list[WorkItem] = []
    for source, record in records:
        try:
            items.extend(_expand(source, record, config, images, resolution))
        except BadInput as error:
            skip_or_raise(source, error)
    if not items:
        raise BadInput("nothing to render: every record is invalid" if skipped else "no prompts to render")
    counts = Counter(item.id for item in items)
    duplicates = sorted(item_id for item_id, count in counts.items() if count > 1)
    if duplicates:
        raise BadInput(f"duplicate item ids {duplicates[:5]}: give the records distinct `id`s")
    return Work(items, skipped)


def item_seed(base_seed: int, item_id: str) -> int:
    """A seed of its own for every item, from the run's SEED and the item's id (not its position)."""
    digest = hashlib.sha256(f"{base_seed}:{item_id}".encode()).digest()
    return int.from_bytes(digest[:8], "big") >> 1  # 63 bits: what torch.Generator.manual_seed takes


def shard_of(items: list[WorkItem], shard_index: int, num_shards: int) -> list[WorkItem]:
    """Item i belongs to shard i % NUM_SHARDS."""
    return items[shard_index::num_shards]


def fitted_size(size: tuple[int, int], box: tuple[int, int]) -> tuple[int, int]:
    """Scale to fit the box keeping the aspect ratio, like the seed's `thumbnail`, in multiples of 8."""
    scale = min(box[0] / size[0], box[1] / size[1])
    return tuple(max(8, round(side * scale / 8) * 8) for side in size)  # type: ignore[return-value]


def _expand(
    source: Source, record: PromptRecord, config: InferenceConfig, images: dict[Path, InputImage | str], resolution: int
) -> list[WorkItem]:
    """A checked record's items: `num_images` of them, ids `<record id>-<k>`."""
    scheduler = record.scheduler or config.scheduler
    steps = record.num_inference_steps or config.num_inference_steps or SCHEDULERS[scheduler][2]
    width = record.width or config.width or resolution
    height = record.height or config.height or resolution
    image = None
    if record.image is not None:
        image = images[record.image]
        if isinstance(image, str):
            raise BadInput(f"{source.where}: image {record.image}: {image}")
        width, height = fitted_size(image.size, (width, height))
        strength = config.strength  # type: ignore[attr-defined]
        if int(steps * strength) < 1:
            raise BadInput(f"{source.where}: STRENGTH {strength} with {steps} steps runs no denoising step")
    negative_prompt = record.negative_prompt if record.negative_prompt is not None else config.negative_prompt
    guidance_scale = record.guidance_scale if record.guidance_scale is not None else config.guidance_scale
    record_id = record.id or source.default_id
    items = []
    for k in range(record.num_images or config.num_images_per_prompt):
        item_id = f"{record_id}-{k}"
        seed = record.seed + k if record.seed is not None else item_seed(config.seed, item_id)
        items.append(
            WorkItem(
                item_id, record.prompt, negative_prompt, seed, guidance_scale, steps, scheduler, width, height, image
            )
        )
    return items


def _check_record(source: Source, config: InferenceConfig, edits_images: bool) -> PromptRecord:
    data = source.data
    if isinstance(data, str):
        try:
            data = json.loads(data)
        except json.JSONDecodeError as error:
            raise BadInput(f"{source.where}: not valid JSON ({error.msg} at column {error.colno})") from None
        except RecursionError:
            raise BadInput(f"{source.where}: not valid JSON (nested too deeply)") from None
    if not isinstance(data, dict):
        raise BadInput(f"{source.where}: expected a record with a `prompt`, got {type(data).__name__}")
    try:
        record = PromptRecord.model_validate(data)
    except ValidationError as error:
        problems = "; ".join(f"{'.'.join(map(str, e['loc'])) or 'record'}: {e['msg']}" for e in error.errors())
        raise BadInput(f"{source.where}: {problems}") from None
    if record.image is not None and not edits_images:
        raise BadInput(f"{source.where}: `image` is only for img2img")
    if edits_images and record.image is None:
        raise BadInput(f"{source.where}: img2img needs an `image`")
    if record.image is not None and not record.image.is_absolute() and config.prompts_file is not None:
        record = record.model_copy(update={"image": config.prompts_file.parent / record.image})
    return record


def check_images(paths: list[Path]) -> dict[Path, InputImage | str]:
    """Every input image read and decoded whole, on a thread pool (PIL decodes outside the GIL):
    its InputImage, or why it cannot be used. 10,000 inputs take seconds (bench/bookkeeping.py)."""
    unique = list(dict.fromkeys(paths))
    with ThreadPoolExecutor(min(32, 4 * (os.cpu_count() or 1)), thread_name_prefix="check") as pool:
        return dict(zip(unique, pool.map(_check_image, unique), strict=True))


def _check_image(path: Path) -> InputImage | str:
    try:
        data = path.read_bytes()
        with Image.open(io.BytesIO(data)) as image:
            image.load()  # decodes every byte: `verify()` passes a truncated JPEG
            size = image.size
    except FileNotFoundError:
        return "no such file"
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as error:
        return f"not a readable image ({error})"
    return InputImage(path, size, hashlib.sha256(data).hexdigest())


def _read_sources(config: InferenceConfig) -> list[Source]:
    input_dir = getattr(config, "input_dir", None)
    if input_dir is not None:
        return _input_dir_sources(input_dir, config.prompt or "")
    if config.prompt is not None:
        # Named by the prompt: runs of different single prompts into one folder each keep their image.
        digest = hashlib.sha256(config.prompt.encode()).hexdigest()[:12]
        return [Source("PROMPT", f"prompt-{digest}", {"prompt": config.prompt})]
    path = config.prompts_file
    assert path is not None  # the configuration requires one of the sources
    content = text.read(path, "PROMPTS_FILE")
    suffix = path.suffix.lower()
    lines = [(n, line.strip()) for n, line in enumerate(content.splitlines(), 1) if line.strip()]
    if suffix == ".txt":
        sources = [Source(f"{path.name} line {n}", f"{n:05d}", {"prompt": line}) for n, line in lines]
    elif suffix == ".jsonl":
        sources = [Source(f"{path.name} line {n}", f"{n:05d}", line) for n, line in lines]
    elif suffix in (".yaml", ".yml"):
        sources = _yaml_sources(path, content)
    else:
        raise BadInput(f"PROMPTS_FILE {path}: unknown format {suffix!r}, use .txt, .jsonl or .yaml")
    if not sources:
        raise BadInput(f"PROMPTS_FILE {path}: no prompts in it")
    return sources


def _yaml_sources(path: Path, content: str) -> list[Source]:
    """A YAML list of records (or of plain prompts), each named by the line it starts on."""
    try:
        loader = yaml.SafeLoader(content)  # its reader already refuses some characters
        try:
            node = loader.get_single_node()
            if node is None:
                return []
            data = loader.construct_document(node)
        finally:
            loader.dispose()
    except (yaml.YAMLError, RecursionError) as error:
        raise text.yaml_error(f"PROMPTS_FILE {path}", error) from None
    if not isinstance(data, list):
        raise BadInput(f"PROMPTS_FILE {path}: expected a list of records")
    sources = []
    for element, value in zip(node.value, data, strict=True):
        line = element.start_mark.line + 1
        record = {"prompt": value} if isinstance(value, str) else value
        sources.append(Source(f"{path.name} line {line}", f"{line:05d}", record))
    return sources


def _input_dir_sources(input_dir: Path, prompt: str) -> list[Source]:
    """Every image of INPUT_DIR, edited with PROMPT; other files (manifests, index.html) are left alone."""
    if not input_dir.is_dir():
        raise BadInput(f"INPUT_DIR {input_dir}: no such folder")
    images = sorted(p for p in input_dir.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
    if not images:
        raise BadInput(f"INPUT_DIR {input_dir}: no images ({', '.join(sorted(IMAGE_SUFFIXES))})")
    return [
        Source(f"INPUT_DIR {p.name}", re.sub(r"[^\w.-]", "_", p.stem), {"prompt": prompt, "image": str(p)})
        for p in images
    ]
