"""Training data in the order of the run: the batch plan, and the loader that reads, decodes and transforms.

Randomness is derived from (seed, epoch, index), never drawn from a global generator: a resumed run
orders, crops and flips every record exactly as the interrupted run would have, without reading
the batches it skips, and whatever the number of threads. The order comes from the shard sizes
alone (`BatchPlan`); records are read a window at a time, the next window read ahead on a thread
(sequential reads suit object storage and tar files), and decoded on a thread pool (PIL releases
the GIL while it decodes and resizes). An image that cannot be used is replaced by the next good
one of its window (and bucket), and counted (`BadSamples`). With --aspect_buckets (jobs/buckets.py)
every batch holds records of one bucket, cut from one window.
"""

from __future__ import annotations

import io
import logging
import math
import queue
import threading
from collections import deque
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np
import torch
from PIL import Image

from jobs.config import TrainConfig
from jobs.errors import BadInput
from jobs.records import IMAGE_ERRORS, Sample, ShardCursors, Source, undecodable, unusable

if TYPE_CHECKING:
    from jobs.buckets import AspectBuckets
    from jobs.latent_cache import LatentCache

log = logging.getLogger("jobs")

# Records shuffled together, and read ahead as one unit: about 100 MB of 512 px JPEGs.
WINDOW_RECORDS = 1024
READ_AHEAD_WINDOWS = 1
DECODE_AHEAD_BATCHES = 2
# Independent random streams drawn from the same (seed, epoch, ...) as the crops and flips.
DROPPED_BATCHES, CAPTION_DROPOUT = 1, 2


def data_seed(config: TrainConfig) -> int:
    """The seed of data order and augmentation; fixed even without --seed, so a resumed run sees the same data."""
    return config.seed if config.seed is not None else 0


def random_stream(entropy: tuple[int, ...], purpose: int) -> np.random.Generator:
    return np.random.default_rng(np.random.SeedSequence(entropy, spawn_key=(purpose,)))


@dataclass(frozen=True)
class ImageTransform:
    """Resize to cover the target size, crop the rest (centre or random), optionally flip, scale to [-1, 1].
    The target is a --resolution square, or with --aspect_buckets the image's bucket."""

    resolution: int
    center_crop: bool
    random_flip: bool

    def crop(self, image: Image.Image, rng: np.random.Generator, size: tuple[int, int] | None = None) -> Image.Image:
        target_width, target_height = size or (self.resolution, self.resolution)
        scale = max(target_width / image.width, target_height / image.height)
        width, height = (
            max(target_width, round(image.width * scale)),
            max(target_height, round(image.height * scale)),
        )
        image = image.resize((width, height), Image.Resampling.BILINEAR)
        if self.center_crop:
            left, top = (width - target_width) // 2, (height - target_height) // 2
        else:
            left, top = int(rng.integers(width - target_width + 1)), int(rng.integers(height - target_height + 1))
        return image.crop((left, top, left + target_width, top + target_height))

    def flips(self, rng: np.random.Generator) -> bool:
        return self.random_flip and bool(rng.random() < 0.5)

    @staticmethod
    def to_tensor(image: Image.Image, flip: bool = False) -> torch.Tensor:
        pixels = torch.from_numpy(np.asarray(image, dtype=np.float32) / 127.5 - 1.0).permute(2, 0, 1)
        return pixels.flip(-1) if flip else pixels


def tokenize(tokenizer, captions: list[str]) -> torch.Tensor:
    """Token ids padded to the tokenizer's own length (32 for the tiny model, 77 for CLIP; PAI says so itself)."""
    return tokenizer(
        captions, max_length=tokenizer.model_max_length, padding="max_length", truncation=True, return_tensors="pt"
    ).input_ids


class BatchPlan:
    """Which records each micro-batch of the run holds, computable from the batch's number and the shard sizes.

    An epoch's order is the same for any number of processes: the shards in a seeded order, cut into
    windows of WINDOW_RECORDS consecutive records, each window in a seeded order of its own. Process
    r takes the r-th of `world_size` equal parts of it, the last one padded from the start: processes
    read different shards, and all take the same number of steps, so none waits for another at the
    end of an epoch. Resuming at micro-batch N asks for batch N directly.

    With buckets (each record's, -1 for one that cannot be used), each window's records of a bucket
    are cut into batches, the last one filled up from the bucket's first records of the window,
    and the epoch's batches ordered by where they start. That makes some more batches than the
    records need; a seeded choice of them is left out, so every epoch has ceil(records / batch)
    batches as without buckets, and the records left out change from epoch to epoch. Process r
    takes the r-th of `world_size` equal parts of the batches.
    """

    def __init__(
        self,
        sizes: list[int],
        batch_size: int,
        seed: int,
        rank: int = 0,
        world_size: int = 1,
        buckets: np.ndarray | None = None,
    ):
        self.sizes = np.asarray(sizes, dtype=np.int64)
        self.starts = np.concatenate([[0], np.cumsum(self.sizes)[:-1]]).astype(np.int64)
        self.total = int(self.sizes.sum())
        self.batch_size, self.seed, self.rank, self.world_size = batch_size, seed, rank, world_size
        self.buckets = buckets
        if buckets is None:
            self.per_process = math.ceil(self.total / world_size)
            self.batches_per_epoch = math.ceil(self.per_process / batch_size)
        else:
            self.batches_per_epoch = math.ceil(math.ceil(int((buckets >= 0).sum()) / batch_size) / world_size)
        self._orders: dict[int, np.ndarray] = {}
        self._batches: dict[int, np.ndarray] = {}
        self._lock = threading.RLock()  # the loader's read-ahead thread asks too

    def order(self, epoch: int) -> np.ndarray:
        """Every record index of the epoch, in the epoch's order (8 bytes a record; the last two epochs kept)."""
        with self._lock:
            if epoch not in self._orders:
                shards = np.random.default_rng((self.seed, epoch)).permutation(len(self.sizes))
                stream = np.concatenate([np.arange(self.starts[s], self.starts[s] + self.sizes[s]) for s in shards])
                for first in range(0, self.total, WINDOW_RECORDS):
                    window = stream[first : first + WINDOW_RECORDS]
                    window[:] = window[np.random.default_rng((self.seed, epoch, first)).permutation(len(window))]
                self._orders = {e: o for e, o in self._orders.items() if e >= epoch - 1} | {epoch: stream}
            return self._orders[epoch]

    def positions(self, number: int) -> tuple[int, np.ndarray]:
        """The epoch of micro-batch `number` and the positions of its records in the epoch's order."""
        epoch, index = divmod(number, self.batches_per_epoch)
        if self.buckets is not None:
            return epoch, self.bucket_batches(epoch)[self.rank * self.batches_per_epoch + index]
        start = self.rank * self.per_process + index * self.batch_size
        stop = min(start + self.batch_size, (self.rank + 1) * self.per_process)
        return epoch, np.arange(start, stop) % self.total

    def bucket_batches(self, epoch: int) -> np.ndarray:
        """Every process's batches of the epoch, one row of positions each (8 bytes a record; two epochs kept)."""
        with self._lock:
            if epoch not in self._batches:
                self._batches = {e: b for e, b in self._batches.items() if e >= epoch - 1}
                self._batches[epoch] = self._cut_into_batches(epoch)
            return self._batches[epoch]

    def _cut_into_batches(self, epoch: int) -> np.ndarray:
        bucket = self.buckets[self.order(epoch)]
        usable = np.flatnonzero(bucket >= 0)
        grouped = usable[np.lexsort((usable, bucket[usable], usable // WINDOW_RECORDS))]
        keys = (grouped // WINDOW_RECORDS) * (int(self.buckets.max()) + 1) + bucket[grouped]
        groups = np.split(grouped, np.flatnonzero(np.diff(keys)) + 1)
        size = self.batch_size
        batches = np.concatenate([np.resize(g, math.ceil(len(g) / size) * size).reshape(-1, size) for g in groups])
        batches = batches[np.argsort(batches[:, 0], kind="stable")]
        wanted = self.batches_per_epoch * self.world_size
        if len(batches) > wanted:
            left_out = random_stream((self.seed, epoch), DROPPED_BATCHES).choice(
                len(batches), len(batches) - wanted, replace=False
            )
            batches = np.delete(batches, left_out, axis=0)
        return batches[np.arange(wanted) % len(batches)]

    def batch(self, number: int) -> list[tuple[int, int]]:
        """(epoch, record index) of each record of micro-batch `number`."""
        epoch, positions = self.positions(number)
        return [(epoch, int(index)) for index in self.order(epoch)[positions]]

    def shard_of(self, index: int) -> tuple[int, int]:
        """The shard a record index is in, and its place in that shard."""
        shard = int(np.searchsorted(self.starts, index, side="right")) - 1
        return shard, index - int(self.starts[shard])


@dataclass
class BadSamples:
    """Records that could not be used (an image that does not decode, no caption), by record index."""

    limit: int
    found: dict[int, str] = field(default_factory=dict)

    def add(self, index: int, where: str, problem: str) -> None:
        if index not in self.found:
            log.warning("skipping a bad sample", extra={"fields": {"sample": where, "problem": problem}})
            self.found[index] = f"{where}: {problem}"

    def check(self, total: int) -> None:
        """Stop the run, naming them, once more than the limit are bad (`total`: all processes' count)."""
        if total > self.limit:
            listed = "\n  ".join(sorted(self.found.values())[:50])
            raise BadInput(
                f"{total} bad samples, more than --max_bad_samples={self.limit}; this process found:\n  {listed}"
            )


@dataclass
class Item:
    """One record of a micro-batch, ready for the step (or for the latent cache's encoder)."""

    index: int
    flip: bool
    caption_dropped: bool = False  # trained on the empty prompt (--caption_dropout)
    pixel_values: torch.Tensor | None = None  # transformed; both flips when the latent cache must encode it
    latent_dist: torch.Tensor | None = None  # from the latent cache, both flips
    text_embeddings: torch.Tensor | None = None  # from the latent cache
    input_ids: torch.Tensor | None = None


def caption_dropped(seed: int, epoch: int, index: int, probability: float) -> bool:
    return probability > 0 and bool(random_stream((seed, epoch, index), CAPTION_DROPOUT).random() < probability)


class Loader:
    """Micro-batches of `plan` from `source`: items in plan order, read ahead and decoded on threads."""

    def __init__(
        self,
        source: Source,
        plan: BatchPlan,
        transform: ImageTransform,
        tokenizer,
        seed: int,
        cache: LatentCache | None,
        threads: int,
        bad: BadSamples,
        buckets: AspectBuckets | None = None,
        caption_dropout: float = 0.0,
    ):
        self.source, self.plan, self.transform, self.tokenizer = source, plan, transform, tokenizer
        self.seed, self.cache, self.threads, self.bad = seed, cache, threads, bad
        self.buckets, self.caption_dropout = buckets, caption_dropout
        self.empty_ids = tokenize(tokenizer, [""])[0]

    def batches(self, start: int, stop: int) -> Iterator[list[Item]]:
        """Micro-batches `start` to `stop - 1`, each a list of items in plan order."""
        windows = WindowReader(self, start, stop)
        pending: deque[list[Future]] = deque()
        with ThreadPoolExecutor(self.threads, thread_name_prefix="decode") as pool:
            try:
                for number in range(start, stop):
                    pending.append(self._submit(number, windows, pool))
                    if len(pending) > DECODE_AHEAD_BATCHES:
                        yield [future.result() for future in pending.popleft()]
                while pending:
                    yield [future.result() for future in pending.popleft()]
            finally:
                windows.close()

    def _submit(self, number: int, windows: WindowReader, pool: ThreadPoolExecutor) -> list[Future]:
        epoch, positions = self.plan.positions(number)
        futures = []
        for position in positions:
            window = windows.get(epoch, int(position) // WINDOW_RECORDS)
            futures.append(pool.submit(self._prepare_or_substitute, epoch, int(position), window))
        return futures

    def _prepare_or_substitute(self, epoch: int, position: int, window: Window) -> Item:
        """The record at `position`, or when it is bad the next good one of its window and bucket (deterministic)."""
        start = window.positions.index(position)
        candidates = window.positions[start:] + window.positions[:start]
        if self.buckets is not None:
            bucket = self.buckets.of_record[window.records[position]]
            candidates = [c for c in candidates if self.buckets.of_record[window.records[c]] == bucket]
        for candidate in candidates:
            index = window.records[candidate]
            item = self.prepare(epoch, index, window.samples.get(index))
            if item is not None:
                return item
        raise BadInput(f"all {len(candidates)} records of a window are bad, e.g. {self.bad.found[index]}")

    def prepare(self, epoch: int, index: int, sample: Sample | None) -> Item | None:
        """One record as the step takes it, or None (and counted) if it cannot be used."""
        rng = np.random.default_rng((self.seed, epoch, index))
        dropped = caption_dropped(self.seed, epoch, index, self.caption_dropout)
        cached = self.cache.get(index) if self.cache is not None else None
        if cached is not None:
            return Item(index, self.transform.flips(rng), dropped, **cached)
        assert sample is not None, f"record {index} was not read"
        problem = unusable(sample)
        if problem is None:
            try:
                with Image.open(io.BytesIO(sample.image)) as image:
                    image.load()  # decodes every byte: a truncated file fails here
                    rgb = image.convert("RGB")
            except IMAGE_ERRORS as error:
                problem = undecodable(error)
        if problem is not None:
            self.bad.add(index, sample.where, problem)
            return None
        ids = tokenize(self.tokenizer, [sample.caption])[0]
        size = self.buckets.size_of(index) if self.buckets is not None else None
        if self.cache is not None:  # encoded once, with the crop epoch 0 draws, both flips when flipping
            image = self.transform.crop(rgb, np.random.default_rng((self.seed, 0, index)), size)
            flips = [False, True] if self.transform.random_flip else [False]
            pixels = torch.stack([self.transform.to_tensor(image, flip) for flip in flips])
            return Item(index, self.transform.flips(rng), dropped, pixel_values=pixels, input_ids=ids)
        image = self.transform.crop(rgb, rng, size)
        pixels = self.transform.to_tensor(image, self.transform.flips(rng))
        return Item(index, False, dropped, pixel_values=pixels, input_ids=self.empty_ids if dropped else ids)


def collate(items: list[Item], device: torch.device, cache: LatentCache | None) -> dict[str, torch.Tensor]:
    """The step's batch: pixels and token ids, or with the latent cache latents (encoding those it
    lacks) and text embeddings or token ids, the empty prompt's for a dropped caption. Cached tensors
    keep the encoder's precision; the step gets them in fp32, as it gets freshly encoded ones."""
    if cache is None:
        return {
            "pixel_values": torch.stack([item.pixel_values for item in items]).to(device),
            "input_ids": torch.stack([item.input_ids for item in items]).to(device),
        }
    for item in items:
        if item.latent_dist is None:
            cache.encode(item, device)
    batch = {"latent_dist": torch.stack([item.latent_dist[int(item.flip)] for item in items]).to(device).float()}
    empty = cache.empty_caption(device)
    if items[0].text_embeddings is not None:
        embeddings = [empty["text_embeddings"] if item.caption_dropped else item.text_embeddings for item in items]
        batch["text_embeddings"] = torch.stack(embeddings).to(device).float()
    else:
        ids = [empty["input_ids"] if item.caption_dropped else item.input_ids for item in items]
        batch["input_ids"] = torch.stack(ids).to(device)
    return batch


@dataclass
class Window:
    """The records of one window that this process uses: their positions, indices and samples."""

    epoch: int
    number: int
    positions: list[int]
    records: dict[int, int]  # position -> record index
    samples: dict[int, Sample]  # record index -> sample (none for records the latent cache holds)


class WindowReader:
    """Reads the windows that micro-batches `start` to `stop - 1` need, in order, one ahead on a thread.

    Each window's records are read shard by shard, from where the last read of that shard stopped,
    so a window that ends mid-shard hands the open stream to the next window."""

    def __init__(self, loader: Loader, start: int, stop: int):
        self.loader, self.plan = loader, loader.plan
        self.ready: queue.Queue = queue.Queue(maxsize=READ_AHEAD_WINDOWS)
        self.current: dict[tuple[int, int], Window] = {}
        self.stopping = threading.Event()
        self.thread = threading.Thread(target=self._read_all, args=(start, stop), name="read-ahead", daemon=True)
        self.thread.start()

    def get(self, epoch: int, number: int) -> Window:
        while (epoch, number) not in self.current:
            window = self.ready.get()
            if isinstance(window, BaseException):
                raise window
            self.current = {key: w for key, w in self.current.items() if key >= (window.epoch, window.number - 1)}
            self.current[(window.epoch, window.number)] = window
        return self.current[(epoch, number)]

    def close(self) -> None:
        self.stopping.set()
        while self.thread.is_alive():
            try:
                self.ready.get(timeout=0.1)
            except queue.Empty:
                pass

    def _windows(self, start: int, stop: int) -> Iterator[tuple[int, int, list[int]]]:
        """(epoch, window number, this process's positions in it) in the order the batches need them."""
        current, positions = None, []
        for number in range(start, stop):
            epoch, batch = self.plan.positions(number)
            for position in batch.tolist():
                key = (epoch, position // WINDOW_RECORDS)
                if key != current and positions:
                    yield (*current, positions)
                    positions = []
                current = key
                positions.append(position)
        if positions:
            yield (*current, positions)

    def _read_all(self, start: int, stop: int) -> None:
        cursors = ShardCursors(self.loader.source)
        cache, last_epoch = self.loader.cache, None
        try:
            for epoch, number, positions in self._windows(start, stop):
                if cache is not None and epoch != last_epoch:  # what other processes wrote in the last epoch
                    cache.refresh()
                    last_epoch = epoch
                window = self._read(epoch, number, positions, cursors)
                while not self.stopping.is_set():
                    try:
                        self.ready.put(window, timeout=0.1)
                        break
                    except queue.Full:
                        pass
                if self.stopping.is_set():
                    return
        except BaseException as error:  # handed to the loop, which raises it
            self.ready.put(error)
        finally:
            cursors.close()

    def _read(self, epoch: int, number: int, positions: list[int], cursors: ShardCursors) -> Window:
        order = self.plan.order(epoch)
        records = {position: int(order[position]) for position in positions}
        cache = self.loader.cache
        wanted = sorted({index for index in records.values() if cache is None or not cache.holds(index)})
        by_shard: dict[int, list[int]] = {}
        for index in wanted:
            shard, place = self.plan.shard_of(index)
            by_shard.setdefault(shard, []).append(place)
        samples = {}
        for shard, places in by_shard.items():
            first, needed = int(self.plan.starts[shard]), set(places)
            for place, sample in cursors.read(shard, places[0], places[-1] + 1):
                if place in needed:
                    samples[first + place] = sample
        return Window(epoch, number, positions, records, samples)
