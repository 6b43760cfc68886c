"""`generate` end to end on the tiny PAI-shaped model: files, manifests, seeds, shards, restarts."""

from __future__ import annotations

import json
import os
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import REPO, manifest_records, pixels
from PIL import Image

PROMPTS = (REPO / "tests" / "data" / "prompts.txt").read_text(encoding="utf-8").split()
FAST = {"NUM_INFERENCE_STEPS": 2}


def write_jsonl(path: Path, records: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records), encoding="utf-8")
    return path


def images_by_id(folder: Path) -> dict[str, bytes]:
    return {path.stem: pixels(path) for path in sorted(folder.glob("*.png"))}


def test_chinese_prompts_tokenize_without_unknown_tokens(tiny_model):
    from diffusers import StableDiffusionPipeline

    from jobs.config import GenerateConfig, load
    from jobs.models import load_pipeline

    config = load(GenerateConfig, ["--prompt", "x"], {"MODEL_NAME": str(tiny_model)})
    pipe = load_pipeline(config, StableDiffusionPipeline, torch.device("cpu"), torch.float32)
    assert type(pipe.tokenizer).__name__ == "BertTokenizer"
    for prompt in PROMPTS:
        ids = pipe.tokenizer(prompt).input_ids
        assert pipe.tokenizer.unk_token_id not in ids, prompt
        assert len(ids) > 5


def test_n_prompts_by_m_images_give_n_times_m_files_and_records(cli, tiny_model, tmp_path):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("\n".join(PROMPTS[:3]) + "\n\n", encoding="utf-8")  # a blank line is not a prompt
    out = tmp_path / "out"
    code = cli("generate", MODEL_NAME=tiny_model, PROMPTS_FILE=prompts, OUTPUT_DIR=out, NUM_IMAGES_PER_PROMPT=2, **FAST)
    assert code == 0
    records = manifest_records(out)
    assert sorted(r["file"] for r in records) == sorted(p.name for p in out.glob("*.png"))
    assert len(records) == 6
    assert {r["prompt"] for r in records} == set(PROMPTS[:3])
    assert len({r["seed"] for r in records}) == 6
    record = records[0]
    assert record["steps"] == 2 and record["scheduler"] == "dpm++" and record["model"] == str(tiny_model)
    assert (record["width"], record["height"]) == (32, 32)  # the UNet's sample size x the VAE factor
    with Image.open(out / record["file"]) as image:
        assert json.loads(image.text["pai-diffusion"]) == record
    gallery = (out / "index.html").read_text(encoding="utf-8")
    assert gallery.count("<figure>") == 6 and PROMPTS[0] in gallery

    # A rerun finds everything done: it renders nothing and loads no model.
    before = {p.name: p.stat().st_mtime_ns for p in out.glob("*.png")}
    code = cli("generate", MODEL_NAME=tiny_model, PROMPTS_FILE=prompts, OUTPUT_DIR=out, NUM_IMAGES_PER_PROMPT=2, **FAST)
    assert code == 0
    assert {p.name: p.stat().st_mtime_ns for p in out.glob("*.png")} == before
    assert len(manifest_records(out)) == 6


def test_same_pixels_whatever_the_batch_size_and_shard_layout(cli, tiny_model, tmp_path):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("\n".join(PROMPTS[:5]), encoding="utf-8")
    common = dict(MODEL_NAME=tiny_model, PROMPTS_FILE=prompts, SEED=7, **FAST)
    assert cli("generate", OUTPUT_DIR=tmp_path / "one", BATCH_SIZE=1, **common) == 0
    for shard in range(3):
        code = cli("generate", OUTPUT_DIR=tmp_path / "three", BATCH_SIZE=2, NUM_SHARDS=3, SHARD_INDEX=shard, **common)
        assert code == 0
    single, sharded = images_by_id(tmp_path / "one"), images_by_id(tmp_path / "three")
    assert len(single) == 5
    assert single == sharded
    # Shards are disjoint and complete: every item is in exactly one shard's manifest.
    per_shard = [
        {json.loads(line)["id"] for line in (tmp_path / "three" / f"manifest-{k:05d}.jsonl").read_text().splitlines()}
        for k in range(3)
    ]
    assert sum(len(ids) for ids in per_shard) == 5 and set().union(*per_shard) == set(single)
    # Different prompts (and seeds) give different images.
    assert len(set(single.values())) == 5


def test_shard_index_defaults_to_the_indexed_job_completion_index(cli, tiny_model, tmp_path):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("\n".join(PROMPTS[:4]), encoding="utf-8")
    out = tmp_path / "out"
    code = cli(
        "generate",
        MODEL_NAME=tiny_model,
        PROMPTS_FILE=prompts,
        OUTPUT_DIR=out,
        NUM_SHARDS=2,
        JOB_COMPLETION_INDEX=1,
        **FAST,
    )
    assert code == 0
    assert sorted(r["id"] for r in manifest_records(out)) == ["00002-0", "00004-0"]  # items 1 and 3


def test_a_new_shard_layout_renders_only_what_is_missing(cli, tiny_model, tmp_path):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("\n".join(PROMPTS[:4]), encoding="utf-8")
    out = tmp_path / "out"
    common = dict(MODEL_NAME=tiny_model, PROMPTS_FILE=prompts, OUTPUT_DIR=out, **FAST)
    assert cli("generate", NUM_SHARDS=2, SHARD_INDEX=1, **common) == 0
    first = {p.name: p.stat().st_mtime_ns for p in out.glob("*.png")}
    assert len(first) == 2
    assert cli("generate", NUM_SHARDS=3, SHARD_INDEX=0, **common) == 0
    assert cli("generate", **common) == 0
    assert {
        name: mtime for name, mtime in ((p.name, p.stat().st_mtime_ns) for p in out.glob("*.png")) if name in first
    } == first
    ids = [r["id"] for r in manifest_records(out)]
    assert sorted(ids) == ["00001-0", "00002-0", "00003-0", "00004-0"]


def test_record_fields_override_the_job_defaults(cli, tiny_model, tmp_path):
    records = [
        {
            "prompt": PROMPTS[0],
            "seed": 42,
            "num_images": 2,
            "guidance_scale": 3.0,
            "negative_prompt": "模糊",
            "id": "cat",
        },
        {"prompt": PROMPTS[1]},
    ]
    out = tmp_path / "out"
    code = cli(
        "generate",
        MODEL_NAME=tiny_model,
        PROMPTS_FILE=write_jsonl(tmp_path / "p.jsonl", records),
        OUTPUT_DIR=out,
        **FAST,
    )
    assert code == 0
    by_id = {r["id"]: r for r in manifest_records(out)}
    assert sorted(by_id) == ["00002-0", "cat-0", "cat-1"]
    assert (by_id["cat-0"]["seed"], by_id["cat-1"]["seed"]) == (42, 43)
    assert by_id["cat-0"]["guidance_scale"] == 3.0 and by_id["cat-0"]["negative_prompt"] == "模糊"
    assert by_id["00002-0"]["guidance_scale"] == 7.5 and by_id["00002-0"]["negative_prompt"] is None


def test_yaml_prompts_file(cli, tiny_model, tmp_path):
    prompts = tmp_path / "prompts.yaml"
    prompts.write_text(f"- {PROMPTS[0]}\n- prompt: {PROMPTS[1]}\n  seed: 5\n", encoding="utf-8")
    out = tmp_path / "out"
    assert cli("generate", MODEL_NAME=tiny_model, PROMPTS_FILE=prompts, OUTPUT_DIR=out, **FAST) == 0
    assert sorted((r["id"], r["prompt"]) for r in manifest_records(out)) == [
        ("00001-0", PROMPTS[0]),
        ("00002-0", PROMPTS[1]),
    ]


def test_gallery_escapes_prompts(cli, tiny_model, tmp_path):
    out = tmp_path / "out"
    assert cli("generate", MODEL_NAME=tiny_model, PROMPT='<script>alert("猫")</script>', OUTPUT_DIR=out, **FAST) == 0
    gallery = (out / "index.html").read_text(encoding="utf-8")
    assert "<script>" not in gallery and "&lt;script&gt;" in gallery


def test_seed_snippet_works_and_pndm_with_50_steps_reproduces_it(cli, tiny_model, tmp_path, monkeypatch):
    """The seed document's text-to-image snippet as written (model id, device and a generator aside)
    runs on the PAI-shaped model, and our job with SCHEDULER=pndm, 50 steps and fp32 gives its very pixels."""
    out = tmp_path / "out"
    assert (
        cli(
            "generate",
            MODEL_NAME=tiny_model,
            PROMPT="输入文本",
            OUTPUT_DIR=out,
            SCHEDULER="pndm",
            NUM_INFERENCE_STEPS=50,
            DTYPE="fp32",  # the snippet's precision; `auto` is bf16 on CPUs with bf16 instructions
        )
        == 0
    )
    (record,) = manifest_records(out)
    monkeypatch.chdir(tmp_path)
    from diffusers import StableDiffusionPipeline

    model_id = str(tiny_model)
    pipe = StableDiffusionPipeline.from_pretrained(model_id)
    pipe = pipe.to("cpu")
    prompt = "输入文本"
    image = pipe(prompt, generator=torch.Generator().manual_seed(record["seed"])).images[0]
    image.save("result.png")
    assert pixels(tmp_path / "result.png") == pixels(out / record["file"])


def test_dtype_auto_is_the_cpus_native_half_precision_and_is_recorded(cli, tiny_model, tmp_path):
    """On a CPU `auto` renders in bf16 where it has bf16 instructions, else fp32; each record says which."""
    from jobs.models import cpu_has_native_bf16

    rendered = {}
    for dtype in ("auto", "bf16", "fp32"):
        out = tmp_path / dtype
        assert cli("generate", MODEL_NAME=tiny_model, PROMPT=PROMPTS[0], OUTPUT_DIR=out, DTYPE=dtype, **FAST) == 0
        (record,) = manifest_records(out)
        rendered[dtype] = (record["dtype"], pixels(out / record["file"]))
    assert rendered["bf16"][0] == "bfloat16" and rendered["fp32"][0] == "float32"
    assert rendered["auto"] == rendered["bf16" if cpu_has_native_bf16() else "fp32"]
    assert rendered["bf16"][1] != rendered["fp32"][1]


@pytest.mark.parametrize("native_bf16", [True, False])
def test_dtype_auto_follows_the_hardware(monkeypatch, native_bf16):
    from jobs import models
    from jobs.errors import BadInput

    monkeypatch.setattr(models, "cpu_has_native_bf16", lambda: native_bf16)
    cpu = torch.device("cpu")
    assert models.resolve_dtype("auto", cpu) == (torch.bfloat16 if native_bf16 else torch.float32)
    assert models.resolve_dtype("auto", torch.device("cuda")) == torch.float16
    assert models.resolve_dtype("fp32", cpu) == torch.float32
    with pytest.raises(BadInput, match="needs a GPU"):
        models.resolve_dtype("fp16", cpu)


def test_batched_forward_pass_keeps_items_in_order(tiny_model):
    """The GPU path: a short batch is padded to BATCH_SIZE, each item gets back its own image, and the VAE
    decodes one image at a time. (Bit-exactness is not asserted here: on a CPU, BLAS rounds batched rows
    differently, which is why CPUs render one at a time.)"""
    from jobs import models
    from jobs.config import GenerateConfig, load
    from jobs.identity import RunRequest
    from jobs.inference import TEXT_TO_IMAGE, prepare_pipeline, render
    from jobs.prompts import WorkItem

    env = {"MODEL_NAME": str(tiny_model), "SCHEDULER": "pndm", "DTYPE": "fp32"}
    config = load(GenerateConfig, ["--prompt", "x"], env)
    pipe, settings = prepare_pipeline(config, TEXT_TO_IMAGE, RunRequest.of(config, []), [])
    models.set_scheduler(pipe, "pndm")
    decoded_batches = []
    pipe.vae.decoder.register_forward_hook(lambda module, args, output: decoded_batches.append(len(args[0])))
    items = [
        WorkItem(
            f"{k}", prompt, None, seed=k, guidance_scale=7.5, steps=2, scheduler="pndm", width=32, height=32, image=None
        )
        for k, prompt in enumerate(PROMPTS[:2])
    ]
    batched, _ = render(pipe, items, settings, batch_size=3)
    assert decoded_batches == [1, 1, 1]
    alone = [render(pipe, [item], settings, batch_size=1)[0][0] for item in items]
    assert len(batched) == 2
    for together, single in zip(batched, alone, strict=True):
        difference = np.abs(np.asarray(together, dtype=int) - np.asarray(single, dtype=int))
        assert difference.max() <= 2, "a batched image must be its own item's image, not a neighbour's"
    assert np.abs(np.asarray(batched[0], dtype=int) - np.asarray(alone[1], dtype=int)).max() > 2


@pytest.mark.parametrize(("stop", "exit_code"), [(signal.SIGKILL, -signal.SIGKILL), (signal.SIGTERM, 143)])
def test_killed_mid_run_and_rerun_gives_every_image_exactly_once(cli, tiny_model, tmp_path, stop, exit_code):
    """Kill a real process while it renders (SIGKILL; SIGTERM exits 143), rerun: nothing lost or twice."""
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("\n".join(PROMPTS[:5]), encoding="utf-8")
    out = tmp_path / "out"
    settings = dict(MODEL_NAME=tiny_model, PROMPTS_FILE=prompts, OUTPUT_DIR=out, NUM_IMAGES_PER_PROMPT=2, **FAST)
    env = {**os.environ, **{name: str(value) for name, value in settings.items()}}
    command = [sys.executable, "-m", "jobs.generate"]
    process = subprocess.Popen(command, env=env, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    while len(list(out.glob("*.png"))) < 2 and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.005)
    process.send_signal(stop)
    process.wait()
    assert process.returncode == exit_code
    assert 2 <= len(list(out.glob("*.png"))) < 10, "the kill must land mid-run"

    assert cli("generate", **settings) == 0
    ids = [record["id"] for record in manifest_records(out)]
    assert len(ids) == len(set(ids)) == 10
    assert sorted(f"{i}.png" for i in ids) == sorted(p.name for p in out.glob("*.png"))
    umask = os.umask(0)
    os.umask(umask)
    for path in out.glob("*.png"):
        with Image.open(path) as image:
            image.load()
        assert stat.S_IMODE(path.stat().st_mode) == 0o666 & ~umask  # readable as a plain open() would leave it
    assert not list(out.glob(".*.tmp"))


@pytest.mark.parametrize("cut", ["torn manifest line", "png without manifest line"])
def test_restart_repairs_what_a_kill_between_writes_leaves(cli, tiny_model, tmp_path, cut):
    """The two states a kill can leave between the PNG rename and the manifest append."""
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("\n".join(PROMPTS[:3]), encoding="utf-8")
    out = tmp_path / "out"
    common = dict(MODEL_NAME=tiny_model, PROMPTS_FILE=prompts, OUTPUT_DIR=out, **FAST)
    assert cli("generate", **common) == 0
    manifest = out / "manifest-00000.jsonl"
    lines = manifest.read_text(encoding="utf-8").splitlines(keepends=True)
    before = {p.name: p.stat().st_mtime_ns for p in out.glob("*.png")}
    kept = "".join(lines[:2]) + (lines[2][:25] if cut == "torn manifest line" else "")
    manifest.write_text(kept, encoding="utf-8")

    assert cli("generate", **common) == 0
    assert {p.name: p.stat().st_mtime_ns for p in out.glob("*.png")} == before  # recovered, not re-rendered
    assert [json.loads(line) for line in lines] == [json.loads(line) for line in manifest.read_text().splitlines()]
