"""torch.compile once per cluster, not once per pod, and only where it pays.

What inductor builds (its FX graph and AOTAutograd caches, the C++ kernels' shared objects on a CPU,
Triton's kernels on a GPU) goes to a folder of this process's own, and from there, as one gzipped
tar per key, to the model-cache volume (`COMPILE_CACHE_DIR`, default `$HF_HOME/pai-diffusion-compile`).
The key: the torch version, the device and its instructions, the dtype, the model (name, revision,
UNet config), what is compiled and for what shapes. A pod that finds its key unpacks the file into
its folder before compiling, and the compile then skips code generation and the C++ or Triton builds.
(torch.compiler.save_cache_artifacts is not enough on a CPU: it leaves out the shared objects, and a
warm start with it still took 95% of a cold one.) Files are written whole (jobs/atomic.py), so pods
writing one key at once cannot corrupt it; one that does not unpack is ignored with a warning, and
the run writes it again.

COMPILE=auto (the default) compiles when the work ahead is enough for it to pay: the UNet passes of
this shard's images, or of this run's training steps, against the break-even measured in
docs/benchmarks.md, lower when the cache is warm; on a CPU only UNets far narrower than SD's, the
only ones compiling made faster there. `true` and `false` force it.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import shutil
import tarfile
import tempfile
import zlib
from dataclasses import dataclass, field
from pathlib import Path

import torch

from jobs import atomic

log = logging.getLogger("jobs")

# UNet passes (an image's steps; a training run's micro-steps) after which compiling pays, with an
# empty cache and with this key's file in it (docs/benchmarks.md, *Compiling*).
BREAK_EVEN = {
    ("cpu", "inference"): (900, 100),
    ("cpu", "training"): (300, 50),
    # Guesses: on an H200 a cold compile took 65-80 s, but what a pass saves there is not yet measured
    # (docs/benchmarks.md, *GPU*).
    ("cuda", "inference"): (6000, 1000),
    ("cuda", "training"): (3000, 500),
}
# On a CPU compiling pays only for narrow UNets: it fuses the element-wise work between convolutions
# and attention, whose share falls as the channels widen. Compiled as the jobs compile them, the medium
# test model's passes (256 channels at most) were 1.03-1.19x as fast, SD 1.x's (1280, every PAI model's)
# 0.95-1.02x, inference and training (docs/benchmarks.md, *What compiling gains one UNet pass*).
CPU_WIDEST_THAT_GAINS = 256


def default_directory() -> Path:
    from huggingface_hub.constants import HF_HOME

    return Path(HF_HOME) / "pai-diffusion-compile"


def device_name(device: torch.device) -> str:
    """What compiled code depends on: the GPU model, or the CPU's vector instructions."""
    if device.type == "cuda":
        return f"cuda {torch.cuda.get_device_name(device)} {torch.version.cuda}"
    bf16 = torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported()
    return f"{device.type} {torch.backends.cpu.get_cpu_capability()}{' bf16' if bf16 else ''}"


@dataclass
class CompileCache:
    """This run's file of compiled code on the shared volume, and the private folder inductor builds in."""

    path: Path
    folder: tempfile.TemporaryDirectory = field(
        default_factory=lambda: tempfile.TemporaryDirectory(prefix="pai-diffusion-inductor-")
    )
    written: int = 0  # bytes in the folder when it was last unpacked or written

    @classmethod
    def for_key(cls, directory: Path, key: dict) -> CompileCache:
        digest = hashlib.sha256(json.dumps({"torch": torch.__version__, **key}, sort_keys=True, default=str).encode())
        return cls(directory / f"{digest.hexdigest()[:24]}.tar.gz")

    @property
    def warm(self) -> bool:
        return self.path.is_file()

    def use(self) -> None:
        """Point inductor and Triton at the private folder (before anything compiles), filled from the
        file if it is good. The image's TRITON_CACHE_DIR is overridden too, or a GPU's kernels would be
        left out of the file."""
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = self.folder.name
        os.environ["TRITON_CACHE_DIR"] = str(Path(self.folder.name, "triton"))
        if not self.warm:
            return
        try:
            with tarfile.open(self.path, "r:gz") as tar:
                tar.extractall(self.folder.name, filter="data")
        except (OSError, EOFError, tarfile.TarError, zlib.error) as error:  # damaged: compile afresh, write it again
            log.warning(
                "ignoring a compile cache file", extra={"fields": {"file": str(self.path), "problem": str(error)}}
            )
            shutil.rmtree(self.folder.name)  # a member may be half written
            os.mkdir(self.folder.name)
            return
        self.written = self._folder_bytes()

    def save(self) -> None:
        """Write what the folder holds, if it grew since it was unpacked or last written."""
        size = self._folder_bytes()
        if size <= self.written:
            return
        buffer = io.BytesIO()
        with tarfile.open(fileobj=buffer, mode="w:gz", compresslevel=1) as tar:
            for name in sorted(os.listdir(self.folder.name)):
                if name != "locks":  # inductor's lock files: one pod's, of no use to the next
                    tar.add(Path(self.folder.name, name), arcname=name)
        try:
            atomic.write_bytes(self.path, buffer.getvalue())
        except OSError as error:  # a read-only cache volume: the run goes on, the next one compiles again
            log.warning(
                "cannot write the compile cache", extra={"fields": {"file": str(self.path), "problem": str(error)}}
            )
            return
        self.written = size

    def _folder_bytes(self) -> int:
        return sum(file.stat().st_size for file in Path(self.folder.name).rglob("*") if file.is_file())


def decide(
    setting: str, passes: int, kind: str, device: torch.device, warm: bool, widest: int, sizes: int = 1
) -> tuple[bool, str]:
    """Whether to compile, and why (the job logs both). `widest` is the UNet's widest block, in
    channels. Each of `sizes` (aspect buckets) is compiled on its own, so each must pay for itself."""
    if setting != "auto":
        return setting == "true", f"COMPILE={setting}"
    if device.type not in ("cpu", "cuda"):
        return False, f"COMPILE=auto: torch.compile is not used on {device.type}"
    if device.type == "cpu" and widest > CPU_WIDEST_THAT_GAINS:
        return False, f"COMPILE=auto: on a CPU compiling does not pay for a UNet {widest} channels wide"
    cold, hot = BREAK_EVEN[(device.type, kind)]
    needed = (hot if warm else cold) * sizes
    state = ("a warm cache" if warm else "an empty cache") + (f", {sizes} sizes" if sizes > 1 else "")
    if passes >= needed:
        return True, f"COMPILE=auto: {passes} UNet passes ahead, compiling pays from {needed} with {state}"
    return False, f"COMPILE=auto: {passes} UNet passes ahead, compiling pays only from {needed} with {state}"
