"""Generation benchmark: the seed's snippet against the `generate` job, same model, same machine.

Each contender runs as its own process and is timed whole, start-up included, as a user would
time it. Printed: images/s, peak memory and the ratio to the seed's snippet (averaged over rounds).

    python bench/generate.py                          # CPU, medium PAI-shaped model
    python bench/generate.py --rounds 3               # the same, three rounds
    python bench/generate.py --size sd1 --device cuda # full SD 1.x architecture on a GPU
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

from harness import REPO, Contender, machine, mean, print_spread, round_ratios, run_rounds

sys.path.insert(0, str(REPO / "tests"))

from tiny_model import build  # noqa: E402

# The seed's text-to-image snippet as written (pipeline defaults, one prompt per call, images
# saved one by one), looped over the prompts; the last line reports the process's peak memory.
SEED_SNIPPET = """
import json, os, resource, sys, torch
from diffusers import StableDiffusionPipeline

model_id, device, prompts_file = sys.argv[1:4]
out = os.environ["OUTPUT_DIR"]
pipe = StableDiffusionPipeline.from_pretrained(model_id)
pipe = pipe.to(device)
for i, prompt in enumerate(open(prompts_file, encoding="utf-8").read().splitlines()):
    torch.manual_seed(i)
    image = pipe(prompt).images[0]
    image.save(f"{out}/result-{i}.png")
print(json.dumps({"peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                  "peak_cuda_mb": torch.cuda.max_memory_allocated() / 2**20 if device == "cuda" else 0}))
"""

# The generate job, in-process, reporting the same peak-memory line.
OUR_JOB = """
import json, resource, sys, torch
from jobs.cli import main

code = main(["generate"])
print(json.dumps({"peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                  "peak_cuda_mb": torch.cuda.max_memory_allocated() / 2**20 if torch.cuda.is_available() else 0}))
sys.exit(code)
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", default="medium", help="fixture size (tests/tiny_model.py)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--prompts", type=int, default=16)
    parser.add_argument("--rounds", type=int, default=1, help="run every contender this many times")
    parser.add_argument("--peak_tflops", type=float, default=790, help="the GPU's dense fp16/bf16 peak (H100/H200)")
    args = parser.parse_args()
    print(machine(args.device))

    with tempfile.TemporaryDirectory(prefix="bench-generate-") as folder:
        compare(Path(folder), args)


def compare(work: Path, args: argparse.Namespace) -> None:
    """Run the seed's snippet and the generate job on one model; print their images/s and ratios."""
    model = build(work / f"model-{args.size}", args.size)
    lines = (REPO / "bench" / "prompts.txt").read_text(encoding="utf-8").splitlines()
    prompts = [lines[i % len(lines)] for i in range(args.prompts)]
    prompts_file = work / "prompts.txt"
    prompts_file.write_text("\n".join(prompts) + "\n", encoding="utf-8")
    common = {"MODEL_NAME": str(model), "PROMPTS_FILE": str(prompts_file), "DEVICE": args.device}

    our_job = [sys.executable, "-c", OUR_JOB]
    equal_steps = {"SCHEDULER": "pndm", "NUM_INFERENCE_STEPS": "50"}
    seed_snippet = [sys.executable, "-c", SEED_SNIPPET, str(model), args.device, str(prompts_file)]
    contenders = {
        "seed snippet (pndm, 50 steps, 1 prompt/call)": Contender(seed_snippet),
        "generate job, defaults": Contender(our_job, common),
        "generate job, SCHEDULER=pndm NUM_INFERENCE_STEPS=50": Contender(our_job, {**common, **equal_steps}),
        # The seed's precision too: what is left is the job's own engineering.
        "generate job, ... and DTYPE=fp32": Contender(our_job, {**common, **equal_steps, "DTYPE": "fp32"}),
    }
    runs = run_rounds(contenders, args.rounds, work, {"HF_HUB_OFFLINE": "1"})

    def rate(run: dict) -> float:
        return len(prompts) / run["seconds"]

    ratios = round_ratios(runs, next(iter(runs)), rate)
    setup = f"model size {args.size}, device {args.device}, whole process timed, {args.rounds} round(s)"
    print(f"\n{len(prompts)} prompts, {setup}\n")
    print(f"{'contender':<55} {'images/s':>9} {'ratio':>7} {'peak RSS MB':>12} {'peak CUDA MB':>13}")
    for name, own in runs.items():
        memory = f"{max(run['peak_rss_mb'] for run in own):>12.0f} {max(run['peak_cuda_mb'] for run in own):>13.0f}"
        print(f"{name:<55} {mean([rate(run) for run in own]):>9.3f} {mean(ratios[name]):>6.2f}x {memory}")
    print_spread("ratio", ratios)
    if args.size == "sd1":
        # SD 1.x at 512x512: 1.35 TFLOP per guided UNet step, 2.5 TFLOP per VAE decode.
        steps = 25
        flops = len(prompts) * (steps * 1.35e12 + 2.5e12)
        seconds = mean([run["seconds"] for run in runs["generate job, defaults"]])
        utilisation = flops / seconds / (args.peak_tflops * 1e12)
        print(f"\nmodel FLOP utilisation of the generate job's defaults ({steps} steps): {utilisation:.1%}")


if __name__ == "__main__":
    main()
