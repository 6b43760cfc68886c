"""The batch runner behind `generate` and `img2img`: check everything, load once, render the shard.

Order matters: every input is checked (prompts, images, OUTPUT_DIR, model, LoRAs) and every finished
image compared with its request (jobs/identity.py) before the model is loaded, so bad input costs
seconds, not a GPU's start-up, and a rerun of a finished shard loads nothing.
"""

from __future__ import annotations

import logging
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from diffusers import DiffusionPipeline, StableDiffusionImg2ImgPipeline, StableDiffusionPipeline
from PIL import Image

from jobs import atomic, compiling, identity, models, outputs
from jobs.config import GenerateConfig, Img2ImgConfig, InferenceConfig
from jobs.errors import BadInput
from jobs.identity import RunRequest, request
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
    dtype: str
    run: RunRequest


def run(config: InferenceConfig, mode: Mode) -> None:
    """Render this shard's unfinished items into OUTPUT_DIR, refresh the gallery, log a summary."""
    started = time.perf_counter()
    work, run_request, loras = check_inputs(config, mode)
    mine = shard_of(work.items, config.shard_index, config.num_shards)
    ledger = outputs.Ledger(config.output_dir)
    decision = identity.decide(mine, run_request, ledger, config.overwrite)
    manifest = outputs.Manifest(config.output_dir, config.shard_index, ledger)  # from here on OUTPUT_DIR may change
    repair(decision, mine, manifest, config.output_dir)
    if config.shard_index == 0:  # every shard reads the same prompts; one lists the skipped records
        list_skipped(work, manifest)
    todo = decision.to_render
    log.info("work", extra={"fields": {"items": len(work.items), "shard": len(mine), "to_render": len(todo)}})
    if todo:
        device = models.resolve_device(config.device)
        dtype = models.resolve_dtype(config.dtype, device)
        # Batching pays on a GPU. On a CPU it is no faster, and BLAS picks different kernels for
        # different row counts, which would make an image's last bits depend on its batch.
        batch_size = config.batch_size if device.type != "cpu" else 1
        cache = compile_cache(config, device, dtype, batch_size, todo)
        pipe, settings = prepare_pipeline(config, mode, run_request, loras, cache is not None)
        render_all(pipe, todo, settings, batch_size, manifest, config.output_dir, len(mine), cache)
    gallery = outputs.write_gallery(config.output_dir, f"pai-diffusion {mode.job}: {config.output_dir.name}", ledger)
    seconds = time.perf_counter() - started
    summary = (
        f"{mode.job}: {len(todo)} images in {seconds:.1f} s ({len(todo) / seconds:.2f} images/s); gallery {gallery}"
    )
    fields = {"images": len(todo), "seconds": round(seconds, 2), "skipped_records": len(work.skipped)}
    log.info(summary, extra={"fields": fields})


def check_inputs(config: InferenceConfig, mode: Mode) -> tuple[Work, RunRequest, list[models.Lora]]:
    """Everything that can be wrong with the input, checked before the model is loaded (BadInput)."""
    strength = getattr(config, "strength", None)  # img2img's; records that set their own steps are checked too
    steps = config.num_inference_steps or models.SCHEDULERS[config.scheduler][2]
    if strength is not None and int(steps * strength) < 1:
        raise BadInput(f"STRENGTH {strength} with {steps} steps runs no denoising step: raise either")
    outputs.check_writable(config.output_dir)
    models.check_model_source(config)
    work = plan(config, mode.edits_images, models.default_resolution(config))
    loras = models.read_loras(config.lora_path, config.lora_scale)
    return work, RunRequest.of(config, loras), loras


def repair(decision: identity.Decision, items: list[WorkItem], manifest: outputs.Manifest, output_dir: Path) -> None:
    """What a kill may have left: half-written temporaries, PNGs renamed into place but not yet listed
    (their manifest lines are put back from the records embedded in them), files that are not ours."""
    atomic.remove_leftovers(output_dir, {f"{item.id}.png" for item in items})
    for record in decision.recovered:
        manifest.append(record)
        log.info("recovered manifest record", extra={"fields": {"id": record["id"]}})
    for path in decision.unusable:
        path.unlink()


def compile_cache(
    config: InferenceConfig, device: torch.device, dtype: torch.dtype, batch_size: int, todo: list[WorkItem]
) -> compiling.CompileCache | None:
    """Whether to compile (COMPILE), said in the log with why; if so, the compile cache it loads from."""
    cache, warm, widest = None, False, 0
    if config.compile != "false":
        sizes = sorted({(item.width, item.height) for item in todo})
        key = {"kind": "inference", "device": compiling.device_name(device), "dtype": str(dtype), "batch": batch_size}
        key |= {"model": models.model_identity(config), "sizes": sizes}
        cache = compiling.CompileCache.for_key(config.compile_cache_dir or compiling.default_directory(), key)
        warm, widest = cache.warm, models.unet_width(config)
    passes = sum(item.steps for item in todo) // batch_size
    compile, why = compiling.decide(config.compile, passes, "inference", device, warm, widest)
    fields = {"why": why, "cache": str(cache and cache.path), "warm": warm}
    log.info("compile" if compile else "no compile", extra={"fields": fields})
    if not compile:
        return None
    cache.use()
    return cache


def prepare_pipeline(
    config: InferenceConfig, mode: Mode, run_request: RunRequest, loras: list[models.Lora], compile: bool = False
) -> tuple[DiffusionPipeline, Settings]:
    """Load the model once, with its LoRAs fused in, and fix what every image of the run shares."""
    device = models.resolve_device(config.device)
    dtype = models.resolve_dtype(config.dtype, device)
    # LoRAs are fused in fp32 and rounded once, as the `lora` job's merged copy is: fused in half
    # precision, their small deltas would be rounded twice.
    load_dtype = torch.float32 if loras else dtype
    pipe = models.load_pipeline(config, mode.pipeline_cls, device, load_dtype, config.safety_checker)
    if loras:
        models.apply_loras(pipe, loras, config.lora_scale)
        pipe.to(dtype=dtype)
    # One image at a time: a batch's decode would need 1.7x the memory of its denoising (SD 1.x at
    # 512 px: 360 MB an image against 210 MB), and it would cap BATCH_SIZE (docs/benchmarks.md).
    pipe.vae.enable_slicing()
    if compile:
        # The whole UNet: at inference its resnets gain too (1.19x, against 1.07x for the transformer blocks alone).
        pipe.unet = torch.compile(pipe.unet)
    return pipe, Settings(mode.job, str(dtype).removeprefix("torch."), run_request)


def render_all(
    pipe: DiffusionPipeline,
    items: list[WorkItem],
    settings: Settings,
    batch_size: int,
    manifest: outputs.Manifest,
    output_dir: Path,
    shard_size: int,
    cache: compiling.CompileCache | None = None,
) -> None:
    """Render batch after batch while a writer thread saves the previous one; after the first batch
    and at the end, what was compiled goes to the compile cache.

    Encoding a 512x512 PNG takes 5-30 ms, which a GPU at 10 images/s cannot spare on its own thread.
    One writer with at most one batch queued keeps memory bounded and the manifest in order; on the
    way out (SIGTERM included) the queued batch is still written.
    """
    progress = Progress(total=shard_size, unit="image", initial=shard_size - len(items))
    queued: Future | None = None
    scheduler = None
    try:
        with ThreadPoolExecutor(max_workers=1, thread_name_prefix="writer") as writer:
            for number, batch in enumerate(batches(items, batch_size)):
                if batch[0].scheduler != scheduler:
                    scheduler = batch[0].scheduler
                    models.set_scheduler(pipe, scheduler)
                batch_started = time.perf_counter()
                images, flagged = render(pipe, batch, settings, batch_size)
                seconds = round((time.perf_counter() - batch_started) / len(batch), 3)
                records = [
                    image_record(item, settings, nsfw, seconds) for item, nsfw in zip(batch, flagged, strict=True)
                ]
                if queued is not None:
                    queued.result()  # a failed write stops the run here, not batches later
                queued = writer.submit(save_batch, images, records, manifest, output_dir)
                progress.update(len(batch))
                if cache is not None and number == 0:  # the first batch compiled the UNet
                    cache.save()
            if queued is not None:
                queued.result()
    finally:
        progress.close()
    if cache is not None:
        cache.save()


def save_batch(
    images: list[Image.Image], records: list[dict[str, Any]], manifest: outputs.Manifest, output_dir: Path
) -> None:
    """Each PNG is renamed into place before its manifest line is appended (see `repair`)."""
    for image, record in zip(images, records, strict=True):
        atomic.write_bytes(output_dir / record["file"], outputs.png_with_record(image, record))
        manifest.append(record)


def batches(items: list[WorkItem], batch_size: int) -> list[list[WorkItem]]:
    """Items that can share a forward pass (same sampler, steps, guidance scale and size), grouped,
    then cut to `batch_size`; items keep their order within a group."""
    groups: dict[tuple, list[WorkItem]] = {}
    for item in items:
        groups.setdefault((item.scheduler, item.steps, item.guidance_scale, item.width, item.height), []).append(item)
    return [group[i : i + batch_size] for group in groups.values() for i in range(0, len(group), batch_size)]


def render(
    pipe: DiffusionPipeline, batch: list[WorkItem], settings: Settings, batch_size: int
) -> tuple[list[Image.Image], list[bool]]:
    """One forward pass: the images, and whether the safety checker blacked each out.

    Every image has its own generator (on the CPU, so that a GPU draws the same noise), so its noise
    does not depend on its batch; a short batch is padded to `batch_size` so every pass has the same
    shape, hence the same kernels."""
    padded = batch + [batch[-1]] * (batch_size - len(batch))
    first = batch[0]
    arguments: dict[str, Any] = {
        "prompt": [item.prompt for item in padded],
        "negative_prompt": [item.negative_prompt or "" for item in padded],
        "num_inference_steps": first.steps,
        "guidance_scale": first.guidance_scale,
        "generator": [torch.Generator("cpu").manual_seed(item.seed) for item in padded],
    }
    if first.image is None:
        arguments.update(width=first.width, height=first.height)
    else:
        arguments.update(image=[fit_image(item) for item in padded], strength=settings.run.strength)
    result = pipe(**arguments)
    flagged = result.nsfw_content_detected or [False] * len(padded)  # None without a safety checker
    return result.images[: len(batch)], flagged[: len(batch)]


def fit_image(item: WorkItem) -> Image.Image:
    assert item.image is not None
    with Image.open(item.image.path) as image:
        image = image.convert("RGB")
    return image.resize((item.width, item.height), Image.Resampling.LANCZOS)


def image_record(item: WorkItem, settings: Settings, nsfw: bool, seconds: float) -> dict[str, Any]:
    """The manifest line of one image, also embedded in its PNG: its request, and how it was rendered."""
    record = {"id": item.id, "file": f"{item.id}.png", "job": settings.job, **request(item, settings.run)}
    record |= {"dtype": settings.dtype, "nsfw_filtered": bool(nsfw), "seconds": seconds}
    if item.image is not None:
        record["input_image"] = str(item.image.path)
    record["rendered_at"] = round(time.time(), 3)
    return record


def list_skipped(work: Work, manifest: outputs.Manifest) -> None:
    """SKIP_INVALID: name each skipped record in the manifest once, and in the log every run."""
    for skipped in work.skipped:
        if skipped.where not in manifest.ledger.skipped:
            manifest.append({"skipped": skipped.where, "reason": skipped.reason})
        log.warning("skipped %s: %s", skipped.where, skipped.reason)
