"""Training data at scale: time to the first optimizer step, peak memory and steady samples/s as the dataset grows.

For each dataset size (2,000 and 20,000 captioned JPEGs by default) every contender is its own
`lora` process on the tiny PAI-shaped model, so that the data path, not the UNet, sets the pace:

  baseline   the folder path of the commit before the data change (`--baseline`, from a git worktree)
  folder     this tree's folder path (metadata.jsonl)
  shards     the same images packed by `pai-diffusion pack` into local WebDataset shards
  s3         those shards streamed from a SeaweedFS S3 endpoint on 127.0.0.1

each without --cache_latents, with a cold cache (filled as the run trains) and with a warm one
(filled by an earlier run; not for the baseline, which has no --latent_cache_dir). Printed per size:
seconds from launch to the end of the first step, peak RSS, steady samples/s (the steps after the
first quarter), and the ratios that the targets name (20,000 against 2,000; s3 against shards).

    python bench/data.py                     # 2,000 and 20,000 images, about 25 minutes on 2 cores
    python bench/data.py --sizes 200 2000 --steps 40
"""

from __future__ import annotations

import argparse
import io
import json
import os
import subprocess
import sys
import tempfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
from harness import REPO, Contender, mean, run_rounds
from PIL import Image

sys.path.insert(0, str(REPO / "tests"))

from object_store import seaweedfs  # noqa: E402
from tiny_model import build  # noqa: E402

# The lora job in-process: when each step started (read by wrapping its loss function, which each
# step calls once), where `jobs` came from, and peak memory, on the last line.
OUR_JOB = """
import json, os, resource, sys, time
sys.path.insert(0, os.environ.get("JOBS_TREE", ""))  # the baseline's tree, ahead of this one (the cwd)
import jobs, jobs.train
from jobs.cli import main

step_starts, loss = [], jobs.train.diffusion_loss
def timed_loss(*args, **kwargs):
    step_starts.append(time.time())
    return loss(*args, **kwargs)
jobs.train.diffusion_loss = timed_loss

code = main(["lora", *sys.argv[1:]])
print(json.dumps({"step_starts": step_starts, "jobs": jobs.__file__,
                  "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))
sys.exit(code)
"""
SOURCES = ("baseline", "folder", "shards", "s3")
CAPTIONS = ["一只红色的猫", "蓝色的大海和白云", "绿色的森林", "黄色的花朵", "夜晚的城市灯光", "山上的雪"]


def write_jpeg(folder: Path, index: int) -> str:
    """A 256x192 JPEG of a gradient with noise (about 20 KB, like a small photo), seeded by its index."""
    rng = np.random.default_rng(index)
    x = np.linspace(0, 255, 256)[None, :, None] * rng.random(3)
    y = np.linspace(0, 255, 192)[:, None, None] * rng.random(3)
    pixels = np.clip(x + y * 0.5 + rng.normal(0, 12, (192, 256, 3)), 0, 255).astype(np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="JPEG", quality=90)
    name = f"{index:06d}.jpg"
    (folder / name).write_bytes(buffer.getvalue())
    return json.dumps({"file_name": name, "text": CAPTIONS[index % len(CAPTIONS)]}, ensure_ascii=False)


def make_dataset(folder: Path, count: int) -> Path:
    folder.mkdir(parents=True)
    with ThreadPoolExecutor(os.cpu_count()) as pool:
        lines = list(pool.map(lambda i: write_jpeg(folder, i), range(count)))
    (folder / "metadata.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")
    return folder


def pack(folder: Path, url: str, env: dict[str, str]) -> None:
    command = [sys.executable, "-m", "jobs.pack", "--train_data_dir", str(folder), "--output_dir", url]
    done = subprocess.run(command, cwd=REPO, env={**os.environ, **env}, capture_output=True, text=True)
    if done.returncode != 0:
        sys.exit(f"pack to {url} failed:\n{done.stderr[-3000:]}")


def baseline_tree(work: Path, revision: str) -> Path:
    tree = work / "baseline"
    subprocess.run(
        ["git", "-C", str(REPO), "worktree", "add", "--detach", str(tree), revision], check=True, capture_output=True
    )
    return tree


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[2000, 20000])
    parser.add_argument("--steps", type=int, default=120)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--resolution", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=1)
    parser.add_argument("--sources", nargs="+", default=list(SOURCES), choices=SOURCES)
    parser.add_argument("--baseline", default="a417eba", help="the commit before the data change")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="bench-data-") as folder:
        work = Path(folder)
        tree = baseline_tree(work, args.baseline)
        (work / "s3").mkdir()
        try:
            with seaweedfs(work / "s3", bucket="data") as s3:
                compare(work, tree, s3, args)
        finally:
            subprocess.run(["git", "-C", str(REPO), "worktree", "remove", "--force", str(tree)], check=False)


def compare(work: Path, tree: Path, s3: dict[str, str], args: argparse.Namespace) -> None:
    model = build(work / "model", "tiny")
    flags = ["--pretrained_model_name_or_path", str(model), "--resolution", str(args.resolution)]
    flags += ["--train_batch_size", str(args.batch), "--max_train_steps", str(args.steps), "--seed", "0"]
    flags += ["--lr_warmup_steps", "0", "--report_to", "none", "--no_save_merged", "--checkpointing_steps", "100000"]
    flags += ["--center_crop", "--random_flip"]
    job = [sys.executable, "-c", OUR_JOB]
    results = {}
    for size in args.sizes:
        folder = make_dataset(work / f"images-{size}", size)
        pack(folder, str(work / f"shards-{size}"), {})
        pack(folder, f"s3://data/shards-{size}", s3)
        sources = {
            "baseline": (str(folder), {"JOBS_TREE": str(tree)}),
            "folder": (str(folder), {}),
            "shards": (str(work / f"shards-{size}"), {}),
            "s3": (f"s3://data/shards-{size}", s3),
        }
        sources = {name: sources[name] for name in args.sources}
        contenders = {}
        for name, (data, env) in sources.items():
            command, env = [*job, *flags, "--train_data_dir", data], {"HF_HUB_OFFLINE": "1", **env}
            contenders[name] = Contender(command, env)
            # A cold cache (each run's own OUTPUT_DIR/latent-cache) fills as the run trains.
            contenders[f"{name} +cache"] = Contender([*command, "--cache_latents"], env)
            if name != "baseline":  # a cache that an earlier run filled (its option is new)
                warm = work / f"cache-{name}-{size}"
                fill = {**os.environ, **env, "OUTPUT_DIR": str(work / f"fill-{name}-{size}")}
                subprocess.run(
                    [*command, "--cache_latents", "--latent_cache_dir", str(warm)],
                    cwd=REPO,
                    env=fill,
                    check=True,
                    capture_output=True,
                )
                contenders[f"{name} +warm cache"] = Contender(
                    [*command, "--cache_latents", "--latent_cache_dir", str(warm)], env
                )
        runs = run_rounds(contenders, args.rounds, work / f"runs-{size}", {"OMP_WAIT_POLICY": "PASSIVE"})
        results[size] = {name: summary(own, args) for name, own in runs.items()}
        for name, own in runs.items():
            expected = str(tree) if name.startswith("baseline") else str(REPO)
            assert all(run["jobs"].startswith(expected) for run in own), (name, own[0]["jobs"])
    report(results, args)


def summary(runs: list[dict], args: argparse.Namespace) -> dict[str, float]:
    """Mean over rounds: seconds from launch to the end of step 1, peak RSS, steady samples/s."""
    first, rss, speed = [], [], []
    for run in runs:
        starts = run["step_starts"]
        first.append(starts[1] - run["launched_at"])
        rss.append(run["peak_rss_mb"])
        warm = len(starts) // 4
        speed.append((len(starts) - 1 - warm) * args.batch / (starts[-1] - starts[warm]))
    return {"first_step_s": mean(first), "peak_rss_mb": mean(rss), "samples_per_s": mean(speed)}


def report(results: dict[int, dict[str, dict[str, float]]], args: argparse.Namespace) -> None:
    sizes = sorted(results)
    setup = f"{args.resolution} px, batch {args.batch}, {args.steps} steps, {args.rounds} round(s)"
    print(f"\nlora on the tiny model, {setup}")
    print(f"{'contender':<20}" + "".join(f"{f'{size} images':>36}" for size in sizes))
    print(f"{'':<20}" + "".join(f"{'first step s':>13}{'peak RSS MB':>12}{'samples/s':>11}" for _ in sizes))
    for name in results[sizes[0]]:
        cells = "".join(
            f"{results[s][name]['first_step_s']:>13.1f}{results[s][name]['peak_rss_mb']:>12.0f}{results[s][name]['samples_per_s']:>11.1f}"
            for s in sizes
        )
        print(f"{name:<20}{cells}")
    small, large = sizes[0], sizes[-1]
    print(f"\nratios, {large} images against {small} (target: within 1.2x)")
    for name in results[small]:
        a, b = results[small][name], results[large][name]
        first, rss = b["first_step_s"] / a["first_step_s"], b["peak_rss_mb"] / a["peak_rss_mb"]
        print(f"{name:<20} first step {first:.2f}x   peak RSS {rss:.2f}x")
    if not {"s3", "shards"} <= set(args.sources):
        return
    print("\nsteady samples/s, s3 against local shards (target: within 10%)")
    for size in sizes:
        for cache in ("", " +cache", " +warm cache"):
            ratio = results[size][f"s3{cache}"]["samples_per_s"] / results[size][f"shards{cache}"]["samples_per_s"]
            print(f"{size} images{cache:<13} {ratio:.2f}")


if __name__ == "__main__":
    main()
