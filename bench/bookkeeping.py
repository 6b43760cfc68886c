"""Bookkeeping at scale: what a rerun of a finished 200,000-image run costs, and checking 10,000 input images.

1. A finished `generate` run of N items (their PNGs, as empty files, and a manifest) is run again;
   it renders nothing. Timed: seconds from launch to the job's `work` log line (what is left was
   decided), and the whole process (the gallery included). The baseline is the commit before the
   change (`--baseline`, a git worktree), which checks each item's PNG with a stat; ours lists
   OUTPUT_DIR once and compares every item's request with its manifest record.
2. img2img's check of M input images (decoded whole), on one thread against jobs.prompts'
   thread pool, in alternating rounds in this process.

    python bench/bookkeeping.py                       # 200,000 items and 10,000 images, about 5 minutes
    python bench/bookkeeping.py --items 20000 --images 1000
"""

from __future__ import annotations

import argparse
import io
import json
import os
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
from harness import REPO, Contender, mean, run_rounds
from PIL import Image

sys.path.insert(0, str(REPO / "tests"))

from tiny_model import build  # noqa: E402

# The generate job in-process, reporting when its `work` line was logged.
OUR_JOB = """
import json, logging, os, sys, time
started = time.time()
sys.path.insert(0, os.environ.get("JOBS_TREE", ""))  # the baseline's tree, ahead of this one (the cwd)
marks = {}
class Mark(logging.Handler):
    def emit(self, record):
        marks.setdefault(record.getMessage(), time.time() - started)
logging.getLogger("jobs").addHandler(Mark())
from jobs.cli import main
code = main(["generate", *sys.argv[1:]])
print(json.dumps({"work_s": marks["work"]}))
sys.exit(code)
"""


def finished_run(work: Path, model: Path, items: int) -> tuple[Path, Path]:
    """A prompts file of `items` lines, and an OUTPUT_DIR holding each item's PNG and manifest record."""
    from jobs.config import GenerateConfig, load
    from jobs.identity import RunRequest, request
    from jobs.models import default_resolution
    from jobs.prompts import plan

    prompts = work / "prompts.txt"
    prompts.write_text("\n".join(f"第{i}只猫，水墨画" for i in range(items)) + "\n", encoding="utf-8")
    config = load(GenerateConfig, [], {"MODEL_NAME": str(model), "PROMPTS_FILE": str(prompts)})
    run = RunRequest.of(config, [])
    output = work / "output"
    output.mkdir()
    with open(output / "manifest-00000.jsonl", "w", encoding="utf-8") as manifest:
        for item in plan(config, False, default_resolution(config)).items:
            record = {"id": item.id, "file": f"{item.id}.png", "job": "generate", **request(item, run)}
            manifest.write(json.dumps({**record, "dtype": "float32", "rendered_at": 1.0}, ensure_ascii=False) + "\n")
            (output / record["file"]).touch()
    return prompts, output


def rerun(work: Path, model: Path, tree: Path, items: int, rounds: int) -> None:
    prompts, output = finished_run(work, model, items)
    env = {"MODEL_NAME": str(model), "PROMPTS_FILE": str(prompts), "HF_HUB_OFFLINE": "1"}
    # Every run reruns the same finished OUTPUT_DIR (the flag wins over run_rounds' own OUTPUT_DIR).
    job = [sys.executable, "-c", OUR_JOB, "--output_dir", str(output)]
    contenders = {"baseline": Contender(job, {**env, "JOBS_TREE": str(tree)}), "ours": Contender(job, env)}
    runs = run_rounds(contenders, rounds, work / "runs", {})
    print(f"\nrerun of a finished run of {items} items, renders nothing ({rounds} round(s))")
    print(f"{'contender':<12}{'to the work line s':>20}{'whole process s':>18}")
    for name, own in runs.items():
        print(f"{name:<12}{mean([r['work_s'] for r in own]):>20.2f}{mean([r['seconds'] for r in own]):>18.2f}")


def check_inputs(work: Path, images: int, rounds: int) -> None:
    from jobs import prompts

    folder = work / "inputs"
    folder.mkdir()

    def write(index: int) -> Path:
        rng = np.random.default_rng(index)
        pixels = np.clip(rng.normal(128, 40, (192, 256, 3)), 0, 255).astype(np.uint8)
        buffer = io.BytesIO()
        Image.fromarray(pixels).save(buffer, format="JPEG", quality=90)
        path = folder / f"{index:06d}.jpg"
        path.write_bytes(buffer.getvalue())
        return path

    with ThreadPoolExecutor(os.cpu_count()) as pool:
        paths = list(pool.map(write, range(images)))
    timings: dict[str, list[float]] = {"one thread": [], "thread pool": []}
    for round_index in range(rounds):
        order = list(timings) if round_index % 2 == 0 else list(reversed(timings))
        for name in order:
            started = time.perf_counter()
            if name == "thread pool":
                checked = prompts.check_images(paths)
            else:
                checked = {path: prompts._check_image(path) for path in paths}
            timings[name].append(time.perf_counter() - started)
            assert all(isinstance(result, prompts.InputImage) for result in checked.values())
    print(f"\nchecking {images} input JPEGs (256x192, decoded whole), {rounds} rounds, {os.cpu_count()} CPUs")
    for name, seconds in timings.items():
        ratio = mean(timings["one thread"]) / mean(seconds)
        print(f"{name:<12} {mean(seconds):>7.2f} s {ratio:>6.2f}x {images / mean(seconds):>7.0f} images/s")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--items", type=int, default=200_000)
    parser.add_argument("--images", type=int, default=10_000)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--baseline", default="a417eba", help="the commit before the change")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="bench-bookkeeping-") as folder:
        work = Path(folder)
        model = build(work / "model", "tiny")
        tree = work / "baseline"
        subprocess.run(["git", "-C", str(REPO), "worktree", "add", "--detach", str(tree), args.baseline], check=True)
        try:
            rerun(work, model, tree, args.items, args.rounds)
        finally:
            subprocess.run(["git", "-C", str(REPO), "worktree", "remove", "--force", str(tree)], check=False)
        check_inputs(work, args.images, args.rounds)


if __name__ == "__main__":
    main()
