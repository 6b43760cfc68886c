"""Training data in object storage: a real S3 server on loopback (SeaweedFS), reached through the AWS variables.

`pack` writes shards into a bucket; a LoRA run streams them (and fills its latent cache as it goes),
is killed with SIGKILL after a checkpoint, and the rerun ends bit-identical to an uninterrupted run.
"""

from __future__ import annotations

import json
import signal
import sys
from pathlib import Path

import pytest
from conftest import resumed_from, run_process, start, training_flags, wait_for
from object_store import filesystem
from safetensors.torch import load_file

SHARDS = "s3://data/shards"


@pytest.fixture(scope="module")
def shards_in_s3(object_store, dataset: Path) -> str:
    packed = run_process(
        [
            sys.executable,
            "-m",
            "jobs.pack",
            "--train_data_dir",
            str(dataset),
            "--output_dir",
            SHARDS,
            "--shard_size",
            "2",
        ],
        env=object_store,
        timeout=300,
    )
    assert packed.returncode == 0, packed.stderr[-3000:]
    return SHARDS


def test_pack_writes_its_shards_and_index_into_the_bucket(object_store, shards_in_s3):
    fs = filesystem(object_store)
    names = sorted(path.rsplit("/", 1)[1] for path in fs.ls("data/shards"))
    assert names == ["index.json", "shard-000000.tar", "shard-000001.tar", "shard-000002.tar"]
    index = json.loads(fs.cat_file("data/shards/index.json"))
    assert sum(shard["nsamples"] for shard in index["shardlist"]) == 5 and index["left_out"] == []


def lora_command(model: Path, output: Path) -> list[str]:
    flags = training_flags(
        SHARDS, output, pretrained_model_name_or_path=model, train_batch_size=2, max_train_steps=6,
        checkpointing_steps=2, seed=0, learning_rate="1e-3", lr_warmup_steps=0, report_to="none",
        random_flip=True, cache_latents=True, no_save_merged=True,
    )  # fmt: skip
    return [sys.executable, "-m", "jobs.lora", *flags]


def outcome(output: Path) -> tuple[list, dict]:
    history = json.loads((output / "trainer_state.json").read_text())["loss_history"]
    return history, load_file(output / "pytorch_lora_weights.safetensors")


def test_lora_streams_shards_from_s3_and_resumes_exactly_after_kill_9(tiny_model, object_store, shards_in_s3, tmp_path):
    reference = run_process(lora_command(tiny_model, tmp_path / "reference"), env=object_store, timeout=600)
    assert reference.returncode == 0, reference.stderr[-3000:]
    assert f'"source": "{SHARDS} (WebDataset, 3 shards)"' in reference.stderr

    output = tmp_path / "killed"
    process = start(lora_command(tiny_model, output), tmp_path / "killed.log", env=object_store)
    wait_for(lambda: (output / "checkpoint-2").is_dir(), process)
    process.kill()
    assert process.wait() == -signal.SIGKILL
    assert not (output / "trainer_state.json").exists(), "the kill must land mid-run"

    rerun = run_process(lora_command(tiny_model, output), env=object_store, timeout=600)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert resumed_from(rerun.stderr) in (2, 4)
    (history, weights), (expected_history, expected_weights) = outcome(output), outcome(tmp_path / "reference")
    assert history == expected_history and [step for step, _ in history] == [1, 2, 3, 4, 5, 6]
    assert weights.keys() == expected_weights.keys()
    assert all((weights[name] == expected_weights[name]).all() for name in weights)


def test_aspect_buckets_read_every_size_from_tar_shards_in_s3(object_store, shards_in_s3, monkeypatch, tmp_path):
    from jobs.buckets import aspect_buckets
    from jobs.config import LoraConfig
    from jobs.sources import open_source

    for name, value in object_store.items():
        monkeypatch.setenv(name, value)
    config = LoraConfig(train_data_dir=SHARDS, resolution=32, bucket_reso_steps=8, aspect_buckets=True)
    buckets = aspect_buckets(config, open_source(config, None), tmp_path)
    assert buckets.summary() == [{"width": 32, "height": 32, "images": 5}]  # 48x40 is nearest to square
    assert not buckets.problems and len(list(tmp_path.glob("image-sizes-*.npz"))) == 1
