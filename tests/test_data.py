"""Training data: the sources (a folder, WebDataset and parquet shards, `datasets`), their up-front
checks, `pack`, the transforms and the batch plan."""

from __future__ import annotations

import hashlib
import io
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from tiny_dataset import write_dataset

from jobs.config import LoraConfig, PackConfig
from jobs.data import WINDOW_RECORDS, BatchPlan, ImageTransform
from jobs.errors import BadInput
from jobs.sources import open_source


def records(train_dir: str | Path | None = None, **options) -> list[tuple[str, str]]:
    """(caption, sha256 of the image bytes) of every record of a source, in the source's order."""
    config = LoraConfig(train_data_dir=None if train_dir is None else str(train_dir), **options)
    source = open_source(config, None)
    found = []
    for shard in source.shards:
        samples = list(shard.read(0, shard.size))
        assert len(samples) == shard.size
        found += [(sample.caption, hashlib.sha256(sample.image).hexdigest()) for sample in samples]
    return found


def test_seed_layout_and_the_folder_itself_are_both_accepted(tmp_path: Path):
    root = write_dataset(tmp_path / "data")
    assert records(root) == records(root / "train")
    assert len(records(root)) == 5
    with pytest.raises(BadInput, match="no metadata.jsonl"):
        records(tmp_path)
    with pytest.raises(BadInput, match="no such folder"):
        records(tmp_path / "nowhere")


def test_every_bad_record_is_reported_with_its_line_and_the_job_exits_2(tmp_path: Path, tiny_model, cli, capfd):
    """What costs little per record is checked before the model loads; images are decoded when used
    (tests/test_train.py: a truncated image is skipped, counted and listed)."""
    train = write_dataset(tmp_path / "data", count=2) / "train"
    (train / "truncated.png").write_bytes((train / "000.png").read_bytes()[:200])
    (tmp_path / "data" / "outside.png").write_bytes((train / "000.png").read_bytes())
    good = (train / "metadata.jsonl").read_bytes()
    bad_lines = [
        json.dumps({"file_name": "missing.png", "text": "缺失"}, ensure_ascii=False).encode(),  # line 3
        json.dumps({"file_name": "truncated.png", "text": "截断"}, ensure_ascii=False).encode(),  # line 4: fine here
        json.dumps({"file_name": "001.png", "text": "  "}).encode(),  # line 5: empty caption
        json.dumps({"file_name": "001.png"}).encode(),  # line 6: no caption
        b'{"file_name": "001.png", "text": ',  # line 7: malformed JSON
        '{"file_name": "001.png", "text": "café"}'.encode("latin-1"),  # line 8: not UTF-8
        json.dumps({"file_name": "../outside.png", "text": "外面"}, ensure_ascii=False).encode(),  # line 9
        json.dumps({"file_name": "train", "text": "文件夹"}, ensure_ascii=False).encode(),  # line 10: not a file
        json.dumps({"file_name": "link.png", "text": "链接"}, ensure_ascii=False).encode(),  # line 11: fine
    ]
    (train / "link.png").symlink_to(tmp_path / "data" / "outside.png")  # symlinks may point anywhere
    (train / "metadata.jsonl").write_bytes(good + b"\n".join(bad_lines) + b"\n")

    code = cli("lora", "--train_data_dir", tmp_path / "data", "--output_dir", tmp_path / "out", MODEL_NAME=tiny_model)

    assert code == 2
    error = capfd.readouterr().err
    assert "7 problem(s)" in error
    for line, words in [
        (3, "file_name 'missing.png': no such file"),
        (5, "empty or missing caption 'text'"),
        (6, "empty or missing caption 'text'"),
        (7, "malformed JSON"),
        (8, "not UTF-8"),
        (9, "file_name '../outside.png' points outside the dataset folder"),
        (10, "file_name 'train': no such file"),
    ]:
        assert f"line {line}: {words}" in error
    assert "line 1:" not in error and "line 2:" not in error and "line 4:" not in error and "line 11:" not in error
    assert "Traceback" not in error
    assert not (tmp_path / "out").exists(), "nothing is written before the data is checked"


def test_caption_column_and_max_train_samples(tmp_path: Path):
    train = tmp_path / "data"
    write_dataset(train, count=4)
    lines = [json.loads(line) for line in (train / "train" / "metadata.jsonl").read_text().splitlines()]
    (train / "train" / "metadata.jsonl").write_text(
        "\n".join(json.dumps({"file_name": r["file_name"], "caption": r["text"]}) for r in lines)
    )
    kept = records(train, caption_column="caption", max_train_samples=3, seed=1)
    assert len(kept) == 3
    assert {caption for caption, _ in kept} <= {r["text"] for r in lines}
    source = open_source(LoraConfig(train_data_dir=str(train), caption_column="caption"), None)
    sample = next(source.shards[0].read(0, 1))
    assert Image.open(io.BytesIO(sample.image)).convert("RGB").mode == "RGB"


@pytest.fixture(scope="module")
def packed(dataset: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The session's dataset packed by the `pack` job: WebDataset and parquet, and tar shards without index.json."""
    from jobs.packing import pack

    out = tmp_path_factory.mktemp("packed")
    pack(PackConfig(train_data_dir=str(dataset), output_dir=str(out / "tar"), shard_size=2))
    pack(PackConfig(train_data_dir=str(dataset), output_dir=str(out / "parquet"), shard_size=3, format="parquet"))
    shutil.copytree(out / "tar", out / "foreign", ignore=shutil.ignore_patterns("index.json"))
    return {name: out / name for name in ("tar", "parquet", "foreign")}


def test_pack_writes_shards_and_an_index_that_every_source_reads_back(dataset: Path, packed: dict[str, Path], tmp_path):
    index = json.loads((packed["tar"] / "index.json").read_text())
    assert index["__kind__"] == "wids-shard-index-v1"  # webdataset's own shard-index format
    assert [(s["url"], s["nsamples"]) for s in index["shardlist"]] == [
        ("shard-000000.tar", 2),
        ("shard-000001.tar", 2),
        ("shard-000002.tar", 1),
    ]
    folder = sorted(records(dataset))
    for name in ("tar", "parquet", "foreign"):
        assert sorted(records(packed[name])) == folder, name
    assert records(packed["tar"]) == records(packed["parquet"])  # packed in the same seeded order
    assert records(packed["tar"]) != records(dataset)  # which is not the folder's
    assert sorted(records(None, dataset_name=str(dataset / "train"))) == folder  # `datasets`, streamed


def test_pack_leaves_out_what_does_not_decode_and_a_rerun_finishes_a_killed_pack(tmp_path: Path):
    from jobs.packing import pack

    data = write_dataset(tmp_path / "data", count=6)
    (data / "train" / "003.png").write_bytes((data / "train" / "003.png").read_bytes()[:300])
    config = PackConfig(train_data_dir=str(data), output_dir=str(tmp_path / "whole"), shard_size=2)
    pack(config)
    index = json.loads((tmp_path / "whole" / "index.json").read_text())
    assert sum(s["nsamples"] for s in index["shardlist"]) == 5
    assert (
        len(index["left_out"]) == 1 and "line 4" in index["left_out"][0] and "cannot be decoded" in index["left_out"][0]
    )

    # What a pack killed while writing its second shard leaves: the first shard listed in
    # pack-progress.json, a temporary file, no index.json. The rerun keeps the first shard.
    killed = tmp_path / "killed"
    killed.mkdir()
    shutil.copy(tmp_path / "whole" / "shard-000000.tar", killed)
    (killed / ".shard-000001.tar.x1y2.tmp").write_bytes(b"half a shard")
    in_first = index["shardlist"][0]["nsamples"]
    first = {
        "shard-000000.tar": {
            "url": "shard-000000.tar",
            "nsamples": in_first,
            "left_out": index["left_out"][: 2 - in_first],
        }
    }
    (killed / "pack-progress.json").write_text(json.dumps(first))
    kept = (killed / "shard-000000.tar").stat().st_mtime_ns
    pack(config.model_copy(update={"output_dir": str(killed)}))
    assert (killed / "shard-000000.tar").stat().st_mtime_ns == kept
    assert sorted(p.name for p in killed.iterdir()) == sorted(p.name for p in (tmp_path / "whole").iterdir())
    for name in ("index.json", "shard-000001.tar", "shard-000002.tar"):
        assert (killed / name).read_bytes() == (tmp_path / "whole" / name).read_bytes(), name


def test_a_truncated_shard_yields_bad_samples_not_an_error(packed: dict[str, Path], tmp_path: Path):
    shards = tmp_path / "shards"
    shutil.copytree(packed["tar"], shards)
    whole = (shards / "shard-000001.tar").read_bytes()
    (shards / "shard-000001.tar").write_bytes(whole[: len(whole) // 3])
    source = open_source(LoraConfig(train_data_dir=str(shards)), None)
    samples = list(source.shards[1].read(0, 2))
    assert len(samples) == 2
    assert samples[-1].problem and samples[-1].image is None


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
    plan = BatchPlan(sizes=[7], batch_size=2, seed=3)
    epoch = [key for number in range(plan.batches_per_epoch) for key in plan.batch(number)]
    assert sorted(index for _, index in epoch) == list(range(7))
    assert {e for e, _ in epoch} == {0}
    assert plan.batch(plan.batches_per_epoch)[0][0] == 1  # the next batch starts epoch 1
    assert BatchPlan([7], 2, 3).batch(5) == plan.batch(5)  # a fresh plan jumps straight there

    shards = [BatchPlan(sizes=[7], batch_size=2, seed=3, rank=rank, world_size=2) for rank in (0, 1)]
    assert shards[0].batches_per_epoch == shards[1].batches_per_epoch == 2
    seen = [index for shard in shards for n in range(2) for _, index in shard.batch(n)]
    assert set(seen) == set(range(7)) and len(seen) == 8  # padded by one so both take the same steps


def test_processes_read_different_shards_in_an_order_that_does_not_depend_on_their_number():
    sizes = [1000] * 8 + [300]  # 8,300 records: windows of WINDOW_RECORDS mix parts of neighbouring shards
    alone = BatchPlan(sizes, batch_size=4, seed=0)
    assert sorted(alone.order(0).tolist()) == list(range(8300))
    assert alone.order(0).tolist() != alone.order(1).tolist()
    window = alone.order(0)[:WINDOW_RECORDS]
    assert len({alone.shard_of(int(i))[0] for i in window}) <= 2  # a window reads one or two shards
    assert window.tolist() != sorted(window.tolist())  # and is shuffled

    four = [BatchPlan(sizes, batch_size=4, seed=0, rank=r, world_size=4) for r in range(4)]
    assert (four[0].order(0) == alone.order(0)).all()
    parts = [[i for n in range(p.batches_per_epoch) for _, i in p.batch(n)] for p in four]
    assert sorted(i for part in parts for i in part) == list(range(8300))  # no overlap, nothing left out
    shards_read = [{alone.shard_of(i)[0] for i in part} for part in parts]
    assert all(len(read) <= 4 for read in shards_read)  # about a quarter of the 9 shards each


def test_a_bom_and_crlf_line_ends_in_metadata_jsonl_are_fine(tmp_path: Path):
    data = write_dataset(tmp_path / "data", count=3)
    metadata = data / "train" / "metadata.jsonl"
    metadata.write_bytes(b"\xef\xbb\xbf" + metadata.read_bytes().replace(b"\n", b"\r\n"))  # as Notepad saves it
    assert len(records(data)) == 3
