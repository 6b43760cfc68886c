"""Where training records come from: TRAIN_DIR (a folder, WebDataset or parquet shards) or --dataset_name.

Every source is a list of shards, each a run of records read in order, whose sizes are known
before training: from metadata.jsonl, from an `index.json` (which `pack` writes), from parquet
footers, or counted once and kept in OUTPUT_DIR/data-index.json. The batch plan is computed from
those sizes alone, so nothing is read before it is used, and a resumed run reads nothing it skips.

TRAIN_DIR is a path or a URL read through fsspec: `s3://` (the AWS variables, `AWS_ENDPOINT_URL`
for MinIO, SeaweedFS or Alibaba OSS's S3 endpoint), `gs://`, `https://`. What costs little per
record is checked up front (metadata.jsonl: JSON, captions, file names, a listing of the files);
images, and the captions inside shards, are checked when they are read (jobs/data.py).
"""

from __future__ import annotations

import json
import logging
import posixpath
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from fsspec.core import url_to_fs

from jobs.config import DataOptions
from jobs.errors import BadInput
from jobs.records import Sample, Shard, Source, digest, version
from jobs.shards import INDEX, indexed_shards, parquet_shards, streamed_dataset, tar_shards
from jobs.text import BOM

log = logging.getLogger("jobs")

METADATA = "metadata.jsonl"
# A folder is cut into shards of this many records: small, so that a window of the batch plan
# (jobs/data.py) mixes many parts of the folder, as a folder's lines are often sorted by subject.
FOLDER_SHARD_RECORDS = 64


def open_source(config: DataOptions, index_file: Path | None) -> Source:
    """The source the configuration names, checked; cut to --max_train_samples. `index_file` keeps the
    sizes of shards that had to be counted (None: count again)."""
    if config.dataset_name:
        source = streamed_dataset(config, index_file)
    else:
        source = _train_dir(str(config.train_data_dir), config, index_file)
    if config.max_train_samples and config.max_train_samples < source.size:
        source = _first_records(source, config.max_train_samples, config.seed or 0)
    log.info("training data", extra={"fields": {"source": source.description, "records": source.size}})
    return source


def _train_dir(url: str, config: DataOptions, index_file: Path | None) -> Source:
    fs, root = url_to_fs(url)
    root = root.rstrip("/")
    if not fs.exists(root):
        raise BadInput(f"TRAIN_DIR {url}: no such folder or file")
    for folder in (root, posixpath.join(root, "train")):
        if fs.isfile(posixpath.join(folder, METADATA)):
            return _folder(fs, folder, url, config)
    if fs.isfile(posixpath.join(root, INDEX)):
        return indexed_shards(fs, root, url, config, index_file)
    files = sorted(fs.ls(root, detail=False)) if fs.isdir(root) else [root]
    tars = [f for f in files if f.endswith(".tar")]
    parquets = [f for f in files if f.endswith(".parquet")]
    if tars:
        return tar_shards(fs, tars, url, config, index_file)
    if parquets:
        return parquet_shards(fs, parquets, url, config)
    raise BadInput(f"TRAIN_DIR {url}: no {METADATA} (in it or in train/), no {INDEX}, no .tar or .parquet shards")


# The seed's layout: a folder of images with metadata.jsonl -------------------------------------


@dataclass(frozen=True)
class FolderShard:
    """Consecutive records of a metadata.jsonl folder; each image is its own file."""

    name: str
    fs: Any
    files: list[str]
    captions: list[str]
    lines: list[int]
    metadata: str

    @property
    def size(self) -> int:
        return len(self.files)

    def read(self, start: int, stop: int) -> Iterator[Sample]:
        for path, caption, line in zip(
            self.files[start:stop], self.captions[start:stop], self.lines[start:stop], strict=True
        ):
            where = f"{self.metadata} line {line}"
            try:
                yield Sample(where, caption, self.fs.cat_file(path))
            except (OSError, ValueError) as error:
                yield Sample(where, caption, None, f"cannot read {path} ({error})")

    def stated_sizes(self) -> None:
        return None


def _folder(fs, folder: str, url: str, config: DataOptions) -> Source:
    """Every record of metadata.jsonl checked: valid JSON, a caption, a file name inside the folder that
    the folder's listing holds. Every problem is listed with its line number."""
    metadata = posixpath.join(folder, METADATA)
    listing = {posixpath.relpath(path, folder): info for path, info in fs.find(folder, detail=True).items()}
    files, captions, lines, problems = [], [], [], []
    for number, raw in enumerate(fs.cat_file(metadata).splitlines(), start=1):
        record, problem = _json_record(raw.removeprefix(BOM) if number == 1 else raw)
        if record is None and problem is None:
            continue  # a blank line
        if problem is None:
            name, caption = record.get("file_name"), record.get(config.caption_column)
            problem = _file_name_problem(name, listing)
            if problem is None and not (isinstance(caption, str) and caption.strip()):
                problem = f"empty or missing caption {config.caption_column!r}"
        if problem:
            problems.append(f"line {number}: {problem}")
            continue
        files.append(posixpath.join(folder, posixpath.normpath(name)))
        captions.append(caption)
        lines.append(number)
    if not problems and not files:
        problems.append("no records")
    if problems:
        raise BadInput(f"dataset {url.rstrip('/')}/{METADATA}: {len(problems)} problem(s)\n  " + "\n  ".join(problems))
    versions = [version(listing[posixpath.relpath(f, folder)]) for f in files]  # an edited image changes it
    shards = []
    for first in range(0, len(files), FOLDER_SHARD_RECORDS):
        part = slice(first, first + FOLDER_SHARD_RECORDS)
        name = f"{METADATA} lines {lines[part][0]}-{lines[part][-1]}"
        shards.append(FolderShard(name, fs, files[part], captions[part], lines[part], METADATA))
    return Source(shards, digest(url, files, captions, versions), f"{url} ({METADATA}, {len(files)} images)")


def _json_record(raw: bytes) -> tuple[dict | None, str | None]:
    """The JSON object of one line of metadata.jsonl, or why it is not one; (None, None) for a blank line."""
    try:
        line = raw.decode("utf-8").strip()
    except UnicodeDecodeError:
        return None, "not UTF-8 text (save the file as UTF-8)"
    if not line:
        return None, None
    try:
        record = json.loads(line)
    except ValueError as error:
        return None, f"malformed JSON ({error})"
    return (record, None) if isinstance(record, dict) else (None, "malformed JSON (not a JSON object)")


def _file_name_problem(name: object, listing: dict[str, Any]) -> str | None:
    if not isinstance(name, str) or not name:
        return "no file_name"
    normal = posixpath.normpath(name)  # lexically: `..` and absolute paths escape, symlinks are fine
    if normal.startswith(("../", "/")) or normal == "..":
        return f"file_name {name!r} points outside the dataset folder"
    if normal not in listing or listing[normal].get("type") == "directory":
        return f"file_name {name!r}: no such file"
    return None


@dataclass(frozen=True)
class FirstRecords:
    """The first `size` records of a shard."""

    shard: Shard
    size: int

    @property
    def name(self) -> str:
        return self.shard.name

    def read(self, start: int, stop: int) -> Iterator[Sample]:
        return self.shard.read(start, min(stop, self.size))

    def stated_sizes(self) -> np.ndarray | None:
        sizes = self.shard.stated_sizes()
        return sizes[: self.size] if sizes is not None else None


def _first_records(source: Source, count: int, seed: int) -> Source:
    """--max_train_samples: records in a seeded order of the shards, the last shard cut (a folder's
    shards are small, so its subset is spread over the whole folder)."""
    kept: list[Shard] = []
    left = count
    for index in np.random.default_rng(seed).permutation(len(source.shards)):
        shard = source.shards[index]
        kept.append(shard if shard.size <= left else FirstRecords(shard, left))
        left -= kept[-1].size
        if left == 0:
            break
    fingerprint = digest(source.fingerprint, count, seed)
    return Source(kept, fingerprint, f"{source.description}, {count} of them")
