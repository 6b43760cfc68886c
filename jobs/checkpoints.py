"""Checkpoints: `OUTPUT_DIR/checkpoint-<step>/`, written whole or not at all, and resume from the newest good one.

accelerate saves and restores the optimizer, the LR schedule, every process's RNG state and what a
strategy registers (the EMA); the hooks here make it save only the parameters that train, so a
LoRA checkpoint holds the adapters, not the model. `trainer_state.json` records the step, the loss
history and every file's size, so a truncated checkpoint is recognised and skipped.
"""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import torch
from accelerate import Accelerator
from safetensors.torch import load_file, save_file

from jobs import atomic
from jobs.config import TrainConfig
from jobs.errors import BadInput

log = logging.getLogger("jobs")

STATE_FILE = "trainer_state.json"


def keep_checkpoints_small(accelerator: Accelerator) -> None:
    """Save and restore only the parameters that train (a LoRA checkpoint holds the adapters, not the model)."""

    def save(models, weights, output_dir):
        if accelerator.is_main_process:
            for i, model in enumerate(models):
                trainable = {n: p.detach().contiguous() for n, p in trainable_parameters(accelerator, model)}
                save_file(trainable, Path(output_dir) / f"trainable_{i}.safetensors")
        weights.clear()  # accelerate would otherwise save every weight of every model again

    def load(models, input_dir):
        for i, model in enumerate(models):
            parameters = dict(trainable_parameters(accelerator, model))
            saved = load_file(Path(input_dir) / f"trainable_{i}.safetensors")
            if saved.keys() != parameters.keys():
                raise ValueError(f"trainable_{i}.safetensors does not hold this model's trainable parameters")
            with torch.no_grad():
                for name, value in saved.items():
                    parameters[name].copy_(value)
        models.clear()

    accelerator.register_save_state_pre_hook(save)
    accelerator.register_load_state_pre_hook(load)


def trainable_parameters(accelerator: Accelerator, model: torch.nn.Module):
    return [(n, p) for n, p in accelerator.unwrap_model(model).named_parameters() if p.requires_grad]


def save_checkpoint(accelerator: Accelerator, config: TrainConfig, step: int, state: dict) -> None:
    """Write `checkpoint-<step>/` (with `state`: the loss history and what else the run records) whole
    or not at all: into a temporary folder, renamed when complete; then honour the total limit."""
    final = config.output_dir / f"checkpoint-{step}"
    partial = config.output_dir / f".checkpoint-{step}.partial"
    if accelerator.is_main_process:
        for leftover in config.output_dir.glob(".checkpoint-*.partial"):  # from a run killed while saving
            shutil.rmtree(leftover)
    accelerator.wait_for_everyone()
    accelerator.save_state(partial)  # every process: each saves its own RNG state
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        files = {str(p.relative_to(partial)): p.stat().st_size for p in sorted(partial.rglob("*")) if p.is_file()}
        (partial / STATE_FILE).write_text(json.dumps({"global_step": step, **state, "files": files}))
        atomic.publish_folder(partial, final)
        log.info("checkpoint saved", extra={"fields": {"checkpoint": str(final), "step": step}})
        if config.checkpoints_total_limit:
            for old in sorted_checkpoints(config.output_dir)[config.checkpoints_total_limit :]:
                shutil.rmtree(old)
    accelerator.wait_for_everyone()


def sorted_checkpoints(output_dir: Path) -> list[Path]:
    """`checkpoint-<step>` folders, newest first."""
    found = [p for p in output_dir.glob("checkpoint-*") if p.is_dir() and p.name.split("-", 1)[1].isdigit()]
    return sorted(found, key=lambda p: int(p.name.split("-", 1)[1]), reverse=True)


def resume_candidates(config: TrainConfig) -> list[Path]:
    """Checkpoints to try, best first: all of them for `latest`, the one named otherwise, none for `none`."""
    choice = config.resume_from_checkpoint
    if choice in (None, "none", ""):
        return []
    if choice == "latest":
        return sorted_checkpoints(config.output_dir)
    path = Path(choice) if Path(choice).is_dir() else config.output_dir / choice
    if not path.is_dir():
        raise BadInput(f"RESUME_FROM_CHECKPOINT {choice}: no such checkpoint folder")
    return [path]


def checkpoint_problem(checkpoint: Path) -> str | None:
    """Why a checkpoint cannot be trusted (no state file, a missing or truncated file), or None."""
    try:
        state = json.loads((checkpoint / STATE_FILE).read_text())
        for name, size in state["files"].items():
            actual = (checkpoint / name).stat().st_size
            if actual != size:
                return f"{name} is {actual} bytes, {size} were written"
    except (OSError, ValueError, KeyError) as error:
        return str(error)
    return None


def resume(accelerator: Accelerator, checkpoints: list[Path]) -> tuple[int, dict]:
    """Restore the newest usable checkpoint; return its step and the state saved with it (0 and {} when none)."""
    half_loaded = None
    for checkpoint in checkpoints:
        problem = checkpoint_problem(checkpoint)
        if problem is None:
            try:
                accelerator.load_state(checkpoint)
            except Exception as error:  # any unreadable file: fall back to the previous checkpoint
                problem = f"cannot be loaded ({error})"
                half_loaded = checkpoint
        if problem:
            log.warning("skipping checkpoint", extra={"fields": {"checkpoint": str(checkpoint), "problem": problem}})
            continue
        state = json.loads((checkpoint / STATE_FILE).read_text())
        log.info("resuming", extra={"fields": {"checkpoint": str(checkpoint), "step": state["global_step"]}})
        step = state.pop("global_step")
        state.pop("files")
        return step, state
    if half_loaded:
        # Part of it may be in the model already; starting afresh on top of that would be silently wrong.
        raise BadInput(
            f"checkpoint {half_loaded} cannot be loaded and no earlier one can: "
            "remove it, or start afresh in a new OUTPUT_DIR"
        )
    return 0, {}
