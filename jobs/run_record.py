"""What a training run leaves beside its model: trainer_state.json, loss.png, a README.md model card,
TensorBoard's hyperparameters, and the upload to the hub."""

from __future__ import annotations

import io
import json
import logging
from pathlib import Path

from jobs import atomic
from jobs.config import TrainConfig, settings
from jobs.strategies import Strategy
from jobs.validation import validation_prompts

log = logging.getLogger("jobs")

CARD_HYPERPARAMETERS = (
    *("resolution", "center_crop", "random_flip", "aspect_buckets", "caption_dropout"),
    *("train_batch_size", "gradient_accumulation_steps"),
    *("learning_rate", "lr_scheduler", "lr_warmup_steps", "mixed_precision", "use_ema", "rank", "lora_alpha"),
    *("train_text_encoder", "snr_gamma", "noise_offset", "prediction_type", "seed"),
)


def hyperparameters(config: TrainConfig) -> dict:
    """The configuration as TensorBoard takes it: secrets masked, anything but a number or text as text."""
    return {
        name: value if isinstance(value, int | float | str | bool) else str(value)
        for name, value in settings(config).items()
    }


def write_run_record(config: TrainConfig, folder: Path, strategy: Strategy, examples: int, state: dict) -> None:
    """trainer_state.json (the step, loss history and this run's loop speed), loss.png and README.md."""
    atomic.write_bytes(folder / "trainer_state.json", json.dumps(state).encode())
    atomic.write_bytes(folder / "loss.png", loss_plot(state["loss_history"]))
    card = model_card(config, strategy, examples, state["global_step"])
    atomic.write_bytes(folder / "README.md", card.encode("utf-8"))


def loss_plot(loss_history: list) -> bytes:
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot

    figure, axes = pyplot.subplots(figsize=(8, 4))
    steps, losses = zip(*loss_history, strict=True) if loss_history else ((), ())
    axes.plot(steps, losses, linewidth=0.8)
    axes.set(xlabel="step", ylabel="loss", title="training loss")
    axes.grid(alpha=0.3)
    figure.tight_layout()
    png = io.BytesIO()
    figure.savefig(png, format="png")
    pyplot.close(figure)
    return png.getvalue()


def model_card(config: TrainConfig, strategy: Strategy, examples: int, steps: int) -> str:
    data = config.dataset_name or str(config.train_data_dir)
    values = {name: value for name, value in hyperparameters(config).items() if name in CARD_HYPERPARAMETERS}
    prompt = (validation_prompts(config) or ["一只可爱的小猫"])[0]
    usage = strategy.usage.format(
        output_dir=config.output_dir, base_model=config.pretrained_model_name_or_path, prompt=prompt
    )
    table = "\n".join(f"| {name} | {value} |" for name, value in values.items())
    return f"""---
base_model: {config.pretrained_model_name_or_path}
library_name: diffusers
tags: [stable-diffusion, text-to-image, pai-diffusion, {strategy.name}]
---

# {config.output_dir.name}

`{strategy.name}` of [{config.pretrained_model_name_or_path}](https://huggingface.co/{config.pretrained_model_name_or_path})
on {data} ({examples} images) for {steps} optimizer steps.

| hyperparameter | value |
|---|---|
{table}

## How to load

{usage}

Validation images are in `samples/`, the loss curve is `loss.png`, TensorBoard logs are in `{config.logging_dir}/`.
"""


def push_to_hub(config: TrainConfig) -> None:
    from huggingface_hub import create_repo, upload_folder

    token = config.hub_token.get_secret_value() if config.hub_token else None
    repo_id = create_repo(config.hub_model_id or config.output_dir.name, exist_ok=True, token=token).repo_id
    upload_folder(
        repo_id=repo_id,
        folder_path=config.output_dir,
        token=token,
        commit_message="End of training",
        ignore_patterns=["checkpoint-*", ".checkpoint-*", "latent-cache/*"],
    )
    log.info("pushed to the hub", extra={"fields": {"repo_id": repo_id}})
