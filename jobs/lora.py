"""LoRA fine-tuning: the seed's `accelerate launch lora.py ...`, saving LoRA weights and a merged pipeline."""

if __name__ == "__main__":
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a file too: `accelerate launch jobs/lora.py`
    from jobs.cli import main

    sys.exit(main(["lora", *sys.argv[1:]]))
