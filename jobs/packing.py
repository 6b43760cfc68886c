"""The `pack` job: any training source into WebDataset (or parquet) shards and an index.json that TRAIN_DIR reads.

    TRAIN_DIR=data/folder OUTPUT_DIR=s3://bucket/shards pai-diffusion pack [--format parquet] [--shard_size 1000]

Every image is decoded on the way, on a thread pool, and one that does not decode is left out and
listed, so the shards hold only usable records. A folder's records are packed in a seeded order
(its lines are often sorted by subject, and a shard of one subject would make batches of one
subject); shards' records keep their order. Shard k holds the k-th run of `shard_size` records of
that order, so a rerun makes the same shards: it is restartable, and skips the shards that exist
(a shard is written whole or not at all). `index.json` (webdataset's `wids` shard-index format,
with each shard's record count) is written last, so a training job never reads a half-packed set.
"""

from __future__ import annotations

import io
import json
import logging
import math
import os
import posixpath
import tempfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from fsspec.core import url_to_fs
from fsspec.implementations.local import LocalFileSystem
from PIL import Image
from webdataset import TarWriter

from jobs import atomic
from jobs.config import PackConfig
from jobs.errors import BadInput
from jobs.progress import Progress
from jobs.records import IMAGE_ERRORS, Sample, ShardCursors, Source, undecodable, unusable
from jobs.shards import INDEX
from jobs.sources import FolderShard, open_source

log = logging.getLogger("jobs")

PROGRESS = "pack-progress.json"
FORMATS = {"JPEG": "jpg", "PNG": "png", "WEBP": "webp", "BMP": "bmp"}


def pack(config: PackConfig) -> None:
    source = open_source(config, index_file=None)
    fs, root = url_to_fs(config.output_dir)
    try:
        fs.makedirs(root, exist_ok=True)
    except OSError as error:
        raise BadInput(f"OUTPUT_DIR {config.output_dir}: not writable ({error})") from None
    done = _finished_shards(fs, root)
    suffix = ".tar" if config.format == "webdataset" else ".parquet"
    names = [f"shard-{number:06d}{suffix}" for number in range(math.ceil(source.size / config.shard_size))]
    if isinstance(fs, LocalFileSystem):
        atomic.remove_leftovers(Path(root), set(names))
    order = _pack_order(source, config.seed or 0)
    starts = np.cumsum([0] + [shard.size for shard in source.shards])
    cursors = ShardCursors(source)
    threads = config.dataloader_num_workers or os.cpu_count() or 1
    initial = sum(entry["nsamples"] + len(entry["left_out"]) for entry in done.values())
    progress = Progress(source.size, "record", initial=initial)
    with ThreadPoolExecutor(threads, thread_name_prefix="decode") as pool:
        for number, name in enumerate(names):
            if name in done:
                continue
            shard = order[number * config.shard_size : (number + 1) * config.shard_size]
            samples = [_read(cursors, starts, int(index)) for index in shard]
            records, left_out = [], []
            for sample, checked in zip(samples, pool.map(_check, samples), strict=True):
                if isinstance(checked, str):
                    left_out.append(f"{sample.where}: {checked}")
                    log.warning("left out", extra={"fields": {"sample": sample.where, "problem": checked}})
                else:
                    records.append((sample, checked))
            _write_shard(fs, posixpath.join(root, name), records, config.format, number)
            done[name] = {"url": name, "nsamples": len(records), "left_out": left_out}
            _write_whole(fs, posixpath.join(root, PROGRESS), json.dumps(done, ensure_ascii=False).encode())
            progress.update(len(samples), shard=name)
    cursors.close()
    progress.close()
    shards = [{"url": e["url"], "nsamples": e["nsamples"]} for _, e in sorted(done.items()) if e["nsamples"]]
    left_out = [line for _, entry in sorted(done.items()) for line in entry["left_out"]]
    index = {"__kind__": "wids-shard-index-v1", "wids_version": 1, "name": source.description, "shardlist": shards}
    _write_whole(fs, posixpath.join(root, INDEX), json.dumps({**index, "left_out": left_out}, indent=1).encode())
    fs.rm(posixpath.join(root, PROGRESS))
    packed = {"shards": len(shards), "records": sum(e["nsamples"] for e in shards), "left_out": len(left_out)}
    log.info("packed", extra={"fields": {"output_dir": config.output_dir, **packed}})


def _pack_order(source: Source, seed: int) -> np.ndarray:
    """Record indices in the order they are packed: a folder's in a seeded order, shards' as they are."""
    if all(isinstance(shard, FolderShard) for shard in source.shards):
        return np.random.default_rng(seed).permutation(source.size)
    return np.arange(source.size)


def _read(cursors: ShardCursors, starts: np.ndarray, index: int) -> Sample:
    shard = int(np.searchsorted(starts, index, side="right")) - 1
    place = index - int(starts[shard])
    return next(cursors.read(shard, place, place + 1))[1]


def _check(sample: Sample) -> tuple[int, int, str] | str:
    """(width, height, file extension) of a usable record, or why it is left out."""
    problem = unusable(sample)
    if problem is not None:
        return problem
    try:
        with Image.open(io.BytesIO(sample.image)) as image:
            image.load()
            return image.width, image.height, FORMATS.get(image.format or "", "png")
    except IMAGE_ERRORS as error:
        return undecodable(error)


def _write_shard(fs, path: str, records: list, format: str, number: int) -> None:
    with tempfile.TemporaryDirectory(prefix="pack-") as folder:
        local = Path(folder) / posixpath.basename(path)
        (_write_tar if format == "webdataset" else _write_parquet)(local, records, number)
        _write_whole(fs, path, local.read_bytes())


def _write_tar(path: Path, records: list, number: int) -> None:
    with TarWriter(str(path), mtime=0) as writer:  # the same records make the same bytes, whenever packed
        for k, (sample, (width, height, extension)) in enumerate(records):
            meta = {"text": sample.caption, "width": width, "height": height, "source": sample.where}
            writer.write(
                {"__key__": f"{number:06d}{k:06d}", extension: sample.image, "txt": sample.caption, "json": meta}
            )


def _write_parquet(path: Path, records: list, number: int) -> None:
    """The image column as `datasets` writes an Image feature (a struct of bytes and path)."""
    table = pa.table(
        {
            "image": [{"bytes": sample.image, "path": None} for sample, _ in records],
            "text": [sample.caption for sample, _ in records],
            "width": [size[0] for _, size in records],
            "height": [size[1] for _, size in records],
            "key": [f"{number:06d}{k:06d}" for k in range(len(records))],
        }
    )
    pq.write_table(table, path, row_group_size=100)


def _write_whole(fs, path: str, data: bytes) -> None:
    """Whole or not at all: locally through a temporary name; an object store's PUT is atomic by itself."""
    if isinstance(fs, LocalFileSystem):
        atomic.write_bytes(Path(path), data)
    else:
        fs.pipe_file(path, data)


def _finished_shards(fs, root: str) -> dict:
    """The shards a killed run finished: listed in pack-progress.json, and there."""
    path = posixpath.join(root, PROGRESS)
    if not fs.exists(path):
        return {}
    done = json.loads(fs.cat_file(path))
    return {name: entry for name, entry in done.items() if fs.exists(posixpath.join(root, name))}
