"""The training loop behind `finetune` and `lora`: one loop, two strategies (jobs/strategies.py).

`train` reads top to bottom as the phases of a run: check, load the models, plan the data, make
the optimizer, resume, take the steps, save. Distribution, mixed precision and the saved
optimizer/RNG state come from accelerate; the data order comes from `jobs.data.BatchPlan`, so a
resumed run continues at the exact micro-batch without reading the ones before it.
"""

from __future__ import annotations

import importlib.util
import logging
import math
import os
import time
from contextlib import ExitStack
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from accelerate import Accelerator, PartialState
from accelerate.utils import ProjectConfiguration, gather_object, set_seed
from diffusers import DDPMScheduler, StableDiffusionPipeline
from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution
from diffusers.optimization import get_scheduler
from diffusers.training_utils import compute_snr

from jobs import atomic, compiling, models, sigterm
from jobs.buckets import AspectBuckets, aspect_buckets
from jobs.checkpoints import keep_checkpoints_small, resume, resume_candidates, save_checkpoint
from jobs.config import FinetuneConfig, LoraConfig, TrainConfig
from jobs.data import BadSamples, BatchPlan, ImageTransform, Loader, collate, data_seed, tokenize
from jobs.errors import PREEMPTED_EXIT_CODE, BadInput
from jobs.latent_cache import LatentCache, cache_folder
from jobs.models import check_model_source, cpu_has_native_bf16
from jobs.progress import Progress
from jobs.run_record import hyperparameters, push_to_hub, write_run_record
from jobs.sources import Source, open_source
from jobs.strategies import FullFinetune, LoraFinetune, Strategy, load_base_pipeline
from jobs.validation import validate, validation_due

log = logging.getLogger("jobs")


def finetune(config: FinetuneConfig) -> None:
    train(config, FullFinetune)


def lora(config: LoraConfig) -> None:
    train(config, LoraFinetune)


@dataclass
class Run:
    """What the phases of one training run share."""

    config: TrainConfig
    accelerator: Accelerator
    pipe: StableDiffusionPipeline  # the loop's model, also used for validation
    strategy: Strategy
    noise_scheduler: DDPMScheduler
    seed: int  # of the data order and augmentation (jobs.data.data_seed)
    max_train_steps: int = 0
    batches_per_epoch: int = 0  # micro-batches of each process
    examples: int = 0
    bad: BadSamples | None = None
    buckets: AspectBuckets | None = None
    cache: LatentCache | None = None
    compile_cache: compiling.CompileCache | None = None


def train(config: TrainConfig, strategy_cls: type[Strategy]) -> None:
    """Fine-tune the model `config` names on its dataset; resume from the newest checkpoint if there is one."""
    check_before_loading(config)
    with process_state(config).main_process_first():  # the main process counts what must be counted, once
        source = open_source(config, config.output_dir / "data-index.json")
        buckets = aspect_buckets(config, source, config.output_dir) if config.aspect_buckets else None
    bad = bad_samples(config, source, buckets)
    checkpoints = resume_candidates(config)
    run = load_models(config, strategy_cls)
    run.bad, run.buckets = bad, buckets
    loader = plan_data(run, source)
    trained, optimizer, lr_scheduler = make_optimizer(run)
    start_step, state = resume(run.accelerator, checkpoints)
    state.setdefault("loss_history", [])
    run.compile_cache = compile_unet(run, (run.max_train_steps - start_step) * config.gradient_accumulation_steps)
    if run.accelerator.is_main_process:
        run.bad.found |= {int(index): text for index, text in state.get("bad_samples", {}).items()}
    accumulation = config.gradient_accumulation_steps
    micro_batches = loader.batches(start_step * accumulation, run.max_train_steps * accumulation)
    speed = take_steps(run, micro_batches, trained, optimizer, lr_scheduler, start_step, state)
    finish(run, {**state, **speed})


def check_before_loading(config: TrainConfig) -> None:
    """Refuse what cannot work before minutes are spent loading a model."""
    if config.use_8bit_adam and (importlib.util.find_spec("bitsandbytes") is None or not torch.cuda.is_available()):
        raise BadInput("--use_8bit_adam needs the bitsandbytes package and a CUDA GPU; drop the flag to use AdamW")
    if config.push_to_hub and os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes"):
        raise BadInput("--push_to_hub cannot work with HF_HUB_OFFLINE set")
    check_model_source(config)


def bad_samples(config: TrainConfig, source: Source, buckets: AspectBuckets | None) -> BadSamples:
    """The bad-sample count of this run; with buckets, the main process starts it with the records
    whose size could not be read, and too many of them stop the run before a model loads."""
    limit = config.max_bad_samples if config.max_bad_samples is not None else max(10, source.size // 100)
    bad = BadSamples(limit)
    if buckets is not None:
        if not (buckets.of_record >= 0).any():
            example = next(iter(buckets.problems.values()))
            raise BadInput(f"no record of {source.description} can be used, e.g. {example}")
        bad.found = dict(buckets.problems)
        bad.check(len(bad.found))
        if not process_state(config).is_main_process:
            bad.found = {}  # counted once, by the main process
        elif bad.found:
            example = next(iter(bad.found.values()))
            log.warning("records left out", extra={"fields": {"records": len(bad.found), "e.g.": example}})
    return bad


def load_models(config: TrainConfig, strategy_cls: type[Strategy]) -> Run:
    """One load of the base model for the loop and validation (the final save starts again from the base)."""
    accelerator = make_accelerator(config)
    if config.seed is not None:
        set_seed(config.seed)
    if config.allow_tf32:
        torch.backends.cuda.matmul.allow_tf32 = True
    if config.enable_xformers_memory_efficient_attention and accelerator.is_main_process:
        log.info("--enable_xformers_memory_efficient_attention: PyTorch's SDPA attention is used, it is as fast")
    weight_dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(accelerator.mixed_precision, torch.float32)
    pipe = load_base_pipeline(config, accelerator.device)
    pipe.vae.requires_grad_(False).to(weight_dtype)
    pipe.text_encoder.requires_grad_(False).to(weight_dtype)
    strategy = strategy_cls(config, pipe, weight_dtype)
    for model in strategy.models.values():
        model.train()  # from_pretrained leaves models in eval mode
    if config.gradient_checkpointing:
        pipe.unet.enable_gradient_checkpointing()
        if "text_encoder" in strategy.models:
            pipe.text_encoder.gradient_checkpointing_enable()
    noise_scheduler = DDPMScheduler.from_config(pipe.scheduler.config)
    return Run(config, accelerator, pipe, strategy, noise_scheduler, data_seed(config))


def process_state(config: TrainConfig) -> PartialState:
    """This process's place among the run's processes. Without a GPU accelerate is told so explicitly:
    only then do several launched processes (torchrun, `accelerate launch --multi_gpu`) join one gloo
    group instead of training alone."""
    return PartialState(cpu=config.device == "cpu" or not torch.accelerator.is_available())


def compile_unet(run: Run, passes: int) -> compiling.CompileCache | None:
    """Compile the UNet's repeated transformer blocks if COMPILE says so (auto: if `passes` pay for it),
    from the compile cache when it holds them. In training the blocks' step is as fast as the whole
    UNet's compiled (0.88 against 0.86 s, medium model on a CPU) for half the compile time (47 against 100 s)."""
    config, accelerator = run.config, run.accelerator
    cache = None
    if config.compile != "false":
        key = {"kind": "training", "strategy": run.strategy.name, "device": compiling.device_name(accelerator.device)}
        key |= {"mixed_precision": accelerator.mixed_precision, "model": models.model_identity(config)}
        key |= {"resolution": config.resolution, "batch": config.train_batch_size}
        key |= {"buckets": run.buckets.sizes if run.buckets is not None else None}
        key |= {"gradient_checkpointing": config.gradient_checkpointing, "trained": sorted(run.strategy.models)}
        cache = compiling.CompileCache.for_key(config.compile_cache_dir or compiling.default_directory(), key)
    sizes = sum(1 for images in run.buckets.counts() if images) if run.buckets is not None else 1
    warm = bool(cache and cache.warm)
    widest = max(run.pipe.unet.config.block_out_channels)
    compile, why = compiling.decide(config.compile, passes, "training", accelerator.device, warm, widest, sizes)
    if accelerator.is_main_process:
        fields = {"why": why, "cache": str(cache and cache.path), "warm": warm}
        log.info("compile" if compile else "no compile", extra={"fields": fields})
    if not compile:
        return None
    cache.use()
    # A static graph for each input the blocks see: a UNet level's (the mid block's too), with or
    # without gradients, at each size. By default the second shape would get one shape-generic graph
    # instead, whose step takes 11-14% longer on a CPU (docs/benchmarks.md, *Compiling*); the limit of
    # graphs per block must hold them all.
    inputs = 2 * (len(run.pipe.unet.config.block_out_channels) + 1) * sizes
    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, inputs)
    run.pipe.unet.compile_repeated_blocks(fullgraph=True, dynamic=False)
    return cache


def make_accelerator(config: TrainConfig) -> Accelerator:
    """An Accelerator for this process. fp16 on a CPU becomes the CPU's native half precision (bf16,
    as `DTYPE=auto` picks for inference) or, without bf16 instructions, fp32; one warning says which."""
    state = process_state(config)
    cpu = state.device.type == "cpu"
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


def plan_data(run: Run, source: Source) -> Loader:
    """Micro-batches numbered across epochs, so step N always starts at micro-batch N * accumulation."""
    config, accelerator, pipe = run.config, run.accelerator, run.pipe
    sizes = [shard.size for shard in source.shards]
    of_record = run.buckets.of_record if run.buckets is not None else None
    rank, processes = accelerator.process_index, accelerator.num_processes
    plan = BatchPlan(sizes, config.train_batch_size, run.seed, rank, processes, of_record)
    if run.buckets is not None and accelerator.is_main_process:
        listed = ", ".join(f"{b['width']}x{b['height']}: {b['images']}" for b in run.buckets.summary())
        log.info("aspect buckets", extra={"fields": {"buckets": listed}})
    if config.cache_latents:
        with_text = "text_encoder" not in run.strategy.models
        folder = cache_folder(config, source, with_text, pipe.vae.dtype, run.buckets)
        empty_ids = tokenize(pipe.tokenizer, [""])[0]
        run.cache = LatentCache(folder, plan, pipe.vae, pipe.text_encoder, with_text, empty_ids)
    steps_per_epoch = math.ceil(plan.batches_per_epoch / config.gradient_accumulation_steps)
    run.max_train_steps = config.max_train_steps or config.num_train_epochs * steps_per_epoch
    run.batches_per_epoch = plan.batches_per_epoch
    run.examples = source.size
    transform = ImageTransform(config.resolution, config.center_crop, config.random_flip)
    threads = config.dataloader_num_workers or 1
    tokenizer, dropout = pipe.tokenizer, config.caption_dropout
    return Loader(source, plan, transform, tokenizer, run.seed, run.cache, threads, run.bad, run.buckets, dropout)


def make_optimizer(run: Run):
    """AdamW and the LR schedule as upstream (its schedule counts every process's step), all prepared
    by accelerate; returns the trained modules as accelerate wrapped them, by pipeline component."""
    config, accelerator, strategy = run.config, run.accelerator, run.strategy
    learning_rate = config.learning_rate
    if config.scale_lr:
        learning_rate *= config.gradient_accumulation_steps * config.train_batch_size * accelerator.num_processes
    parameters = [p for model in strategy.models.values() for p in model.parameters() if p.requires_grad]
    hyperparameters = {
        "lr": learning_rate,
        "betas": (config.adam_beta1, config.adam_beta2),
        "weight_decay": config.adam_weight_decay,
        "eps": config.adam_epsilon,
    }
    if config.use_8bit_adam:
        import bitsandbytes

        optimizer = bitsandbytes.optim.AdamW8bit(parameters, **hyperparameters)
    else:  # fused: one kernel updates every parameter (2.5x faster on a CPU)
        optimizer = torch.optim.AdamW(parameters, fused=True, **hyperparameters)
    lr_scheduler = get_scheduler(
        config.lr_scheduler,
        optimizer=optimizer,
        num_warmup_steps=config.lr_warmup_steps * accelerator.num_processes,
        num_training_steps=run.max_train_steps * accelerator.num_processes,
    )
    *models, optimizer, lr_scheduler = accelerator.prepare(*strategy.models.values(), optimizer, lr_scheduler)
    for obj in strategy.checkpointed_objects():
        obj.to(accelerator.device)
        accelerator.register_for_checkpointing(obj)
    keep_checkpoints_small(accelerator)
    return dict(zip(strategy.models, models, strict=True)), optimizer, lr_scheduler


def take_steps(run: Run, micro_batches, trained, optimizer, lr_scheduler, start_step: int, state: dict) -> dict:
    """The optimizer steps from `start_step + 1` on; a SIGTERM saves a checkpoint and exits 143.
    Returns the loop's speed, for trainer_state.json."""
    config, accelerator = run.config, run.accelerator
    unet, text_encoder = trained["unet"], trained.get("text_encoder", run.pipe.text_encoder)
    parameters = [p for group in optimizer.param_groups for p in group["params"]]
    accumulation = config.gradient_accumulation_steps
    if accelerator.is_main_process:
        accelerator.init_trackers(run.strategy.name, config=hyperparameters(config))
        facts = {"examples": run.examples, "processes": accelerator.num_processes}
        facts |= {"mixed_precision": accelerator.mixed_precision, "first_step": start_step + 1}
        log.info("training", extra={"fields": {**facts, "max_train_steps": run.max_train_steps}})
    progress = Progress(run.max_train_steps, "step", initial=start_step) if accelerator.is_main_process else None
    loop_started = time.perf_counter()
    with sigterm.deferred():
        for step in range(start_step + 1, run.max_train_steps + 1):
            step_loss = 0.0
            for micro_step in range(accumulation):
                batch = collate(next(micro_batches), accelerator.device, run.cache)
                with gradient_sync(accelerator, list(trained.values()), micro_step == accumulation - 1):
                    loss = diffusion_loss(batch, unet, text_encoder, run.pipe.vae, run.noise_scheduler, config)
                    accelerator.backward(loss / accumulation)
                step_loss += accelerator.gather(loss.detach()).mean().item() / accumulation
            accelerator.clip_grad_norm_(parameters, config.max_grad_norm)
            optimizer.step()
            lr_scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            run.strategy.after_step()
            check_bad_samples(run)
            if run.compile_cache and accelerator.is_main_process and step == start_step + 1:
                run.compile_cache.save()  # the first step compiled the blocks; the other ranks compiled the same

            state["loss_history"].append([step, step_loss])
            accelerator.log({"train_loss": step_loss, "lr": lr_scheduler.get_last_lr()[0]}, step=step)
            if progress:
                progress.update(1, step=step, loss=round(step_loss, 5))
            if validation_due(config, step, run.batches_per_epoch):
                validate(run, step)
                state["validated_at"] = step
            if sigterm.received():
                accelerator.set_trigger()
            stopping = accelerator.check_trigger()  # every process stops at the same step, or they would hang
            if step % config.checkpointing_steps == 0 or stopping:
                if run.cache is not None:
                    run.cache.flush()
                save_checkpoint(accelerator, config, step, {**state, "bad_samples": all_bad_samples(run)})
            if stopping:
                log.warning(
                    "SIGTERM: checkpoint saved, exiting so that a retry resumes", extra={"fields": {"step": step}}
                )
                accelerator.end_training()
                raise SystemExit(PREEMPTED_EXIT_CODE)
    if progress:
        progress.close()
    runtime = time.perf_counter() - loop_started
    samples = (run.max_train_steps - start_step) * accumulation * config.train_batch_size * accelerator.num_processes
    return {"train_runtime": round(runtime, 3), "train_samples_per_second": round(samples / runtime, 3)}


def finish(run: Run, state: dict) -> None:
    """Validate the final weights (unless the last step did), then the main process saves the outputs whole."""
    config, accelerator = run.config, run.accelerator
    if run.cache is not None:
        run.cache.flush()
    if state.pop("validated_at", None) != run.max_train_steps:
        validate(run, run.max_train_steps)
    if run.compile_cache and accelerator.is_main_process:  # validation compiled the blocks for sampling too
        run.compile_cache.save()
    state["bad_samples"] = sorted(all_bad_samples(run).values())
    if run.buckets is not None:
        state["aspect_buckets"] = run.buckets.summary()
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        with atomic.staged_into(config.output_dir, last="model_index.json") as folder:
            run.strategy.save(folder)
            write_run_record(config, folder, run.strategy, run.examples, {"global_step": run.max_train_steps, **state})
        if config.push_to_hub:
            push_to_hub(config)
        speed = {k: state[k] for k in ("train_runtime", "train_samples_per_second")}
        log.info(
            "saved", extra={"fields": {"output_dir": str(config.output_dir), "steps": run.max_train_steps, **speed}}
        )
    accelerator.wait_for_everyone()
    accelerator.end_training()


def check_bad_samples(run: Run) -> None:
    """Every process stops with exit code 2, at the same step, once the run has more bad samples than allowed."""
    count = torch.tensor(float(len(run.bad.found)), device=run.accelerator.device)
    if run.accelerator.reduce(count, "sum").item() > run.bad.limit:
        run.bad.check(len(all_bad_samples(run)))  # the same records may have been found by several processes


def all_bad_samples(run: Run) -> dict[int, str]:
    """The bad samples every process found (every process must call this)."""
    found: dict[int, str] = {}
    for part in gather_object([run.bad.found]):
        found |= part
    return found


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
