"""Typed configuration of the four jobs: one class per job, read from flags, env vars and YAML.

Every option is a field. Its flag is `--<field>`, its env var the field's name in upper case
(`--max_train_steps` <-> `MAX_TRAIN_STEPS`), and precedence is flag > env > `CONFIG_FILE` (YAML)
> default, as DESIGN.md says.

Why pydantic-settings: it reads flags, env vars and YAML into one typed object with the
precedence we need, validates ranges and choices with messages that name the field, and accepts
the seed's bare boolean flags (`--center_crop`). jsonargparse was tried first and wants a value
after every boolean flag, which breaks the seed's command lines.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Annotated, Any, Literal, TypeVar

import yaml
from pydantic import AliasChoices, Field, SecretStr, ValidationError, field_validator, model_validator
from pydantic_settings import (
    BaseSettings,
    CliSettingsSource,
    EnvSettingsSource,
    InitSettingsSource,
    NoDecode,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    SettingsError,
)

from jobs import text
from jobs.errors import BadInput

DEFAULT_MODEL = "alibaba-pai/pai-diffusion-artist-large-zh"

# Variables that launchers (torchrun, accelerate, PyTorchJob) set in every process and that share
# a name with an option; they are never read as settings. `--rank` is the LoRA rank: its env var
# is LORA_RANK, because RANK is the process rank.
LAUNCHER_VARIABLES = {"rank"}
# The one option that takes several values (see _join_list_flags).
LIST_FLAG = "--validation_prompts"


def alias(*names: str) -> AliasChoices:
    """Extra flag and env-var names for a field (its own name stays first and wins)."""
    return AliasChoices(*names)


class Options(BaseSettings):
    """How every job reads its options: flags, env vars and YAML, unknown names refused."""

    model_config = SettingsConfigDict(
        case_sensitive=False,
        extra="forbid",
        cli_implicit_flags=True,
        cli_exit_on_error=False,
        cli_avoid_json=True,
        cli_hide_none_type=True,
        cli_show_env_vars=False,
        validate_default=True,
    )


class HubOptions(Options):
    cache_dir: Path | None = Field(None, description="Where hub downloads are cached (default HF_HOME).")
    hf_token: SecretStr | None = Field(None, description="Hub token for private models (env HF_TOKEN).")


class JobConfig(HubOptions):
    """Options every job with a model shares: which model, on what device."""

    pretrained_model_name_or_path: str = Field(
        DEFAULT_MODEL,
        validation_alias=alias("pretrained_model_name_or_path", "model_name"),
        description="Model folder or hub id (env MODEL_NAME works too).",
    )
    revision: str | None = Field(None, description="Hub revision (branch, tag or commit).")
    variant: str | None = Field(None, description="Weights variant, e.g. fp16.")
    device: str = Field("auto", pattern=r"^(auto|cpu|mps|cuda(:\d+)?)$", description="auto, cpu, cuda, cuda:N or mps.")
    compile: Literal["auto", "true", "false"] = Field(
        "auto",
        description="torch.compile the UNet: auto (when the work ahead pays for it), true, false (jobs/compiling.py).",
    )
    compile_cache_dir: Path | None = Field(
        None, description="Where compiled code is kept for the next pods (default $HF_HOME/pai-diffusion-compile)."
    )

    @field_validator("compile", mode="before")
    @classmethod
    def _compile_words(cls, value: object) -> object:
        """`--compile` alone, COMPILE=1 or yes, as for the other switches."""
        value = value.lower() if isinstance(value, str) else value
        return {True: "true", False: "false", "1": "true", "yes": "true", "0": "false", "no": "false"}.get(value, value)


class InferenceConfig(JobConfig):
    """Options shared by `generate` and `img2img`: the prompts, the sampler and the batch runner."""

    output_dir: Path = Field(Path("outputs"), description="Where images, manifests and the gallery go.")
    dtype: Literal["auto", "fp32", "fp16", "bf16"] = Field(
        "auto", description="auto: fp16 on CUDA; bf16 on a CPU with bf16 instructions (AVX512-BF16, AMX); else fp32."
    )
    prompt: str | None = Field(None, description="One prompt (or use --prompts_file).")
    prompts_file: Path | None = Field(None, description=".txt (one prompt a line), .jsonl or .yaml records.")
    negative_prompt: str | None = Field(None, description="Default negative prompt.")
    num_images_per_prompt: int = Field(1, ge=1, le=1000)
    height: int | None = Field(None, ge=8, le=4096, multiple_of=8, description="Default: the model's resolution.")
    width: int | None = Field(None, ge=8, le=4096, multiple_of=8, description="Default: the model's resolution.")
    num_inference_steps: int | None = Field(
        None, ge=1, le=1000, description="Default: 25 for dpm++ and unipc, 50 otherwise."
    )
    guidance_scale: float = Field(7.5, ge=0.0, le=50.0)
    scheduler: Literal["dpm++", "pndm", "ddim", "euler", "euler_a", "unipc"] = "dpm++"
    batch_size: int = Field(4, ge=1, le=256, description="Images per forward pass.")
    seed: int = Field(0, ge=0, description="Base seed; each image's seed is derived from it and the image id.")
    num_shards: int = Field(1, ge=1, description="How many pods share the work.")
    shard_index: int = Field(
        0,
        ge=0,
        validation_alias=alias("shard_index", "job_completion_index"),
        description="This pod's shard (default: JOB_COMPLETION_INDEX of an Indexed Job).",
    )
    lora_path: Annotated[list[str], NoDecode] = Field(
        [],
        description="LoRA folders or files (diffusers/PEFT, kohya, legacy PAI): comma-separated or a JSON list.",
    )
    lora_scale: Annotated[list[Annotated[float, Field(ge=-10.0, le=10.0)]], NoDecode] = Field(
        [1.0], description="One scale for every LoRA, or one each (comma-separated or a JSON list)."
    )
    overwrite: bool = Field(
        False, description="Render again the finished items whose request changed (default: refuse them, exit 2)."
    )
    safety_checker: bool = Field(True, description="Keep the model's safety checker when it has one.")
    skip_invalid: bool = Field(
        False, description="Skip bad prompt records (listed in the manifest) instead of failing."
    )

    @field_validator("lora_path", "lora_scale", mode="before")
    @classmethod
    def _listed(cls, value: object) -> object:
        """`a,b` or `["a", "b"]` from a flag or a variable; empty: none."""
        if isinstance(value, str):
            listed = _json_list(value, (str, int, float))
            return listed if listed is not None else [part.strip() for part in value.split(",") if part.strip()]
        return value

    @model_validator(mode="after")
    def _check_inference(self) -> InferenceConfig:
        if self.shard_index >= self.num_shards:
            raise ValueError(f"shard_index {self.shard_index} must be below num_shards {self.num_shards}")
        if self.prompt is not None and self.prompts_file is not None:
            raise ValueError("give either prompt or prompts_file, not both")
        return self


class GenerateConfig(InferenceConfig):
    """Text to image."""

    @model_validator(mode="after")
    def _need_prompts(self) -> GenerateConfig:
        if self.prompt is None and self.prompts_file is None:
            raise ValueError("no prompt: set PROMPT or PROMPTS_FILE")
        return self


class Img2ImgConfig(InferenceConfig):
    """Text-guided image editing."""

    input_dir: Path | None = Field(None, description="Folder of images, each edited with --prompt.")
    strength: float = Field(0.75, ge=0.0, le=1.0, description="How far the image may move from the input.")

    @model_validator(mode="after")
    def _need_inputs(self) -> Img2ImgConfig:
        if self.input_dir is not None and self.prompt is None:
            raise ValueError("input_dir needs a prompt: set PROMPT")
        if self.input_dir is None and self.prompts_file is None:
            raise ValueError("no input images: set INPUT_DIR (with PROMPT) or PROMPTS_FILE records naming `image`")
        return self


class DataOptions(HubOptions):
    """Where training records come from (jobs/sources.py): for the training jobs and `pack`."""

    dataset_name: str | None = Field(
        None, description="A `datasets` dataset, streamed (wins over TRAIN_DIR, as upstream)."
    )
    dataset_config_name: str | None = None
    train_data_dir: str | None = Field(
        None,
        validation_alias=alias("train_data_dir", "train_dir"),
        description="A folder with metadata.jsonl (or its parent holding train/), WebDataset or parquet shards;"
        " a path or an s3://, gs://, https:// URL (env TRAIN_DIR works too).",
    )
    image_column: str = "image"
    caption_column: str = "text"
    max_train_samples: int | None = Field(None, ge=1)
    seed: int | None = Field(None, description="Seed of the data order, augmentation and, for training, the run.")

    @model_validator(mode="after")
    def _need_data(self) -> DataOptions:
        if self.dataset_name is None and self.train_data_dir is None:
            raise ValueError("no training data: set TRAIN_DIR (--train_data_dir) or --dataset_name")
        return self


class TrainConfig(JobConfig, DataOptions):
    """Options of EasyNLP's finetune.py / lora.py (diffusers' training examples), same defaults."""

    output_dir: Path = Field(Path("sd-model-finetuned"), description="Checkpoints and the final model.")
    resolution: int = Field(512, ge=8, multiple_of=8)
    center_crop: bool = False
    random_flip: bool = False
    aspect_buckets: bool = Field(
        False,
        description="Train each image at about its own aspect ratio, in buckets of about --resolution^2 pixels,"
        " instead of a square crop; every batch from one bucket.",
    )
    bucket_reso_steps: int = Field(
        64, ge=8, multiple_of=8, description="Bucket sides are multiples of this (64 for SD 1.x's UNet)."
    )
    max_aspect_ratio: float = Field(2.0, ge=1.0, description="Buckets range from 1:N to N:1.")
    caption_dropout: float = Field(
        0.0, ge=0.0, le=1.0, description="Probability of training a record on the empty prompt instead of its caption."
    )
    train_batch_size: int = Field(16, ge=1)
    num_train_epochs: int = Field(100, ge=1)
    max_train_steps: int | None = Field(None, ge=1)
    gradient_accumulation_steps: int = Field(1, ge=1)
    gradient_checkpointing: bool = False
    learning_rate: float = Field(1e-4, gt=0)
    scale_lr: bool = False
    lr_scheduler: Literal[
        "linear", "cosine", "cosine_with_restarts", "polynomial", "constant", "constant_with_warmup"
    ] = "constant"
    lr_warmup_steps: int = Field(500, ge=0)
    use_8bit_adam: bool = False
    allow_tf32: bool = False
    dataloader_num_workers: int = Field(0, ge=0)
    adam_beta1: float = Field(0.9, ge=0, lt=1)
    adam_beta2: float = Field(0.999, ge=0, lt=1)
    adam_weight_decay: float = Field(1e-2, ge=0)
    adam_epsilon: float = Field(1e-8, gt=0)
    max_grad_norm: float = Field(1.0, gt=0)
    push_to_hub: bool = False
    hub_token: SecretStr | None = None
    hub_model_id: str | None = None
    logging_dir: Path = Path("logs")
    mixed_precision: Literal["no", "fp16", "bf16"] | None = None
    report_to: str = "tensorboard"
    local_rank: int = -1
    checkpointing_steps: int = Field(500, ge=1)
    checkpoints_total_limit: int | None = Field(None, ge=1)
    resume_from_checkpoint: str | None = Field(
        "latest", description="latest (default), a checkpoint folder, or none to start afresh."
    )
    enable_xformers_memory_efficient_attention: bool = Field(
        False, description="Accepted for compatibility; PyTorch SDPA attention is always used."
    )
    snr_gamma: float | None = Field(None, gt=0, description="Min-SNR loss weighting (5.0 is the paper's value).")
    noise_offset: float = Field(0.0, ge=0)
    prediction_type: Literal["epsilon", "v_prediction"] | None = Field(
        None, description="Default: the model scheduler's."
    )
    validation_prompt: str | None = None
    validation_prompts: list[str] | None = None
    num_validation_images: int = Field(4, ge=1)
    validation_epochs: int = Field(1, ge=1)
    validation_steps: int | None = Field(None, ge=1)
    cache_latents: bool = Field(
        False,
        description="Encode each image and caption once, into a cache on disk that later epochs, resumed and"
        " later runs read.",
    )
    latent_cache_dir: Path | None = Field(
        None, description="Where --cache_latents keeps its cache (default OUTPUT_DIR/latent-cache); shareable."
    )
    max_bad_samples: int | None = Field(
        None,
        ge=0,
        description="Images that fail to decode before the run stops (default: 1% of the records, at least 10).",
    )

    @model_validator(mode="after")
    def _buckets_fit(self) -> TrainConfig:
        if self.aspect_buckets and self.resolution < self.bucket_reso_steps:
            raise ValueError(
                f"--aspect_buckets: --resolution {self.resolution} is smaller than --bucket_reso_steps"
                f" {self.bucket_reso_steps}, so no bucket fits"
            )
        return self


class PackConfig(DataOptions):
    """Any training source into WebDataset or parquet shards that TRAIN_DIR then reads."""

    output_dir: str = Field(description="The folder (a path or an s3://, gs:// URL) the shards and index.json go to.")
    format: Literal["webdataset", "parquet"] = "webdataset"
    shard_size: int = Field(1000, ge=1, description="Records per shard.")
    dataloader_num_workers: int = Field(0, ge=0, description="Decoding threads (0: as many as the CPU has).")


class FinetuneConfig(TrainConfig):
    """Full UNet fine-tuning."""

    use_ema: bool = False
    non_ema_revision: str | None = None


class LoraConfig(TrainConfig):
    """LoRA fine-tuning."""

    output_dir: Path = Field(Path("sd-model-finetuned-lora"), description="Checkpoints and the final LoRA.")
    rank: int = Field(4, ge=1, validation_alias=alias("rank", "lora_rank"), description="LoRA rank (env LORA_RANK).")
    lora_alpha: int | None = Field(None, ge=1, description="Default: the rank.")
    train_text_encoder: bool = False
    no_save_merged: bool = Field(False, description="Save only the LoRA weights, not a merged pipeline.")


Config = TypeVar("Config", bound=Options)


def load(
    config_cls: type[Config],
    argv: list[str] | None = None,
    env: dict[str, str] | None = None,
    prog: str = "pai-diffusion",
) -> Config:
    """Read a job's configuration from flags, env vars and `CONFIG_FILE`; raise BadInput if invalid.
    `prog` is the command that `--help` shows (the job's, from jobs/registry.py)."""
    argv = _join_list_flags(_bare_compile(sys.argv[1:] if argv is None else argv))
    env = dict(os.environ if env is None else env)
    from_file = _config_file(Path(env["CONFIG_FILE"])) if env.get("CONFIG_FILE") else {}

    class Sources(config_cls):  # type: ignore[valid-type,misc]
        @classmethod
        def settings_customise_sources(cls, settings_cls, **_: Any) -> tuple[PydanticBaseSettingsSource, ...]:
            env_source = EnvSettingsSource(settings_cls, case_sensitive=False)
            env_source.env_vars = {k.lower(): v for k, v in env.items() if k.lower() not in LAUNCHER_VARIABLES}
            cli = CliSettingsSource(settings_cls, cli_parse_args=argv, cli_prog_name=prog)
            return cli, env_source, InitSettingsSource(settings_cls, init_kwargs=from_file)

    Sources.__name__ = config_cls.__name__
    try:
        return Sources()
    except ValidationError as error:
        raise BadInput("; ".join(_describe(e) for e in error.errors())) from None
    except SettingsError as error:
        raise BadInput(str(error).strip().splitlines()[-1]) from None


def _config_file(path: Path) -> dict[str, Any]:
    """CONFIG_FILE's settings: a YAML mapping, read as UTF-8 (a byte-order mark is fine)."""
    if not path.is_file():
        raise BadInput(f"CONFIG_FILE {path}: no such file")
    content = text.read(path, "CONFIG_FILE")
    try:
        values = yaml.safe_load(content)
    except (yaml.YAMLError, RecursionError) as error:
        raise text.yaml_error(f"CONFIG_FILE {path}", error) from None
    if values is None:
        return {}
    if not isinstance(values, dict) or not all(isinstance(key, str) for key in values):
        raise BadInput(f"CONFIG_FILE {path}: expected settings by name (a YAML mapping), got {type(values).__name__}")
    return values


def _bare_compile(argv: list[str]) -> list[str]:
    """`--compile` alone is `--compile true`, as it was when the option was a switch."""
    return [
        "--compile=true" if arg == "--compile" and (i + 1 == len(argv) or argv[i + 1].startswith("--")) else arg
        for i, arg in enumerate(argv)
    ]


def _join_list_flags(argv: list[str]) -> list[str]:
    """`--validation_prompts a b` (upstream's argparse nargs="+"), the flag repeated, or a JSON list,
    handed on as one JSON list: pydantic-settings would refuse the second value and split a prompt
    at its commas ("a cat, by the sea" is one prompt). argparse reads them as upstream does."""
    parser = argparse.ArgumentParser(add_help=False, allow_abbrev=False, exit_on_error=False)
    parser.add_argument(LIST_FLAG, nargs="+", action="extend", default=[], dest="prompts")
    try:
        found, rest = parser.parse_known_args(argv)
    except argparse.ArgumentError as error:
        raise BadInput(str(error)) from None
    prompts = found.prompts
    if len(prompts) == 1 and (listed := _json_list(prompts[0])) is not None:
        prompts = listed
    return [*rest, f"{LIST_FLAG}={json.dumps(prompts, ensure_ascii=False)}"] if prompts else rest


def _json_list(text: str, types: tuple[type, ...] = (str,)) -> list | None:
    try:
        value = json.loads(text)
    except ValueError:
        return None
    return value if isinstance(value, list) and all(isinstance(v, types) for v in value) else None


def _describe(error: dict[str, Any]) -> str:
    if not error["loc"]:
        return error["msg"].removeprefix("Value error, ")
    field, *item = error["loc"]
    where = f" item {item[0] + 1}" if item and isinstance(item[0], int) else ""
    return f"{str(field).upper()} (--{field}){where}: {error['msg']} (got {error.get('input')!r})"


def settings(config: Options) -> dict[str, Any]:
    """The resolved configuration as JSON values, secrets masked: the job's first log line, the run record."""
    values = {}
    for name, value in config.model_dump().items():
        if isinstance(value, SecretStr):
            value = "***" if value.get_secret_value() else None
        values[name] = str(value) if isinstance(value, Path) else value
    return values


def describe(config: Options) -> str:
    return json.dumps({"config": settings(config)}, ensure_ascii=False)
