"""Any training source into WebDataset or parquet shards (jobs/packing.py) that TRAIN_DIR then reads.

TRAIN_DIR=data/folder OUTPUT_DIR=s3://bucket/shards pai-diffusion pack [--format parquet] [--shard_size 1000]
"""

if __name__ == "__main__":
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a file too: `python jobs/pack.py`
    from jobs.cli import main

    sys.exit(main(["pack", *sys.argv[1:]]))
