"""Shared fixtures: one tiny PAI-shaped model per test session, and ways to run the real entrypoints."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# Before torch loads OpenMP: idle threads sleep instead of spinning, or on a busy machine (CI, shared
# cores) they starve each other and a test runs ten times slower. Numerics are unchanged.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "tests"))

from tiny_dataset import write_dataset  # noqa: E402
from tiny_model import build  # noqa: E402


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A PAI-shaped pipeline folder with random weights; treat it as read-only."""
    return build(tmp_path_factory.mktemp("model") / "pai-tiny")


@pytest.fixture(scope="session")
def dataset(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Five captioned images in the seed's layout (folder/train/metadata.jsonl); treat it as read-only."""
    return write_dataset(tmp_path_factory.mktemp("dataset") / "folder")


def training_flags(data: Path, output: Path, **options: object) -> list[str]:
    """The flags of a short training run on the tiny model: its data and output, 32 px, and `options`
    as flags (`rank=8` is `--rank 8`, `no_save_merged=True` the bare `--no_save_merged`)."""
    flags = ["--train_data_dir", str(data), "--output_dir", str(output), "--resolution", "32"]
    for name, value in options.items():
        flags += [f"--{name}"] if value is True else [f"--{name}", str(value)]
    return flags


@pytest.fixture
def cli(monkeypatch: pytest.MonkeyPatch):
    """Run `pai-diffusion JOB ...` in this process (diffusers is imported once) with extra env vars."""
    from accelerate.state import AcceleratorState

    from jobs.cli import main

    def run(*args: str, **env: object) -> int:
        with monkeypatch.context() as patch:
            for name, value in env.items():
                patch.setenv(name, str(value))
            try:
                return main([str(a) for a in args])
            finally:
                # A job is one process; here the next one may train in another mixed precision,
                # which accelerate's process-wide state refuses (as accelerate's own tests, reset it).
                AcceleratorState._reset_state()

    return run


def run_process(args: list[str], env: dict[str, object] | None = None, **kwargs) -> subprocess.CompletedProcess:
    """Run a command in a fresh process (for signals, kills and `accelerate launch`)."""
    full_env = {**os.environ, **{k: str(v) for k, v in (env or {}).items()}}
    return subprocess.run(args, env=full_env, cwd=REPO, capture_output=True, text=True, **kwargs)


def manifest_records(folder: Path) -> list[dict]:
    """Every image record of every shard manifest in `folder` (skipped-record entries left out)."""
    records = []
    for manifest in sorted(folder.glob("manifest-*.jsonl")):
        lines = manifest.read_text(encoding="utf-8").splitlines()
        records += [r for r in map(json.loads, lines) if "skipped" not in r]
    return records


def pixels(path: Path) -> bytes:
    """An image's decoded RGB pixels, to compare images exactly whatever their PNG metadata."""
    with Image.open(path) as image:
        return image.convert("RGB").tobytes()
