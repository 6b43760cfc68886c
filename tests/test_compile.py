"""COMPILE: the jobs compile the UNet and give what the eager jobs give, within float rounding; a new
pod compiles from the compile cache; COMPILE=auto compiles only when the work ahead pays for it.

Compiling is slow on a CPU, so each job is compiled as few times as the checks allow.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import run_process, training_flags
from PIL import Image
from safetensors.torch import load_file
from tiny_dataset import write_dataset


@pytest.fixture
def compiled_graphs():
    """How many graphs torch compiled during the test; the compiler is reset afterwards."""
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    before = counters["stats"]["unique_graphs"]  # the counter runs on across tests
    yield lambda: counters["stats"]["unique_graphs"] - before
    torch._dynamo.reset()


def lora_run(cli, model: Path, data: Path, output: Path, *flags: str, **env: object) -> None:
    args = training_flags(
        data, output, train_batch_size=2, max_train_steps=2, checkpointing_steps=1, learning_rate="1e-3", seed=0,
        lr_warmup_steps=0, gradient_checkpointing=True, no_save_merged=True,
    )  # fmt: skip
    args += flags
    assert cli("lora", *args, MODEL_NAME=model, **env) == 0


def losses(output: Path) -> list[float]:
    return [loss for _, loss in json.loads((output / "trainer_state.json").read_text())["loss_history"]]


def test_compiled_lora_trains_like_eager_and_checkpoints_the_same_keys(tiny_model, tmp_path, cli, compiled_graphs):
    """On two aspect buckets, one batch each: a static graph for every input the transformer blocks see."""
    data = write_dataset(tmp_path / "data", count=4, sizes=((40, 24), (32, 32)))
    buckets = ("--aspect_buckets", "--bucket_reso_steps", "8")
    lora_run(cli, tiny_model, data, tmp_path / "eager", *buckets)
    assert compiled_graphs() == 0
    lora_run(cli, tiny_model, data, tmp_path / "compiled", *buckets, COMPILE="true")
    assert compiled_graphs() == 2 * 3  # at both sizes, the first level's with and without gradients, the mid block's

    eager_losses, compiled_losses = (losses(tmp_path / run) for run in ("eager", "compiled"))
    assert compiled_losses == pytest.approx(eager_losses, rel=1e-4)
    for file in ("pytorch_lora_weights.safetensors", "checkpoint-1/trainable_0.safetensors"):
        eager, compiled = (load_file(tmp_path / run / file) for run in ("eager", "compiled"))
        assert compiled.keys() == eager.keys(), file  # no `_orig_mod.`: a compiled run resumes an eager one's
        for key in eager:
            torch.testing.assert_close(compiled[key], eager[key], rtol=1e-3, atol=1e-5)


def test_compiled_generate_renders_like_eager_and_a_new_pod_compiles_from_the_cache(tiny_model, tmp_path, cli):
    """Each run a fresh process, as a new pod is; the two compiled runs share COMPILE_CACHE_DIR, as
    pods share the model-cache volume."""
    settings = {"MODEL_NAME": tiny_model, "PROMPT": "一只红色的猫", "NUM_INFERENCE_STEPS": 2, "DTYPE": "fp32"}
    assert cli("generate", OUTPUT_DIR=tmp_path / "eager", **settings) == 0
    shared = tmp_path / "compile-cache"
    logs = {}
    for run in ("cold", "warm"):
        env = {**settings, "OUTPUT_DIR": tmp_path / run, "COMPILE": "true", "COMPILE_CACHE_DIR": shared}
        done = run_process([sys.executable, "-m", "jobs.generate"], env=env, timeout=600)
        assert done.returncode == 0, done.stderr[-3000:]
        logs[run] = next(json.loads(line) for line in done.stderr.splitlines() if '"message": "compile"' in line)
    assert (logs["cold"]["warm"], logs["warm"]["warm"]) == (False, True)
    (cache,) = shared.glob("*.tar.gz")
    assert logs["cold"]["cache"] == logs["warm"]["cache"] == str(cache)

    (eager,) = (tmp_path / "eager").glob("*.png")
    for run in ("cold", "warm"):
        (compiled,) = (tmp_path / run).glob("*.png")
        difference = np.abs(np.asarray(Image.open(eager), int) - np.asarray(Image.open(compiled), int))
        assert difference.max() <= 2, run


def test_a_damaged_cache_file_is_ignored_with_a_warning(tmp_path, caplog, monkeypatch):
    from jobs.compiling import CompileCache

    key = {"kind": "inference", "model": "m"}
    first = CompileCache.for_key(tmp_path, key)
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", "unchanged")  # restored after the test
    first.use()
    Path(first.folder.name, "fxgraph").mkdir()
    Path(first.folder.name, "fxgraph", "entry").write_bytes(b"compiled")
    first.save()
    assert first.warm
    damaged = first.path.read_bytes()
    first.path.write_bytes(damaged[: len(damaged) // 2])  # cut short, as by a full disk

    again = CompileCache.for_key(tmp_path, key)
    assert again.path == first.path and again.warm
    again.use()
    assert "ignoring a compile cache file" in caplog.text
    assert not any(Path(again.folder.name).iterdir())  # nothing half unpacked is left for inductor
    again.save()  # nothing compiled yet: the damaged file stays until there is something to write
    Path(again.folder.name, "entry").write_bytes(b"compiled again")
    again.save()
    third = CompileCache.for_key(tmp_path, key)
    third.use()
    assert Path(third.folder.name, "entry").read_bytes() == b"compiled again"
    assert CompileCache.for_key(tmp_path, {**key, "dtype": "bf16"}).path != first.path  # another key, another file


@pytest.mark.parametrize(
    ("setting", "passes", "kind", "device", "warm", "widest", "sizes", "compiles"),
    [
        ("auto", 100, "inference", "cpu", False, 256, 1, False),  # a few images: the compile costs more than it saves
        ("auto", 5000, "inference", "cpu", False, 256, 1, True),  # a night's shard
        ("auto", 500, "inference", "cpu", False, 256, 1, False),
        ("auto", 500, "inference", "cpu", True, 256, 1, True),  # the same with the shapes in the cache already
        ("auto", 200, "training", "cpu", True, 256, 1, True),
        ("auto", 200, "training", "cpu", True, 256, 6, False),  # but six aspect buckets, each compiled on its own
        ("auto", 10**6, "inference", "cpu", True, 1280, 1, False),  # SD 1.x's UNet, which compiling does not speed up
        ("auto", 10**6, "training", "cpu", True, 1280, 1, False),
        ("auto", 10**6, "inference", "cuda", True, 1280, 1, True),  # but on a GPU it does
        ("true", 1, "inference", "cpu", False, 1280, 1, True),
        ("false", 10**6, "inference", "cuda", True, 1280, 1, False),
        ("auto", 10**6, "inference", "mps", False, 256, 1, False),
    ],
)
def test_compile_auto_compiles_when_the_work_ahead_pays(setting, passes, kind, device, warm, widest, sizes, compiles):
    from jobs.compiling import decide

    decided, why = decide(setting, passes, kind, torch.device(device), warm, widest, sizes)
    assert decided == compiles and why.startswith(f"COMPILE={setting}")


def test_a_short_run_does_not_compile_by_default(tiny_model, tmp_path, cli, capfd, compiled_graphs):
    out = tmp_path / "out"
    assert cli("generate", MODEL_NAME=tiny_model, PROMPT="一只猫", OUTPUT_DIR=out, NUM_INFERENCE_STEPS=2) == 0
    assert compiled_graphs() == 0
    line = next(json.loads(line) for line in capfd.readouterr().err.splitlines() if "no compile" in line)
    assert "COMPILE=auto: 2 UNet passes ahead, compiling pays only from 900 with an empty cache" == line["why"]
