"""What trains and what is saved: the two strategies that the one training loop (jobs/train.py) serves.

`finetune` trains every UNet weight and saves a whole pipeline; `lora` trains low-rank adapters on
the attention projections and saves them, in diffusers' format and kohya's, and a merged pipeline.
"""

from __future__ import annotations

from contextlib import AbstractContextManager, contextmanager, nullcontext
from pathlib import Path
from typing import Protocol

import torch
from diffusers import StableDiffusionPipeline, UNet2DConditionModel
from diffusers.training_utils import EMAModel, cast_training_params
from diffusers.utils import convert_state_dict_to_diffusers, convert_state_dict_to_kohya
from peft import LoraConfig as AdapterConfig
from peft import inject_adapter_in_model
from peft.utils import get_peft_model_state_dict
from safetensors.torch import save_file

from jobs.config import FinetuneConfig, LoraConfig, TrainConfig
from jobs.models import apply_loras, load_pipeline, read_lora, save_pipeline

UNET_LORA_TARGETS = ["to_q", "to_k", "to_v", "to_out.0"]
TEXT_ENCODER_LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "out_proj"]
KOHYA_WEIGHT_NAME = "pytorch_lora_weights_kohya.safetensors"  # the name diffusers' examples give their kohya output


class Strategy(Protocol):
    name: str  # the job's name, for the trackers and the model card
    usage: str  # how to load what `save` writes, for the model card
    models: dict[str, torch.nn.Module]  # the modules with trainable parameters, by pipeline component

    def after_step(self) -> None: ...

    def checkpointed_objects(self) -> list:
        """What a checkpoint holds beyond the trainable parameters, optimizer, schedule and RNG."""
        ...

    def sampling_weights(self) -> AbstractContextManager[None]:
        """The weights validation images are sampled with (the ones that get saved)."""
        ...

    def save(self, folder: Path) -> None: ...


def load_base_pipeline(
    config: TrainConfig, device: torch.device, **trained: torch.nn.Module
) -> StableDiffusionPipeline:
    """The base model in fp32 (with the `trained` modules instead of its own), its scheduler set to
    the prediction type being trained for.

    Loaded again on the CPU for the final save, so that the saved model's frozen parts are the base's
    weights bit for bit, not the copies the loop rounded to its mixed precision."""
    pipe = load_pipeline(config, StableDiffusionPipeline, device, torch.float32, **trained)
    if config.prediction_type:
        pipe.scheduler.register_to_config(prediction_type=config.prediction_type)
    return pipe


class FullFinetune:
    """Every UNet weight trains (the text encoder and VAE stay frozen); optionally an EMA copy is kept and saved."""

    name = "finetune"
    usage = """```python
from diffusers import StableDiffusionPipeline

pipe = StableDiffusionPipeline.from_pretrained("{output_dir}")
image = pipe("{prompt}").images[0]
```"""

    def __init__(self, config: FinetuneConfig, pipe: StableDiffusionPipeline, weight_dtype: torch.dtype):
        self.config, self.pipe = config, pipe
        unet = pipe.unet
        unet.requires_grad_(True)
        self.ema = None
        if config.use_ema:
            self.ema = EMAModel(unet.parameters(), model_cls=UNet2DConditionModel, model_config=unet.config)
        if config.non_ema_revision:
            # Upstream's meaning: the EMA starts from --revision, the trained weights from --non_ema_revision.
            non_ema = UNet2DConditionModel.from_pretrained(
                config.pretrained_model_name_or_path, subfolder="unet", revision=config.non_ema_revision
            )
            unet.load_state_dict(non_ema.state_dict())
        self.models = {"unet": unet}

    def after_step(self) -> None:
        if self.ema is not None:
            self.ema.step(self.pipe.unet.parameters())

    def checkpointed_objects(self) -> list:
        return [self.ema] if self.ema is not None else []

    @contextmanager
    def sampling_weights(self):
        """Sample with the EMA weights when there are some: they are what gets saved."""
        if self.ema is None:
            yield
            return
        parameters = list(self.pipe.unet.parameters())
        self.ema.store(parameters)
        self.ema.copy_to(parameters)
        try:
            yield
        finally:
            self.ema.restore(parameters)

    def save(self, folder: Path) -> None:
        if self.ema is not None:
            self.ema.copy_to(self.pipe.unet.parameters())
        # The UNet trains in fp32 whatever the mixed precision.
        pipe = load_base_pipeline(self.config, torch.device("cpu"), unet=self.pipe.unet)
        save_pipeline(pipe, folder)


class LoraFinetune:
    """The model stays frozen; low-rank adapters on the attention projections train (UNet, optionally text encoder)."""

    name = "lora"
    usage = """```python
from diffusers import StableDiffusionPipeline

# the merged pipeline (unless --no_save_merged)
pipe = StableDiffusionPipeline.from_pretrained("{output_dir}")
# or the base model plus the LoRA weights
pipe = StableDiffusionPipeline.from_pretrained("{base_model}")
pipe.load_lora_weights("{output_dir}")
image = pipe("{prompt}").images[0]
```"""

    def __init__(self, config: LoraConfig, pipe: StableDiffusionPipeline, weight_dtype: torch.dtype):
        self.config, self.pipe = config, pipe
        pipe.unet.requires_grad_(False)
        pipe.unet.to(weight_dtype)
        pipe.unet.add_adapter(adapter_config(config, UNET_LORA_TARGETS))
        self.models = {"unet": pipe.unet}
        if config.train_text_encoder:
            # peft directly: transformers' add_adapter insists on a newer peft than diffusers needs.
            inject_adapter_in_model(adapter_config(config, TEXT_ENCODER_LORA_TARGETS), pipe.text_encoder)
            self.models["text_encoder"] = pipe.text_encoder
        # Adapters train in fp32 even when the frozen weights are fp16: fp16 gradients cannot be unscaled.
        cast_training_params(list(self.models.values()), dtype=torch.float32)

    def after_step(self) -> None:
        pass

    def checkpointed_objects(self) -> list:
        return []

    def sampling_weights(self):
        return nullcontext()

    def save(self, folder: Path) -> None:
        """The adapters in diffusers' format (for `load_lora_weights`) and in kohya's (A1111, ComfyUI),
        then the model with them merged in."""
        layers, metadata = {}, {}
        for name, model in self.models.items():
            layers[f"{name}_lora_layers"] = convert_state_dict_to_diffusers(get_peft_model_state_dict(model))
            metadata[f"{name}_lora_adapter_metadata"] = model.peft_config["default"].to_dict()
        StableDiffusionPipeline.save_lora_weights(folder, **layers, **metadata, safe_serialization=True)
        save_file(self.kohya_state_dict(), folder / KOHYA_WEIGHT_NAME, metadata=self.kohya_metadata())
        if self.config.no_save_merged:
            return
        # Merged the way `generate` applies LORA_PATH, so both render the same pixels.
        pipe = load_base_pipeline(self.config, torch.device("cpu"))
        apply_loras(pipe, [read_lora(folder, str(folder))], [1.0])
        save_pipeline(pipe, folder)

    def kohya_state_dict(self) -> dict[str, torch.Tensor]:
        """kohya's naming (`lora_unet_<module>.lora_down.weight`, `.alpha`, `lora_te_...`), converted from
        the PEFT state dicts: converting the saved diffusers file instead mis-names the UNet's keys when
        text-encoder keys are present. diffusers sets every alpha to the rank; ours is --lora_alpha."""
        converted = {}
        for name, model in self.models.items():
            # kohya names CLIP's modules as transformers 4 laid them out, under `text_model.`.
            layout = "text_encoder.text_model." if name == "text_encoder" else f"{name}."
            peft = get_peft_model_state_dict(model)
            converted |= convert_state_dict_to_kohya(
                {f"{layout}{key.removeprefix('text_model.')}": value for key, value in peft.items()}
            )
        alpha = float(self.config.lora_alpha or self.config.rank)
        return {
            # SD 1.x has one text encoder: kohya's scripts, A1111 and ComfyUI name it lora_te_, not lora_te1_.
            key.replace("lora_te1_", "lora_te_", 1): torch.tensor(alpha)
            if key.endswith(".alpha")
            else value.contiguous()
            for key, value in converted.items()
        }

    def kohya_metadata(self) -> dict[str, str]:
        """What kohya's scripts record and A1111's extra-networks page shows."""
        return {
            "ss_network_module": "networks.lora",
            "ss_network_dim": str(self.config.rank),
            "ss_network_alpha": str(self.config.lora_alpha or self.config.rank),
            "ss_base_model_version": "sd_v1",
            "ss_sd_model_name": self.config.pretrained_model_name_or_path,
            "ss_resolution": f"({self.config.resolution}, {self.config.resolution})",
            "ss_enable_bucket": str(self.config.aspect_buckets),
            "ss_caption_dropout_rate": str(self.config.caption_dropout),
        }


def adapter_config(config: LoraConfig, target_modules: list[str]) -> AdapterConfig:
    """Gaussian A, zero B: the adapted model starts exactly as the base model."""
    return AdapterConfig(
        r=config.rank,
        lora_alpha=config.lora_alpha or config.rank,
        init_lora_weights="gaussian",
        target_modules=target_modules,
    )
