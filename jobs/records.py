"""What a training record is, and how shards of them are read: the types every source shares."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import numpy as np
from PIL import Image

from jobs import atomic

IMAGE_ERRORS = (OSError, ValueError, Image.DecompressionBombError)  # what opening a bad image raises


@dataclass(frozen=True)
class Sample:
    """One record as read. `caption` and `image` are None where the record has none; `problem` says why."""

    where: str  # names the record in the list of bad samples
    caption: str | None
    image: bytes | None
    problem: str | None = None


def unusable(sample: Sample) -> str | None:
    """Why a record read cannot be trained on, before its image is decoded; None if it may be."""
    if sample.problem:
        return sample.problem
    if not (isinstance(sample.caption, str) and sample.caption.strip()):
        return "empty or missing caption"
    if not sample.image:
        return "no image"
    return None


def undecodable(error: Exception) -> str:
    """Why an image did not decode, worded the same in every run (PIL's message names an object's address)."""
    if isinstance(error, Image.UnidentifiedImageError):
        return "image cannot be decoded (not a format PIL reads)"
    return f"image cannot be decoded ({error})"


class Shard(Protocol):
    name: str
    size: int

    def read(self, start: int, stop: int) -> Iterator[Sample]:
        """Records `start` to `stop - 1` of the shard, in order."""
        ...

    def stated_sizes(self) -> np.ndarray | None:
        """(width, height) of every record's image where the shard states them, (0, 0) where it
        does not; None where the images must be opened to know."""
        ...


@dataclass(frozen=True)
class Source:
    shards: list[Shard]
    fingerprint: str  # changes when the data does: part of the latent cache's key
    description: str

    @property
    def size(self) -> int:
        return sum(shard.size for shard in self.shards)


def read_counts(path: Path | None) -> dict:
    try:
        return json.loads(path.read_text()) if path else {}
    except (OSError, ValueError):
        return {}


def write_counts(path: Path | None, index: dict) -> None:
    if path is not None:
        atomic.write_bytes(path, json.dumps(index, indent=1).encode())


def digest(*parts: object) -> str:
    return hashlib.sha256(json.dumps(parts, default=str).encode()).hexdigest()[:16]


def version(info: dict) -> tuple:
    changed = ("mtime", "LastModified", "ETag", "updated", "etag")
    return info.get("size"), next((info[key] for key in changed if info.get(key)), None)


class ShardCursors:
    """Open sequential reads of a source's shards: reading on from where the last read of a shard
    stopped costs nothing more, so consecutive reads of a tar file or an object stream it once."""

    OPEN_AT_MOST = 8

    def __init__(self, source: Source):
        self.shards = source.shards
        self.open: dict[int, tuple[int, Iterator[Sample]]] = {}  # shard -> (next place, reader)

    def read(self, shard: int, start: int, stop: int) -> Iterator[tuple[int, Sample]]:
        place, reader = self.open.pop(shard, (None, None))
        if place is None or place > start:
            if reader is not None:
                reader.close()
            place, reader = start, self.shards[shard].read(start, self.shards[shard].size)
        while place < stop:
            sample = next(reader)
            if place >= start:
                yield place, sample
            place += 1
        self.open[shard] = (place, reader)
        while len(self.open) > self.OPEN_AT_MOST:
            oldest = next(iter(self.open))
            self.open.pop(oldest)[1].close()

    def close(self) -> None:
        for _, reader in self.open.values():
            reader.close()
        self.open.clear()
