"""Write small captioned-image datasets in the seed's layout (`folder/train/metadata.jsonl`), for training tests."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from PIL import Image

CAPTIONS = ["一只红色的猫", "蓝色的大海和白云", "绿色的森林", "黄色的花朵", "夜晚的城市灯光", "山上的雪"]


def write_dataset(folder: Path, count: int = 5, sizes: tuple[tuple[int, int], ...] = ((48, 40),)) -> Path:
    """`count` random RGB images (not square, so crops matter; of `sizes` in turn) with Chinese
    captions; returns `folder`."""
    train = folder / "train"
    train.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    lines = []
    for i in range(count):
        width, height = sizes[i % len(sizes)]
        pixels = rng.integers(0, 256, (height, width, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(train / f"{i:03d}.png")
        lines.append(json.dumps({"file_name": f"{i:03d}.png", "text": CAPTIONS[i % len(CAPTIONS)]}, ensure_ascii=False))
    (train / "metadata.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")
    return folder
