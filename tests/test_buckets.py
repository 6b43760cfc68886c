"""--aspect_buckets and --caption_dropout: the buckets, batches of one shape, and a mixed-aspect run
that is killed and resumes bit-identically."""

from __future__ import annotations

import json
import math
import signal
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from conftest import resumed_from, run_process, start, training_flags, wait_for
from PIL import Image
from safetensors import safe_open
from safetensors.torch import load_file
from tiny_dataset import write_dataset

from jobs.buckets import aspect_buckets, bucket_sizes, nearest_bucket
from jobs.config import LoraConfig
from jobs.data import BatchPlan, ImageTransform, caption_dropped
from jobs.sources import open_source

WIDE, TALL, SQUARE = (60, 40), (40, 60), (40, 40)
# 12 images, the last one made undecodable: 5 wide, 3 tall, 3 square; at --resolution 32 with
# --bucket_reso_steps 8 they go to the buckets 40x24, 24x40 and 32x32.
SIZES = (WIDE, WIDE, TALL, SQUARE, WIDE, TALL, SQUARE, WIDE, WIDE, TALL, SQUARE, WIDE)
MAX_STEPS = 8  # 6 batches of 2 an epoch: the run crosses into epoch 1


def test_buckets_keep_the_area_and_images_go_to_the_nearest_aspect_ratio():
    assert bucket_sizes(512, 64, 2.0) == [(384, 640), (448, 576), (512, 512), (576, 448), (640, 384)]
    assert bucket_sizes(32, 8, 2.0) == [(24, 40), (32, 32), (40, 24)]
    sizes = bucket_sizes(512, 64, 4.0)
    assert all(w % 64 == 0 and h % 64 == 0 and w * h <= 512 * 512 for w, h in sizes)
    assert (256, 1024) in sizes and (1024, 256) in sizes

    sizes = bucket_sizes(512, 64, 2.0)
    widths, heights = np.array([4000, 3000, 1920, 1000, 500, 10000]), np.array([3000, 4000, 1080, 1000, 2000, 10])
    nearest = [sizes[b] for b in nearest_bucket(sizes, widths, heights)]
    assert nearest == [(576, 448), (448, 576), (640, 384), (512, 512), (384, 640), (640, 384)]


def test_transform_covers_the_bucket_and_crops_only_what_is_left_over():
    image = Image.fromarray(np.arange(300 * 400 * 3, dtype=np.uint8).reshape(300, 400, 3))  # 4:3
    transform = ImageTransform(512, center_crop=False, random_flip=False)
    cropped = transform.crop(image, np.random.default_rng(0), (576, 448))
    assert cropped.size == (576, 448)  # resized to 597x448: 21 columns of 597 cropped, not a quarter
    assert transform.to_tensor(cropped, flip=False).shape == (3, 448, 576)


def test_batches_hold_one_bucket_and_every_process_takes_as_many():
    rng = np.random.default_rng(0)
    of_record = rng.integers(-1, 5, 3000).astype(np.int16)  # a sixth cannot be used
    usable = int((of_record >= 0).sum())
    for world_size in (1, 2, 3):
        plans = [BatchPlan([1000, 2000], 4, 7, rank, world_size, of_record) for rank in range(world_size)]
        per_process = plans[0].batches_per_epoch
        assert per_process == math.ceil(math.ceil(usable / 4) / world_size)  # as many batches as without buckets
        for epoch in (0, 1):
            batches = [p.batch(epoch * per_process + n) for p in plans for n in range(per_process)]
            assert all(len(batch) == 4 and {e for e, _ in batch} == {epoch} for batch in batches)
            assert all(len({int(of_record[i]) for _, i in batch}) == 1 for batch in batches)  # one shape each
            seen = {i for batch in batches for _, i in batch}
            assert all(of_record[i] >= 0 for i in seen)
            assert len(seen) >= 0.95 * usable  # a few batches of the leftovers are left out, by seed
    fresh = BatchPlan([1000, 2000], 4, 7, 1, 3, of_record)
    assert fresh.batch(300) == plans[1].batch(300)  # resuming computes the same batches
    other_seed = BatchPlan([1000, 2000], 4, 8, buckets=of_record)
    assert other_seed.batch(0) != BatchPlan([1000, 2000], 4, 7, buckets=of_record).batch(0)


def test_caption_dropout_is_seeded_per_record_and_epoch_at_the_asked_rate():
    draws = np.array([caption_dropped(0, 0, index, 0.2) for index in range(20_000)])
    assert abs(draws.mean() - 0.2) < 0.012  # 4 standard deviations
    assert (draws == [caption_dropped(0, 0, index, 0.2) for index in range(20_000)]).all()
    assert (draws != [caption_dropped(0, 1, index, 0.2) for index in range(20_000)]).any()
    assert not any(caption_dropped(0, 0, index, 0.0) for index in range(1000))


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--aspect_buckets"], "--resolution 32 is smaller than --bucket_reso_steps 64, so no bucket fits"),
        (["--caption_dropout", "1.5"], "caption_dropout"),
        (["--aspect_buckets", "--bucket_reso_steps", "12"], "bucket_reso_steps"),
    ],
)
def test_unusable_bucket_and_dropout_options_exit_2_before_loading(dataset, tmp_path, cli, capfd, flags, message):
    code = cli("lora", *training_flags(dataset, tmp_path / "out"), *flags, MODEL_NAME=tmp_path / "no-model")
    assert code == 2
    assert message in capfd.readouterr().err


def mixed_aspect_dataset(folder: Path) -> Path:
    write_dataset(folder, count=len(SIZES), sizes=SIZES)
    (folder / "train" / "011.png").write_bytes(b"not a png")
    return folder


def test_image_sizes_are_read_once_and_kept(tmp_path):
    data = mixed_aspect_dataset(tmp_path / "data")
    config = LoraConfig(train_data_dir=str(data), resolution=32, bucket_reso_steps=8, aspect_buckets=True)
    source = open_source(config, None)
    buckets = aspect_buckets(config, source, tmp_path)
    assert buckets.summary() == [
        {"width": 24, "height": 40, "images": 3},
        {"width": 32, "height": 32, "images": 3},
        {"width": 40, "height": 24, "images": 5},
    ]
    assert buckets.of_record[11] == -1 and "line 12: image cannot be decoded" in buckets.problems[11]
    assert buckets.most_used(2) == [(40, 24), (24, 40)]
    (kept,) = tmp_path.glob("image-sizes-*.npz")
    (data / "train" / "000.png").unlink()  # a second look reads nothing
    again = aspect_buckets(config, source, tmp_path)
    assert (again.of_record == buckets.of_record).all() and again.problems == buckets.problems


def test_parquet_shards_state_the_sizes_so_no_image_is_opened(tmp_path):
    from jobs.config import PackConfig
    from jobs.packing import pack

    data = mixed_aspect_dataset(tmp_path / "data")
    pack(PackConfig(train_data_dir=str(data), output_dir=str(tmp_path / "packed"), shard_size=4, format="parquet"))
    for path in (tmp_path / "packed").glob("*.parquet"):  # the images replaced: only width and height are read
        table = pq.read_table(path)
        blank = pa.array([{"bytes": b"", "path": None}] * len(table), table.schema.field("image").type)
        pq.write_table(table.set_column(table.schema.get_field_index("image"), "image", blank), path)
    packed = str(tmp_path / "packed")
    config = LoraConfig(train_data_dir=packed, resolution=32, bucket_reso_steps=8, aspect_buckets=True)
    buckets = aspect_buckets(config, open_source(config, None), tmp_path)
    assert buckets.counts() == [3, 3, 5]  # pack left out the image that does not decode
    assert not buckets.problems


def test_a_source_of_which_no_size_can_be_read_exits_2_before_the_model_loads(unloadable_model, tmp_path, cli, capfd):
    data = write_dataset(tmp_path / "data", count=2)
    for image in (data / "train").glob("*.png"):
        image.write_bytes(b"not a png")
    flags = training_flags(data, tmp_path / "out", aspect_buckets=True, bucket_reso_steps=8)
    assert cli("lora", *flags, MODEL_NAME=unloadable_model) == 2  # which loading would fail otherwise
    error = capfd.readouterr().err
    assert "can be used, e.g. metadata.jsonl line 1: image cannot be decoded (not a format PIL reads)" in error


def lora_command(model: Path, data: Path, output: Path) -> list[str]:
    flags = training_flags(
        data, output, pretrained_model_name_or_path=model, aspect_buckets=True, bucket_reso_steps=8,
        caption_dropout=0.3, cache_latents=True, random_flip=True, train_batch_size=2,
        max_train_steps=MAX_STEPS, checkpointing_steps=3, seed=0, learning_rate="1e-3", lr_warmup_steps=0,
        validation_prompt="一只猫", num_validation_images=1, validation_steps=MAX_STEPS, report_to="none",
        no_save_merged=True,
    )  # fmt: skip
    return [sys.executable, "-m", "jobs.lora", *flags]


def outcome(output: Path) -> tuple[dict, dict[str, torch.Tensor]]:
    return json.loads((output / "trainer_state.json").read_text()), load_file(
        output / "pytorch_lora_weights.safetensors"
    )


@pytest.fixture(scope="module")
def bucketed_run(tiny_model, tmp_path_factory) -> tuple[Path, Path]:
    """An uninterrupted run on the mixed-aspect dataset: (data, output)."""
    folder = tmp_path_factory.mktemp("buckets")
    data, output = mixed_aspect_dataset(folder / "data"), folder / "out"
    result = run_process(lora_command(tiny_model, data, output), timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    return data, output


def test_a_bucketed_run_records_its_buckets_caches_each_shape_and_validates_at_them(bucketed_run):
    _, output = bucketed_run
    state, _ = outcome(output)
    assert [step for step, _ in state["loss_history"]] == list(range(1, MAX_STEPS + 1))
    assert state["aspect_buckets"] == [
        {"width": 24, "height": 40, "images": 3},
        {"width": 32, "height": 32, "images": 3},
        {"width": 40, "height": 24, "images": 5},
    ]
    assert len(state["bad_samples"]) == 1 and "line 12: image cannot be decoded" in state["bad_samples"][0]

    (folder,) = (output / "latent-cache").iterdir()
    shapes = {t.shape for path in folder.glob("seg-*.safetensors") for k, t in load_file(path).items() if "latent" in k}
    assert shapes == {(2, 8, 20, 12), (2, 8, 16, 16), (2, 8, 12, 20)}  # (both flips, mean+logvar, h/2, w/2)

    with Image.open(output / "samples" / f"step-{MAX_STEPS:06d}.png") as grid:
        assert grid.size == (40, 3 * 40)  # the 3 buckets, a row each, in cells of the largest side
    card = (output / "README.md").read_text(encoding="utf-8")
    assert "aspect_buckets" in card and "caption_dropout" in card
    with safe_open(output / "pytorch_lora_weights_kohya.safetensors", framework="pt") as kohya:
        metadata = kohya.metadata()  # what kohya's scripts record, and A1111 and Civitai show
    assert metadata["ss_enable_bucket"] == "True" and metadata["ss_caption_dropout_rate"] == "0.3"


def test_kill_9_then_rerun_ends_as_the_uninterrupted_bucketed_run(tiny_model, bucketed_run, tmp_path):
    data, reference = bucketed_run
    output = tmp_path / "out"
    command = lora_command(tiny_model, data, output)
    process = start(command, tmp_path / "killed.log")
    wait_for(lambda: (output / "checkpoint-3").is_dir(), process)
    process.kill()
    assert process.wait() == -signal.SIGKILL

    rerun = run_process(command, timeout=600)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert resumed_from(rerun.stderr) in (3, 6)
    (state, weights), (reference_state, reference_weights) = outcome(output), outcome(reference)
    assert state["loss_history"] == reference_state["loss_history"]
    assert state["bad_samples"] == reference_state["bad_samples"]
    assert weights.keys() == reference_weights.keys()
    assert all(torch.equal(weights[name], reference_weights[name]) for name in weights)


def test_two_processes_train_on_buckets_each_taking_as_many_batches(tiny_model, bucketed_run, tmp_path):
    """The main process reads the sizes once; the other plans from the file it kept. Both take the
    same number of one-bucket batches, so neither waits on the other at an epoch's end."""
    data, _ = bucketed_run
    output = tmp_path / "out"
    launch = [Path(sys.executable).parent / "accelerate", "launch", "--multi_gpu", "--num_processes", 2]
    launch += ["--num_machines", 1, "--mixed_precision", "no", "--dynamo_backend", "no", "-m", "jobs.lora"]
    flags = training_flags(
        data, output, aspect_buckets=True, bucket_reso_steps=8, cache_latents=True, caption_dropout=0.3,
        train_batch_size=2, max_train_steps=4, checkpointing_steps=100, seed=0, lr_warmup_steps=0,
        report_to="none", no_save_merged=True,
    )  # fmt: skip
    result = run_process([str(a) for a in launch + flags], env={"MODEL_NAME": tiny_model}, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stderr.count("reading every image's size once") == 1
    assert result.stderr.count('"message": "aspect buckets"') == 1
    state = json.loads((output / "trainer_state.json").read_text())
    assert [step for step, _ in state["loss_history"]] == [1, 2, 3, 4]  # 6 batches an epoch: 3 each, into epoch 1
    assert len(state["bad_samples"]) == 1  # counted once, not once a process
    (folder,) = (output / "latent-cache").iterdir()
    shapes = {t.shape for path in folder.glob("seg-*.safetensors") for k, t in load_file(path).items() if "latent" in k}
    assert shapes <= {(1, 8, 20, 12), (1, 8, 16, 16), (1, 8, 12, 20)} and len(shapes) >= 2  # no flips
