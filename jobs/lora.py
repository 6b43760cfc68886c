"""LoRA fine-tuning job: the seed's `accelerate launch lora.py ...`, saves diffusers LoRA weights and a merged model."""

import sys
from pathlib import Path

if __package__ in (None, ""):
    # Run as a file (`accelerate launch jobs/lora.py`, the seed's form): import the package beside it.
    sys.path[0] = str(Path(__file__).resolve().parent.parent)

from jobs.cli import run_job  # noqa: E402
from jobs.config import LoraConfig  # noqa: E402
from jobs.train import LoraFinetune, train  # noqa: E402


def lora(config: LoraConfig) -> None:
    train(config, LoraFinetune)


def main(argv: list[str] | None = None) -> int:
    return run_job(LoraConfig, lora, argv)


if __name__ == "__main__":
    sys.exit(main())
