"""The training step of diffusers' text-to-image examples (what EasyNLP's scripts run), as a baseline.

Every step it decodes the images from disk, encodes them through the VAE and the captions through
the text encoder, then trains: no caching, the default AdamW. It trains peft LoRA adapters on the
UNet's attention projections (`--mode lora`) or the whole UNet (`--mode full`). With
`--mixed_precision bf16` (or `fp16`) it does what the examples do: frozen modules in half precision,
trained weights in fp32, the UNet's forward pass under autocast, and for fp16 a gradient scaler.

    python bench/upstream_train.py MODEL DATA_DIR --mode lora --steps 40 --batch 4 --resolution 64
"""

from __future__ import annotations

import argparse
import json
import random
import resource
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
from diffusers.training_utils import cast_training_params
from peft import LoraConfig
from PIL import Image
from transformers import AutoTokenizer, CLIPTextModel


def load_example(folder: Path, record: dict, resolution: int) -> torch.Tensor:
    """Resize, centre-crop, random flip and normalise, as the examples' torchvision transforms do."""
    image = Image.open(folder / record["file_name"]).convert("RGB")
    scale = resolution / min(image.size)
    image = image.resize((round(image.width * scale), round(image.height * scale)), Image.BILINEAR)
    left, top = (image.width - resolution) // 2, (image.height - resolution) // 2
    image = image.crop((left, top, left + resolution, top + resolution))
    if random.random() < 0.5:
        image = image.transpose(Image.FLIP_LEFT_RIGHT)
    pixels = torch.from_numpy(np.asarray(image, dtype=np.float32) / 127.5 - 1.0)
    return pixels.permute(2, 0, 1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model", type=Path)
    parser.add_argument("data", type=Path)
    parser.add_argument("--mode", choices=["lora", "full"], default="lora")
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--resolution", type=int, default=64)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--mixed_precision", choices=["no", "bf16", "fp16"], default="no")
    args = parser.parse_args()
    torch.manual_seed(0)
    random.seed(0)
    device = torch.device(args.device)
    half = {"no": None, "bf16": torch.bfloat16, "fp16": torch.float16}[args.mixed_precision]
    weight_dtype = half or torch.float32
    scaler = torch.amp.GradScaler(device.type, enabled=half is torch.float16)

    tokenizer = AutoTokenizer.from_pretrained(args.model, subfolder="tokenizer")
    text_encoder = CLIPTextModel.from_pretrained(args.model, subfolder="text_encoder")
    vae = AutoencoderKL.from_pretrained(args.model, subfolder="vae")
    unet = UNet2DConditionModel.from_pretrained(args.model, subfolder="unet")
    noise_scheduler = DDPMScheduler.from_pretrained(args.model, subfolder="scheduler")
    vae.requires_grad_(False).to(device, weight_dtype)
    text_encoder.requires_grad_(False).to(device, weight_dtype)
    if args.mode == "lora":
        unet.requires_grad_(False).to(device, weight_dtype)
        unet.add_adapter(LoraConfig(r=4, lora_alpha=4, target_modules=["to_k", "to_q", "to_v", "to_out.0"]))
        cast_training_params(unet, dtype=torch.float32)
    else:
        unet.to(device)
    params = [p for p in unet.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-4)

    records = [json.loads(line) for line in (args.data / "metadata.jsonl").read_text(encoding="utf-8").splitlines()]
    started = time.perf_counter()
    step_starts, train_loss = [], 0.0
    for step in range(args.steps):
        step_starts.append(time.time())  # wall clock, as bench/train.py's
        batch = [records[(step * args.batch + i) % len(records)] for i in range(args.batch)]
        pixels = torch.stack([load_example(args.data, r, args.resolution) for r in batch])
        ids = tokenizer(
            [r["text"] for r in batch],
            max_length=tokenizer.model_max_length,
            padding="max_length",
            truncation=True,
            return_tensors="pt",
        ).input_ids.to(device)
        latents = vae.encode(pixels.to(device, weight_dtype)).latent_dist.sample() * vae.config.scaling_factor
        noise = torch.randn_like(latents)
        timesteps = torch.randint(0, noise_scheduler.config.num_train_timesteps, (len(batch),), device=device)
        noisy = noise_scheduler.add_noise(latents, noise, timesteps)
        hidden_states = text_encoder(ids)[0]
        with torch.autocast(device.type, dtype=half or torch.bfloat16, enabled=half is not None):
            prediction = unet(noisy, timesteps, hidden_states).sample
        loss = F.mse_loss(prediction.float(), noise.float())
        scaler.scale(loss).backward()
        train_loss += loss.item()  # as upstream logs it; on a GPU, this waits for the step
        scaler.unscale_(optimizer)
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        scaler.step(optimizer)
        scaler.update()
        optimizer.zero_grad()
    if device.type == "cuda":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - started
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    peak_cuda = torch.cuda.max_memory_allocated() / 2**20 if device.type == "cuda" else 0
    timing = {"train_seconds": seconds, "step_starts": step_starts, "mean_loss": train_loss / args.steps}
    print(json.dumps({**timing, "peak_rss_mb": peak, "peak_cuda_mb": peak_cuda}))


if __name__ == "__main__":
    main()
