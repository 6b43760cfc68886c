"""Prompt sources turned into work items: what to render, under which stable id, with which seed.

An item's id comes from where its prompt came from (the record's line or `id`, or the input
image's name) and never from the shard layout or batch size, so the same item gets the same
seed, the same file name and the same pixels however the work is split or restarted.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml
from PIL import Image, UnidentifiedImageError
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from jobs.config import InferenceConfig
from jobs.errors import BadInput

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".webp", ".bmp"}


class PromptRecord(BaseModel):
    """One record of a `.jsonl` or `.yaml` prompts file; unset fields take the job's defaults."""

    model_config = ConfigDict(extra="forbid")

    prompt: str = Field(min_length=1)
    negative_prompt: str | None = None
    seed: int | None = Field(None, ge=0)
    num_images: int | None = Field(None, ge=1, le=1000)
    guidance_scale: float | None = Field(None, ge=0.0, le=50.0)
    image: Path | None = None
    id: str | None = Field(None, pattern=r"^[\w.-]+$", description="Names the output files.")


@dataclass(frozen=True)
class Source:
    """One record as read, before it is checked, so that a bad one can be skipped on its own."""

    where: str  # e.g. "prompts.jsonl line 3", for error messages
    default_id: str  # the id of its items when the record has no `id`
    data: Any  # a parsed record, or a JSON line still to parse


@dataclass(frozen=True)
class WorkItem:
    """One image to render."""

    id: str
    prompt: str
    negative_prompt: str | None
    seed: int
    guidance_scale: float
    image: Path | None  # the input image, for img2img


@dataclass(frozen=True)
class Skipped:
    """A bad record passed over because SKIP_INVALID is set."""

    where: str
    reason: str


@dataclass(frozen=True)
class Work:
    items: list[WorkItem]  # every item of the run, in a stable order
    skipped: list[Skipped]


def plan(config: InferenceConfig, edits_images: bool) -> Work:
    """Read and check the prompt source; raise BadInput on the first bad record unless SKIP_INVALID.
    For img2img (`edits_images`) every record names its input image; for generate none may."""
    items: list[WorkItem] = []
    skipped: list[Skipped] = []
    for source in _read_sources(config):
        try:
            items.extend(_expand(source, config, edits_images))
        except BadInput as error:
            if not config.skip_invalid:
                raise
            skipped.append(Skipped(source.where, str(error).removeprefix(f"{source.where}: ")))
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


def _expand(source: Source, config: InferenceConfig, edits_images: bool) -> list[WorkItem]:
    """A checked record's items: `num_images` of them, ids `<record id>-<k>`."""
    record = _check_record(source, config, edits_images)
    count = record.num_images or config.num_images_per_prompt
    record_id = record.id or source.default_id
    negative_prompt = record.negative_prompt if record.negative_prompt is not None else config.negative_prompt
    guidance_scale = record.guidance_scale if record.guidance_scale is not None else config.guidance_scale
    items = []
    for k in range(count):
        item_id = f"{record_id}-{k}"
        seed = record.seed + k if record.seed is not None else item_seed(config.seed, item_id)
        items.append(WorkItem(item_id, record.prompt, negative_prompt, seed, guidance_scale, record.image))
    return items


def _check_record(source: Source, config: InferenceConfig, edits_images: bool) -> PromptRecord:
    data = source.data
    if isinstance(data, str):
        try:
            data = json.loads(data)
        except json.JSONDecodeError as error:
            raise BadInput(f"{source.where}: not valid JSON ({error.msg} at column {error.colno})") from None
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
    if record.image is not None:
        if not record.image.is_absolute() and config.prompts_file is not None:
            record = record.model_copy(update={"image": config.prompts_file.parent / record.image})
        _check_image(record.image, source.where)
    return record


def _check_image(path: Path, where: str) -> None:
    """Open and verify an input image now, so a bad one fails before the model is loaded."""
    try:
        with Image.open(path) as image:
            image.verify()
    except FileNotFoundError:
        raise BadInput(f"{where}: image {path}: no such file") from None
    except UnidentifiedImageError:
        raise BadInput(f"{where}: image {path}: not a readable image") from None
    except (OSError, SyntaxError) as error:
        raise BadInput(f"{where}: image {path}: not a readable image ({error})") from None


def _read_sources(config: InferenceConfig) -> list[Source]:
    input_dir = getattr(config, "input_dir", None)
    if input_dir is not None:
        return _input_dir_sources(input_dir, config.prompt or "")
    if config.prompt is not None:
        return [Source("PROMPT", "prompt", {"prompt": config.prompt})]
    path = config.prompts_file
    assert path is not None  # the configuration requires one of the sources
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as error:
        raise BadInput(f"PROMPTS_FILE {path}: cannot read it ({error})") from None
    suffix = path.suffix.lower()
    lines = [(n, line.strip()) for n, line in enumerate(text.splitlines(), 1) if line.strip()]
    if suffix == ".txt":
        sources = [Source(f"{path.name} line {n}", f"{n:05d}", {"prompt": line}) for n, line in lines]
    elif suffix == ".jsonl":
        sources = [Source(f"{path.name} line {n}", f"{n:05d}", line) for n, line in lines]
    elif suffix in (".yaml", ".yml"):
        sources = _yaml_sources(path, text)
    else:
        raise BadInput(f"PROMPTS_FILE {path}: unknown format {suffix!r}, use .txt, .jsonl or .yaml")
    if not sources:
        raise BadInput(f"PROMPTS_FILE {path}: no prompts in it")
    return sources


def _yaml_sources(path: Path, text: str) -> list[Source]:
    """A YAML list of records (or of plain prompts), each named by the line it starts on."""
    loader = yaml.SafeLoader(text)
    try:
        node = loader.get_single_node()
        if node is None:
            return []
        data = loader.construct_document(node)
    except yaml.YAMLError as error:
        mark = getattr(error, "problem_mark", None)
        line = f" line {mark.line + 1}" if mark else ""
        raise BadInput(f"PROMPTS_FILE {path}{line}: not valid YAML ({getattr(error, 'problem', error)})") from None
    finally:
        loader.dispose()
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
