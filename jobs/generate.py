"""Text to image: render PROMPT or every record of PROMPTS_FILE into OUTPUT_DIR.

pai-diffusion generate --prompts_file prompts.jsonl --output_dir out/
"""

if __name__ == "__main__":
    import sys
    from pathlib import Path

    sys.path.insert(
        0, str(Path(__file__).resolve().parents[1])
    )  # run as a file too: `accelerate launch jobs/generate.py`
    from jobs.cli import main

    sys.exit(main(["generate", *sys.argv[1:]]))
