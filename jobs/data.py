"""Training data in the order of the run: the batch plan, and the loader that reads, decodes and transforms.

Randomness is derived from (seed, epoch, index), never drawn from a global generator: a resumed run
orders, crops and flips every record exactly as the interrupted run would have, without reading
the batches it skips, and whatever the number of threads. The order comes from the shard sizes
alone (`BatchPlan`); records are read a window at a time, the next window read ahead on a thread
(sequential reads suit object storage and tar files), and decoded on a thread pool (PIL releases
the GIL while it decodes and resizes). An image that cannot be used is replaced by the next good
one of its window, and counted (`BadSamples`).
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
from jobs.records import Sample, ShardCursors, Source

if TYPE_CHECKING:
    from jobs.latent_cache import LatentCache

log = logging.getLogger("jobs")

# Records shuffled together, and read ahead as one unit: about 100 MB of 512 px JPEGs.
WINDOW_RECORDS = 1024
READ_AHEAD_WINDOWS = 1
DECODE_AHEAD_BATCHES = 2


def data_seed(config: TrainConfig) -> int:
    """The seed of data order and augmentation; fixed even without --seed, so a resumed run sees the same data."""
    return config.seed if config.seed is not None else 0


@dataclass(frozen=True)
class ImageTransform:
    """Resize the short side, crop a square (centre or random), optionally flip, scale to [-1, 1]."""

    resolution: int
    center_crop: bool
    random_flip: bool

    def crop(self, image: Image.Image, rng: np.random.Generator) -> Image.Image:
        scale = self.resolution / min(image.size)
        width, height = (
            max(self.resolution, round(image.width * scale)),
            max(self.resolution, round(image.height * scale)),
        )
        image = image.resize((width, height), Image.Resampling.BILINEAR)
        if self.center_crop:
            left, top = (width - self.resolution) // 2, (height - self.resolution) // 2
        else:
            left, top = int(rng.integers(width - self.resolution + 1)), int(rng.integers(height - self.resolution + 1))
        return image.crop((left, top, left + self.resolution, top + self.resolution))

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
    """

    def __init__(self, sizes: list[int], batch_size: int, seed: int, rank: int = 0, world_size: int = 1):
        self.sizes = np.asarray(sizes, dtype=np.int64)
        self.starts = np.concatenate([[0], np.cumsum(self.sizes)[:-1]]).astype(np.int64)
        self.total = int(self.sizes.sum())
        self.batch_size, self.seed, self.rank, self.world_size = batch_size, seed, rank, world_size
        self.per_process = math.ceil(self.total / world_size)
        self.batches_per_epoch = math.ceil(self.per_process / batch_size)
        self._orders: dict[int, np.ndarray] = {}
        self._lock = threading.Lock()  # the loader's read-ahead thread asks too

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
        start = self.rank * self.per_process + index * self.batch_size
        stop = min(start + self.batch_size, (self.rank + 1) * self.per_process)
        return epoch, np.arange(start, stop) % self.total

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
    pixel_values: torch.Tensor | None = None  # transformed; both flips when the latent cache must encode it
    latent_dist: torch.Tensor | None = None  # from the latent cache, both flips
    text_embeddings: torch.Tensor | None = None  # from the latent cache
    input_ids: torch.Tensor | None = None


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
    ):
        self.source, self.plan, self.transform, self.tokenizer = source, plan, transform, tokenizer
        self.seed, self.cache, self.threads, self.bad = seed, cache, threads, bad

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
        """The record at `position`, or when it is bad the next good one of the window (deterministic)."""
        start = window.positions.index(position)
        for candidate in window.positions[start:] + window.positions[:start]:
            index = window.records[candidate]
            item = self.prepare(epoch, index, window.samples.get(index))
            if item is not None:
                return item
        raise BadInput(f"all {len(window.positions)} records of a window are bad, e.g. {self.bad.found[index]}")

    def prepare(self, epoch: int, index: int, sample: Sample | None) -> Item | None:
        """One record as the step takes it, or None (and counted) if it cannot be used."""
        rng = np.random.default_rng((self.seed, epoch, index))
        cached = self.cache.get(index) if self.cache is not None else None
        if cached is not None:
            return Item(index, self.transform.flips(rng), **cached)
        assert sample is not None, f"record {index} was not read"
        problem = sample.problem or self._problem(sample)
        if problem is None:
            try:
                with Image.open(io.BytesIO(sample.image)) as image:
                    image.load()  # decodes every byte: a truncated file fails here
                    rgb = image.convert("RGB")
            except (OSError, ValueError, Image.DecompressionBombError) as error:
                problem = f"image cannot be decoded ({error})"
        if problem is not None:
            self.bad.add(index, sample.where, problem)
            return None
        ids = tokenize(self.tokenizer, [sample.caption])[0]
        if self.cache is not None:  # encoded once, with the crop epoch 0 draws, both flips when flipping
            image = self.transform.crop(rgb, np.random.default_rng((self.seed, 0, index)))
            flips = [False, True] if self.transform.random_flip else [False]
            pixels = torch.stack([self.transform.to_tensor(image, flip) for flip in flips])
            return Item(index, self.transform.flips(rng), pixel_values=pixels, input_ids=ids)
        image = self.transform.crop(rgb, rng)
        return Item(
            index, False, pixel_values=self.transform.to_tensor(image, self.transform.flips(rng)), input_ids=ids
        )

    @staticmethod
    def _problem(sample: Sample) -> str | None:
        if not (isinstance(sample.caption, str) and sample.caption.strip()):
            return "empty or missing caption"
        if not sample.image:
            return "no image"
        return None


def collate(items: list[Item], device: torch.device, cache: LatentCache | None) -> dict[str, torch.Tensor]:
    """The step's batch: pixels and token ids, or with the latent cache latents (encoding those it
    lacks) and text embeddings or token ids. Cached tensors keep the encoder's precision; the step
    gets them in fp32, as it gets freshly encoded ones."""
    if cache is None:
        return {
            "pixel_values": torch.stack([item.pixel_values for item in items]).to(device),
            "input_ids": torch.stack([item.input_ids for item in items]).to(device),
        }
    for item in items:
        if item.latent_dist is None:
            cache.encode(item, device)
    batch = {"latent_dist": torch.stack([item.latent_dist[int(item.flip)] for item in items]).to(device).float()}
    if items[0].text_embeddings is not None:
        batch["text_embeddings"] = torch.stack([item.text_embeddings for item in items]).to(device).float()
    else:
        batch["input_ids"] = torch.stack([item.input_ids for item in items]).to(device)
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
