"""Every bad input exits with code 2 and one line naming it, before any model is loaded."""

from __future__ import annotations

import json
import sys

import pytest
from conftest import manifest_records, run_process


def error_line(capsys) -> str:
    err = capsys.readouterr().err
    assert "Traceback" not in err
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, err
    return errors[0]


def write(path, text):
    path.write_text(text, encoding="utf-8")
    return path


def not_an_image(tmp_path):
    return write(tmp_path / "fake.png", "this is text")


def truncated_jpeg(tmp_path):
    """A JPEG cut short: `Image.verify()` passes it; decoding it whole does not."""
    from PIL import Image

    folder = tmp_path / "inputs"
    folder.mkdir()
    Image.effect_noise((64, 64), 60).convert("RGB").save(folder / "cut.jpg", quality=90)
    (folder / "cut.jpg").write_bytes((folder / "cut.jpg").read_bytes()[:1500])
    return folder


def decompression_bomb(tmp_path):
    """A 20,000 x 20,000 PNG of a few hundred KB: PIL refuses to decode 400 million pixels."""
    from PIL import Image

    folder = tmp_path / "inputs"
    folder.mkdir()
    Image.new("1", (20000, 20000)).save(folder / "bomb.png")
    return folder


def gbk(path, text):
    path.write_bytes(text.encode("gbk"))
    return path


CASES = {
    # name: (job, env builder, words the message must contain)
    "no prompt": ("generate", lambda t: {}, ["PROMPT"]),
    "empty prompts file": ("generate", lambda t: {"PROMPTS_FILE": write(t / "p.txt", "\n\n")}, ["no prompts"]),
    "bad json line": (
        "generate",
        lambda t: {"PROMPTS_FILE": write(t / "p.jsonl", '{"prompt": "猫"}\n{"prompt": 狗}\n')},
        ["p.jsonl line 2", "JSON"],
    ),
    "record without prompt": (
        "generate",
        lambda t: {"PROMPTS_FILE": write(t / "p.jsonl", '{"prompt": "猫"}\n\n{"seed": 1}\n')},
        ["line 3", "prompt"],
    ),
    "unknown record field": (
        "generate",
        lambda t: {"PROMPTS_FILE": write(t / "p.jsonl", '{"prompt": "猫", "sead": 1}\n')},
        ["line 1", "sead"],
    ),
    "bad yaml": ("generate", lambda t: {"PROMPTS_FILE": write(t / "p.yaml", "- 猫\n- [狗\n")}, ["p.yaml", "YAML"]),
    "unknown prompts format": ("generate", lambda t: {"PROMPTS_FILE": write(t / "p.csv", "猫")}, ["p.csv"]),
    "missing prompts file": ("generate", lambda t: {"PROMPTS_FILE": t / "nope.txt"}, ["nope.txt"]),
    "unknown scheduler": ("generate", lambda t: {"PROMPT": "猫", "SCHEDULER": "lms"}, ["SCHEDULER"]),
    "zero batch size": ("generate", lambda t: {"PROMPT": "猫", "BATCH_SIZE": 0}, ["BATCH_SIZE"]),
    "shard out of range": (
        "generate",
        lambda t: {"PROMPT": "猫", "NUM_SHARDS": 2, "SHARD_INDEX": 2},
        ["shard_index"],
    ),
    "height not a multiple of 8": ("generate", lambda t: {"PROMPT": "猫", "HEIGHT": 30}, ["HEIGHT"]),
    "unwritable output dir": (
        "generate",
        lambda t: {"PROMPT": "猫", "OUTPUT_DIR": write(t / "a-file", "") / "out"},
        ["OUTPUT_DIR", "not writable"],
    ),
    "missing model folder": ("generate", lambda t: {"PROMPT": "猫", "MODEL_NAME": t / "no-model"}, ["no-model"]),
    "missing lora": ("generate", lambda t: {"PROMPT": "猫", "LORA_PATH": t / "lora"}, ["LORA_PATH"]),
    "image in a generate record": (
        "generate",
        lambda t: {"PROMPTS_FILE": write(t / "p.jsonl", '{"prompt": "猫", "image": "x.png"}\n')},
        ["img2img"],
    ),
    "strength out of range": ("img2img", lambda t: {"INPUT_DIR": t, "PROMPT": "猫", "STRENGTH": 1.5}, ["STRENGTH"]),
    "strength runs no step": (
        "img2img",
        lambda t: {"INPUT_DIR": not_an_image(t).parent, "PROMPT": "猫", "STRENGTH": 0.01, "NUM_INFERENCE_STEPS": 10},
        ["STRENGTH"],
    ),
    "no input images": ("img2img", lambda t: {"PROMPT": "猫"}, ["INPUT_DIR"]),
    "missing input dir": ("img2img", lambda t: {"INPUT_DIR": t / "nope", "PROMPT": "猫"}, ["nope"]),
    "input dir without images": ("img2img", lambda t: {"INPUT_DIR": t, "PROMPT": "猫"}, ["no images"]),
    "input that is not an image": (
        "img2img",
        lambda t: {"INPUT_DIR": not_an_image(t).parent, "PROMPT": "猫"},
        ["fake.png", "not a readable image"],
    ),
    "input that is truncated": (
        "img2img",
        lambda t: {"INPUT_DIR": truncated_jpeg(t), "PROMPT": "猫"},
        ["cut.jpg", "not a readable image"],
    ),
    "input that is a decompression bomb": (
        "img2img",
        lambda t: {"INPUT_DIR": decompression_bomb(t), "PROMPT": "猫"},
        ["bomb.png", "decompression bomb"],
    ),
    "config file that is not YAML": (
        "generate",
        lambda t: {"CONFIG_FILE": write(t / "job.yaml", "prompt: [猫\n")},
        ["CONFIG_FILE", "job.yaml", "not valid YAML"],
    ),
    "config file that is a list": (
        "generate",
        lambda t: {"CONFIG_FILE": write(t / "job.yaml", "- prompt: 猫\n")},
        ["CONFIG_FILE", "a YAML mapping"],
    ),
    "config file in GBK": (
        "generate",
        lambda t: {"CONFIG_FILE": gbk(t / "job.yaml", "prompt: 一条狗\n")},
        ["CONFIG_FILE", "not UTF-8", "save it as UTF-8"],
    ),
    "prompts file in GBK": (
        "generate",
        lambda t: {"PROMPTS_FILE": gbk(t / "p.txt", "一只猫\n一条狗\n")},
        ["PROMPTS_FILE", "not UTF-8", "save it as UTF-8"],
    ),
    "lora scales that do not match the loras": (
        "generate",
        lambda t: {"PROMPT": "猫", "LORA_PATH": "a,b,c", "LORA_SCALE": "0.5,0.5"},
        ["LORA_SCALE", "2 scales for 3 LoRAs"],
    ),
    "record with a size not a multiple of 8": (
        "generate",
        lambda t: {"PROMPTS_FILE": write(t / "p.jsonl", '{"prompt": "猫", "width": 100}\n')},
        ["line 1", "width"],
    ),
    "record naming a missing image": (
        "img2img",
        lambda t: {"PROMPTS_FILE": write(t / "p.jsonl", '{"prompt": "猫", "image": "gone.png"}\n')},
        ["line 1", "gone.png"],
    ),
}


@pytest.mark.parametrize("case", CASES)
def test_bad_input_exits_2_with_one_line(cli, capsys, tmp_path, unloadable_model, case):
    job, env, words = CASES[case]
    settings = {"MODEL_NAME": unloadable_model, "OUTPUT_DIR": tmp_path / "out", **env(tmp_path)}
    assert cli(job, **settings) == 2
    line = error_line(capsys)
    for word in words:
        assert word in line, line


def test_skip_invalid_renders_the_good_records_and_lists_the_bad(cli, capsys, tiny_model, tmp_path):
    prompts = write(
        tmp_path / "p.jsonl", '{"prompt": "猫"}\n{"prompt": 狗}\n{"prompt": "鱼", "seed": -1}\n{"prompt": "鸟"}\n'
    )
    out = tmp_path / "out"
    settings = dict(MODEL_NAME=tiny_model, PROMPTS_FILE=prompts, OUTPUT_DIR=out, NUM_INFERENCE_STEPS=2)
    assert cli("generate", **settings) == 2
    assert "line 2" in error_line(capsys)

    assert cli("generate", SKIP_INVALID="true", **settings) == 0
    assert sorted(r["id"] for r in manifest_records(out)) == ["00001-0", "00004-0"]
    lines = (out / "manifest-00000.jsonl").read_text(encoding="utf-8").splitlines()
    skipped = [json.loads(line) for line in lines if "skipped" in line]
    assert [s["skipped"] for s in skipped] == ["p.jsonl line 2", "p.jsonl line 3"]
    assert "line 3" in (out / "index.html").read_text(encoding="utf-8")


def test_bad_input_from_a_real_process_has_no_traceback():
    """Run as a file, the seed's form (`accelerate launch jobs/generate.py`)."""
    result = run_process([sys.executable, "jobs/generate.py", "--prompt", "猫", "--scheduler", "nope"])
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    assert result.stderr.splitlines()[-1].startswith("error: SCHEDULER")


def test_an_unknown_job_is_named_before_the_usage(capsys):
    from jobs.cli import main

    assert main(["paint", "--prompt", "猫"]) == 2
    err = capsys.readouterr().err
    assert err.splitlines()[0] == "error: unknown job 'paint'"
    assert "usage: pai-diffusion JOB" in err and "generate" in err


def test_a_run_that_exits_2_changes_nothing_in_output_dir(cli, capsys, tiny_model, tmp_path):
    out = tmp_path / "out"
    assert cli("generate", MODEL_NAME=tiny_model, PROMPT="猫", OUTPUT_DIR=out, NUM_INFERENCE_STEPS=2) == 0
    before = {path.name: path.read_bytes() for path in out.iterdir()}
    prompts = write(tmp_path / "p.jsonl", '{"prompt": "猫"}\n{"prompt": 狗}\n')
    assert cli("generate", MODEL_NAME=tiny_model, PROMPTS_FILE=prompts, OUTPUT_DIR=out) == 2
    assert {path.name: path.read_bytes() for path in out.iterdir()} == before
