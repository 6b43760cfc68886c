"""Training data: captioned images from a metadata.jsonl folder or a `datasets` dataset.

The whole dataset is checked before any model is loaded, and every problem is reported at once
with its line number, because a bad record found after an hour of training wastes the hour.

Randomness is derived from (seed, epoch, index) rather than drawn from a global generator: a
resumed run then crops, flips and orders every example exactly as the interrupted run would
have, without reading the batches it skips.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from safetensors.torch import load_file, save_file

from jobs import atomic
from jobs.config import TrainConfig
from jobs.errors import BadInput

log = logging.getLogger("jobs")

METADATA = "metadata.jsonl"


@dataclass
class Examples:
    """The training examples: one caption each, and how to open each one's image."""

    captions: list[str]
    open_image: Callable[[int], Image.Image]
    fingerprint: str  # identifies the content, for the latent cache key

    def __len__(self) -> int:
        return len(self.captions)

    def subset(self, indices: list[int]) -> Examples:
        chosen = list(indices)
        return Examples(
            captions=[self.captions[i] for i in chosen],
            open_image=lambda i: self.open_image(chosen[i]),
            fingerprint=_digest(self.fingerprint, chosen),
        )


def load_examples(config: TrainConfig) -> Examples:
    """The examples the config names, checked, and cut to --max_train_samples as upstream does."""
    if config.dataset_name:
        examples = _hub_examples(config)
    else:
        examples = _folder_examples(find_image_folder(config.train_data_dir), config.caption_column)
    if config.max_train_samples and config.max_train_samples < len(examples):
        order = torch.randperm(len(examples), generator=torch.Generator().manual_seed(data_seed(config)))
        examples = examples.subset(order[: config.max_train_samples].tolist())
    return examples


def data_seed(config: TrainConfig) -> int:
    """The seed of data order and augmentation; fixed even without --seed, so a resumed run sees the same data."""
    return config.seed if config.seed is not None else 0


def find_image_folder(path: Path) -> Path:
    """The folder holding metadata.jsonl: `path` itself or, in the seed's layout, `path/train`."""
    for folder in (path, path / "train"):
        if (folder / METADATA).is_file():
            return folder
    raise BadInput(f"TRAIN_DIR {path}: no {METADATA} in it or in {path / 'train'}")


def _folder_examples(folder: Path, caption_column: str) -> Examples:
    metadata = folder / METADATA
    root = folder.resolve()
    files: list[Path] = []
    captions: list[str] = []
    problems: list[str] = []
    for number, raw in enumerate(metadata.read_bytes().splitlines(), start=1):
        problem = None
        try:
            line = raw.decode("utf-8").strip()
            if not line:
                continue
            record = json.loads(line)
            if not isinstance(record, dict):
                raise ValueError("not a JSON object")
        except UnicodeDecodeError:
            problem = "not UTF-8 text"
        except ValueError as error:
            problem = f"malformed JSON ({error})"
        else:
            path, problem = _check_file_name(record.get("file_name"), root)
            caption = record.get(caption_column)
            if problem is None and not (isinstance(caption, str) and caption.strip()):
                problem = f"empty or missing caption {caption_column!r}"
            if problem is None:
                files.append(path)
                captions.append(caption)
        if problem:
            problems.append(f"line {number}: {problem}")
    if not problems and not files:
        problems.append("no records")
    if problems:
        raise BadInput(f"dataset {metadata}: {len(problems)} problem(s)\n  " + "\n  ".join(problems))
    versions = [(str(f), f.stat().st_size, f.stat().st_mtime_ns) for f in files]  # an edited image changes it
    return Examples(captions, lambda i: _open_rgb(files[i]), _digest(versions, captions))


def _check_file_name(name: object, root: Path) -> tuple[Path | None, str | None]:
    """The image a record names, or why it cannot be used (missing, outside the folder, unreadable)."""
    if not isinstance(name, str) or not name:
        return None, "no file_name"
    path = Path(os.path.normpath(root / name))  # lexically: `..` and absolute paths escape, symlinks are fine
    if not path.is_relative_to(root):
        return None, f"file_name {name!r} points outside the dataset folder"
    if not path.is_file():
        return None, f"file_name {name!r}: no such file"
    try:
        with Image.open(path) as image:
            image.load()  # decodes every byte: a truncated file fails here, not mid-training
    except (OSError, Image.DecompressionBombError) as error:
        return None, f"image {name!r} cannot be read ({error})"
    return path, None


def _hub_examples(config: TrainConfig) -> Examples:
    import datasets

    try:
        dataset = datasets.load_dataset(
            config.dataset_name, config.dataset_config_name, cache_dir=config.cache_dir, split="train"
        )
    except (FileNotFoundError, ValueError, datasets.exceptions.DatasetNotFoundError) as error:
        raise BadInput(f"DATASET_NAME {config.dataset_name}: {error}") from None
    for column in (config.image_column, config.caption_column):
        if column not in dataset.column_names:
            raise BadInput(f"dataset {config.dataset_name} has no column {column!r}; it has {dataset.column_names}")
    captions = list(dataset[config.caption_column])
    problems = [
        f"row {number}: empty or missing caption {config.caption_column!r}"
        for number, caption in enumerate(captions, start=1)
        if not (isinstance(caption, str) and caption.strip())
    ]
    if problems:
        raise BadInput(f"dataset {config.dataset_name}: {len(problems)} problem(s)\n  " + "\n  ".join(problems))
    images = dataset.select_columns([config.image_column])
    fingerprint = _digest(config.dataset_name, config.dataset_config_name, dataset._fingerprint)
    return Examples(captions, lambda i: images[i][config.image_column].convert("RGB"), fingerprint)


def _open_rgb(path: Path) -> Image.Image:
    with Image.open(path) as image:
        return image.convert("RGB")


def _digest(*parts: object) -> str:
    return hashlib.sha256(json.dumps(parts, default=str).encode()).hexdigest()[:16]


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


class TrainingSet(torch.utils.data.Dataset):
    """Examples keyed by (epoch, index): pixels and token ids, or their cached encodings."""

    def __init__(self, examples: Examples, transform: ImageTransform, tokenizer, seed: int, cache: LatentCache | None):
        self.examples, self.transform, self.tokenizer, self.seed, self.cache = (
            examples,
            transform,
            tokenizer,
            seed,
            cache,
        )

    def __len__(self) -> int:
        return len(self.examples)

    def __getitem__(self, key: tuple[int, int]) -> dict[str, torch.Tensor]:
        epoch, index = key
        rng = np.random.default_rng((self.seed, epoch, index))
        item = {}
        if self.cache is not None:
            item["latent_dist"] = self.cache.latent_dists[index, int(self.transform.flips(rng))]
        else:
            image = self.transform.crop(self.examples.open_image(index), rng)
            item["pixel_values"] = self.transform.to_tensor(image, self.transform.flips(rng))
        if self.cache is not None and self.cache.text_embeddings is not None:
            item["text_embeddings"] = self.cache.text_embeddings[index]
        else:
            item["input_ids"] = tokenize(self.tokenizer, [self.examples.captions[index]])[0]
        return item


def tokenize(tokenizer, captions: list[str]) -> torch.Tensor:
    """Token ids padded to the tokenizer's own length (32 for the tiny model, 77 for CLIP; PAI says so itself)."""
    return tokenizer(
        captions, max_length=tokenizer.model_max_length, padding="max_length", truncation=True, return_tensors="pt"
    ).input_ids


class BatchPlan:
    """Which examples each micro-batch of the run holds, computable from the batch's number alone.

    Every epoch is a seeded permutation, padded to split evenly across processes (so all take
    the same number of steps and none waits forever), then cut into batches. Resuming at batch
    N asks for batch N directly: nothing before it is read or decoded.
    """

    def __init__(self, size: int, batch_size: int, seed: int, rank: int = 0, world_size: int = 1):
        self.size, self.batch_size, self.seed, self.rank, self.world_size = size, batch_size, seed, rank, world_size
        self.per_process = math.ceil(size / world_size)
        self.batches_per_epoch = math.ceil(self.per_process / batch_size)
        self._order_epoch, self._order = -1, []

    def _epoch_order(self, epoch: int) -> list[int]:
        """This process's share of the epoch's permutation (kept for the epoch's next batches)."""
        if self._order_epoch != epoch:
            order = torch.randperm(self.size, generator=torch.Generator().manual_seed(self.seed + epoch)).tolist()
            padded = (order * self.world_size)[: self.per_process * self.world_size]
            self._order_epoch, self._order = epoch, padded[self.rank :: self.world_size]
        return self._order

    def batch(self, number: int) -> list[tuple[int, int]]:
        epoch, position = divmod(number, self.batches_per_epoch)
        mine = self._epoch_order(epoch)[position * self.batch_size : (position + 1) * self.batch_size]
        return [(epoch, index) for index in mine]

    def batches(self, start: int, stop: int) -> Iterator[list[tuple[int, int]]]:
        return (self.batch(number) for number in range(start, stop))


@dataclass
class LatentCache:
    """VAE latent distributions per example and flip, and text embeddings when the text encoder is frozen."""

    latent_dists: torch.Tensor  # [examples, 2 (as is, flipped), 2 * latent channels, h, w]: mean and log-variance
    text_embeddings: torch.Tensor | None  # [examples, tokens, width]

    @staticmethod
    def key(config: TrainConfig, examples: Examples, with_text: bool) -> str:
        """Changes whenever what is cached would: model, data, resolution, crop, flip, text caching."""
        return _digest(
            config.pretrained_model_name_or_path,
            config.revision,
            config.variant,
            examples.fingerprint,
            config.resolution,
            config.center_crop,
            config.random_flip,
            with_text,
            data_seed(config),
        )

    def tensors(self) -> dict[str, torch.Tensor]:
        found = {"latent_dists": self.latent_dists, "text_embeddings": self.text_embeddings}
        return {name: tensor.contiguous() for name, tensor in found.items() if tensor is not None}

    @classmethod
    def load_or_build(cls, path: Path, encode: ExampleEncoder, accelerator) -> LatentCache:
        """Reuse the file at `path`, or build it: every process encodes its share, the main process joins them.

        Shares keep a big dataset from holding the other GPUs at a barrier until it times out.
        """
        rank, world = accelerator.process_index, accelerator.num_processes
        reused = path.is_file()
        if not reused:
            if accelerator.is_main_process:
                log.info("encoding the dataset once for --cache_latents", extra={"fields": {"cache": str(path)}})
            path.parent.mkdir(parents=True, exist_ok=True)
            parts = [path.with_name(f"{path.stem}.part-{r}-of-{world}") for r in range(world)]
            save_file(encode(range(rank, encode.size, world)).tensors(), parts[rank])
            accelerator.wait_for_everyone()
            if accelerator.is_main_process:
                shares = [load_file(part) for part in parts]
                joined = {}
                for name, first in shares[0].items():  # example i is row i // world of share i % world
                    joined[name] = torch.empty((encode.size, *first.shape[1:]), dtype=first.dtype)
                    for r, share in enumerate(shares):
                        joined[name][r::world] = share[name]
                with atomic.replacing(path) as temporary:
                    save_file(joined, temporary)
                for part in parts:
                    part.unlink()
        accelerator.wait_for_everyone()
        if reused and accelerator.is_main_process:
            log.info("reusing the latent cache", extra={"fields": {"cache": str(path)}})
        tensors = load_file(path)
        return cls(tensors["latent_dists"], tensors.get("text_embeddings"))


class ExampleEncoder:
    """Encodes examples through the VAE (each image and, with --random_flip, its mirror) and the text encoder.

    With random crops the crop is drawn once per image (as epoch 0 would), since a cache holds one.
    """

    def __init__(
        self, examples: Examples, transform: ImageTransform, seed: int, vae, text_encoder, tokenizer, with_text
    ):
        self.examples, self.transform, self.seed, self.with_text = examples, transform, seed, with_text
        self.vae, self.text_encoder, self.tokenizer = vae, text_encoder, tokenizer
        self.size = len(examples)

    @torch.no_grad()
    def __call__(self, indices: range) -> LatentCache:
        flips = [False, True] if self.transform.random_flip else [False]
        latent_dists, text_embeddings = [], []
        for index in indices:
            image = self.transform.crop(self.examples.open_image(index), np.random.default_rng((self.seed, 0, index)))
            pixels = torch.stack([self.transform.to_tensor(image, flip) for flip in flips])
            latent_dists.append(self.vae.encode(pixels.to(self.vae.device, self.vae.dtype)).latent_dist.parameters)
            if self.with_text:
                ids = tokenize(self.tokenizer, [self.examples.captions[index]]).to(self.text_encoder.device)
                text_embeddings.append(self.text_encoder(ids, return_dict=False)[0][0])
        return LatentCache(
            torch.stack(latent_dists).float().cpu(),
            torch.stack(text_embeddings).float().cpu() if self.with_text else None,
        )
