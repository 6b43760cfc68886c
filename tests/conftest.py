"""Shared fixtures: one tiny PAI-shaped model per test session, and ways to run the real entrypoints."""

from __future__ import annotations

import json
import logging
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
from PIL import Image

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# Before torch loads OpenMP: idle threads sleep instead of spinning, or on a busy machine (CI, shared
# cores) they starve each other and a test runs ten times slower. Numerics are unchanged.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
# Compiled code goes to a folder of the session's, not to the machine's HF_HOME.
os.environ.setdefault("COMPILE_CACHE_DIR", tempfile.mkdtemp(prefix="pai-diffusion-compile-"))

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "tests"))

from object_store import seaweedfs  # noqa: E402
from tiny_dataset import write_dataset  # noqa: E402
from tiny_model import build  # noqa: E402


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A PAI-shaped pipeline folder with random weights; treat it as read-only."""
    return build(tmp_path_factory.mktemp("model") / "pai-tiny")


@pytest.fixture
def unloadable_model(tmp_path_factory, tiny_model):
    """Passes the up-front model check (model_index.json, and the configs that give its size) but has
    no weights: a job that gets to loading it fails with another error, so exit 2 with our message
    proves the input was checked first."""
    folder = tmp_path_factory.mktemp("model") / "broken"
    for component in ("unet", "vae"):
        (folder / component).mkdir(parents=True)
        shutil.copy(tiny_model / component / "config.json", folder / component)
    (folder / "model_index.json").write_text("{}")
    return folder


@pytest.fixture(autouse=True)
def log_handlers_of_their_own():
    """A job sets up logging on the stderr of its test; the next test's stderr is another stream."""
    yield
    logging.getLogger().handlers.clear()


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


def start(command: list[str], log: Path, env: dict[str, object] | None = None) -> subprocess.Popen:
    """Start a command in a fresh process, its stderr to `log` (for kills mid-run)."""
    return subprocess.Popen(
        command,
        cwd=REPO,
        env={**os.environ, **{k: str(v) for k, v in (env or {}).items()}},
        stdout=subprocess.DEVNULL,
        stderr=log.open("w"),
        text=True,
    )


def wait_for(condition, process: subprocess.Popen, timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert process.poll() is None, "the run ended before it could be interrupted"
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.05)


def resumed_from(log: str) -> int:
    (line,) = [json.loads(line) for line in log.splitlines() if '"message": "resuming"' in line]
    return line["step"]


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


@pytest.fixture(scope="session")
def object_store(tmp_path_factory: pytest.TempPathFactory):
    """A real S3 server on 127.0.0.1 (tests/object_store.py) with a bucket `data`, for the session;
    the standard AWS variables that reach it."""
    with seaweedfs(tmp_path_factory.mktemp("seaweedfs"), bucket="data") as env:
        yield env
