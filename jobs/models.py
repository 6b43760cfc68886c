"""Loading PAI-Diffusion pipelines: where the model comes from, on what device, with which sampler."""

from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import re
import warnings
from dataclasses import dataclass
from pathlib import Path

import diffusers
import safetensors.torch
import torch
import transformers
from diffusers import (
    DDIMScheduler,
    DiffusionPipeline,
    DPMSolverMultistepScheduler,
    EulerAncestralDiscreteScheduler,
    EulerDiscreteScheduler,
    PNDMScheduler,
    UniPCMultistepScheduler,
)
from diffusers.schedulers.scheduling_utils import SchedulerMixin
from huggingface_hub import hf_hub_download, try_to_load_from_cache
from huggingface_hub.errors import HfHubHTTPError
from huggingface_hub.utils import HFValidationError, validate_repo_id

from jobs.config import JobConfig
from jobs.errors import BadInput

log = logging.getLogger(__name__)

# The published PAI-Diffusion models and the resolution they were trained at. Any other model
# falls back to its UNet's sample size, which is what these numbers are for the hub folders too.
PAI_MODELS = {
    "alibaba-pai/pai-diffusion-artist-large-zh": 512,
    "alibaba-pai/pai-diffusion-food-large-zh": 512,
    "alibaba-pai/pai-diffusion-artist-xlarge-zh": 768,
}

# name -> (scheduler class, extra config, default number of steps). `pndm` with 50 steps is what
# the seed's `pipe(prompt)` runs; DPM-Solver++ reaches the same quality in half the steps.
SCHEDULERS: dict[str, tuple[type[SchedulerMixin], dict, int]] = {
    "dpm++": (DPMSolverMultistepScheduler, {"algorithm_type": "dpmsolver++"}, 25),
    "pndm": (PNDMScheduler, {}, 50),
    "ddim": (DDIMScheduler, {}, 50),
    "euler": (EulerDiscreteScheduler, {}, 50),
    "euler_a": (EulerAncestralDiscreteScheduler, {}, 50),
    "unipc": (UniPCMultistepScheduler, {}, 25),
}


def resolve_device(name: str) -> torch.device:
    if name != "auto":
        if name.startswith("cuda") and not torch.cuda.is_available():
            raise BadInput(f"DEVICE={name}: CUDA is not available on this machine")
        return torch.device(name)
    if torch.cuda.is_available():
        return torch.device("cuda")
    return torch.device("cpu")


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    """`auto` is the half precision the hardware computes natively: fp16 on CUDA, bf16 on a CPU with
    bf16 instructions (AVX512-BF16 or AMX), where it is 1.4x faster than fp32; fp32 on other CPUs.
    fp16 on a CPU is refused: it is slow and lossy there."""
    if name == "auto":
        if device.type == "cuda":
            return torch.float16
        return torch.bfloat16 if device.type == "cpu" and cpu_has_native_bf16() else torch.float32
    if name == "fp16" and device.type == "cpu":
        raise BadInput("DTYPE=fp16 needs a GPU; use fp32 or bf16 on CPU")
    return {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[name]


def cpu_has_native_bf16() -> bool:
    # torch's own checks, the ones its compiler uses; private, hence in one place.
    return torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported()


def check_model_source(config: JobConfig) -> None:
    """Fail before any loading when the model can be neither read locally nor fetched."""
    name = config.pretrained_model_name_or_path
    if Path(name).is_dir():
        if not (Path(name) / "model_index.json").is_file():
            raise BadInput(f"model folder {name} has no model_index.json: not a diffusers pipeline")
        return
    try:
        validate_repo_id(name)
    except HFValidationError:
        raise BadInput(f"model {name}: no such folder, and not a hub id") from None
    if os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes"):
        cached = try_to_load_from_cache(name, "model_index.json", cache_dir=config.cache_dir, revision=config.revision)
        if not isinstance(cached, str):
            raise BadInput(f"model {name} is not in the cache and HF_HUB_OFFLINE is set: prefetch it first")


def load_pipeline(
    config: JobConfig,
    pipeline_cls: type[DiffusionPipeline],
    device: torch.device,
    dtype: torch.dtype,
    safety_checker: bool = True,
    **components: torch.nn.Module,
) -> DiffusionPipeline:
    """Load a pipeline with the tokenizer its folder names (BertTokenizer for PAI models); `components`
    are used as they are instead of being loaded."""
    kwargs: dict = dict(components)
    if not safety_checker:
        kwargs |= {"safety_checker": None, "requires_safety_checker": False}
    token = config.hf_token.get_secret_value() if config.hf_token else None
    # Per-component loading bars are noise in a job's log; hub download bars are not affected.
    diffusers.utils.logging.disable_progress_bar()
    transformers.utils.logging.disable_progress_bar()
    with warnings.catch_warnings():
        # diffusers warns at length when the safety checker is turned off on purpose.
        warnings.simplefilter("ignore", FutureWarning)
        pipe = pipeline_cls.from_pretrained(
            config.pretrained_model_name_or_path,
            revision=config.revision,
            variant=config.variant,
            cache_dir=config.cache_dir,
            token=token,
            torch_dtype=dtype,
            **kwargs,
        )
    pipe.set_progress_bar_config(disable=True)
    return pipe.to(device)


def save_pipeline(pipe: DiffusionPipeline, output_dir: Path) -> None:
    """A whole pipeline in safetensors, with the PAI tokenizer's vocab.txt kept."""
    pipe.save_pretrained(output_dir, safe_serialization=True)
    # transformers 5 saves BertTokenizer as tokenizer.json only; PAI tooling and older libraries read vocab.txt.
    vocab = sorted(pipe.tokenizer.get_vocab().items(), key=lambda item: item[1])
    (output_dir / "tokenizer" / "vocab.txt").write_text("".join(token + "\n" for token, _ in vocab), encoding="utf-8")


def default_resolution(config: JobConfig) -> int:
    """The size the model was trained at, known before it loads: the registry for PAI ids, else its
    UNet's sample size times the VAE's downscaling (from their config.json, a few hundred bytes)."""
    known = PAI_MODELS.get(config.pretrained_model_name_or_path)
    if known:
        return known
    unet, vae = (_component_config(config, name) for name in ("unet", "vae"))
    return unet["sample_size"] * 2 ** (len(vae["block_out_channels"]) - 1)


def unet_width(config: JobConfig) -> int:
    """The UNet's widest block in channels, known before it loads (jobs/compiling.py decides by it)."""
    return max(_component_config(config, "unet")["block_out_channels"])


def model_identity(config: JobConfig) -> dict:
    """The model as compiled code depends on it: its name and revision, and its UNet's architecture."""
    unet = json.dumps(_component_config(config, "unet"), sort_keys=True)
    return {"name": config.pretrained_model_name_or_path, "revision": config.revision, "unet": unet}


def _component_config(config: JobConfig, component: str) -> dict:
    name = config.pretrained_model_name_or_path
    try:
        if Path(name).is_dir():
            path = Path(name) / component / "config.json"
        else:
            token = config.hf_token.get_secret_value() if config.hf_token else None
            path = Path(
                hf_hub_download(
                    name, f"{component}/config.json", revision=config.revision, cache_dir=config.cache_dir, token=token
                )
            )
        return json.loads(path.read_text())
    except (OSError, ValueError, HfHubHTTPError) as error:
        raise BadInput(f"model {name}: cannot read {component}/config.json ({error})") from None


def set_scheduler(pipe: DiffusionPipeline, name: str) -> int:
    """Swap the pipeline's sampler for `name`, keeping the model's noise schedule; return its default steps."""
    scheduler_cls, extra, default_steps = SCHEDULERS[name]
    pipe.scheduler = scheduler_cls.from_config(pipe.scheduler.config, **extra)
    return default_steps


LORA_WEIGHT_NAMES = ("pytorch_lora_weights.safetensors", "pytorch_lora_weights.bin")

# Old diffusers attention-processor LoRA keys, as in the PAI LoRAs:
# down_blocks.0.attentions.0.transformer_blocks.0.attn1.processor.to_q_lora.down.weight
LEGACY_LORA_KEY = re.compile(
    r"^(?P<module>.+)\.processor\.(?P<proj>to_q|to_k|to_v|to_out)_lora\.(?P<side>down|up)\.weight$"
)


@dataclass(frozen=True)
class Lora:
    """A LoRA checked before any model loads: what diffusers loads, and its file's hash (its identity)."""

    name: str  # as LORA_PATH gave it
    weights: Path | dict[str, torch.Tensor]
    sha256: str


def read_loras(paths: list[str], scales: list[float]) -> list[Lora]:
    """LORA_PATH's LoRAs, with LORA_SCALE's scales: one for all, or one each."""
    if len(scales) not in (1, len(paths)):
        raise BadInput(f"LORA_SCALE: {len(scales)} scales for {len(paths)} LoRAs; give one, or one for each")
    return [read_lora(Path(path), path) for path in paths]


def read_lora(path: Path, name: str) -> Lora:
    """A LoRA file (or the folder holding one): the file itself, so that diffusers also reads the adapter
    metadata it carries (a `lora_alpha` other than the rank changes the LoRA's strength), kohya's files
    included, or for a legacy PAI file a converted state dict: `<module>.processor.to_q_lora.down.weight`
    becomes `unet.<module>.to_q.lora_A.weight` (`up` is `lora_B`, `to_out` is `to_out.0`).
    """
    if path.is_dir():
        files = [path / file for file in LORA_WEIGHT_NAMES if (path / file).is_file()]
        if not files:
            raise BadInput(f"LORA_PATH {name}: no {' or '.join(LORA_WEIGHT_NAMES)} in this folder")
        path = files[0]
    elif not path.is_file():
        raise BadInput(f"LORA_PATH {name}: no such file or folder")
    try:
        data = path.read_bytes()
        if path.suffix == ".safetensors":
            state_dict = safetensors.torch.load(data)
        else:
            state_dict = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except Exception as error:  # any unreadable file is the same bad input
        raise BadInput(f"LORA_PATH {name}: cannot read LoRA weights ({error})") from None
    if not isinstance(state_dict, dict) or not state_dict:
        raise BadInput(f"LORA_PATH {name}: no weights in it")
    digest = hashlib.sha256(data).hexdigest()
    if all(LEGACY_LORA_KEY.match(key) for key in state_dict):
        return Lora(name, {_convert_legacy_key(key): value for key, value in state_dict.items()}, digest)
    return Lora(name, path, digest)


def _convert_legacy_key(key: str) -> str:
    match = LEGACY_LORA_KEY.match(key)
    assert match is not None
    proj = "to_out.0" if match["proj"] == "to_out" else match["proj"]
    side = "lora_A" if match["side"] == "down" else "lora_B"
    return f"unet.{match['module']}.{proj}.{side}.weight"


def apply_loras(pipe: DiffusionPipeline, loras: list[Lora], scales: list[float]) -> None:
    """Load the LoRAs and fuse them into the weights once, each at its scale (diffusers' `set_adapters`);
    one that does not fit the model, or changes none of its layers, is bad input naming it."""
    names = [f"lora{i}" for i in range(len(loras))]
    for lora, adapter in zip(loras, names, strict=True):
        if isinstance(lora.weights, Path):
            source, options = str(lora.weights.parent), {"weight_name": lora.weights.name}
        else:
            source, options = dict(lora.weights), {}
        try:
            pipe.load_lora_weights(source, adapter_name=adapter, **options)
        except Exception as error:  # whatever a foreign file makes diffusers raise, it is bad input
            raise BadInput(f"LORA_PATH {lora.name}: does not fit this model ({str(error).splitlines()[0]})") from None
        if not any(adapter in adapters for adapters in pipe.get_list_adapters().values()):
            raise BadInput(f"LORA_PATH {lora.name}: none of its keys matches a layer of this model")
    pipe.set_adapters(names, adapter_weights=scales * len(loras) if len(scales) == 1 else scales)
    pipe.fuse_lora(adapter_names=names, lora_scale=1.0)
    pipe.unload_lora_weights()
