"""What torch.compile gains one UNet pass on this machine, for a model size: COMPILE=auto's evidence.

An inference pass (no gradients, a classifier-free-guidance batch) and a LoRA training pass (forward
and backward), each eager, with the transformer blocks compiled (what the training jobs compile) and
with the whole UNet compiled (what inference compiles), timed in one process on random inputs. Each
contender's first pass compiles, from empty caches, and is timed apart; then every repetition runs
all of one kind's contenders, in reverse order every other time. In bf16 training is as the jobs'
mixed precision has it: frozen weights in bf16, adapters in fp32, the pass under autocast.

    python bench/compiled_pass.py                                        # medium model, 256 px, fp32
    python bench/compiled_pass.py --size sd1 --resolution 512 --batch 1
    python bench/compiled_pass.py --size sd1 --device cuda --dtype bf16 --resolution 512 --batch 8
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch
from diffusers import UNet2DConditionModel
from diffusers.training_utils import cast_training_params
from harness import REPO, machine
from peft import LoraConfig

sys.path.insert(0, str(REPO / "tests"))
sys.path.insert(0, str(REPO))

from tiny_model import MAX_LENGTH, build  # noqa: E402

from jobs.cli import keep_freed_memory  # noqa: E402
from jobs.strategies import UNET_LORA_TARGETS  # noqa: E402

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
COMPILED = {"eager": "eager", "blocks": "blocks compiled", "whole": "whole UNet compiled"}


def unet_for(model: Path, kind: str, compiled: str, device: torch.device, dtype: torch.dtype) -> torch.nn.Module:
    unet = UNet2DConditionModel.from_pretrained(model / "unet", torch_dtype=dtype).requires_grad_(False)
    unet.to(device)
    if kind == "training":
        unet.add_adapter(LoraConfig(r=4, lora_alpha=4, target_modules=UNET_LORA_TARGETS))
        cast_training_params(unet, torch.float32)
    if compiled == "blocks":
        # As jobs/train.py: a static graph for each UNet level's input, with and without gradients.
        torch._dynamo.config.recompile_limit = 2 * (len(unet.config.block_out_channels) + 1)
        unet.compile_repeated_blocks(fullgraph=True, dynamic=False)
    elif compiled == "whole":
        unet = torch.compile(unet)
    return unet


def pass_of(kind: str, unet: torch.nn.Module, args: argparse.Namespace, device: torch.device) -> Callable[[], None]:
    dtype = DTYPES[args.dtype]
    batch = 2 * args.batch if kind == "inference" else args.batch  # guidance runs each image twice
    latents = torch.randn(batch, 4, args.resolution // 8, args.resolution // 8, device=device, dtype=dtype)
    timesteps = torch.randint(0, 1000, (batch,), device=device)
    text = torch.randn(batch, MAX_LENGTH, unet.config.cross_attention_dim, device=device, dtype=dtype)
    autocast = torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32)

    def inference() -> None:
        with torch.no_grad():
            unet(latents, timesteps, text, return_dict=False)

    def training() -> None:
        with autocast:
            prediction = unet(latents, timesteps, text, return_dict=False)[0]
        torch.nn.functional.mse_loss(prediction.float(), latents.float()).backward()

    return inference if kind == "inference" else training


def timed(run: Callable[[], None], device: torch.device) -> float:
    started = time.perf_counter()
    run()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - started


def time_kind(model: Path, kind: str, args: argparse.Namespace, device: torch.device) -> list[tuple]:
    """One kind's contenders, alternating; a row each: name, first pass, eager and own median seconds.
    Only one kind's UNets are held at a time (SD 1.x's are 3.4 GB each in fp32)."""
    names = {f"{kind}, {COMPILED[compiled]}": compiled for compiled in ("eager", *args.compiled)}
    passes, first = {}, {}
    for name, compiled in names.items():
        passes[name] = pass_of(kind, unet_for(model, kind, compiled, device, DTYPES[args.dtype]), args, device)
        first[name] = timed(passes[name], device)  # compiles
        print(f"{name}: first pass {first[name]:.1f} s", file=sys.stderr, flush=True)
    seconds = {name: [] for name in names}
    for repeat in range(args.repeats):
        for name in names if repeat % 2 == 0 else reversed(names):
            seconds[name].append(timed(passes[name], device))
    torch._dynamo.reset()  # compiled code refers to its UNet: let this kind's go
    eager = statistics.median(seconds[f"{kind}, eager"])
    return [(name, first[name], eager, statistics.median(seconds[name])) for name in names]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", default="medium", help="fixture size (tests/tiny_model.py)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", choices=DTYPES, default="fp32")
    parser.add_argument("--resolution", type=int, default=256)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=6)
    parser.add_argument("--kinds", nargs="+", choices=("inference", "training"), default=["inference", "training"])
    parser.add_argument("--compiled", nargs="+", choices=("blocks", "whole"), default=["blocks", "whole"])
    args = parser.parse_args()
    keep_freed_memory()
    torch.manual_seed(0)
    device = torch.device(args.device)
    with tempfile.TemporaryDirectory(prefix="bench-compiled-pass-") as folder:
        # Empty caches of inductor's and Triton's own: each first pass is a cold compile.
        os.environ["TORCHINDUCTOR_CACHE_DIR"], os.environ["TRITON_CACHE_DIR"] = f"{folder}/inductor", f"{folder}/triton"
        model = build(Path(folder, "model"), args.size)
        rows = [row for kind in args.kinds for row in time_kind(model, kind, args, device)]

    setup = f"{args.size} model, {args.resolution} px, batch {args.batch}, {args.dtype}, median of {args.repeats}"
    print(f"{setup}\n{machine(args.device)}")
    print(f"{'contender':<34}{'first pass s':>13}{'pass s':>10}{'saved s':>9}   speed")
    for name, first, eager, median in rows:
        print(f"{name:<34}{first:>13.2f}{median:>10.3f}{eager - median:>9.3f}   {eager / median:.2f}x ")


if __name__ == "__main__":
    main()
