"""The dataset check, transforms and batch plan of jobs/data.py; bad datasets exit 2 naming each line."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from tiny_dataset import write_dataset

from jobs.config import LoraConfig
from jobs.data import BatchPlan, ImageTransform, find_image_folder, load_examples
from jobs.errors import BadInput


def test_seed_layout_and_the_folder_itself_are_both_accepted(tmp_path: Path):
    root = write_dataset(tmp_path / "data")
    assert find_image_folder(root) == root / "train"
    assert find_image_folder(root / "train") == root / "train"
    with pytest.raises(BadInput, match="no metadata.jsonl"):
        find_image_folder(tmp_path)


def test_every_bad_record_is_reported_with_its_line_and_the_job_exits_2(tmp_path: Path, tiny_model, cli, capfd):
    train = write_dataset(tmp_path / "data", count=2) / "train"
    (train / "truncated.png").write_bytes((train / "000.png").read_bytes()[:200])
    (train / "notes.txt").write_text("not an image")
    (tmp_path / "data" / "outside.png").write_bytes((train / "000.png").read_bytes())
    good = (train / "metadata.jsonl").read_bytes()
    bad_lines = [
        json.dumps({"file_name": "missing.png", "text": "缺失"}, ensure_ascii=False).encode(),  # line 3
        json.dumps({"file_name": "truncated.png", "text": "截断"}, ensure_ascii=False).encode(),  # line 4
        json.dumps({"file_name": "001.png", "text": "  "}).encode(),  # line 5: empty caption
        json.dumps({"file_name": "001.png"}).encode(),  # line 6: no caption
        b'{"file_name": "001.png", "text": ',  # line 7: malformed JSON
        '{"file_name": "001.png", "text": "café"}'.encode("latin-1"),  # line 8: not UTF-8
        json.dumps({"file_name": "../outside.png", "text": "外面"}, ensure_ascii=False).encode(),  # line 9
        json.dumps({"file_name": "notes.txt", "text": "文本"}, ensure_ascii=False).encode(),  # line 10
        json.dumps({"file_name": "link.png", "text": "链接"}, ensure_ascii=False).encode(),  # line 11: fine
    ]
    (train / "link.png").symlink_to(tmp_path / "data" / "outside.png")  # symlinks may point anywhere
    (train / "metadata.jsonl").write_bytes(good + b"\n".join(bad_lines) + b"\n")

    code = cli("lora", "--train_data_dir", tmp_path / "data", "--output_dir", tmp_path / "out", MODEL_NAME=tiny_model)

    assert code == 2
    error = capfd.readouterr().err
    assert "8 problem(s)" in error
    for line, words in [
        (3, "file_name 'missing.png': no such file"),
        (4, "image 'truncated.png' cannot be read"),
        (5, "empty or missing caption 'text'"),
        (6, "empty or missing caption 'text'"),
        (7, "malformed JSON"),
        (8, "not UTF-8"),
        (9, "file_name '../outside.png' points outside the dataset folder"),
        (10, "image 'notes.txt' cannot be read"),
    ]:
        assert f"line {line}: {words}" in error
    assert "line 1:" not in error and "line 2:" not in error and "line 11:" not in error
    assert "Traceback" not in error
    assert not (tmp_path / "out").exists(), "nothing is written before the data is checked"


def test_caption_column_and_max_train_samples(tmp_path: Path):
    train = tmp_path / "data"
    write_dataset(train, count=4)
    records = [json.loads(line) for line in (train / "train" / "metadata.jsonl").read_text().splitlines()]
    (train / "train" / "metadata.jsonl").write_text(
        "\n".join(json.dumps({"file_name": r["file_name"], "caption": r["text"]}) for r in records)
    )
    config = LoraConfig(train_data_dir=train, caption_column="caption", max_train_samples=3, seed=1)
    examples = load_examples(config)
    assert len(examples) == 3
    assert set(examples.captions) <= {r["text"] for r in records}
    assert examples.open_image(0).mode == "RGB"


def test_transform_resizes_crops_and_flips_reproducibly():
    image = Image.fromarray(np.arange(40 * 48 * 3, dtype=np.uint8).reshape(40, 48, 3))
    center = ImageTransform(32, center_crop=True, random_flip=False)
    pixels = center.to_tensor(center.crop(image, np.random.default_rng(0)))
    assert pixels.shape == (3, 32, 32)
    assert -1.0 <= pixels.min() and pixels.max() <= 1.0

    random = ImageTransform(32, center_crop=False, random_flip=True)
    first = [random.crop(image, np.random.default_rng((0, 0, i))).tobytes() for i in range(8)]
    again = [random.crop(image, np.random.default_rng((0, 0, i))).tobytes() for i in range(8)]
    assert first == again and len(set(first)) > 1
    flipped = random.to_tensor(center.crop(image, np.random.default_rng(0)), flip=True)
    assert (flipped == pixels.flip(-1)).all()


def test_batch_plan_covers_each_epoch_splits_processes_evenly_and_jumps_to_any_batch():
    plan = BatchPlan(size=7, batch_size=2, seed=3)
    epoch = [key for number in range(plan.batches_per_epoch) for key in plan.batch(number)]
    assert sorted(index for _, index in epoch) == list(range(7))
    assert {e for e, _ in epoch} == {0}
    assert plan.batch(plan.batches_per_epoch)[0][0] == 1  # the next batch starts epoch 1
    assert list(BatchPlan(7, 2, 3).batches(5, 6)) == [plan.batch(5)]  # a fresh plan jumps straight there

    shards = [BatchPlan(size=7, batch_size=2, seed=3, rank=rank, world_size=2) for rank in (0, 1)]
    assert shards[0].batches_per_epoch == shards[1].batches_per_epoch == 2
    seen = [index for shard in shards for n in range(2) for _, index in shard.batch(n)]
    assert set(seen) == set(range(7)) and len(seen) == 8  # padded by one so both take the same steps
