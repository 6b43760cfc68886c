"""Text-guided image editing: redraw every image of INPUT_DIR (or of PROMPTS_FILE records) by a prompt.

pai-diffusion img2img --input_dir photos/ --prompt 水彩画风格 --strength 0.6 --output_dir out/
"""

if __name__ == "__main__":
    import sys
    from pathlib import Path

    sys.path.insert(
        0, str(Path(__file__).resolve().parents[1])
    )  # run as a file too: `accelerate launch jobs/img2img.py`
    from jobs.cli import main

    sys.exit(main(["img2img", *sys.argv[1:]]))
