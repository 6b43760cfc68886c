"""The jobs: the one table that the `pai-diffusion` command, the entrypoint files and the launcher read."""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from jobs.config import FinetuneConfig, GenerateConfig, Img2ImgConfig, LoraConfig, Options, PackConfig


@dataclass(frozen=True)
class Job:
    name: str
    summary: str
    config: type[Options]
    runner: str  # "module:function" taking the configuration, imported when the job starts (torch takes seconds)
    distributed: bool = False  # runs on every GPU of the pod, and on several pods (jobs/launch.py)

    @property
    def prog(self) -> str:
        return f"pai-diffusion {self.name}"

    def run_function(self) -> Callable[[Any], None]:
        module, function = self.runner.split(":")
        return getattr(importlib.import_module(module), function)


JOBS = {
    job.name: job
    for job in (
        Job("generate", "text to image", GenerateConfig, "jobs.inference:generate"),
        Job("img2img", "text-guided image editing", Img2ImgConfig, "jobs.inference:img2img"),
        Job("finetune", "full UNet fine-tuning", FinetuneConfig, "jobs.train:finetune", distributed=True),
        Job("lora", "LoRA fine-tuning", LoraConfig, "jobs.train:lora", distributed=True),
        Job("pack", "a training dataset into WebDataset or parquet shards", PackConfig, "jobs.packing:pack"),
    )
}
