"""COMPILE=true: the jobs compile the UNet and give what the eager jobs give, within float rounding.

Compiling is slow on a CPU (these two tests take about 70 s), so each job is compiled once.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import training_flags
from PIL import Image
from safetensors.torch import load_file


@pytest.fixture
def compiled_graphs():
    """How many graphs torch compiled during the test; the compiler is reset afterwards."""
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    yield lambda: counters["stats"]["unique_graphs"]
    torch._dynamo.reset()


def lora_run(cli, model: Path, data: Path, output: Path, **env: object) -> None:
    args = training_flags(
        data, output, train_batch_size=2, max_train_steps=2, checkpointing_steps=1, learning_rate="1e-3", seed=0,
        lr_warmup_steps=0, gradient_checkpointing=True, no_save_merged=True,
    )  # fmt: skip
    assert cli("lora", *args, MODEL_NAME=model, **env) == 0


def losses(output: Path) -> list[float]:
    return [loss for _, loss in json.loads((output / "trainer_state.json").read_text())["loss_history"]]


def test_compiled_lora_trains_like_eager_and_checkpoints_the_same_keys(
    tiny_model, dataset, tmp_path, cli, compiled_graphs
):
    lora_run(cli, tiny_model, dataset, tmp_path / "eager")
    assert compiled_graphs() == 0
    lora_run(cli, tiny_model, dataset, tmp_path / "compiled", COMPILE="true")
    assert compiled_graphs() > 0

    eager_losses, compiled_losses = (losses(tmp_path / run) for run in ("eager", "compiled"))
    assert compiled_losses == pytest.approx(eager_losses, rel=1e-4)
    for file in ("pytorch_lora_weights.safetensors", "checkpoint-1/trainable_0.safetensors"):
        eager, compiled = (load_file(tmp_path / run / file) for run in ("eager", "compiled"))
        assert compiled.keys() == eager.keys(), file  # no `_orig_mod.`: a compiled run resumes an eager one's
        for key in eager:
            torch.testing.assert_close(compiled[key], eager[key], rtol=1e-3, atol=1e-5)


def test_compiled_generate_renders_like_eager(tiny_model, tmp_path, cli, compiled_graphs):
    settings = {"MODEL_NAME": tiny_model, "PROMPT": "一只红色的猫", "NUM_INFERENCE_STEPS": 2, "DTYPE": "fp32"}
    assert cli("generate", OUTPUT_DIR=tmp_path / "eager", **settings) == 0
    assert cli("generate", OUTPUT_DIR=tmp_path / "compiled", COMPILE="true", **settings) == 0
    assert compiled_graphs() > 0

    (eager,), (compiled,) = (sorted((tmp_path / run).glob("*.png")) for run in ("eager", "compiled"))
    difference = np.abs(np.asarray(Image.open(eager), int) - np.asarray(Image.open(compiled), int))
    assert difference.max() <= 2
