"""Compiling: a cold compile, a warm one from the persisted compile cache, and the steady speed, for
`generate` and `lora`, against the seed's snippet and the upstream training step.

Each run is a fresh process, compiling (if it does) in an empty folder of its own, as a new pod does.
"cold": an empty COMPILE_CACHE_DIR; "warm": one that an earlier (untimed) run filled, as the
model-cache volume is after the first pod. Printed: seconds from launch to the first image (or to the end of the first
step), the whole process, the steady rate, and ratios to the baseline, in alternating rounds.

    python bench/compile.py                     # medium model, fp32 (a CPU without bf16 instructions)
    python bench/compile.py --dtype bf16 --rounds 1
    python bench/compile.py --jobs lora --size sd1 --resolution 512 --batch 1 --steps 16 --rounds 1
    python bench/compile.py --size sd1 --device cuda --dtype fp16 --prompts 256 32 --resolution 512 --batch 8
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

from generate import SEED_SNIPPET
from harness import REPO, Contender, machine, mean, print_spread, round_ratios, run_rounds, timed
from train import OUR_JOB as OUR_TRAINING_JOB
from train import make_dataset

sys.path.insert(0, str(REPO / "tests"))

from tiny_model import build  # noqa: E402

# The generate job in-process: when each batch was saved and how many images it held, on the last
# line. A cold run gets a compile cache of its own.
OUR_GENERATE_JOB = """
import json, os, resource, sys, time
out = os.environ["OUTPUT_DIR"]
if os.environ.pop("COLD", None):
    os.environ["COMPILE_CACHE_DIR"] = out + "/compile-cache"
import jobs.inference
from jobs.cli import main
saved, save = [], jobs.inference.save_batch
def timed_save(images, *args, **kwargs):
    save(images, *args, **kwargs)
    saved.append((time.time(), len(images)))
jobs.inference.save_batch = timed_save
code = main(["generate"])
print(json.dumps({"saved": saved, "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))
sys.exit(code)
"""
TRAINING_JOB = (
    """
import os
out = os.environ["OUTPUT_DIR"]
if os.environ.pop("COLD", None):
    os.environ["COMPILE_CACHE_DIR"] = out + "/compile-cache"
"""
    + OUR_TRAINING_JOB
)


def fill(command: list[str], env: dict[str, str], work: Path) -> None:
    """One untimed run that fills the warm contenders' compile cache."""
    seconds = timed(command, {**env, "OUTPUT_DIR": str(work)})["seconds"]
    print(f"  filling the warm cache: {seconds:.1f} s", file=sys.stderr, flush=True)


def generation(work: Path, model: Path, args: argparse.Namespace) -> None:
    lines = (REPO / "bench" / "prompts.txt").read_text(encoding="utf-8").splitlines()
    for count in args.prompts:
        prompts = work / f"prompts-{count}.txt"
        prompts.write_text("\n".join(lines[i % len(lines)] for i in range(count)) + "\n", encoding="utf-8")
        warm = work / f"generate-cache-{count}"
        env = {"MODEL_NAME": str(model), "PROMPTS_FILE": str(prompts), "DTYPE": args.dtype, "DEVICE": args.device}
        env["HF_HUB_OFFLINE"] = "1"
        job = [sys.executable, "-c", OUR_GENERATE_JOB]
        fill(job, {**env, "COMPILE": "true", "COMPILE_CACHE_DIR": str(warm)}, work / f"fill-generate-{count}")
        snippet = [sys.executable, "-c", SEED_SNIPPET, str(model), args.device, str(prompts)]
        contenders = {
            "seed snippet": Contender(snippet, {"HF_HUB_OFFLINE": "1"}),
            "generate, COMPILE=false": Contender(job, {**env, "COMPILE": "false"}),
            "generate, COMPILE=auto, cold": Contender(job, {**env, "COLD": "1"}),
            "generate, COMPILE=auto, warm": Contender(job, {**env, "COMPILE_CACHE_DIR": str(warm)}),
        }
        if count < 32:  # where auto does not compile: what a forced compile costs, cold and warm
            contenders["generate, COMPILE=true, cold"] = Contender(job, {**env, "COMPILE": "true", "COLD": "1"})
            contenders["generate, COMPILE=true, warm"] = Contender(
                job, {**env, "COMPILE": "true", "COMPILE_CACHE_DIR": str(warm)}
            )
        runs = run_rounds(contenders, args.rounds, work / f"generate-{count}", {"OMP_WAIT_POLICY": "PASSIVE"})
        ratios = round_ratios(runs, "seed snippet", lambda run: 1 / run["seconds"])
        print(f"\ngenerate, {count} prompts, {args.size} model, {args.dtype}, {args.rounds} round(s)", end="")
        print("; ratio: whole process")
        print(f"{'contender':<32}{'first image s':>14}{'process s':>11}{'steady images/s':>17}{'ratio':>8}")
        for name, own in runs.items():
            first = mean([r["saved"][0][0] - r["launched_at"] for r in own]) if "saved" in own[0] else float("nan")
            steady = [  # the images saved after the second batch, over the time they took
                sum(count for _, count in r["saved"][2:]) / (r["saved"][-1][0] - r["saved"][1][0])
                for r in own
                if len(r.get("saved", [])) > 3
            ]
            rate = f"{mean(steady):>17.3f}" if steady else f"{'':>17}"
            print(
                f"{name:<32}{first:>14.1f}{mean([r['seconds'] for r in own]):>11.1f}{rate}{mean(ratios[name]):>7.2f}x"
            )
        print_spread("ratio", ratios)


def training(work: Path, model: Path, args: argparse.Namespace) -> None:
    data = make_dataset(work / "data", args.images, 2 * args.resolution)
    flags = [f"--pretrained_model_name_or_path={model}", f"--train_data_dir={data}", f"--resolution={args.resolution}"]
    flags += [f"--train_batch_size={args.batch}", f"--max_train_steps={args.steps}", "--center_crop", "--random_flip"]
    flags += ["--lr_warmup_steps=0", "--report_to=none", f"--checkpointing_steps={args.steps * 10}", "--no_save_merged"]
    flags += [
        f"--device={args.device}",
        "--cache_latents",
        f"--mixed_precision={'no' if args.dtype == 'fp32' else args.dtype}",
    ]
    job = [sys.executable, "-c", TRAINING_JOB, "lora", *flags]
    warm = work / "lora-cache"
    fill(job, {"COMPILE": "true", "COMPILE_CACHE_DIR": str(warm), "HF_HUB_OFFLINE": "1"}, work / "fill-lora")
    upstream = [
        sys.executable,
        "bench/upstream_train.py",
        str(model),
        str(data),
        "--mode=lora",
        f"--steps={args.steps}",
    ]
    upstream += [
        f"--batch={args.batch}",
        f"--resolution={args.resolution}",
        f"--device={args.device}",
        f"--mixed_precision={'no' if args.dtype == 'fp32' else args.dtype}",
    ]
    contenders = {
        "upstream step": Contender(upstream),
        "lora, COMPILE=false": Contender(job, {"COMPILE": "false"}),
        "lora, COMPILE=true, cold": Contender(job, {"COMPILE": "true", "COLD": "1"}),
        "lora, COMPILE=true, warm": Contender(job, {"COMPILE": "true", "COMPILE_CACHE_DIR": str(warm)}),
        "lora, COMPILE=auto, warm": Contender(job, {"COMPILE_CACHE_DIR": str(warm)}),
    }
    runs = run_rounds(contenders, args.rounds, work / "lora", {"OMP_WAIT_POLICY": "PASSIVE", "HF_HUB_OFFLINE": "1"})
    first = max(2, args.steps // 4 + 1)

    def steady(run: dict) -> float:
        return (args.steps - first) * args.batch / (run["step_starts"][-1] - run["step_starts"][first - 1])

    ratios = round_ratios(runs, "upstream step", steady)
    shape = f"{args.steps} steps x batch {args.batch} at {args.resolution} px, {args.size} model, {args.dtype}"
    print(f"\nlora, {shape}; ratio: steady samples/s")
    print(f"{'contender':<28}{'first step s':>13}{'process s':>11}{'steady samples/s':>18}{'ratio':>8}")
    for name, own in runs.items():
        start = mean([run["step_starts"][1] - run["launched_at"] for run in own])
        line = (
            f"{name:<28}{start:>13.1f}{mean([r['seconds'] for r in own]):>11.1f}{mean([steady(r) for r in own]):>18.2f}"
        )
        print(f"{line}{mean(ratios[name]):>7.2f}x")
    print_spread("steady ratio", ratios)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", default="medium", help="fixture size (tests/tiny_model.py)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="fp32", choices=["fp32", "bf16", "fp16"])
    parser.add_argument("--prompts", type=int, nargs="+", default=[32, 4])
    parser.add_argument("--jobs", nargs="+", choices=["generate", "lora"], default=["generate", "lora"])
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--resolution", type=int, default=256)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--images", type=int, default=16)
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args()
    print(machine(args.device))
    with tempfile.TemporaryDirectory(prefix="bench-compile-") as folder:
        work = Path(folder)
        model = build(work / "model", args.size)
        if "generate" in args.jobs:
            generation(work, model, args)
        if "lora" in args.jobs:
            training(work, model, args)


if __name__ == "__main__":
    main()
