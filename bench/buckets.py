"""What --aspect_buckets costs at scale: reading every image's size before the first step, and
planning an epoch's batches of one bucket each.

1. The size scan of N captioned JPEGs (`aspect_buckets`, in this process), alternating rounds:
   tar shards read whole (every record's header opened; the baseline), parquet shards' width and
   height columns (what `pack --format parquet` writes), both local and from a SeaweedFS S3
   endpoint on 127.0.0.1, and a rerun, which loads the sizes kept in OUTPUT_DIR.
2. The batch plan of R records in 1,000 shards, batch 16, 8 processes: computing an epoch's order
   (no buckets; the baseline) against cutting it into one-bucket batches, and the bytes each keeps.

    python bench/buckets.py                       # 20,000 images, 1,000,000 records, 6-7 minutes
    python bench/buckets.py --images 2000 --records 100000
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from data import make_dataset
from harness import REPO, mean

from jobs.buckets import aspect_buckets
from jobs.config import LoraConfig, PackConfig
from jobs.data import BatchPlan
from jobs.packing import pack
from jobs.sources import open_source

sys.path.insert(0, str(REPO / "tests"))

from object_store import seaweedfs  # noqa: E402

PLAN_BUCKETS = 9  # a photo collection's spread: most images 4:3, 3:4 and square, a tail of the rest
PLAN_SHARES = [0.02, 0.04, 0.2, 0.06, 0.3, 0.06, 0.26, 0.04, 0.02]


def size_scan(work: Path, s3: dict[str, str], images: int, rounds: int) -> None:
    folder = make_dataset(work / "images", images)
    locations = {"local": str(work / "shards"), "s3": "s3://data/shards"}
    os.environ.update(s3)
    for root in locations.values():
        for format in ("webdataset", "parquet"):
            output = f"{root}-{'tar' if format == 'webdataset' else format}"
            pack(PackConfig(train_data_dir=str(folder), output_dir=output, shard_size=1000, format=format))
    contenders = {f"tar, {where}: every header": f"{root}-tar" for where, root in locations.items()} | {
        f"parquet, {where}: width and height": f"{root}-parquet" for where, root in locations.items()
    }
    sources = {}
    for name, root in contenders.items():
        config = LoraConfig(train_data_dir=root, resolution=512, aspect_buckets=True)
        sources[name] = (config, open_source(config, None))
    sources["a rerun: the kept sizes"] = sources[next(iter(contenders))]
    timings: dict[str, list[float]] = {name: [] for name in sources}
    for round_index in range(rounds):
        order = list(sources) if round_index % 2 == 0 else list(reversed(sources))
        for name in order:
            config, source = sources[name]
            kept = work / "kept" if name.startswith("a rerun") else work / f"round-{round_index}-{len(timings[name])}"
            if name.startswith("a rerun") and not kept.exists():
                aspect_buckets(config, source, kept)
            started = time.perf_counter()
            buckets = aspect_buckets(config, source, kept)
            timings[name].append(time.perf_counter() - started)
            assert sum(buckets.counts()) == images and not buckets.problems
    baseline = mean(next(iter(timings.values())))
    print(f"\nthe size scan of {images} JPEGs (256x192) in shards of 1000, {rounds} round(s), {os.cpu_count()} CPUs")
    for name, seconds in timings.items():
        rate = images / mean(seconds)
        print(f"{name:<36} {mean(seconds):>8.3f} s {baseline / mean(seconds):>8.2f}x {rate:>12.0f} records/s")


def batch_plan(records: int, rounds: int) -> None:
    sizes = [records // 1000] * 1000
    rng = np.random.default_rng(0)
    of_record = rng.choice(PLAN_BUCKETS, records, p=PLAN_SHARES).astype(np.int16)
    contenders = {"an epoch's order (no buckets)": None, "an epoch of one-bucket batches": of_record}
    timings: dict[str, list[float]] = {name: [] for name in contenders}
    kept: dict[str, int] = {}
    for round_index in range(rounds):
        order = list(contenders) if round_index % 2 == 0 else list(reversed(contenders))
        for name in order:
            plan = BatchPlan(sizes, 16, seed=round_index, rank=0, world_size=8, buckets=contenders[name])
            started = time.perf_counter()
            plan.batch(0)
            timings[name].append(time.perf_counter() - started)
            kept[name] = sum(a.nbytes for a in [*plan._orders.values(), *plan._batches.values()])
    baseline = mean(next(iter(timings.values())))
    print(f"\nthe batch plan of {records} records, batch 16, 8 processes, {rounds} round(s)")
    for name, seconds in timings.items():
        per_record = kept[name] / records
        ratio = baseline / mean(seconds)
        print(f"{name:<36} {mean(seconds):>8.3f} s {ratio:>8.2f}x {per_record:>6.0f} B a record kept an epoch")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=20_000)
    parser.add_argument("--records", type=int, default=1_000_000)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="bench-buckets-") as folder:
        work = Path(folder)
        (work / "s3").mkdir()
        with seaweedfs(work / "s3", bucket="data") as s3:
            size_scan(work, s3, args.images, args.rounds)
        batch_plan(args.records, args.rounds)


if __name__ == "__main__":
    main()
