"""VAE decode of a batch: the whole batch in one pass against one image at a time (`generate`'s way).

The decode is the largest activation of a batch: SD 1.x's VAE at 512x512 holds 128- to 512-channel
feature maps at full resolution for every image. Each way runs in its own process, on random
latents and a VAE with random weights, so each has its own peak memory. Printed: seconds per image,
the ratio to the whole-batch pass, and peak memory.

    python bench/vae_decode.py                                              # CPU, medium VAE, 8 at 256 px
    python bench/vae_decode.py --size sd1 --device cuda --batch 32 --resolution 512
"""

from __future__ import annotations

import argparse
import sys

from harness import REPO, machine, timed

# One way of decoding, timed after a warm-up pass of the same shape; its peak memory on the last line.
DECODE = """
import json, resource, sys, time, torch
from jobs.models import resolve_dtype
from tiny_model import autoencoder

size, device, batch, resolution, repeats, sliced = sys.argv[1:7]
device = torch.device(device)
vae = autoencoder(size).to(device, resolve_dtype("auto", device)).eval()
if sliced == "sliced":
    vae.enable_slicing()
side = int(resolution) // 2 ** (len(vae.config.block_out_channels) - 1)
latents = torch.randn(int(batch), 4, side, side, device=device, dtype=vae.dtype)

def decode():
    with torch.inference_mode():
        vae.decode(latents)
    if device.type == "cuda":
        torch.cuda.synchronize()

decode()
if device.type == "cuda":
    torch.cuda.reset_peak_memory_stats()
started = time.perf_counter()
for _ in range(int(repeats)):
    decode()
seconds = (time.perf_counter() - started) / int(repeats) / int(batch)
print(json.dumps({"seconds_per_image": seconds, "dtype": str(vae.dtype),
                  "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                  "peak_cuda_mb": torch.cuda.max_memory_allocated() / 2**20 if device.type == "cuda" else 0}))
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", default="medium", help="fixture size (tests/tiny_model.py)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--resolution", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    print(machine(args.device))

    shape = [args.size, args.device, str(args.batch), str(args.resolution), str(args.repeats)]
    environment = {"PYTHONPATH": f"{REPO}:{REPO / 'tests'}"}
    runs = {way: timed([sys.executable, "-c", DECODE, *shape, way], environment) for way in ("whole batch", "sliced")}

    baseline = runs["whole batch"]["seconds_per_image"]
    dtype = runs["sliced"]["dtype"].removeprefix("torch.")
    print(f"\n{args.batch} latents, VAE size {args.size}, {args.resolution} px, {dtype}, device {args.device}\n")
    print(f"{'decode':<12} {'s/image':>9} {'ratio':>7} {'peak RSS MB':>12} {'peak CUDA MB':>13}")
    for way, run in runs.items():
        seconds = run["seconds_per_image"]
        memory = f"{run['peak_rss_mb']:>12.0f} {run['peak_cuda_mb']:>13.0f}"
        print(f"{way:<12} {seconds:>9.4f} {baseline / seconds:>6.2f}x {memory}")


if __name__ == "__main__":
    main()
