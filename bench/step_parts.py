"""The parts of a LoRA training step, timed in one process: how much latent caching can gain at most.

Upstream's step (bench/upstream_train.py) decodes the batch's images, encodes them through the VAE
and the captions through the text encoder, then runs the UNet forward and backward and steps AdamW.
With `--cache_latents` our step is the UNet pass and a fused AdamW alone. The parts run in turn, in
reverse order every other repetition, on random inputs; the ratio is the upstream step's parts over
the cached step's, before compiling, which only speeds up the UNet pass.

    python bench/step_parts.py                                    # medium model, 256 px, batch 4
    python bench/step_parts.py --size sd1 --resolution 512 --batch 1
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
from diffusers import AutoencoderKL, UNet2DConditionModel
from harness import REPO, machine
from peft import LoraConfig
from train import make_dataset
from transformers import CLIPTextModel
from upstream_train import load_example

sys.path.insert(0, str(REPO / "tests"))
sys.path.insert(0, str(REPO))

from tiny_model import MAX_LENGTH, build  # noqa: E402

from jobs.cli import keep_freed_memory  # noqa: E402
from jobs.strategies import UNET_LORA_TARGETS  # noqa: E402


def time_parts(model: Path, data: Path, args: argparse.Namespace) -> dict[str, float]:
    """Each part's median seconds."""
    unet = UNet2DConditionModel.from_pretrained(model / "unet").requires_grad_(False)
    vae = AutoencoderKL.from_pretrained(model / "vae").requires_grad_(False)
    text_encoder = CLIPTextModel.from_pretrained(model / "text_encoder").requires_grad_(False)
    unet.add_adapter(LoraConfig(r=4, lora_alpha=4, target_modules=UNET_LORA_TARGETS))
    adapters = [p for p in unet.parameters() if p.requires_grad]
    adamw, fused_adamw = torch.optim.AdamW(adapters, lr=1e-4), torch.optim.AdamW(adapters, lr=1e-4, fused=True)

    records = [{"file_name": path.name} for path in sorted(data.glob("*.png"))]
    pixels = torch.randn(args.batch, 3, args.resolution, args.resolution)
    ids = torch.randint(5, text_encoder.config.vocab_size, (args.batch, MAX_LENGTH))
    latents = torch.randn(args.batch, 4, args.resolution // 8, args.resolution // 8)
    timesteps = torch.randint(0, 1000, (args.batch,))
    with torch.no_grad():
        text_embeddings = text_encoder(ids)[0]

    def unet_pass() -> None:
        prediction = unet(latents, timesteps, text_embeddings, return_dict=False)[0]
        torch.nn.functional.mse_loss(prediction, latents).backward()

    def step(optimizer: torch.optim.Optimizer) -> None:
        torch.nn.utils.clip_grad_norm_(adapters, 1.0)
        optimizer.step()
        optimizer.zero_grad()

    parts = {
        "load images": lambda: [load_example(data, record, args.resolution) for record in records],
        "VAE encode": lambda: vae.encode(pixels).latent_dist.sample(),
        "text encode": lambda: text_encoder(ids),
        "UNet forward and backward": unet_pass,
        "AdamW": lambda: step(adamw),
        "fused AdamW": lambda: step(fused_adamw),
    }
    seconds: dict[str, list[float]] = {name: [] for name in parts}
    for repeat in range(args.repeats + 1):  # the first is a warm-up
        for name in list(parts) if repeat % 2 == 0 else reversed(parts):
            if name.endswith("AdamW"):
                unet_pass()  # gradients to step on, untimed
            started = time.perf_counter()
            parts[name]()
            if repeat:
                seconds[name].append(time.perf_counter() - started)
    return {name: statistics.median(values) for name, values in seconds.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", default="medium", help="fixture size (tests/tiny_model.py)")
    parser.add_argument("--resolution", type=int, default=256)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    keep_freed_memory()
    torch.manual_seed(0)
    with tempfile.TemporaryDirectory(prefix="bench-step-parts-") as folder:
        model = build(Path(folder, "model"), args.size)
        data = make_dataset(Path(folder, "data"), args.batch, 2 * args.resolution)
        median = time_parts(model, data, args)
    upstream = sum(value for name, value in median.items() if name != "fused AdamW")
    cached = median["UNet forward and backward"] + median["fused AdamW"]

    print(f"{args.size} model, {args.resolution} px, batch {args.batch}, fp32, median of {args.repeats}")
    print(machine("cpu"))
    for name, value in median.items():
        print(f"{name:<40}{value:>9.3f} s")
    print(f"{'upstream step (loads, encodes, trains)':<40}{upstream:>9.3f} s   1.00x ")
    print(f"{'cached step (trains)':<40}{cached:>9.3f} s   {upstream / cached:.2f}x ")


if __name__ == "__main__":
    main()
