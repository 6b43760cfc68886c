"""Validation images: the validation prompts sampled with the weights being trained, as a grid per step.

With --aspect_buckets each prompt is sampled at the most used bucket sizes, a row each.
Only the main process samples, the others wait at a barrier: sampling on every GPU would only
repeat the same images, and is where upstream's multi-GPU runs ran out of memory.
"""

from __future__ import annotations

import io
import logging
import math
from typing import TYPE_CHECKING

import numpy as np
import torch
from diffusers import DPMSolverMultistepScheduler, StableDiffusionPipeline
from PIL import Image

from jobs import atomic
from jobs.config import TrainConfig

if TYPE_CHECKING:
    from jobs.train import Run

log = logging.getLogger("jobs")

VALIDATION_INFERENCE_STEPS = 25  # DPM-Solver++ at 25 steps matches the default sampler at 50
VALIDATION_BUCKETS = 3


def validation_prompts(config: TrainConfig) -> list[str]:
    return config.validation_prompts or ([config.validation_prompt] if config.validation_prompt else [])


def validation_due(config: TrainConfig, step: int, batches_per_epoch: int) -> bool:
    """After every --validation_steps steps, or else after every --validation_epochs epochs."""
    if not validation_prompts(config):
        return False
    if config.validation_steps:
        return step % config.validation_steps == 0
    epochs_done = step * config.gradient_accumulation_steps // batches_per_epoch
    epochs_before = (step - 1) * config.gradient_accumulation_steps // batches_per_epoch
    return epochs_done > epochs_before and epochs_done % config.validation_epochs == 0


def validate(run: Run, step: int) -> None:
    """Sample the validation prompts into `samples/step-<step>.png` and TensorBoard."""
    config, accelerator, pipe = run.config, run.accelerator, run.pipe
    prompts = validation_prompts(config)
    if prompts and accelerator.is_main_process:
        sampler = StableDiffusionPipeline(
            vae=pipe.vae,
            text_encoder=pipe.text_encoder,
            tokenizer=pipe.tokenizer,
            unet=pipe.unet,
            scheduler=DPMSolverMultistepScheduler.from_config(run.noise_scheduler.config),
            safety_checker=None,
            feature_extractor=None,
            requires_safety_checker=False,
        )
        sampler.set_progress_bar_config(disable=True)
        generator = torch.Generator(accelerator.device).manual_seed(run.seed)
        by_size = {}
        with run.strategy.sampling_weights(), accelerator.autocast(), torch.no_grad():
            for width, height in validation_sizes(run):
                by_size[(width, height)] = [
                    image
                    for prompt in prompts
                    for image in sampler(
                        prompt,
                        height=height,
                        width=width,
                        num_images_per_prompt=config.num_validation_images,
                        num_inference_steps=VALIDATION_INFERENCE_STEPS,
                        generator=generator,
                    ).images
                ]
        path = config.output_dir / "samples" / f"step-{step:06d}.png"
        png = io.BytesIO()
        images = [image for size_images in by_size.values() for image in size_images]
        grid(images, columns=config.num_validation_images).save(png, format="PNG")
        atomic.write_bytes(path, png.getvalue())
        for tracker in accelerator.trackers:
            if tracker.name == "tensorboard":
                for (width, height), size_images in by_size.items():
                    tag = "validation" if len(by_size) == 1 else f"validation {width}x{height}"
                    pixels = np.stack([np.asarray(image) for image in size_images])
                    tracker.writer.add_images(tag, pixels, step, dataformats="NHWC")
        log.info("validation images", extra={"fields": {"path": str(path), "step": step}})
    accelerator.wait_for_everyone()


def validation_sizes(run: Run) -> list[tuple[int, int]]:
    if run.buckets is None:
        return [(run.config.resolution, run.config.resolution)]
    return run.buckets.most_used(VALIDATION_BUCKETS)


def grid(images: list[Image.Image], columns: int) -> Image.Image:
    """The images in rows of `columns`, each in a cell as large as the largest."""
    width, height = max(image.width for image in images), max(image.height for image in images)
    rows = math.ceil(len(images) / columns)
    sheet = Image.new("RGB", (columns * width, rows * height))
    for i, image in enumerate(images):
        sheet.paste(image, ((i % columns) * width, (i // columns) * height))
    return sheet
