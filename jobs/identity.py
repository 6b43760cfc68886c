"""An image's identity is its request: what it was asked for, and what a rerun does with the images OUTPUT_DIR holds.

An item's request is everything that decides its pixels and that a user chooses: the prompt and
negative prompt, seed, guidance scale, steps, sampler, size, the model and its revision, the LoRAs
(by their files' content) and scales, and for img2img the strength and the input image's content.
Not the hardware, the precision or the batch size: a retry on another node, or with another
BATCH_SIZE, still skips the finished work.

A finished item whose request is unchanged is skipped. One whose request changed (an edited prompts
file, a changed setting) is never skipped silently: the job stops with exit code 2 before the model
loads, naming the first such item and what changed, and changes nothing in OUTPUT_DIR; with
OVERWRITE=true it renders exactly those items again. What is finished is read from one listing of
OUTPUT_DIR and the manifests, not a file check per item.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from jobs import outputs
from jobs.config import InferenceConfig
from jobs.errors import BadInput
from jobs.models import Lora
from jobs.prompts import WorkItem

# A record written before requests were recorded lacks the last three: they are left out of its comparison.
REQUEST_FIELDS = (
    *("prompt", "negative_prompt", "seed", "guidance_scale", "steps", "scheduler", "width", "height", "model"),
    *("strength", "revision", "loras", "input_image_sha256"),
)


@dataclass(frozen=True)
class RunRequest:
    """The part of every item's request that the run sets."""

    model: str
    revision: str | None
    loras: list[dict[str, Any]]  # name, sha256 and scale of each LoRA, in order
    strength: float | None  # img2img's

    @classmethod
    def of(cls, config: InferenceConfig, loras: list[Lora]) -> RunRequest:
        scales = config.lora_scale * len(loras) if len(config.lora_scale) == 1 else config.lora_scale
        listed = [{"path": lora.name, "sha256": lora.sha256, "scale": s} for lora, s in zip(loras, scales, strict=True)]
        return cls(config.pretrained_model_name_or_path, config.revision, listed, getattr(config, "strength", None))


def request(item: WorkItem, run: RunRequest) -> dict[str, Any]:
    return {
        "prompt": item.prompt,
        "negative_prompt": item.negative_prompt,
        "seed": item.seed,
        "guidance_scale": item.guidance_scale,
        "steps": item.steps,
        "scheduler": item.scheduler,
        "width": item.width,
        "height": item.height,
        "model": run.model,
        "strength": run.strength,
        "revision": run.revision,
        "loras": run.loras,
        "input_image_sha256": item.image.sha256 if item.image else None,
    }


def changes(record: dict[str, Any], wanted: dict[str, Any]) -> list[str]:
    """What differs between an image's record and the request for it, as `name old -> new`."""
    return [
        f"{name} {record[name]!r} -> {wanted[name]!r}"
        for name in REQUEST_FIELDS
        if name in record and record[name] != wanted[name]
    ]


@dataclass
class Decision:
    """What this shard's run does, decided without changing OUTPUT_DIR."""

    to_render: list[WorkItem] = field(default_factory=list)
    recovered: list[dict[str, Any]] = field(default_factory=list)  # records of PNGs a kill left unlisted
    unusable: list[Path] = field(default_factory=list)  # PNGs with no record of ours: rendered again


def decide(items: list[WorkItem], run: RunRequest, ledger: outputs.Ledger, overwrite: bool) -> Decision:
    """Sort this shard's items into finished, to render, and changed (BadInput unless `overwrite`)."""
    output_dir = ledger.output_dir
    present = {entry.name for entry in os.scandir(output_dir)}
    records = ledger.images
    decision, changed = Decision(), []
    for item in items:
        name = f"{item.id}.png"
        if name not in present:
            decision.to_render.append(item)
            continue
        record = records.get(item.id)
        if record is None:  # renamed into place, then killed before its manifest line
            record = outputs.read_png_record(output_dir / name)
            if record is None:
                decision.unusable.append(output_dir / name)
                decision.to_render.append(item)
                continue
        differences = changes(record, request(item, run))
        if differences:
            changed.append((item, differences))
            decision.to_render.append(item)
        elif item.id not in records:
            decision.recovered.append(record)
    if changed and not overwrite:
        item, differences = changed[0]
        more = f" (and {len(changed) - 1} more changed items)" if len(changed) > 1 else ""
        raise BadInput(
            f"{item.id} in {output_dir} was rendered for another request: {', '.join(differences)}{more};"
            " set OVERWRITE=true (--overwrite) to render the changed items again, or use another OUTPUT_DIR"
        )
    return decision
