"""Interrupted runs (kill -9, SIGTERM) resume from their checkpoint and end exactly where an uninterrupted run does.

Exactness is checked against a reference run with the same seed: the same loss at every step
and bit-identical final weights mean no step was repeated or lost, and that the optimizer, the
LR schedule, the EMA, the RNG and the data position were all restored.
"""

from __future__ import annotations

import json
import signal
import sys
from pathlib import Path

import pytest
import torch
from conftest import resumed_from, run_process, start, training_flags, wait_for
from safetensors.torch import load_file

MAX_STEPS = 6


def finetune_command(model: Path, data: Path, output: Path) -> list[str]:
    # 5 images, batch 2, accumulation 2: 3 micro-batches an epoch, so steps straddle epochs.
    flags = training_flags(
        data, output, pretrained_model_name_or_path=model, random_flip=True, train_batch_size=2,
        gradient_accumulation_steps=2, max_train_steps=MAX_STEPS, checkpointing_steps=2, use_ema=True, seed=0,
        learning_rate="1e-3", lr_scheduler="cosine", lr_warmup_steps=1, report_to="none",
    )  # fmt: skip
    return [sys.executable, "-m", "jobs.finetune", *flags]


def outcome(output: Path) -> tuple[list, dict[str, torch.Tensor]]:
    history = json.loads((output / "trainer_state.json").read_text())["loss_history"]
    return history, load_file(output / "unet" / "diffusion_pytorch_model.safetensors")


def assert_same_run(output: Path, reference: tuple[list, dict[str, torch.Tensor]]) -> None:
    history, weights = outcome(output)
    assert [step for step, _ in history] == list(range(1, MAX_STEPS + 1))
    assert history == reference[0]
    assert weights.keys() == reference[1].keys()
    assert all(torch.equal(weights[name], reference[1][name]) for name in weights)


@pytest.fixture(scope="module")
def reference(tiny_model, dataset, tmp_path_factory) -> tuple[list, dict[str, torch.Tensor]]:
    """An uninterrupted run: its loss history and final (EMA) UNet weights."""
    output = tmp_path_factory.mktemp("reference") / "out"
    result = run_process(finetune_command(tiny_model, dataset, output), timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    return outcome(output)


@pytest.mark.parametrize(
    ("kill_when", "resumed_at"),
    [("checkpoint-2", (2, 4)), (".final.partial", (MAX_STEPS,))],
    ids=["after-a-checkpoint", "while-saving-the-model"],
)
def test_kill_9_then_rerun_ends_as_uninterrupted(tiny_model, dataset, reference, tmp_path, kill_when, resumed_at):
    """SIGKILL once `kill_when` appears in OUTPUT_DIR: after a checkpoint, or during the final save
    (staged in `.final.partial`, renamed into place). The rerun resumes from the newest checkpoint."""
    output = tmp_path / "out"
    command = finetune_command(tiny_model, dataset, output)
    process = start(command, tmp_path / "killed.log")
    wait_for(lambda: (output / kill_when).is_dir(), process)
    process.kill()
    assert process.wait() == -signal.SIGKILL

    rerun = run_process(command, timeout=600)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert resumed_from(rerun.stderr) in resumed_at
    assert_same_run(output, reference)
    assert not list(output.glob(".final*"))


def test_sigterm_saves_a_checkpoint_exits_143_and_the_retry_resumes(tiny_model, dataset, reference, tmp_path):
    output = tmp_path / "out"
    command = finetune_command(tiny_model, dataset, output)
    log = tmp_path / "terminated.log"
    process = start(command, log)
    wait_for(lambda: '"message": "training"' in log.read_text(), process)
    process.send_signal(signal.SIGTERM)
    assert process.wait(timeout=300) == 143

    text = log.read_text()
    assert "SIGTERM: checkpoint saved" in text
    stopped_at = json.loads(next(line for line in text.splitlines() if "SIGTERM" in line))["step"]
    assert stopped_at < MAX_STEPS and (output / f"checkpoint-{stopped_at}").is_dir()
    assert not (output / "model_index.json").exists()

    retry = run_process(command, timeout=600)
    assert retry.returncode == 0, retry.stderr[-3000:]
    assert resumed_from(retry.stderr) == stopped_at
    assert_same_run(output, reference)
