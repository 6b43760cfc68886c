"""The batch runner behind `generate` and `img2img`: check everything, load once, render the shard.

Order matters: every input is checked (prompts, images, OUTPUT_DIR, model, LoRA) before the model
is loaded, so bad input costs seconds, not a GPU's start-up; finished items are skipped before
loading too, so a rerun of a finished shard loads nothing.
"""

from __future__ import annotations

import logging
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from itertools import groupby
from pathlib import Path
from typing import Any

import torch
from diffusers import DiffusionPipeline, StableDiffusionImg2ImgPipeline, StableDiffusionPipeline
from PIL import Image

from jobs import atomic, models, outputs
from jobs.config import GenerateConfig, Img2ImgConfig, InferenceConfig
from jobs.errors import BadInput
from jobs.progress import Progress
from jobs.prompts import Work, WorkItem, plan, shard_of

log = logging.getLogger("jobs")


@dataclass(frozen=True)
class Mode:
    """What sets the two jobs apart: the pipeline, and whether each item edits an input image."""

    job: str
    pipeline_cls: type[DiffusionPipeline]
    edits_images: bool


TEXT_TO_IMAGE = Mode("generate", StableDiffusionPipeline, edits_images=False)
IMAGE_TO_IMAGE = Mode("img2img", StableDiffusionImg2ImgPipeline, edits_images=True)


def generate(config: GenerateConfig) -> None:
    run(config, TEXT_TO_IMAGE)


def img2img(config: Img2ImgConfig) -> None:
    run(config, IMAGE_TO_IMAGE)


@dataclass(frozen=True)
class Settings:
    """What the loaded model and the configuration fix for every image of the run."""

    job: str
    model: str
    scheduler: str
    steps: int
    dtype: str
    width: int
    height: int
    strength: float | None
    lora: str | None
    lora_scale: float | None


def run(config: InferenceConfig, mode: Mode) -> None:
    """Render this shard's unfinished items into OUTPUT_DIR, refresh the gallery, log a summary."""
    started = time.perf_counter()
    work, steps, lora = check_inputs(config, mode)
    manifest = outputs.Manifest(config.output_dir, config.shard_index)
    mine = shard_of(work.items, config.shard_index, config.num_shards)
    todo = unfinished(mine, work, manifest, config)
    log.info("work", extra={"fields": {"items": len(work.items), "shard": len(mine), "to_render": len(todo)}})
    if todo:
        pipe, settings = prepare_pipeline(config, mode, steps, lora)
        # Batching pays on a GPU. On a CPU it is no faster, and BLAS picks different kernels for
        # different row counts, which would make an image's last bits depend on its batch.
        batch_size = config.batch_size if pipe.device.type != "cpu" else 1
        render_all(pipe, todo, settings, batch_size, manifest, config.output_dir, len(mine))
    gallery = outputs.write_gallery(config.output_dir, f"pai-diffusion {mode.job}: {config.output_dir.name}")
    seconds = time.perf_counter() - started
    summary = (
        f"{mode.job}: {len(todo)} images in {seconds:.1f} s ({len(todo) / seconds:.2f} images/s); gallery {gallery}"
    )
    fields = {"images": len(todo), "seconds": round(seconds, 2), "skipped_records": len(work.skipped)}
    log.info(summary, extra={"fields": fields})


def check_inputs(config: InferenceConfig, mode: Mode) -> tuple[Work, int, Path | dict[str, torch.Tensor] | None]:
    """Everything that can be wrong with the input, checked before the model is loaded (BadInput)."""
    steps = config.num_inference_steps or models.SCHEDULERS[config.scheduler][2]
    strength = getattr(config, "strength", None)  # img2img's
    if strength is not None and int(steps * strength) < 1:
        raise BadInput(f"STRENGTH {strength} with {steps} steps runs no denoising step: raise either")
    work = plan(config, mode.edits_images)
    outputs.check_writable(config.output_dir)
    models.check_model_source(config)
    lora = models.read_lora(config.lora_path) if config.lora_path else None
    return work, steps, lora


def unfinished(mine: list[WorkItem], work: Work, manifest: outputs.Manifest, config: InferenceConfig) -> list[WorkItem]:
    """This shard's items without a PNG, after repairing what a kill may have left."""
    recover(mine, manifest, config.output_dir)
    if config.shard_index == 0:  # every shard reads the same prompts; one lists the skipped records
        list_skipped(work, manifest)
    return [item for item in mine if not (config.output_dir / f"{item.id}.png").exists()]


def prepare_pipeline(
    config: InferenceConfig, mode: Mode, steps: int, lora: Path | dict[str, torch.Tensor] | None
) -> tuple[DiffusionPipeline, Settings]:
    """Load the model once, with its sampler and LoRA, and fix what every image of the run shares."""
    device = models.resolve_device(config.device)
    dtype = models.resolve_dtype(config.dtype, device)
    # A LoRA is fused in fp32 and rounded once, as the `lora` job's merged copy is: fused in half
    # precision, its small deltas would be rounded twice.
    load_dtype = torch.float32 if lora is not None else dtype
    pipe = models.load_pipeline(config, mode.pipeline_cls, device, load_dtype, config.safety_checker)
    models.set_scheduler(pipe, config.scheduler)
    if lora is not None:
        models.apply_lora(pipe, lora, config.lora_scale, str(config.lora_path))
        pipe.to(dtype=dtype)
    # One image at a time: a batch's decode would need 1.7x the memory of its denoising (SD 1.x at
    # 512 px: 360 MB an image against 210 MB), and it would cap BATCH_SIZE (docs/benchmarks.md).
    pipe.vae.enable_slicing()
    if config.compile:
        # The whole UNet: at inference its resnets gain too (1.19x, against 1.07x for the transformer blocks alone).
        pipe.unet = torch.compile(pipe.unet)
    resolution = models.default_resolution(config, pipe)
    settings = Settings(
        job=mode.job,
        model=config.pretrained_model_name_or_path,
        scheduler=config.scheduler,
        steps=steps,
        dtype=str(dtype).removeprefix("torch."),
        width=config.width or resolution,
        height=config.height or resolution,
        strength=getattr(config, "strength", None),
        lora=str(config.lora_path) if config.lora_path else None,
        lora_scale=config.lora_scale if config.lora_path else None,
    )
    return pipe, settings


def render_all(
    pipe: DiffusionPipeline,
    items: list[WorkItem],
    settings: Settings,
    batch_size: int,
    manifest: outputs.Manifest,
    output_dir: Path,
    shard_size: int,
) -> None:
    """Render batch after batch while a writer thread saves the previous one.

    Encoding a 512x512 PNG takes 5-30 ms, which a GPU at 10 images/s cannot spare on its own thread.
    One writer with at most one batch queued keeps memory bounded and the manifest in order; on the
    way out (SIGTERM included) the queued batch is still written.
    """
    progress = Progress(total=shard_size, unit="image", initial=shard_size - len(items))
    queued: Future | None = None
    try:
        with ThreadPoolExecutor(max_workers=1, thread_name_prefix="writer") as writer:
            for batch in batches(items, batch_size, settings):
                batch_started = time.perf_counter()
                images, flagged = render(pipe, batch, settings, batch_size)
                seconds = round((time.perf_counter() - batch_started) / len(batch), 3)
                records = [
                    image_record(item, settings, image, nsfw, seconds)
                    for item, image, nsfw in zip(batch, images, flagged, strict=True)
                ]
                if queued is not None:
                    queued.result()  # a failed write stops the run here, not batches later
                queued = writer.submit(save_batch, images, records, manifest, output_dir)
                progress.update(len(batch))
            if queued is not None:
                queued.result()
    finally:
        progress.close()


def save_batch(
    images: list[Image.Image], records: list[dict[str, Any]], manifest: outputs.Manifest, output_dir: Path
) -> None:
    """Each PNG is renamed into place before its manifest line is appended (see `recover`)."""
    for image, record in zip(images, records, strict=True):
        atomic.write_bytes(output_dir / record["file"], outputs.png_with_record(image, record))
        manifest.append(record)


def batches(items: list[WorkItem], batch_size: int, settings: Settings) -> list[list[WorkItem]]:
    """Consecutive items that can share a forward pass: same guidance scale and input size."""
    result = []
    for _, group in groupby(items, key=lambda item: (item.guidance_scale, input_size(item, settings))):
        group = list(group)
        result.extend(group[i : i + batch_size] for i in range(0, len(group), batch_size))
    return result


def render(
    pipe: DiffusionPipeline, batch: list[WorkItem], settings: Settings, batch_size: int
) -> tuple[list[Image.Image], list[bool]]:
    """One forward pass: the images, and whether the safety checker blacked each out.

    Every image has its own generator (on the CPU, so that a GPU draws the same noise), so its noise
    does not depend on its batch; a short batch is padded to `batch_size` so every pass has the same
    shape, hence the same kernels."""
    padded = batch + [batch[-1]] * (batch_size - len(batch))
    arguments: dict[str, Any] = {
        "prompt": [item.prompt for item in padded],
        "negative_prompt": [item.negative_prompt or "" for item in padded],
        "num_inference_steps": settings.steps,
        "guidance_scale": batch[0].guidance_scale,
        "generator": [torch.Generator("cpu").manual_seed(item.seed) for item in padded],
    }
    if settings.strength is None:
        arguments.update(width=settings.width, height=settings.height)
    else:
        arguments.update(image=[fit_image(item.image, settings) for item in padded], strength=settings.strength)
    result = pipe(**arguments)
    flagged = result.nsfw_content_detected or [False] * len(padded)  # None without a safety checker
    return result.images[: len(batch)], flagged[: len(batch)]


def input_size(item: WorkItem, settings: Settings) -> tuple[int, int]:
    if item.image is None:
        return settings.width, settings.height
    with Image.open(item.image) as image:
        return fitted_size(image.size, (settings.width, settings.height))


def fitted_size(size: tuple[int, int], box: tuple[int, int]) -> tuple[int, int]:
    """Scale to fit the box keeping the aspect ratio, like the seed's `thumbnail`, in multiples of 8."""
    scale = min(box[0] / size[0], box[1] / size[1])
    return tuple(max(8, round(side * scale / 8) * 8) for side in size)  # type: ignore[return-value]


def fit_image(path: Path | None, settings: Settings) -> Image.Image:
    assert path is not None
    with Image.open(path) as image:
        image = image.convert("RGB")
    return image.resize(fitted_size(image.size, (settings.width, settings.height)), Image.Resampling.LANCZOS)


def image_record(item: WorkItem, settings: Settings, image: Image.Image, nsfw: bool, seconds: float) -> dict[str, Any]:
    """The manifest line of one image, also embedded in its PNG."""
    record = {
        "id": item.id,
        "file": f"{item.id}.png",
        "job": settings.job,
        "prompt": item.prompt,
        "negative_prompt": item.negative_prompt,
        "seed": item.seed,
        "steps": settings.steps,
        "scheduler": settings.scheduler,
        "dtype": settings.dtype,
        "guidance_scale": item.guidance_scale,
        "model": settings.model,
        "lora": settings.lora,
        "lora_scale": settings.lora_scale,
        "width": image.width,
        "height": image.height,
        "nsfw_filtered": bool(nsfw),
        "seconds": seconds,
    }
    if item.image is not None:
        record.update(input_image=str(item.image), strength=settings.strength)
    return record


def recover(items: list[WorkItem], manifest: outputs.Manifest, output_dir: Path) -> None:
    """Repair after a kill: drop half-written temporaries, and put back the manifest lines of PNGs
    that were renamed into place but not yet listed, from the records embedded in them."""
    atomic.remove_leftovers(output_dir, {f"{item.id}.png" for item in items})
    listed = outputs.listed_ids(output_dir)
    for item in items:
        path = output_dir / f"{item.id}.png"
        if item.id in listed or not path.exists():
            continue
        record = outputs.read_png_record(path)
        if record is None:
            path.unlink()  # not ours, or damaged: render it again
            continue
        manifest.append(record)
        log.info("recovered manifest record", extra={"fields": {"id": item.id}})


def list_skipped(work: Work, manifest: outputs.Manifest) -> None:
    """SKIP_INVALID: name each skipped record in the manifest once, and in the log every run."""
    listed = {record["skipped"] for record in manifest.records if "skipped" in record}
    for skipped in work.skipped:
        if skipped.where not in listed:
            manifest.append({"skipped": skipped.where, "reason": skipped.reason})
        log.warning("skipped %s: %s", skipped.where, skipped.reason)
