"""The training loop behind `finetune` and `lora`: one loop, two strategies for what trains and what is saved.

Read top to bottom: the two strategies, then `train` (the loop), then the pieces it calls:
the denoising loss, checkpoints and resume, validation images, and the final outputs.

Distribution, mixed precision and the saved optimizer/RNG state come from accelerate; the data
order comes from `jobs.data.BatchPlan`, so a resumed run continues at the exact micro-batch
without reading the ones before it.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import math
import os
import shutil
import signal
import time
from contextlib import ExitStack, contextmanager, nullcontext
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from accelerate import Accelerator, PartialState
from accelerate.utils import ProjectConfiguration, set_seed
from diffusers import DDPMScheduler, DPMSolverMultistepScheduler, StableDiffusionPipeline, UNet2DConditionModel
from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution
from diffusers.optimization import get_scheduler
from diffusers.training_utils import EMAModel, cast_training_params, compute_snr
from diffusers.utils import convert_state_dict_to_diffusers
from peft import LoraConfig as AdapterConfig
from peft import inject_adapter_in_model
from peft.utils import get_peft_model_state_dict
from PIL import Image
from safetensors.torch import load_file, save_file

from jobs.config import PREEMPTED_EXIT_CODE, BadInput, FinetuneConfig, LoraConfig, TrainConfig
from jobs.data import (
    BatchPlan,
    ExampleEncoder,
    ImageTransform,
    LatentCache,
    TrainingSet,
    data_seed,
    load_examples,
)
from jobs.models import apply_lora, check_model_source, cpu_has_native_bf16, load_pipeline, read_lora
from jobs.progress import Progress

log = logging.getLogger("jobs")

VALIDATION_INFERENCE_STEPS = 25  # DPM-Solver++ at 25 steps matches the default sampler at 50
UNET_LORA_TARGETS = ["to_q", "to_k", "to_v", "to_out.0"]
TEXT_ENCODER_LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "out_proj"]


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
        """The adapters in diffusers' format (for `load_lora_weights`), then the model with them merged in."""
        layers, metadata = {}, {}
        for name, model in self.models.items():
            layers[f"{name}_lora_layers"] = convert_state_dict_to_diffusers(get_peft_model_state_dict(model))
            metadata[f"{name}_lora_adapter_metadata"] = model.peft_config["default"].to_dict()
        StableDiffusionPipeline.save_lora_weights(folder, **layers, **metadata, safe_serialization=True)
        if self.config.no_save_merged:
            return
        # Merged the way `generate` applies LORA_PATH, so both render the same pixels.
        pipe = load_base_pipeline(self.config, torch.device("cpu"))
        apply_lora(pipe, read_lora(folder), scale=1.0, name=str(folder))
        save_pipeline(pipe, folder)


Strategy = FullFinetune | LoraFinetune


def adapter_config(config: LoraConfig, target_modules: list[str]) -> AdapterConfig:
    """Gaussian A, zero B: the adapted model starts exactly as the base model."""
    return AdapterConfig(
        r=config.rank,
        lora_alpha=config.lora_alpha or config.rank,
        init_lora_weights="gaussian",
        target_modules=target_modules,
    )


def train(config: TrainConfig, strategy_cls: type[Strategy]) -> None:
    """Fine-tune the model `config` names on its dataset; resume from the newest checkpoint if there is one."""
    check_before_loading(config)
    examples = load_examples(config)
    checkpoints = resume_candidates(config)
    accelerator = make_accelerator(config)
    is_main = accelerator.is_main_process
    if config.seed is not None:
        set_seed(config.seed)
    if config.allow_tf32:
        torch.backends.cuda.matmul.allow_tf32 = True
    if config.enable_xformers_memory_efficient_attention and is_main:
        log.info("--enable_xformers_memory_efficient_attention: PyTorch's SDPA attention is used, it is as fast")

    # Model: one load for the loop and validation (the final save starts again from the base).
    weight_dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(accelerator.mixed_precision, torch.float32)
    pipe = load_base_pipeline(config, accelerator.device)
    noise_scheduler = DDPMScheduler.from_config(pipe.scheduler.config)
    pipe.vae.requires_grad_(False).to(weight_dtype)
    pipe.text_encoder.requires_grad_(False).to(weight_dtype)
    strategy = strategy_cls(config, pipe, weight_dtype)
    for model in strategy.models.values():
        model.train()  # from_pretrained leaves models in eval mode
    if config.gradient_checkpointing:
        pipe.unet.enable_gradient_checkpointing()
        if "text_encoder" in strategy.models:
            pipe.text_encoder.gradient_checkpointing_enable()
    if config.compile:
        # Only the repeated transformer blocks: in training their step is as fast as the whole UNet's
        # compiled (0.88 against 0.86 s, medium model on a CPU) for half the compile time (47 against 100 s).
        pipe.unet.compile_repeated_blocks(fullgraph=True)

    # Data: micro-batches numbered across epochs, so step N always starts at micro-batch N * accumulation.
    seed = data_seed(config)
    transform = ImageTransform(config.resolution, config.center_crop, config.random_flip)
    cache = None
    if config.cache_latents:
        with_text = "text_encoder" not in strategy.models
        cache = LatentCache.load_or_build(
            config.output_dir / "latent-cache" / f"{LatentCache.key(config, examples, with_text)}.safetensors",
            ExampleEncoder(examples, transform, seed, pipe.vae, pipe.text_encoder, pipe.tokenizer, with_text),
            accelerator,
        )
    dataset = TrainingSet(examples, transform, pipe.tokenizer, seed, cache)
    plan = BatchPlan(len(dataset), config.train_batch_size, seed, accelerator.process_index, accelerator.num_processes)
    accumulation = config.gradient_accumulation_steps
    steps_per_epoch = math.ceil(plan.batches_per_epoch / accumulation)
    max_train_steps = config.max_train_steps or config.num_train_epochs * steps_per_epoch

    # Optimizer and learning-rate schedule, as upstream (its schedule counts every process's step).
    learning_rate = config.learning_rate
    if config.scale_lr:
        learning_rate *= accumulation * config.train_batch_size * accelerator.num_processes
    parameters = [p for model in strategy.models.values() for p in model.parameters() if p.requires_grad]
    optimizer = make_optimizer(config, parameters, learning_rate)
    lr_scheduler = get_scheduler(
        config.lr_scheduler,
        optimizer=optimizer,
        num_warmup_steps=config.lr_warmup_steps * accelerator.num_processes,
        num_training_steps=max_train_steps * accelerator.num_processes,
    )
    *trained_models, optimizer, lr_scheduler = accelerator.prepare(*strategy.models.values(), optimizer, lr_scheduler)
    trained = dict(zip(strategy.models, trained_models, strict=True))
    unet, text_encoder = trained["unet"], trained.get("text_encoder", pipe.text_encoder)
    for obj in strategy.checkpointed_objects():
        obj.to(accelerator.device)
        accelerator.register_for_checkpointing(obj)
    keep_checkpoints_small(accelerator)

    start_step, loss_history = resume(accelerator, checkpoints)
    if is_main:
        accelerator.init_trackers(strategy.name, config=loggable(config))
    micro_batches = iter(
        torch.utils.data.DataLoader(
            dataset,
            batch_sampler=plan.batches(start_step * accumulation, max_train_steps * accumulation),
            num_workers=config.dataloader_num_workers,
            generator=torch.Generator().manual_seed(seed),  # not the global RNG, which a checkpoint restores
        )
    )
    progress = Progress(max_train_steps, "step", initial=start_step) if is_main else None
    sigterm = SigtermFlag()
    validated_at = None
    loop_started = time.perf_counter()
    with sigterm.installed():
        if is_main:
            plan_facts = {"examples": len(dataset), "processes": accelerator.num_processes}
            plan_facts |= {"mixed_precision": accelerator.mixed_precision, "first_step": start_step + 1}
            log.info("training", extra={"fields": {**plan_facts, "max_train_steps": max_train_steps}})
        for step in range(start_step + 1, max_train_steps + 1):
            step_loss = 0.0
            for micro_step in range(accumulation):
                batch = {k: v.to(accelerator.device) for k, v in next(micro_batches).items()}
                with gradient_sync(accelerator, trained_models, micro_step == accumulation - 1):
                    loss = diffusion_loss(batch, unet, text_encoder, pipe.vae, noise_scheduler, config)
                    accelerator.backward(loss / accumulation)
                step_loss += accelerator.gather(loss.detach()).mean().item() / accumulation
            accelerator.clip_grad_norm_(parameters, config.max_grad_norm)
            optimizer.step()
            lr_scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            strategy.after_step()

            loss_history.append([step, step_loss])
            accelerator.log({"train_loss": step_loss, "lr": lr_scheduler.get_last_lr()[0]}, step=step)
            if progress:
                progress.update(1, step=step, loss=round(step_loss, 5))
            if validation_due(config, step, plan.batches_per_epoch):
                validate(config, pipe, noise_scheduler, strategy, accelerator, step)
                validated_at = step
            if sigterm.raised:
                accelerator.set_trigger()
            stopping = accelerator.check_trigger()  # every process stops at the same step, or they would hang
            if step % config.checkpointing_steps == 0 or stopping:
                save_checkpoint(accelerator, config, step, loss_history)
            if stopping:
                log.warning(
                    "SIGTERM: checkpoint saved, exiting so that a retry resumes", extra={"fields": {"step": step}}
                )
                accelerator.end_training()
                raise SystemExit(PREEMPTED_EXIT_CODE)
    if progress:
        progress.close()
    runtime = time.perf_counter() - loop_started
    samples = (max_train_steps - start_step) * accumulation * config.train_batch_size * accelerator.num_processes
    speed = {"train_runtime": round(runtime, 3), "train_samples_per_second": round(samples / runtime, 3)}

    if validated_at != max_train_steps:
        validate(config, pipe, noise_scheduler, strategy, accelerator, max_train_steps)
    accelerator.wait_for_everyone()
    if is_main:
        with saved_whole(config.output_dir) as folder:
            strategy.save(folder)
            write_run_record(config, folder, strategy, len(dataset), max_train_steps, loss_history, speed)
        if config.push_to_hub:
            push_to_hub(config)
        log.info("saved", extra={"fields": {"output_dir": str(config.output_dir), "steps": max_train_steps, **speed}})
    accelerator.wait_for_everyone()
    accelerator.end_training()


def check_before_loading(config: TrainConfig) -> None:
    """Refuse what cannot work before minutes are spent loading a model."""
    if config.use_8bit_adam and (importlib.util.find_spec("bitsandbytes") is None or not torch.cuda.is_available()):
        raise BadInput("--use_8bit_adam needs the bitsandbytes package and a CUDA GPU; drop the flag to use AdamW")
    if config.push_to_hub and os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes"):
        raise BadInput("--push_to_hub cannot work with HF_HUB_OFFLINE set")
    check_model_source(config)


def make_accelerator(config: TrainConfig) -> Accelerator:
    """An Accelerator for this process. fp16 on a CPU becomes the CPU's native half precision (bf16,
    as `DTYPE=auto` picks for inference) or, without bf16 instructions, fp32; one warning says which.

    Without a GPU accelerate is told so explicitly: only then do several launched processes
    (torchrun, `accelerate launch --multi_gpu`) join one gloo group instead of training alone.
    """
    cpu = config.device == "cpu" or not torch.accelerator.is_available()
    state = PartialState(cpu=cpu)
    mixed_precision = config.mixed_precision or os.environ.get("ACCELERATE_MIXED_PRECISION", "no")
    if mixed_precision == "fp16" and state.device.type == "cpu":
        mixed_precision = "bf16" if cpu_has_native_bf16() else "no"
        if state.is_main_process:
            instead = "bf16, this CPU's native half precision" if mixed_precision == "bf16" else "fp32"
            log.warning(f"--mixed_precision=fp16 needs a GPU: training in {instead}")
    project = ProjectConfiguration(project_dir=config.output_dir, logging_dir=config.output_dir / config.logging_dir)
    return Accelerator(
        mixed_precision=mixed_precision,
        log_with=None if config.report_to == "none" else config.report_to,
        project_config=project,
        cpu=cpu,
    )


def make_optimizer(config: TrainConfig, parameters: list[torch.nn.Parameter], learning_rate: float):
    """AdamW as upstream, but fused: one kernel updates every parameter (2.5x faster on a CPU)."""
    hyperparameters = {
        "lr": learning_rate,
        "betas": (config.adam_beta1, config.adam_beta2),
        "weight_decay": config.adam_weight_decay,
        "eps": config.adam_epsilon,
    }
    if config.use_8bit_adam:
        import bitsandbytes

        return bitsandbytes.optim.AdamW8bit(parameters, **hyperparameters)
    return torch.optim.AdamW(parameters, fused=True, **hyperparameters)


def gradient_sync(accelerator: Accelerator, models: list[torch.nn.Module], sync: bool):
    """Skip the gradient all-reduce on all but the last micro-batch of a step (DDP's no_sync)."""
    stack = ExitStack()
    if not sync:
        for model in models:
            stack.enter_context(accelerator.no_sync(model))
    return stack


def diffusion_loss(batch, unet, text_encoder, vae, noise_scheduler, config: TrainConfig) -> torch.Tensor:
    """Add noise at a random timestep and score the UNet's prediction of it (or of the velocity)."""
    if "latent_dist" in batch:
        latent_dist = DiagonalGaussianDistribution(batch["latent_dist"])
    else:
        latent_dist = vae.encode(batch["pixel_values"].to(vae.dtype)).latent_dist
    latents = latent_dist.sample() * vae.config.scaling_factor
    if "text_embeddings" in batch:
        text_embeddings = batch["text_embeddings"]
    else:
        text_embeddings = text_encoder(batch["input_ids"], return_dict=False)[0]

    noise = torch.randn_like(latents)
    if config.noise_offset:
        noise += config.noise_offset * torch.randn(latents.shape[0], latents.shape[1], 1, 1, device=latents.device)
    timesteps = torch.randint(
        0, noise_scheduler.config.num_train_timesteps, (latents.shape[0],), device=latents.device
    ).long()
    noisy_latents = noise_scheduler.add_noise(latents, noise, timesteps)
    prediction_type = noise_scheduler.config.prediction_type
    target = noise if prediction_type == "epsilon" else noise_scheduler.get_velocity(latents, noise, timesteps)
    prediction = unet(noisy_latents, timesteps, text_embeddings, return_dict=False)[0]

    if config.snr_gamma is None:
        return F.mse_loss(prediction.float(), target.float())
    # Min-SNR weighting (Hang et al. 2023): cap the weight of easy, low-noise timesteps.
    snr = compute_snr(noise_scheduler, timesteps)
    weights = snr.clamp(max=config.snr_gamma) / (snr if prediction_type == "epsilon" else snr + 1)
    per_example = F.mse_loss(prediction.float(), target.float(), reduction="none").mean(dim=(1, 2, 3))
    return (per_example * weights).mean()


class SigtermFlag:
    """Turns SIGTERM (preemption, eviction, `kubectl delete`) into a flag the loop reads at a step boundary."""

    raised = False

    def _handle(self, signum, frame) -> None:
        self.raised = True

    @contextmanager
    def installed(self):
        previous = signal.signal(signal.SIGTERM, self._handle)
        try:
            yield
        finally:
            signal.signal(signal.SIGTERM, previous)


# Checkpoints -----------------------------------------------------------------------------------


def keep_checkpoints_small(accelerator: Accelerator) -> None:
    """Save and restore only the parameters that train (a LoRA checkpoint holds the adapters, not the model)."""

    def save(models, weights, output_dir):
        if accelerator.is_main_process:
            for i, model in enumerate(models):
                trainable = {n: p.detach().contiguous() for n, p in trainable_parameters(accelerator, model)}
                save_file(trainable, Path(output_dir) / f"trainable_{i}.safetensors")
        weights.clear()  # accelerate would otherwise save every weight of every model again

    def load(models, input_dir):
        for i, model in enumerate(models):
            parameters = dict(trainable_parameters(accelerator, model))
            saved = load_file(Path(input_dir) / f"trainable_{i}.safetensors")
            if saved.keys() != parameters.keys():
                raise ValueError(f"trainable_{i}.safetensors does not hold this model's trainable parameters")
            with torch.no_grad():
                for name, value in saved.items():
                    parameters[name].copy_(value)
        models.clear()

    accelerator.register_save_state_pre_hook(save)
    accelerator.register_load_state_pre_hook(load)


def trainable_parameters(accelerator: Accelerator, model: torch.nn.Module):
    return [(n, p) for n, p in accelerator.unwrap_model(model).named_parameters() if p.requires_grad]


def save_checkpoint(accelerator: Accelerator, config: TrainConfig, step: int, loss_history: list) -> None:
    """Write `checkpoint-<step>/` whole or not at all: into a temporary folder, renamed when complete."""
    final = config.output_dir / f"checkpoint-{step}"
    partial = config.output_dir / f".checkpoint-{step}.partial"
    if accelerator.is_main_process:
        for leftover in config.output_dir.glob(".checkpoint-*.partial"):  # from a run killed while saving
            shutil.rmtree(leftover)
    accelerator.wait_for_everyone()
    accelerator.save_state(partial)  # every process: each saves its own RNG state
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        files = {str(p.relative_to(partial)): p.stat().st_size for p in sorted(partial.rglob("*")) if p.is_file()}
        state = {"global_step": step, "loss_history": loss_history, "files": files}
        (partial / "trainer_state.json").write_text(json.dumps(state))
        shutil.rmtree(final, ignore_errors=True)
        partial.rename(final)
        log.info("checkpoint saved", extra={"fields": {"checkpoint": str(final), "step": step}})
        if config.checkpoints_total_limit:
            for old in sorted_checkpoints(config.output_dir)[config.checkpoints_total_limit :]:
                shutil.rmtree(old)
    accelerator.wait_for_everyone()


def sorted_checkpoints(output_dir: Path) -> list[Path]:
    """`checkpoint-<step>` folders, newest first."""
    found = [p for p in output_dir.glob("checkpoint-*") if p.is_dir() and p.name.split("-", 1)[1].isdigit()]
    return sorted(found, key=lambda p: int(p.name.split("-", 1)[1]), reverse=True)


def resume_candidates(config: TrainConfig) -> list[Path]:
    """Checkpoints to try, best first: all of them for `latest`, the one named otherwise, none for `none`."""
    choice = config.resume_from_checkpoint
    if choice in (None, "none", ""):
        return []
    if choice == "latest":
        return sorted_checkpoints(config.output_dir)
    path = Path(choice) if Path(choice).is_dir() else config.output_dir / choice
    if not path.is_dir():
        raise BadInput(f"RESUME_FROM_CHECKPOINT {choice}: no such checkpoint folder")
    return [path]


def checkpoint_problem(checkpoint: Path) -> str | None:
    """Why a checkpoint cannot be trusted (no state file, a missing or truncated file), or None."""
    try:
        state = json.loads((checkpoint / "trainer_state.json").read_text())
        for name, size in state["files"].items():
            actual = (checkpoint / name).stat().st_size
            if actual != size:
                return f"{name} is {actual} bytes, {size} were written"
    except (OSError, ValueError, KeyError) as error:
        return str(error)
    return None


def resume(accelerator: Accelerator, checkpoints: list[Path]) -> tuple[int, list]:
    """Restore the newest usable checkpoint; return its step and loss history (0 and [] when there is none)."""
    half_loaded = None
    for checkpoint in checkpoints:
        problem = checkpoint_problem(checkpoint)
        if problem is None:
            try:
                accelerator.load_state(checkpoint)
            except Exception as error:  # any unreadable file: fall back to the previous checkpoint
                problem = f"cannot be loaded ({error})"
                half_loaded = checkpoint
        if problem:
            log.warning("skipping checkpoint", extra={"fields": {"checkpoint": str(checkpoint), "problem": problem}})
            continue
        state = json.loads((checkpoint / "trainer_state.json").read_text())
        log.info("resuming", extra={"fields": {"checkpoint": str(checkpoint), "step": state["global_step"]}})
        return state["global_step"], state["loss_history"]
    if half_loaded:
        # Part of it may be in the model already; starting afresh on top of that would be silently wrong.
        raise BadInput(
            f"checkpoint {half_loaded} cannot be loaded and no earlier one can: "
            "remove it, or start afresh in a new OUTPUT_DIR"
        )
    return 0, []


# Validation images -----------------------------------------------------------------------------


def validation_prompts(config: TrainConfig) -> list[str]:
    return config.validation_prompts or ([config.validation_prompt] if config.validation_prompt else [])


def validation_due(config: TrainConfig, step: int, batches_per_epoch: int) -> bool:
    """After every --validation_steps steps, or else after every --validation_epochs epochs."""
    if not validation_prompts(config):
        return False
    if config.validation_steps:
        return step % config.validation_steps == 0
    epochs_done = step * config.gradient_accumulation_steps // batches_per_epoch
    epochs_before = (step - 1) * config.gradient_accumulation_steps // batches_per_epoch
    return epochs_done > epochs_before and epochs_done % config.validation_epochs == 0


def validate(config: TrainConfig, pipe, noise_scheduler, strategy: Strategy, accelerator: Accelerator, step: int):
    """Sample the validation prompts with the modules being trained; main process only, the others wait."""
    prompts = validation_prompts(config)
    if prompts and accelerator.is_main_process:
        sampler = StableDiffusionPipeline(
            vae=pipe.vae,
            text_encoder=pipe.text_encoder,
            tokenizer=pipe.tokenizer,
            unet=pipe.unet,
            scheduler=DPMSolverMultistepScheduler.from_config(noise_scheduler.config),
            safety_checker=None,
            feature_extractor=None,
            requires_safety_checker=False,
        )
        sampler.set_progress_bar_config(disable=True)
        generator = torch.Generator(accelerator.device).manual_seed(data_seed(config))
        images = []
        with strategy.sampling_weights(), accelerator.autocast(), torch.no_grad():
            for prompt in prompts:
                images += sampler(
                    prompt,
                    height=config.resolution,
                    width=config.resolution,
                    num_images_per_prompt=config.num_validation_images,
                    num_inference_steps=VALIDATION_INFERENCE_STEPS,
                    generator=generator,
                ).images
        path = config.output_dir / "samples" / f"step-{step:06d}.png"
        write_atomically(path, lambda p: grid(images, columns=config.num_validation_images).save(p, format="PNG"))
        for tracker in accelerator.trackers:
            if tracker.name == "tensorboard":
                tracker.writer.add_images(
                    "validation", np.stack([np.asarray(i) for i in images]), step, dataformats="NHWC"
                )
        log.info("validation images", extra={"fields": {"path": str(path), "step": step}})
    accelerator.wait_for_everyone()


def grid(images: list[Image.Image], columns: int) -> Image.Image:
    width, height = images[0].size
    rows = math.ceil(len(images) / columns)
    sheet = Image.new("RGB", (columns * width, rows * height))
    for i, image in enumerate(images):
        sheet.paste(image, ((i % columns) * width, (i // columns) * height))
    return sheet


# Final outputs ---------------------------------------------------------------------------------


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


def save_pipeline(pipe: StableDiffusionPipeline, output_dir: Path) -> None:
    """A whole pipeline in safetensors, with the PAI tokenizer's vocab.txt kept."""
    pipe.save_pretrained(output_dir, safe_serialization=True)
    # transformers 5 saves BertTokenizer as tokenizer.json only; PAI tooling and older libraries read vocab.txt.
    vocab = sorted(pipe.tokenizer.get_vocab().items(), key=lambda item: item[1])
    (output_dir / "tokenizer" / "vocab.txt").write_text("".join(token + "\n" for token, _ in vocab), encoding="utf-8")


@contextmanager
def saved_whole(output_dir: Path):
    """A folder to write the final outputs into; then each is renamed into `output_dir`, model_index.json
    last. A kill while saving leaves every output whole, this run's or the last, never half a file."""
    staging, replaced = output_dir / ".final.partial", output_dir / ".final.replaced"
    for leftover in (staging, replaced):  # from a run killed while saving
        shutil.rmtree(leftover, ignore_errors=True)
    staging.mkdir(parents=True)
    yield staging
    replaced.mkdir()
    for entry in sorted(staging.iterdir(), key=lambda path: path.name == "model_index.json"):
        if (output_dir / entry.name).exists():
            (output_dir / entry.name).rename(replaced / entry.name)
        entry.rename(output_dir / entry.name)
    shutil.rmtree(replaced)
    staging.rmdir()


def write_run_record(
    config: TrainConfig,
    folder: Path,
    strategy: Strategy,
    examples: int,
    steps: int,
    loss_history: list,
    speed: dict,
) -> None:
    """README.md model card, loss.png and trainer_state.json (with this run's loop speed) beside the saved model."""
    state = {"global_step": steps, "loss_history": loss_history, **speed}
    (folder / "trainer_state.json").write_text(json.dumps(state))
    write_loss_plot(loss_history, folder / "loss.png")
    (folder / "README.md").write_text(model_card(config, strategy, examples, steps), encoding="utf-8")


def write_loss_plot(loss_history: list, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot

    figure, axes = pyplot.subplots(figsize=(8, 4))
    steps, losses = zip(*loss_history, strict=True) if loss_history else ((), ())
    axes.plot(steps, losses, linewidth=0.8)
    axes.set(xlabel="step", ylabel="loss", title="training loss")
    axes.grid(alpha=0.3)
    figure.tight_layout()
    figure.savefig(path)
    pyplot.close(figure)


CARD_HYPERPARAMETERS = (
    *("resolution", "center_crop", "random_flip", "train_batch_size", "gradient_accumulation_steps"),
    *("learning_rate", "lr_scheduler", "lr_warmup_steps", "mixed_precision", "use_ema", "rank", "lora_alpha"),
    *("train_text_encoder", "snr_gamma", "noise_offset", "prediction_type", "seed"),
)


def model_card(config: TrainConfig, strategy: Strategy, examples: int, steps: int) -> str:
    data = config.dataset_name or str(config.train_data_dir)
    hyperparameters = {name: value for name, value in loggable(config).items() if name in CARD_HYPERPARAMETERS}
    prompt = (validation_prompts(config) or ["一只可爱的小猫"])[0]
    usage = strategy.usage.format(
        output_dir=config.output_dir, base_model=config.pretrained_model_name_or_path, prompt=prompt
    )
    table = "\n".join(f"| {name} | {value} |" for name, value in hyperparameters.items())
    return f"""---
base_model: {config.pretrained_model_name_or_path}
library_name: diffusers
tags: [stable-diffusion, text-to-image, pai-diffusion, {strategy.name}]
---

# {config.output_dir.name}

`{strategy.name}` of [{config.pretrained_model_name_or_path}](https://huggingface.co/{config.pretrained_model_name_or_path})
on {data} ({examples} images) for {steps} optimizer steps.

| hyperparameter | value |
|---|---|
{table}

## How to load

{usage}

Validation images are in `samples/`, the loss curve is `loss.png`, TensorBoard logs are in `{config.logging_dir}/`.
"""


def loggable(config: TrainConfig) -> dict:
    """The configuration as plain values, for TensorBoard's hyperparameters (no secrets, no lists)."""
    values = {}
    for name, value in config.model_dump().items():
        if "token" in name:
            continue
        values[name] = value if isinstance(value, int | float | str | bool) else str(value)
    return values


def push_to_hub(config: TrainConfig) -> None:
    from huggingface_hub import create_repo, upload_folder

    token = config.hub_token.get_secret_value() if config.hub_token else None
    repo_id = create_repo(config.hub_model_id or config.output_dir.name, exist_ok=True, token=token).repo_id
    upload_folder(
        repo_id=repo_id,
        folder_path=config.output_dir,
        token=token,
        commit_message="End of training",
        ignore_patterns=["checkpoint-*", ".checkpoint-*", "latent-cache/*"],
    )
    log.info("pushed to the hub", extra={"fields": {"repo_id": repo_id}})


def write_atomically(path: Path, write) -> None:
    """Write through a temporary name so that a reader never sees half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(f".{path.name}.partial")
    write(partial)
    partial.replace(path)
