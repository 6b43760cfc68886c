"""Every image matches its request: a rerun renders the new, skips the same, refuses the changed
(exit 2, before the model loads, OUTPUT_DIR untouched) or, with OVERWRITE=true, renders exactly
the changed items again."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from conftest import manifest_records
from PIL import Image

FAST = {"NUM_INFERENCE_STEPS": 2}


def snapshot(folder: Path) -> dict[str, bytes]:
    return {path.name: path.read_bytes() for path in sorted(folder.iterdir())}


def latest_records(folder: Path) -> dict[str, dict]:
    """The record of each image id, the last one where OVERWRITE appended a newer one."""
    return {record["id"]: record for record in manifest_records(folder)}


def error_line(capsys) -> str:
    err = capsys.readouterr().err
    assert "Traceback" not in err
    (line,) = [line for line in err.splitlines() if line.startswith("error:")]
    return line


@pytest.fixture
def model_copy(tiny_model: Path, tmp_path: Path) -> Path:
    """The tiny model in a folder of this test's own, to break after a first run."""
    return Path(shutil.copytree(tiny_model, tmp_path / "model"))


def break_weights(model: Path) -> None:
    """The same folder (so the same request), but a load would now fail: exit 2 proves nothing loaded."""
    (model / "unet" / "diffusion_pytorch_model.safetensors").write_bytes(b"not weights")


def test_runs_with_different_single_prompts_each_keep_their_image(cli, tiny_model, tmp_path):
    out = tmp_path / "out"
    for prompt in ("一只猫", "一条狗", "一只猫"):
        assert cli("generate", MODEL_NAME=tiny_model, PROMPT=prompt, OUTPUT_DIR=out, **FAST) == 0
    records = latest_records(out)
    assert sorted(r["prompt"] for r in records.values()) == ["一只猫", "一条狗"]
    assert len(list(out.glob("*.png"))) == 2
    gallery = (out / "index.html").read_text(encoding="utf-8")
    assert "一只猫" in gallery and "一条狗" in gallery


@pytest.mark.parametrize(
    ("change", "what"),
    [
        ({"NUM_INFERENCE_STEPS": 3}, "steps 2 -> 3"),
        ({"GUIDANCE_SCALE": 5.0}, "guidance_scale 7.5 -> 5.0"),
        ({"WIDTH": 48}, "width 32 -> 48"),
        ({"SCHEDULER": "ddim"}, "scheduler 'dpm++' -> 'ddim'"),
        ({"NEGATIVE_PROMPT": "模糊"}, "negative_prompt None -> '模糊'"),
        ({"SEED": 1}, "seed"),
        ({"REVISION": "v2"}, "revision None -> 'v2'"),
    ],
)
def test_a_changed_run_setting_is_refused_before_the_model_loads(cli, capsys, model_copy, tmp_path, change, what):
    out = tmp_path / "out"
    assert cli("generate", MODEL_NAME=model_copy, PROMPT="一只猫", OUTPUT_DIR=out, **FAST) == 0
    before = snapshot(out)
    break_weights(model_copy)
    capsys.readouterr()
    assert cli("generate", MODEL_NAME=model_copy, PROMPT="一只猫", OUTPUT_DIR=out, **{**FAST, **change}) == 2
    line = error_line(capsys)
    assert "prompt-" in line and what in line and "OVERWRITE=true" in line, line
    assert snapshot(out) == before


def test_overwrite_renders_exactly_the_changed_items_again(cli, tiny_model, tmp_path):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("一只猫\n一条狗\n一只鸟\n", encoding="utf-8")
    out = tmp_path / "out"
    settings = dict(MODEL_NAME=tiny_model, PROMPTS_FILE=prompts, OUTPUT_DIR=out, **FAST)
    assert cli("generate", **settings) == 0
    before = {path.name: path.stat().st_mtime_ns for path in out.glob("*.png")}

    prompts.write_text("一只猫\n一条鱼\n一只鸟\n", encoding="utf-8")  # line 2 edited, as a ConfigMap between retries
    assert cli("generate", **settings) == 2
    assert {path.name: path.stat().st_mtime_ns for path in out.glob("*.png")} == before

    assert cli("generate", OVERWRITE="true", **settings) == 0
    after = {path.name: path.stat().st_mtime_ns for path in out.glob("*.png")}
    assert [name for name in sorted(after) if after[name] != before[name]] == ["00002-0.png"]
    records = latest_records(out)
    assert [records[i]["prompt"] for i in ("00001-0", "00002-0", "00003-0")] == ["一只猫", "一条鱼", "一只鸟"]
    with Image.open(out / "00002-0.png") as image:
        assert json.loads(image.text["pai-diffusion"])["prompt"] == "一条鱼"
    assert "一条鱼" in (out / "index.html").read_text(encoding="utf-8")
    assert "一条狗" not in (out / "index.html").read_text(encoding="utf-8")
    assert cli("generate", **settings) == 0  # now the same request again: nothing to do
    assert {path.name: path.stat().st_mtime_ns for path in out.glob("*.png")} == after


def test_identity_ignores_the_hardware_dtype_and_batch_size(cli, tiny_model, tmp_path, capfd):
    out = tmp_path / "out"
    assert cli("generate", MODEL_NAME=tiny_model, PROMPT="一只猫", OUTPUT_DIR=out, DTYPE="fp32", **FAST) == 0
    before = snapshot(out)
    capfd.readouterr()
    assert (
        cli("generate", MODEL_NAME=tiny_model, PROMPT="一只猫", OUTPUT_DIR=out, DTYPE="bf16", BATCH_SIZE=2, **FAST) == 0
    )
    assert '"to_render": 0' in capfd.readouterr().err
    assert {name: data for name, data in snapshot(out).items() if name.endswith(".png")} == {
        name: data for name, data in before.items() if name.endswith(".png")
    }


def test_an_edited_input_image_is_a_changed_request(cli, capsys, tiny_model, tmp_path):
    inputs = tmp_path / "in"
    inputs.mkdir()
    Image.new("RGB", (32, 32), (200, 30, 30)).save(inputs / "photo.png")
    out = tmp_path / "out"
    settings = dict(MODEL_NAME=tiny_model, INPUT_DIR=inputs, PROMPT="水彩画", OUTPUT_DIR=out, NUM_INFERENCE_STEPS=4)
    assert cli("img2img", **settings) == 0
    Image.new("RGB", (32, 32), (30, 30, 200)).save(inputs / "photo.png")
    capsys.readouterr()
    assert cli("img2img", **settings) == 2
    line = error_line(capsys)
    assert "photo-0" in line and "input_image_sha256" in line
    before = latest_records(out)["photo-0"]["input_image_sha256"]
    assert cli("img2img", OVERWRITE="true", **settings) == 0
    assert latest_records(out)["photo-0"]["input_image_sha256"] != before


def test_a_bom_and_crlf_in_a_prompts_file_are_read_as_editors_mean_them(cli, tiny_model, tmp_path):
    prompts = tmp_path / "prompts.txt"
    prompts.write_bytes("一只猫\r\n一条狗\r\n".encode("utf-8-sig"))
    out = tmp_path / "out"
    assert cli("generate", MODEL_NAME=tiny_model, PROMPTS_FILE=prompts, OUTPUT_DIR=out, **FAST) == 0
    assert sorted(r["prompt"] for r in latest_records(out).values()) == ["一只猫", "一条狗"]


def test_the_gallery_pages_a_large_run(cli, tiny_model, tmp_path):
    from jobs.outputs import Ledger, write_gallery

    prompts = tmp_path / "prompts.txt"
    prompts.write_text("\n".join(f"猫{i}" for i in range(5)), encoding="utf-8")
    out = tmp_path / "out"
    assert cli("generate", MODEL_NAME=tiny_model, PROMPTS_FILE=prompts, OUTPUT_DIR=out, **FAST) == 0
    write_gallery(out, "pages", Ledger(out), per_page=2)
    pages = [out / "index.html", out / "index-2.html", out / "index-3.html"]
    texts = [page.read_text(encoding="utf-8") for page in pages]
    assert [text.count("<figure>") for text in texts] == [2, 2, 1]
    assert 'href="index-2.html"' in texts[0] and 'href="index.html"' in texts[1] and 'href="index-3.html"' in texts[1]
    assert not (out / "index-4.html").exists()
