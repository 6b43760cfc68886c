"""Training benchmark: the upstream examples' step against our `lora` and `finetune` jobs.

Same model, same data, same batch, resolution and step count; each contender is its own process.
Printed for each: samples/s of the whole process (loading, caching and the final save included),
of the training loop alone, and of its steady state (the steps after the first quarter: what a run
of thousands of steps converges to), as ratios to the upstream step in fp32 (averaged over rounds),
and peak memory.
Each job runs in fp32 and in bf16 (`--mixed_precision bf16`; upstream's examples then keep the
frozen modules in bf16 too); ours once more with COMPILE=true.

    python bench/train.py                              # CPU, medium PAI-shaped model
    python bench/train.py --rounds 3                   # the same, three rounds
    python bench/train.py --size sd1 --device cuda --resolution 512
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path

from harness import REPO, Contender, machine, mean, print_spread, round_ratios, run_rounds
from PIL import Image

sys.path.insert(0, str(REPO / "tests"))

from tiny_model import build  # noqa: E402

# Our job in-process, reporting its loop time (from trainer_state.json), when each step started (read
# by wrapping its loss function, which each step calls once) and peak memory, on the last line.
OUR_JOB = """
import json, os, resource, sys, time, torch
from pathlib import Path
import jobs.train
from jobs.cli import main

step_starts, loss = [], jobs.train.diffusion_loss
def timed_loss(*args, **kwargs):
    step_starts.append(time.time())  # wall clock: bench/compile.py compares it with the launch
    return loss(*args, **kwargs)
jobs.train.diffusion_loss = timed_loss

code = main(sys.argv[1:])
state = json.loads((Path(os.environ["OUTPUT_DIR"]) / "trainer_state.json").read_text())
print(json.dumps({"train_seconds": state["train_runtime"], "step_starts": step_starts,
                  "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                  "peak_cuda_mb": torch.cuda.max_memory_allocated() / 2**20 if torch.cuda.is_available() else 0}))
sys.exit(code)
"""


def gradient_image(size: int, shift: int) -> Image.Image:
    base = Image.linear_gradient("L").resize((size, size))
    return Image.merge("RGB", [base.point(lambda v, k=k: (v + shift * (k + 1)) % 256) for k in range(3)])


def make_dataset(folder: Path, count: int, size: int) -> Path:
    """Coloured gradient images with Chinese captions, in the seed's metadata.jsonl layout."""
    folder.mkdir(parents=True)
    captions = (REPO / "bench" / "prompts.txt").read_text(encoding="utf-8").splitlines()
    lines = []
    for i in range(count):
        image = gradient_image(size, shift=40 * i)
        image.save(folder / f"{i:03d}.png")
        lines.append(json.dumps({"file_name": f"{i:03d}.png", "text": captions[i % len(captions)]}, ensure_ascii=False))
    (folder / "metadata.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")
    return folder


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", default="medium", help="fixture size (tests/tiny_model.py)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--resolution", type=int, default=256)
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--images", type=int, default=16)
    parser.add_argument("--rounds", type=int, default=1, help="run every contender this many times")
    parser.add_argument("--compile", action=argparse.BooleanOptionalAction, default=True, help="add COMPILE=true runs")
    args = parser.parse_args()
    print(machine(args.device))

    with tempfile.TemporaryDirectory(prefix="bench-train-") as folder:
        compare(Path(folder), args)


def compare(work: Path, args: argparse.Namespace) -> None:
    """Run the upstream step and our jobs on one model and dataset; print samples/s and ratios."""
    model = build(work / f"model-{args.size}", args.size)
    data = make_dataset(work / "data", args.images, args.resolution * 2)
    env = {
        "HF_HUB_OFFLINE": "1",
        "CUDA_VISIBLE_DEVICES": "" if args.device == "cpu" else os.environ.get("CUDA_VISIBLE_DEVICES", "0"),
        # Every compile starts cold, as in a fresh pod: torch's on-disk cache would make a second run's cheaper.
        "TORCHINDUCTOR_FORCE_DISABLE_CACHES": "1",
    }
    shared = [
        f"--pretrained_model_name_or_path={model}",
        f"--train_data_dir={data}",
        f"--resolution={args.resolution}",
        f"--train_batch_size={args.batch}",
        f"--max_train_steps={args.steps}",
        "--center_crop",
        "--random_flip",
        "--lr_warmup_steps=0",
        "--report_to=none",
        f"--checkpointing_steps={args.steps * 10}",
    ]
    contenders: dict[str, Contender] = {}
    for mode, job, extra in (("lora", "lora", ["--no_save_merged"]), ("full", "finetune", [])):
        ours = [sys.executable, "-c", OUR_JOB, job, *shared, *extra, "--cache_latents"]
        for precision, name in (("no", "fp32"), ("bf16", "bf16")):
            mixed_precision = f"--mixed_precision={precision}"
            upstream = [sys.executable, "bench/upstream_train.py", str(model), str(data), f"--mode={mode}"]
            upstream += [f"--steps={args.steps}", f"--batch={args.batch}", f"--resolution={args.resolution}"]
            upstream += [f"--device={args.device}", mixed_precision]
            contenders[f"{job}: upstream step, {name}"] = Contender(upstream)
            contenders[f"{job}: our job, --cache_latents, {name}"] = Contender([*ours, mixed_precision])
        if args.compile:
            compiled = Contender([*ours, "--mixed_precision=bf16"], {"COMPILE": "true"})
            contenders[f"{job}: our job, --cache_latents, bf16, COMPILE=true"] = compiled

    runs = run_rounds(contenders, args.rounds, work, env)

    # Steady state: from the start of step `first` to the start of the last step. It leaves out what a
    # long run pays once (start-up, the first steps, compiling).
    first = max(2, args.steps // 4 + 1)
    samples, steady_samples = args.steps * args.batch, (args.steps - first) * args.batch
    rates = {
        "process": lambda run: samples / run["seconds"],
        "loop": lambda run: samples / run["train_seconds"],
        "steady": lambda run: steady_samples / (run["step_starts"][-1] - run["step_starts"][first - 1]),
    }
    ratios: dict[str, dict[str, list[float]]] = {kind: {} for kind in rates}
    for job in ("lora", "finetune"):  # each job's rows over its own upstream step
        group = {name: own for name, own in runs.items() if name.startswith(f"{job}:")}
        for kind, rate in rates.items():
            ratios[kind] |= round_ratios(group, f"{job}: upstream step, fp32", rate)

    setup = f"{args.steps} steps x batch {args.batch} at {args.resolution}px, model {args.size}, device {args.device}"
    print(f"\n{samples} samples ({setup}), {args.rounds} round(s); ratios to the upstream step in fp32")
    print(f"steady: steps {first} to {args.steps - 1}\n")
    header = f"{'contender':<55} {'process samples/s':>18} {'ratio':>6} {'loop samples/s':>15} {'ratio':>6}"
    print(f"{header} {'steady samples/s':>17} {'ratio':>6} {'peak RSS MB':>12} {'peak CUDA MB':>13}")
    for name, own in runs.items():
        columns = [
            f"{mean([rate(run) for run in own]):>{width}.2f} {mean(ratios[kind][name]):>5.2f}x"
            for (kind, rate), width in zip(rates.items(), (18, 15, 17), strict=True)
        ]
        memory = f"{max(run['peak_rss_mb'] for run in own):>12.0f} {max(run['peak_cuda_mb'] for run in own):>13.0f}"
        print(f"{name:<55} {' '.join(columns)} {memory}")
    print_spread("steady ratio", ratios["steady"])


if __name__ == "__main__":
    main()
