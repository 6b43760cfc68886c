"""Every bad input exits with code 2 and one line naming it, before any model is loaded."""

from __future__ import annotations

import json
import sys

import pytest
from conftest import manifest_records, run_process


@pytest.fixture
def unloadable_model(tmp_path_factory):
    """Passes the up-front model check but cannot be loaded: a job that gets to loading it fails with
    another error, so exit 2 with our message proves the input was checked first."""
    folder = tmp_path_factory.mktemp("model") / "broken"
    folder.mkdir()
    (folder / "model_index.json").write_text("{}")
    return folder


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
