"""Full UNet fine-tuning job: the seed's `accelerate launch finetune.py ...`, saving a whole pipeline."""

import sys
from pathlib import Path

if __package__ in (None, ""):
    # Run as a file (`accelerate launch jobs/finetune.py`, the seed's form): import the package beside it.
    sys.path[0] = str(Path(__file__).resolve().parent.parent)

from jobs.cli import run_job  # noqa: E402
from jobs.config import FinetuneConfig  # noqa: E402
from jobs.train import FullFinetune, train  # noqa: E402


def finetune(config: FinetuneConfig) -> None:
    train(config, FullFinetune)


def main(argv: list[str] | None = None) -> int:
    return run_job(FinetuneConfig, finetune, argv)


if __name__ == "__main__":
    sys.exit(main())
