"""Text-guided image editing batch job: redraw every image of INPUT_DIR (or of PROMPTS_FILE records) by a prompt.

pai-diffusion img2img --input_dir photos/ --prompt 水彩画风格 --strength 0.6 --output_dir out/
"""

import sys
from pathlib import Path

if __package__ in (None, ""):
    # Run as a file (`accelerate launch jobs/img2img.py`, the seed's form): import the package beside it.
    sys.path[0] = str(Path(__file__).resolve().parent.parent)

from jobs.cli import run_job  # noqa: E402
from jobs.config import Img2ImgConfig  # noqa: E402
from jobs.inference import run  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    return run_job(Img2ImgConfig, run, argv)


if __name__ == "__main__":
    sys.exit(main())
