"""Every job keeps freed memory for its next step (jobs.cli.keep_freed_memory) instead of faulting it in again."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from conftest import REPO

# Page faults of three UNet training steps (at 256 px, batch 4) after three warm-up steps.
STEP_FAULTS = """
import resource, sys, torch
from diffusers import UNet2DConditionModel
from jobs.cli import keep_freed_memory

if sys.argv[2] == "keep":
    assert keep_freed_memory()
unet = UNet2DConditionModel.from_pretrained(sys.argv[1])
latents, text = torch.randn(4, 4, 32, 32), torch.randn(4, 8, unet.config.cross_attention_dim)
for step in range(6):
    if step == 3:
        before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    unet(latents, torch.tensor([10] * 4), text).sample.square().mean().backward()
print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


def steady_page_faults(unet: Path, mode: str) -> int:
    args = [sys.executable, "-c", STEP_FAULTS, str(unet), mode]
    return int(subprocess.run(args, cwd=REPO, capture_output=True, text=True, check=True).stdout.split()[-1])


def test_a_training_step_reuses_the_memory_of_the_last_one(tiny_model: Path) -> None:
    default, kept = steady_page_faults(tiny_model / "unet", "default"), steady_page_faults(tiny_model / "unet", "keep")
    # glibc's defaults fault in about 50 MB a step here; if that stops, the setting may be unnecessary.
    assert default > 15000, default
    # Nearly none kept: now and then the heap still grows by a few hundred pages.
    assert kept * 10 < default, (default, kept)
