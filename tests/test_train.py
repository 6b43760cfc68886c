"""finetune and lora end to end: the seed's commands, their outputs, and what each job writes.

The seed's commands run verbatim through `accelerate launch jobs/<job>.py` (step counts and
resolution shrunk) and their outputs are loaded exactly as the seed's step 3 does.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import run_process, training_flags
from diffusers import StableDiffusionPipeline
from safetensors.torch import load_file
from tiny_dataset import write_dataset

BIN = Path(sys.executable).parent

SEED_FINETUNE = """
accelerate launch jobs/finetune.py \\
  --pretrained_model_name_or_path=$MODEL_NAME \\
  --train_data_dir=$TRAIN_DIR \\
  --use_ema \\
  --resolution=32 --center_crop --random_flip \\
  --train_batch_size=1 \\
  --gradient_accumulation_steps=4 \\
  --gradient_checkpointing \\
  --mixed_precision="fp16" \\
  --max_train_steps=2 \\
  --learning_rate=1e-05 \\
  --max_grad_norm=1 \\
  --lr_scheduler="constant" --lr_warmup_steps=0 \\
  --output_dir=$OUTPUT_DIR
"""

SEED_LORA = """
accelerate launch jobs/lora.py \\
  --pretrained_model_name_or_path=$MODEL_NAME \\
  --train_data_dir=$TRAIN_DIR \\
  --resolution=32 --center_crop --random_flip \\
  --train_batch_size=1 \\
  --gradient_accumulation_steps=4 \\
  --max_train_steps=2 \\
  --learning_rate=1e-04 \\
  --max_grad_norm=1 \\
  --lr_scheduler="cosine" --lr_warmup_steps=0 \\
  --output_dir=$OUTPUT_DIR
"""


def run_seed_command(command: str, model: Path, data: Path, output: Path) -> subprocess.CompletedProcess:
    env = {"MODEL_NAME": model, "TRAIN_DIR": data, "OUTPUT_DIR": output, "PATH": f"{BIN}:{os.environ['PATH']}"}
    return run_process(["bash", "-euc", command], env=env, timeout=600)


def loss_history(output: Path) -> list[list[float]]:
    return json.loads((output / "trainer_state.json").read_text())["loss_history"]


def unet_weights(folder: Path) -> dict[str, torch.Tensor]:
    return load_file(folder / "unet" / "diffusion_pytorch_model.safetensors")


def test_seed_finetune_command_trains_and_its_output_loads_as_in_the_seed(tiny_model, dataset, tmp_path):
    output = tmp_path / "path_to_save_model"
    result = run_seed_command(SEED_FINETUNE, tiny_model, dataset, output)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stderr.count("--mixed_precision=fp16 needs a GPU") == 1

    # The seed's step 3, verbatim but on CPU.
    pipe = StableDiffusionPipeline.from_pretrained(output)
    image = pipe("输入文本").images[0]
    assert image.size == (32, 32)

    assert type(pipe.tokenizer).__name__ == "BertTokenizer" and pipe.tokenizer.model_max_length == 32
    vocab = (output / "tokenizer" / "vocab.txt").read_text(encoding="utf-8").splitlines()
    assert vocab == (tiny_model / "tokenizer" / "vocab.txt").read_text(encoding="utf-8").splitlines()
    trained, base = unet_weights(output), unet_weights(tiny_model)
    assert any(not torch.equal(trained[name], base[name]) for name in base), "EMA weights did not move"
    # The loop ran its frozen VAE in bf16 on a CPU with bf16 instructions; the saved one is the base's, bit for bit.
    saved_vae, base_vae = (load_file(m / "vae" / "diffusion_pytorch_model.safetensors") for m in (output, tiny_model))
    assert saved_vae.keys() == base_vae.keys() and all(torch.equal(saved_vae[k], v) for k, v in base_vae.items())
    losses = loss_history(output)
    assert [step for step, _ in losses] == [1, 2] and all(math.isfinite(loss) for _, loss in losses)
    state = json.loads((output / "trainer_state.json").read_text())
    assert state["train_runtime"] > 0 and state["train_samples_per_second"] > 0  # what bench/train.py reads
    card = (output / "README.md").read_text(encoding="utf-8")
    assert str(tiny_model) in card and "from_pretrained" in card
    assert (output / "loss.png").stat().st_size > 0
    assert list((output / "logs" / "finetune").rglob("events.out.tfevents.*"))


def test_seed_lora_command_output_loads_merged_and_with_stock_load_lora_weights(tiny_model, dataset, tmp_path):
    output = tmp_path / "path_to_save_model"
    result = run_seed_command(SEED_LORA, tiny_model, dataset, output)
    assert result.returncode == 0, result.stderr[-3000:]

    merged = StableDiffusionPipeline.from_pretrained(output)  # the seed's step 3
    assert merged("输入文本").images[0].size == (32, 32)

    base = StableDiffusionPipeline.from_pretrained(tiny_model)
    latents, timestep, text = torch.randn(1, 4, 16, 16), torch.tensor([500]), torch.randn(1, 32, 32)
    with torch.no_grad():
        before = base.unet(latents, timestep, text).sample
        base.load_lora_weights(output)
        with_lora = base.unet(latents, timestep, text).sample
        from_merged = merged.unet(latents, timestep, text).sample
    assert not torch.equal(before, with_lora), "the LoRA changes nothing"
    torch.testing.assert_close(with_lora, from_merged, atol=1e-5, rtol=1e-4)
    assert base.unet.peft_config["default_0"].r == 4


def test_lora_rank_alpha_text_encoder_without_merged_copy(tiny_model, dataset, tmp_path, cli):
    output = tmp_path / "lora"
    flags = training_flags(
        dataset, output, train_batch_size=2, max_train_steps=2, learning_rate="1e-3", lr_warmup_steps=0, seed=0,
        rank=8, lora_alpha=16, train_text_encoder=True, no_save_merged=True,
    )  # fmt: skip
    code = cli("lora", *flags, MODEL_NAME=tiny_model)
    assert code == 0
    assert (output / "pytorch_lora_weights.safetensors").is_file()
    assert not (output / "model_index.json").exists()

    pipe = StableDiffusionPipeline.from_pretrained(tiny_model)
    ids = pipe.tokenizer(["一只红色的猫"], padding="max_length", return_tensors="pt").input_ids
    with torch.no_grad():
        before = pipe.text_encoder(ids)[0]
        pipe.load_lora_weights(output)
        after = pipe.text_encoder(ids)[0]
    assert not torch.equal(before, after), "the text-encoder LoRA was not loaded"
    config = pipe.unet.peft_config["default_0"]
    assert (config.r, config.lora_alpha) == (8, 16)

    # kohya's file (A1111, ComfyUI): both models' adapters under kohya's names, --lora_alpha as alpha,
    # and stock diffusers renders it as it renders the diffusers file.
    kohya = load_file(output / "pytorch_lora_weights_kohya.safetensors")
    unet_down = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q.lora_down.weight"
    assert unet_down in kohya and "lora_te_text_model_encoder_layers_0_self_attn_q_proj.lora_up.weight" in kohya
    assert {key.split(".", 1)[1] for key in kohya} == {"lora_down.weight", "lora_up.weight", "alpha"}
    assert all(value.item() == 16 for key, value in kohya.items() if key.endswith(".alpha"))
    images = []
    for weight_name in ("pytorch_lora_weights.safetensors", "pytorch_lora_weights_kohya.safetensors"):
        pipe = StableDiffusionPipeline.from_pretrained(tiny_model, safety_checker=None)
        pipe.load_lora_weights(output, weight_name=weight_name)
        with torch.no_grad():
            torch.testing.assert_close(pipe.text_encoder(ids)[0], after)  # the text encoder's adapters too
        generator = torch.Generator().manual_seed(0)
        images.append(pipe("一只红色的猫", num_inference_steps=3, generator=generator, output_type="np").images[0])
    assert np.array_equal(images[0], images[1])


def test_truncated_newest_checkpoint_is_skipped_and_the_total_limit_holds(tiny_model, dataset, tmp_path, cli, capfd):
    output = tmp_path / "out"
    common = training_flags(
        dataset, output, train_batch_size=2, checkpointing_steps=1, checkpoints_total_limit=2, lr_warmup_steps=0,
        no_save_merged=True,
    )  # fmt: skip
    assert cli("lora", *common, "--max_train_steps", 3, MODEL_NAME=tiny_model) == 0
    assert sorted(p.name for p in output.glob("checkpoint-*")) == ["checkpoint-2", "checkpoint-3"]

    newest = output / "checkpoint-3" / "trainable_0.safetensors"
    newest.write_bytes(newest.read_bytes()[:100])
    capfd.readouterr()
    assert cli("lora", *common, "--max_train_steps", 4, MODEL_NAME=tiny_model) == 0
    log = capfd.readouterr().err
    assert '"message": "skipping checkpoint"' in log and "checkpoint-3" in log
    assert f'"message": "resuming", "checkpoint": "{output / "checkpoint-2"}", "step": 2' in log
    assert [step for step, _ in loss_history(output)] == [1, 2, 3, 4]
    assert sorted(p.name for p in output.glob("checkpoint-*")) == ["checkpoint-3", "checkpoint-4"]


def test_a_checkpoint_that_fails_to_load_with_none_before_it_stops_the_job(tiny_model, dataset, tmp_path, cli, capfd):
    """Part of it may already be in the model, so starting afresh would silently train from a mix."""
    output = tmp_path / "out"
    common = training_flags(dataset, output, no_save_merged=True)
    assert cli("lora", *common, "--max_train_steps", 1, "--checkpointing_steps", 1, MODEL_NAME=tiny_model) == 0
    corrupt = output / "checkpoint-1" / "optimizer.bin"
    corrupt.write_bytes(bytes(corrupt.stat().st_size))  # same size, unreadable

    capfd.readouterr()
    assert cli("lora", *common, "--max_train_steps", 2, MODEL_NAME=tiny_model) == 2
    assert "checkpoint-1 cannot be loaded and no earlier one can" in capfd.readouterr().err


def test_latent_cache_is_built_once_and_reused_on_resume(tiny_model, dataset, tmp_path, cli, capfd):
    output = tmp_path / "out"
    common = training_flags(
        dataset, output, random_flip=True, cache_latents=True, checkpointing_steps=2, lr_warmup_steps=0,
        prediction_type="v_prediction", snr_gamma=5.0, noise_offset=0.05,
    )  # fmt: skip
    assert cli("lora", *common, "--max_train_steps", 2, MODEL_NAME=tiny_model) == 0
    (folder,) = (output / "latent-cache").iterdir()
    (cache,) = folder.glob("seg-*.safetensors")  # epoch 0's 5 records, written as it trained
    tensors = load_file(cache)
    assert sorted(tensors) == sorted(f"{name}.{row}" for name in ("latent_dist", "text_embeddings") for row in range(5))
    assert tensors["latent_dist.0"].shape == (2, 8, 16, 16)  # (as is, flipped) x mean+logvar
    assert tensors["text_embeddings.0"].shape == (32, 32)
    written = cache.stat().st_mtime_ns

    capfd.readouterr()
    assert cli("lora", *common, "--max_train_steps", 3, MODEL_NAME=tiny_model) == 0
    log = capfd.readouterr().err
    assert '"message": "latent cache"' in log and '"records": 5' in log and '"step": 2' in log
    assert list(folder.glob("seg-*.safetensors")) == [cache]
    assert cache.stat().st_mtime_ns == written
    losses = loss_history(output)
    assert [step for step, _ in losses] == [1, 2, 3] and all(math.isfinite(loss) for _, loss in losses)
    scheduler = json.loads((output / "scheduler" / "scheduler_config.json").read_text())
    assert scheduler["prediction_type"] == "v_prediction"  # what it was trained for (upstream saved epsilon)


def test_dataset_name_reads_a_datasets_dataset_and_legacy_flags_are_accepted(tiny_model, dataset, tmp_path, cli):
    output = tmp_path / "out"
    code = cli(
        "lora",
        *("--dataset_name", dataset / "train", "--output_dir", output, "--resolution", 32, "--max_train_steps", 1),
        *("--no_save_merged", "--local_rank", 0, "--enable_xformers_memory_efficient_attention"),
        MODEL_NAME=tiny_model,
    )
    assert code == 0
    assert (output / "pytorch_lora_weights.safetensors").is_file()


@pytest.mark.parametrize(
    ("flag", "message"),
    [("--use_8bit_adam", "needs the bitsandbytes package and a CUDA GPU"), ("--push_to_hub", "HF_HUB_OFFLINE")],
)
def test_unusable_options_exit_2_with_one_line(tiny_model, dataset, tmp_path, cli, capfd, flag, message):
    code = cli("finetune", "--train_data_dir", dataset, "--output_dir", tmp_path / "out", flag, MODEL_NAME=tiny_model)
    assert code == 2
    assert message in capfd.readouterr().err


def test_two_processes_train_validate_and_save_once(tiny_model, dataset, tmp_path):
    """Two CPU processes in one gloo group: one config line, one validation, one save, one latent cache.

    `--multi_gpu`, not `--cpu`: accelerate 1.15 starts several CPU processes only through MPI with
    `--cpu`, and through torchrun with `--multi_gpu`, which the job turns into gloo on a CPU machine.
    """
    output = tmp_path / "out"
    launch = [BIN / "accelerate", "launch", "--multi_gpu", "--num_processes", 2, "--num_machines", 1]
    launch += ["--mixed_precision", "no", "--dynamo_backend", "no", "-m", "jobs.lora"]
    args = training_flags(
        dataset, output, train_batch_size=1, max_train_steps=2, checkpointing_steps=1, lr_warmup_steps=0, seed=0,
        validation_prompt="一只猫", num_validation_images=1, validation_steps=2,
        cache_latents=True, random_flip=True,  # each process encodes its part of epoch 0 into the shared cache
    )  # fmt: skip
    result = run_process([str(a) for a in launch + args], env={"MODEL_NAME": tiny_model}, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]

    log = result.stderr
    assert log.count('{"config": ') == 1
    assert '"processes": 2' in log
    assert log.count('"message": "validation images"') == 1
    assert log.count('"message": "saved"') == 1
    assert (output / "samples" / "step-000002.png").is_file()
    assert len(list((output / "logs" / "lora").rglob("events.out.tfevents.*"))) >= 1
    (folder,) = (output / "latent-cache").iterdir()
    segments = [load_file(path) for path in folder.glob("seg-*.safetensors")]
    assert len(segments) >= 2  # each process wrote what it encoded
    places = {int(key.split(".")[1]) for tensors in segments for key in tensors}  # keys: name.<place>
    assert places == {0, 1, 3, 4}  # epoch 0's places that two steps of batch 1 trained on: 0-2 are rank 0's
    assert all(t.shape[0] == 2 for tensors in segments for k, t in tensors.items() if "latent" in k)
    assert {p.name for p in (output / "checkpoint-2").glob("random_states_*")} == {
        "random_states_0.pkl",
        "random_states_1.pkl",
    }
    pipe = StableDiffusionPipeline.from_pretrained(output)
    assert pipe("一只猫", num_inference_steps=2).images[0].size == (32, 32)


def test_validation_runs_every_validation_epochs_or_every_validation_steps():
    from jobs.config import LoraConfig
    from jobs.validation import validation_due

    # 3 micro-batches an epoch, 2 a step: epochs end in steps 2, 3, 5, 6, 8, 9; every second one in 3, 6, 9.
    config = LoraConfig(train_data_dir=".", validation_prompt="猫", gradient_accumulation_steps=2, validation_epochs=2)
    assert [step for step in range(1, 10) if validation_due(config, step, batches_per_epoch=3)] == [3, 6, 9]
    by_steps = config.model_copy(update={"validation_steps": 4})
    assert [step for step in range(1, 10) if validation_due(by_steps, step, batches_per_epoch=3)] == [4, 8]
    assert not validation_due(config.model_copy(update={"validation_prompt": None}), 3, batches_per_epoch=3)


def test_a_named_checkpoint_that_does_not_exist_is_bad_input(tiny_model, dataset, tmp_path, cli, capfd):
    code = cli(
        "finetune",
        *("--train_data_dir", dataset, "--output_dir", tmp_path, "--resume_from_checkpoint", "checkpoint-7"),
        MODEL_NAME=tiny_model,
    )
    assert code == 2
    assert "RESUME_FROM_CHECKPOINT checkpoint-7: no such checkpoint folder" in capfd.readouterr().err


def test_images_that_do_not_decode_are_skipped_counted_and_listed(tiny_model, tmp_path, cli, capfd):
    """Images are decoded when used; a bad one is replaced by the next good one of its window."""
    train = write_dataset(tmp_path / "data", count=6) / "train"
    (train / "002.png").write_bytes((train / "002.png").read_bytes()[:200])  # truncated: metadata line 3
    (train / "004.png").write_text("not an image")  # line 5
    output = tmp_path / "out"
    flags = training_flags(train, output, train_batch_size=2, max_train_steps=4, lr_warmup_steps=0, no_save_merged=True)
    assert cli("lora", *flags, MODEL_NAME=tiny_model) == 0  # the default limit, 1% or at least 10, is not reached
    bad = json.loads((output / "trainer_state.json").read_text())["bad_samples"]
    assert len(bad) == 2 and "line 3" in bad[0] and "line 5" in bad[1]
    assert all("cannot be decoded" in line for line in bad)
    assert capfd.readouterr().err.count('"message": "skipping a bad sample"') == 2

    stopped = tmp_path / "stopped"
    flags = training_flags(train, stopped, train_batch_size=2, max_train_steps=4, lr_warmup_steps=0, max_bad_samples=1)
    assert cli("lora", *flags, MODEL_NAME=tiny_model) == 2
    error = capfd.readouterr().err
    assert "error: 2 bad samples, more than --max_bad_samples=1" in error and "metadata.jsonl line 3" in error
    assert "Traceback" not in error and not (stopped / "pytorch_lora_weights.safetensors").exists()


def test_a_later_run_reuses_the_latent_cache_and_trains_exactly_as_with_a_cold_one(tiny_model, dataset, tmp_path, cli):
    shared = tmp_path / "latent-cache"  # --latent_cache_dir: one cache for several runs (and nodes)

    def run(output: Path) -> list:
        flags = training_flags(
            dataset, output, cache_latents=True, latent_cache_dir=shared, random_flip=True, seed=0,
            train_batch_size=2, max_train_steps=4, lr_warmup_steps=0, report_to="none", no_save_merged=True,
        )  # fmt: skip
        assert cli("lora", *flags, MODEL_NAME=tiny_model) == 0
        return loss_history(output)

    cold = run(tmp_path / "cold")
    written = {path: path.stat().st_mtime_ns for path in shared.rglob("seg-*.safetensors")}
    assert written and not (tmp_path / "cold" / "latent-cache").exists()
    assert run(tmp_path / "warm") == cold
    assert {path: path.stat().st_mtime_ns for path in shared.rglob("seg-*.safetensors")} == written
