"""Text-to-image batch job: render PROMPT or every record of PROMPTS_FILE into OUTPUT_DIR.

pai-diffusion generate --prompts_file prompts.jsonl --output_dir out/
"""

import sys
from pathlib import Path

if __package__ in (None, ""):
    # Run as a file (`accelerate launch jobs/generate.py`, the seed's form): import the package beside it.
    sys.path[0] = str(Path(__file__).resolve().parent.parent)

from jobs.cli import run_job  # noqa: E402
from jobs.config import GenerateConfig  # noqa: E402
from jobs.inference import run  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    return run_job(GenerateConfig, run, argv)


if __name__ == "__main__":
    sys.exit(main())
