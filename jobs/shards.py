"""Shards: WebDataset tar files, parquet files, and a `datasets` dataset's data files, streamed.

Read through fsspec, so each is a path or an `s3://`, `gs://`, `https://` URL. A shard is read in
order from its start; jobs/records.py's `ShardCursors` keeps the stream open between windows.
"""

from __future__ import annotations

import json
import logging
import posixpath
import tarfile
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import fsspec
import numpy as np
import pyarrow.parquet as pq
from webdataset.tariterators import group_by_keys, tar_file_expander

from jobs.config import DataOptions
from jobs.errors import BadInput
from jobs.records import Sample, Source, digest, read_counts, version, write_counts
from jobs.text import BOM

log = logging.getLogger("jobs")

INDEX = "index.json"
IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp", "bmp")


# WebDataset shards: tar files of samples, `<key>.jpg` + `<key>.txt` or `<key>.json` ---------------


@dataclass(frozen=True)
class TarShard:
    name: str
    fs: Any
    path: str
    size: int
    caption_column: str
    image_column: str

    def read(self, start: int, stop: int) -> Iterator[Sample]:
        position = 0
        try:
            with self.fs.open(self.path, "rb", block_size=2**23) as stream:
                for sample in _samples(self.path, stream):
                    if position >= stop:
                        return
                    if position >= start:
                        yield self._sample(position, sample)
                    position += 1
        except (tarfile.TarError, EOFError) as error:  # a truncated or damaged shard; I/O errors are raised
            problem = f"unreadable from here on ({error})"
            for rest in range(max(position, start), stop):
                yield Sample(f"{self.name} sample {rest}", None, None, problem)
            return
        for missing in range(max(position, start), stop):  # fewer samples than the index says
            yield Sample(f"{self.name} sample {missing}", None, None, "not in the shard")

    def stated_sizes(self) -> None:
        return None  # pack writes them in each sample's .json, but reading those means reading the whole tar

    def _sample(self, position: int, sample: dict) -> Sample:
        where = f"{self.name} sample {position} ({sample.get('__key__')})"
        image_key = next((k for k in (self.image_column, *IMAGE_EXTENSIONS) if k in sample), None)
        caption = _text(sample.get(self.caption_column)) or _text(sample.get("txt"))
        if caption is None and "json" in sample:
            try:
                caption = json.loads(sample["json"]).get(self.caption_column)
            except (ValueError, AttributeError):
                caption = None
        return Sample(
            where, caption if isinstance(caption, str) else None, sample.get(image_key) if image_key else None
        )


def _samples(url: str, stream) -> Iterator[dict]:
    """webdataset's samples of an open tar stream: members grouped by key (`<key>.jpg`, `<key>.txt`)."""
    return group_by_keys(tar_file_expander([{"url": url, "stream": stream}]))


def _text(value: object) -> str | None:
    return value.removeprefix(BOM).decode("utf-8", errors="replace") if isinstance(value, bytes) else None


def tar_shards(fs, paths: list[str], url: str, config: DataOptions, index_file: Path | None) -> Source:
    """Foreign WebDataset shards without an index.json: counted once (a pass over their bytes), kept."""
    infos = [fs.info(path) for path in paths]
    known = read_counts(index_file)
    keys = [
        f"{fs.unstrip_protocol(path)}:{json.dumps(version(info), default=str)}"
        for path, info in zip(paths, infos, strict=True)
    ]
    missing = [path for path, key in zip(paths, keys, strict=True) if key not in known]
    if missing:
        log.info("counting the samples of shards without an index.json", extra={"fields": {"shards": len(missing)}})
        with ThreadPoolExecutor(8) as pool:
            counts = dict(zip(missing, pool.map(lambda path: _count_tar(fs, path), missing), strict=True))
        known |= {key: counts[path] for path, key in zip(paths, keys, strict=True) if path in counts}
        write_counts(index_file, known)
    sizes = [known[key] for key in keys]
    return _shard_source(fs, paths, sizes, url, config, [version(info) for info in infos])


def _count_tar(fs, path: str) -> int:
    try:
        with fs.open(path, "rb", block_size=2**23) as stream:
            return sum(1 for _ in _samples(path, stream))
    except (tarfile.TarError, EOFError) as error:
        raise BadInput(f"shard {path}: not a readable tar file ({error})") from None


def indexed_shards(fs, root: str, url: str, config: DataOptions, index_file: Path | None) -> Source:
    """An index.json beside the shards, as `pack` writes it (webdataset's `wids` shard-index format)."""
    try:
        index = json.loads(fs.cat_file(posixpath.join(root, INDEX)).removeprefix(BOM))
        entries = [(posixpath.join(root, entry["url"]), int(entry["nsamples"])) for entry in index["shardlist"]]
    except (ValueError, KeyError, TypeError) as error:
        raise BadInput(f"TRAIN_DIR {url}: {INDEX} is not a shard index ({error})") from None
    if not entries:
        raise BadInput(f"TRAIN_DIR {url}: {INDEX} lists no shards")
    paths, sizes = [path for path, _ in entries], [size for _, size in entries]
    if all(path.endswith(".parquet") for path in paths):
        return parquet_shards(fs, paths, url, config)
    fingerprint = [fs.cat_file(posixpath.join(root, INDEX))]
    return _shard_source(fs, paths, sizes, url, config, fingerprint)


def _shard_source(fs, paths: list[str], sizes: list[int], url: str, config: DataOptions, versions: list) -> Source:
    shards = [
        TarShard(posixpath.basename(path), fs, path, size, config.caption_column, config.image_column)
        for path, size in zip(paths, sizes, strict=True)
        if size > 0
    ]
    return Source(shards, digest(url, paths, sizes, versions), f"{url} (WebDataset, {len(shards)} shards)")


# Parquet shards: an image column (bytes, or a struct with `bytes`, as `datasets` writes) and a caption column


@dataclass(frozen=True)
class ParquetShard:
    name: str
    fs: Any
    path: str
    size: int
    caption_column: str
    image_column: str

    def read(self, start: int, stop: int) -> Iterator[Sample]:
        with self.fs.open(self.path, "rb", block_size=2**23) as file:
            parquet = pq.ParquetFile(file)
            first = 0
            for group in range(parquet.num_row_groups):
                rows = parquet.metadata.row_group(group).num_rows
                if first + rows > start and first < stop:
                    table = parquet.read_row_group(group, columns=[self.image_column, self.caption_column])
                    images, captions = table.column(0).to_pylist(), table.column(1).to_pylist()
                    for row in range(max(start - first, 0), min(stop - first, rows)):
                        yield self._sample(first + row, images[row], captions[row])
                first += rows

    def stated_sizes(self) -> np.ndarray | None:
        """The width and height columns where the file has them (pack and img2dataset write them):
        8 bytes a record read, not the images."""
        with self.fs.open(self.path, "rb") as file:
            parquet = pq.ParquetFile(file)
            if not {"width", "height"} <= set(parquet.schema_arrow.names):
                return None
            table = parquet.read(columns=["width", "height"])
        columns = [table.column(name).fill_null(0).to_numpy() for name in ("width", "height")]
        return np.stack(columns, axis=1).astype(np.int32)

    def _sample(self, position: int, image: object, caption: object) -> Sample:
        if isinstance(image, dict):
            image = image.get("bytes")
        return Sample(
            f"{self.name} row {position}",
            caption if isinstance(caption, str) else None,
            image if isinstance(image, bytes) else None,
        )


def parquet_shards(fs, paths: list[str], url: str, config: DataOptions) -> Source:
    """Sizes and columns from the footers, read in parallel: a few KB a file."""

    def footer(path: str):
        with fs.open(path, "rb") as file:
            parquet = pq.ParquetFile(file)
            return parquet.schema_arrow, parquet.metadata.num_rows

    with ThreadPoolExecutor(16) as pool:
        footers = list(pool.map(footer, paths))
    for path, (schema, _) in zip(paths, footers, strict=True):
        missing = [c for c in (config.image_column, config.caption_column) if c not in schema.names]
        if missing:
            raise BadInput(
                f"shard {path} has no column {missing[0]!r} (--image_column, --caption_column); it has {schema.names}"
            )
    sizes = [rows for _, rows in footers]
    shards = [
        ParquetShard(posixpath.basename(path), fs, path, size, config.caption_column, config.image_column)
        for path, size in zip(paths, sizes, strict=True)
        if size > 0
    ]
    versions = [version(fs.info(path)) for path in paths]
    return Source(shards, digest(url, paths, sizes, versions), f"{url} (parquet, {len(shards)} shards)")


# A `datasets` dataset, streamed: its shards are its data files ------------------------------------


@dataclass(frozen=True)
class StreamedShard:
    name: str
    dataset: Any  # datasets.IterableDataset, images not decoded
    index: int
    count: int
    size: int
    caption_column: str
    image_column: str

    def read(self, start: int, stop: int) -> Iterator[Sample]:
        rows = self.dataset.shard(num_shards=self.count, index=self.index)
        for position, row in enumerate(rows):
            if position >= stop:
                return
            if position >= start:
                yield self._sample(position, row)

    def stated_sizes(self) -> None:
        return None

    def _sample(self, position: int, row: dict) -> Sample:
        where = f"{self.name} row {position}"
        image, caption = row.get(self.image_column), row.get(self.caption_column)
        caption = caption if isinstance(caption, str) else None
        data = image.get("bytes") if isinstance(image, dict) else None
        if data is None and isinstance(image, dict) and image.get("path"):
            try:
                with fsspec.open(image["path"], "rb") as file:
                    data = file.read()
            except OSError as error:
                return Sample(where, caption, None, f"cannot read {image['path']} ({error})")
        return Sample(where, caption, data)


def streamed_dataset(config: DataOptions, index_file: Path | None) -> Source:
    """`--dataset_name` with `datasets.load_dataset(..., streaming=True)`: nothing is downloaded ahead.
    Its shards are counted once, their captions checked on the way, and the counts kept."""
    import datasets  # a second and more to import, for this source only

    name = config.dataset_name
    try:
        dataset = datasets.load_dataset(
            name, config.dataset_config_name, split="train", streaming=True, cache_dir=config.cache_dir
        )
    except (FileNotFoundError, ValueError, datasets.exceptions.DatasetNotFoundError) as error:
        raise BadInput(f"DATASET_NAME {name}: {error}") from None
    columns = list(dataset.features or {})
    for column in (config.image_column, config.caption_column):
        if column not in columns:
            raise BadInput(f"dataset {name} has no column {column!r}; it has {columns}")
    dataset = dataset.cast_column(config.image_column, datasets.Image(decode=False))
    count = dataset.n_shards
    key = digest(name, config.dataset_config_name, count)
    known = read_counts(index_file)
    sizes = known.get(key)
    if sizes is None:
        log.info("counting the dataset's records once", extra={"fields": {"dataset": name, "shards": count}})
        sizes = [_count_rows(dataset, index, count, config.caption_column, name) for index in range(count)]
        write_counts(index_file, {**known, key: sizes})
    shards = [
        StreamedShard(f"{name} shard {i}", dataset, i, count, size, config.caption_column, config.image_column)
        for i, size in enumerate(sizes)
        if size > 0
    ]
    return Source(shards, key, f"{name} (datasets, streamed, {count} shards)")


def _count_rows(dataset, index: int, count: int, caption_column: str, name: str) -> int:
    rows = 0
    problems = []
    for rows, row in enumerate(dataset.shard(num_shards=count, index=index).select_columns([caption_column]), 1):
        caption = row[caption_column]
        if not (isinstance(caption, str) and caption.strip()) and len(problems) < 20:
            problems.append(f"shard {index} row {rows - 1}: empty or missing caption {caption_column!r}")
    if problems:
        raise BadInput(f"dataset {name}: {len(problems)} problem(s)\n  " + "\n  ".join(problems))
    return rows
