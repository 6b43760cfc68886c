"""--aspect_buckets: each image trained at about its own aspect ratio, not cropped to a square.

As in kohya-ss/sd-scripts and SimpleTuner: a bucket is a width and a height, multiples of
--bucket_reso_steps, of at most --resolution^2 pixels and an aspect ratio within --max_aspect_ratio;
an image goes to the bucket nearest its aspect ratio, is resized to cover it and cropped by what is
left over (jobs/data.py's ImageTransform), and every batch comes from one bucket (BatchPlan).

Assigning buckets needs each image's size, so the main process reads every record once before
training (image headers, the shards in parallel processes; only the width and height columns of
parquet shards that have them, as `pack` writes) and keeps the sizes in OUTPUT_DIR: a resumed run
plans exactly the same batches without reading anything. A record whose size cannot be read is a
bad sample from the start and has no place in any batch.
"""

from __future__ import annotations

import hashlib
import io
import logging
import multiprocessing
import os
from concurrent.futures import ProcessPoolExecutor, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from jobs import atomic
from jobs.config import TrainConfig
from jobs.progress import Progress
from jobs.records import IMAGE_ERRORS, Shard, Source, digest, undecodable, unusable

log = logging.getLogger("jobs")

STATED_SIZE_THREADS = 16
# Reading a record's size is Python's tar parsing and PIL's header parsing: CPU-bound, so processes.
SIZE_READING_PROCESSES = 16


@dataclass(frozen=True)
class AspectBuckets:
    sizes: list[tuple[int, int]]  # (width, height) of each bucket, by aspect ratio
    of_record: np.ndarray  # each record's bucket (int16); -1 for a record that cannot be used
    problems: dict[int, str]  # record index -> why it cannot be used

    def size_of(self, index: int) -> tuple[int, int]:
        return self.sizes[self.of_record[index]]

    def counts(self) -> list[int]:
        return np.bincount(self.of_record[self.of_record >= 0], minlength=len(self.sizes)).tolist()

    def summary(self) -> list[dict]:
        """The buckets that hold images, and how many each: for the run record."""
        return [
            {"width": width, "height": height, "images": count}
            for (width, height), count in zip(self.sizes, self.counts(), strict=True)
            if count
        ]

    def most_used(self, count: int) -> list[tuple[int, int]]:
        counts = self.counts()
        ranked = sorted(range(len(self.sizes)), key=lambda bucket: -counts[bucket])  # ties: by aspect ratio
        return [self.sizes[bucket] for bucket in ranked[:count] if counts[bucket]]

    @property
    def fingerprint(self) -> str:
        """Changes whenever a record would be trained at another size: part of the latent cache's key."""
        return digest(self.sizes, hashlib.sha256(self.of_record.tobytes()).hexdigest())


def aspect_buckets(config: TrainConfig, source: Source, folder: Path) -> AspectBuckets:
    """Every record's bucket, from image sizes read once and kept in `folder`."""
    sizes = bucket_sizes(config.resolution, config.bucket_reso_steps, config.max_aspect_ratio)
    image_sizes, problems = read_image_sizes(source, folder / f"image-sizes-{source.fingerprint}.npz")
    usable = (image_sizes > 0).all(axis=1)
    of_record = np.full(len(image_sizes), -1, dtype=np.int16)
    of_record[usable] = nearest_bucket(sizes, image_sizes[usable, 0], image_sizes[usable, 1])
    return AspectBuckets(sizes, of_record, problems)


def bucket_sizes(resolution: int, step: int, max_aspect_ratio: float) -> list[tuple[int, int]]:
    """For each width, the tallest height that keeps the area within resolution^2 (kohya's rule), both ways round."""
    area = resolution * resolution
    sizes = set()
    for width in range(step, area // step + 1, step):
        height = area // width // step * step
        if height >= step and max(width, height) <= max_aspect_ratio * min(width, height):
            sizes |= {(width, height), (height, width)}
    return sorted(sizes, key=lambda size: size[0] / size[1])


def nearest_bucket(sizes: list[tuple[int, int]], widths: np.ndarray, heights: np.ndarray) -> np.ndarray:
    """The bucket nearest each image's aspect ratio, as log(width / height) measures it (a tie: the taller)."""
    logs = np.log([width / height for width, height in sizes])
    return np.searchsorted((logs[1:] + logs[:-1]) / 2, np.log(widths / heights))


def read_image_sizes(source: Source, path: Path) -> tuple[np.ndarray, dict[int, str]]:
    """(width, height) of every record, (0, 0) where there is none, and why; from `path` once it was read."""
    try:
        with np.load(path) as kept:
            return kept["sizes"], dict(zip(kept["problem_index"].tolist(), kept["problem"].tolist(), strict=True))
    except (OSError, ValueError, KeyError):
        pass
    log.info("reading every image's size once, for --aspect_buckets", extra={"fields": {"records": source.size}})
    progress = Progress(source.size, "image")
    with ThreadPoolExecutor(STATED_SIZE_THREADS) as threads:  # a few bytes a record, waiting on storage
        parts = list(threads.map(_stated_sizes, source.shards))
    progress.update(sum(len(part[0]) for part in parts if part is not None))
    unread = [number for number, part in enumerate(parts) if part is None]
    if unread:
        workers = min(SIZE_READING_PROCESSES, len(os.sched_getaffinity(0)), len(unread))
        # Forked, as torch's DataLoader workers are: nothing to import again, and they touch no GPU.
        with ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("fork")) as pool:
            shards = [source.shards[number] for number in unread]
            read = pool.map(_read_sizes, shards, chunksize=max(1, len(shards) // (workers * 8)))
            for number, part in zip(unread, read, strict=True):
                parts[number] = part
                progress.update(len(part[0]))
    progress.close()
    sizes = np.concatenate([shard_sizes for shard_sizes, _ in parts])
    problems, first = {}, 0
    for shard_sizes, shard_problems in parts:
        problems |= {first + place: problem for place, problem in shard_problems.items()}
        first += len(shard_sizes)
    kept = io.BytesIO()
    indices, texts = np.array(list(problems), dtype=np.int64), np.array(list(problems.values()), dtype=str)
    np.savez(kept, sizes=sizes, problem_index=indices, problem=texts)
    atomic.write_bytes(path, kept.getvalue())
    return sizes, problems


def _stated_sizes(shard: Shard) -> tuple[np.ndarray, dict[int, str]] | None:
    stated = shard.stated_sizes()
    if stated is None:
        return None
    unstated = np.flatnonzero((stated <= 0).any(axis=1))
    return stated, {int(place): f"{shard.name} row {place}: no width and height" for place in unstated}


def _read_sizes(shard: Shard) -> tuple[np.ndarray, dict[int, str]]:
    sizes = np.zeros((shard.size, 2), dtype=np.int32)
    problems = {}
    for place, sample in enumerate(shard.read(0, shard.size)):
        problem = unusable(sample)
        if problem is None:
            try:
                with Image.open(io.BytesIO(sample.image)) as image:  # the header only
                    sizes[place] = image.size
            except IMAGE_ERRORS as error:
                problem = undecodable(error)
        if problem is not None:
            problems[place] = f"{sample.where}: {problem}"
    return sizes, problems
