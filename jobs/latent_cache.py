"""--cache_latents: each record's VAE latent distribution (both flips) and text embedding, encoded once, on disk.

The cache fills while the first epoch trains, so the first step does not wait for the whole dataset
to be encoded. Records are known by their place in epoch 0's order, which is the same for any
number of processes: each process writes the records it encodes in epoch 0, `SEGMENT_RECORDS` at
a time, into a file named by the first and last place it holds and a digest of them all
(`seg-<first>-<last>-<digest>.safetensors`; with aspect buckets a process's places are not
consecutive), and every process and node then reads every file, one record at a time through a
memory map. Each latent has its record's shape: its bucket's, with --aspect_buckets. Memory stays
flat in the dataset's size; a kill loses at most the records not yet written, which are encoded
again when next used. Encoding is deterministic, so a record gives the same tensors from the cache
as fresh: a run with a cold cache, a warm one or a half-built one trains exactly alike.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
import threading
from pathlib import Path

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from jobs import atomic
from jobs.buckets import AspectBuckets
from jobs.config import TrainConfig
from jobs.data import WINDOW_RECORDS, BatchPlan, Item
from jobs.records import digest
from jobs.sources import Source

log = logging.getLogger("jobs")

SEGMENT_RECORDS = 256
SEGMENT_NAME = re.compile(r"^seg-\d+-\d+-[0-9a-f]+\.safetensors$")
FORMAT = 2  # files keyed by place, with the places in their metadata


def cache_folder(
    config: TrainConfig, source: Source, with_text: bool, dtype: torch.dtype, buckets: AspectBuckets | None
) -> Path:
    """The cache for this model, data and preprocessing: a new folder whenever what is cached would change."""
    key = hashlib.sha256(
        json.dumps(
            [
                config.pretrained_model_name_or_path,
                config.revision,
                config.variant,
                source.fingerprint,
                config.resolution,
                config.center_crop,
                config.random_flip,
                with_text,
                config.seed or 0,
                str(dtype),
                WINDOW_RECORDS,
                [shard.size for shard in source.shards],  # with the seed, they fix epoch 0's order
                buckets.fingerprint if buckets is not None else None,
                FORMAT,
            ],
            default=str,
        ).encode()
    ).hexdigest()[:16]
    return (config.latent_cache_dir or config.output_dir / "latent-cache") / key


class LatentCache:
    def __init__(self, folder: Path, plan: BatchPlan, vae, text_encoder, with_text: bool, empty_ids: torch.Tensor):
        self.folder, self.vae, self.text_encoder, self.with_text = folder, vae, text_encoder, with_text
        self.empty_ids = empty_ids  # the empty prompt's token ids, for --caption_dropout
        self._empty_caption: dict[str, torch.Tensor] | None = None
        folder.mkdir(parents=True, exist_ok=True)
        order = plan.order(0)
        self.first_position = np.empty(plan.total, dtype=np.int64)  # record index -> its place in epoch 0
        self.first_position[order] = np.arange(plan.total)
        self.segment_of = np.full(plan.total, -1, dtype=np.int32)  # place in epoch 0 -> file
        self.segments: list[Path] = []
        self.pending: dict[int, dict[str, torch.Tensor]] = {}  # place -> tensors, not yet written
        self.lock = threading.Lock()  # the loader's read-ahead thread refreshes while the loop writes
        self.refresh()
        log.info("latent cache", extra={"fields": {"cache": str(folder), "records": int((self.segment_of >= 0).sum())}})

    def refresh(self) -> None:
        """Take in the files written since the last look (by this process, others, or earlier runs)."""
        known = {path.name for path in self.segments}
        for path in sorted(self.folder.iterdir()):
            if SEGMENT_NAME.match(path.name) and path.name not in known:
                with safe_open(path, framework="pt") as file:
                    places = json.loads(file.metadata()["places"])
                self._add(path, places)

    def _add(self, path: Path, places: list[int]) -> None:
        with self.lock:
            places = np.asarray(places, dtype=np.int64)
            places = places[self.segment_of[places] < 0]
            self.segment_of[places] = len(self.segments)
            self.segments.append(path)

    def holds(self, index: int) -> bool:
        return self.segment_of[self.first_position[index]] >= 0

    def get(self, index: int) -> dict[str, torch.Tensor] | None:
        """The record's cached tensors (latent_dist, and text_embeddings or input_ids), or None."""
        place = int(self.first_position[index])
        if place in self.pending:
            return self.pending[place]
        segment = self.segment_of[place]
        if segment < 0:
            return None
        with safe_open(self.segments[segment], framework="pt") as file:
            return {name: file.get_tensor(f"{name}.{place}") for name in self._names()}

    def empty_caption(self, device: torch.device) -> dict[str, torch.Tensor]:
        """What a record with a dropped caption trains on, in the form the cache keeps captions."""
        if self._empty_caption is None:
            if self.with_text:
                with torch.no_grad():
                    embedding = self.text_encoder(self.empty_ids[None].to(device), return_dict=False)[0][0]
                self._empty_caption = {"text_embeddings": embedding.cpu()}
            else:
                self._empty_caption = {"input_ids": self.empty_ids}
        return self._empty_caption

    def encode(self, item: Item, device: torch.device) -> None:
        """Fill in the item's latents (and text embedding) from its pixels, and keep them for the cache;
        unless the cache has them by now (read ahead, the item missed them by a batch or two)."""
        cached = self.get(item.index)
        if cached is not None:
            item.latent_dist, item.text_embeddings = cached["latent_dist"], cached.get("text_embeddings")
            return
        with torch.no_grad():
            pixels = item.pixel_values.to(device, self.vae.dtype)
            tensors = {"latent_dist": self.vae.encode(pixels).latent_dist.parameters.cpu()}
            if self.with_text:
                ids = item.input_ids[None].to(device)
                tensors["text_embeddings"] = self.text_encoder(ids, return_dict=False)[0][0].cpu()
            else:
                tensors["input_ids"] = item.input_ids
        item.latent_dist, item.text_embeddings = tensors["latent_dist"], tensors.get("text_embeddings")
        self._keep(int(self.first_position[item.index]), tensors)

    def _keep(self, place: int, tensors: dict[str, torch.Tensor]) -> None:
        self.pending[place] = tensors
        if len(self.pending) >= SEGMENT_RECORDS:
            self.flush()

    def flush(self) -> None:
        """Write the pending records as one file, named so that the same name always holds the same records."""
        if not self.pending:
            return
        places = sorted(self.pending)
        tensors = {f"{name}.{place}": t.contiguous() for place, row in self.pending.items() for name, t in row.items()}
        path = self.folder / f"seg-{places[0]}-{places[-1]}-{digest(places)}.safetensors"
        with atomic.replacing(path) as temporary:
            save_file(tensors, temporary, metadata={"places": json.dumps(places)})
        self._add(path, places)
        self.pending = {}

    def _names(self) -> tuple[str, ...]:
        return ("latent_dist", "text_embeddings") if self.with_text else ("latent_dist", "input_ids")
