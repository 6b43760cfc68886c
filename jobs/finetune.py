"""Full UNet fine-tuning: the seed's `accelerate launch finetune.py ...`, saving a whole pipeline."""

if __name__ == "__main__":
    import sys
    from pathlib import Path

    sys.path.insert(
        0, str(Path(__file__).resolve().parents[1])
    )  # run as a file too: `accelerate launch jobs/finetune.py`
    from jobs.cli import main

    sys.exit(main(["finetune", *sys.argv[1:]]))
