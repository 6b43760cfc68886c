"""The three parsers of user text, fed whatever Hypothesis makes: prompts files (.txt, .jsonl, .yaml),
metadata.jsonl, and CONFIG_FILE. Whatever the bytes or the JSON values, they accept them or raise
BadInput: never another exception, which would be a traceback and an exit code Kubernetes retries."""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from jobs.config import GenerateConfig, Img2ImgConfig, LoraConfig, load
from jobs.errors import BadInput
from jobs.prompts import plan
from jobs.sources import open_source

RUNS = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=20),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=10), children, max_size=4),
    max_leaves=12,
)
# Records with the fields the parsers know, holding any JSON value, and others besides.
PROMPT_FIELDS = ["prompt", "negative_prompt", "seed", "num_images", "guidance_scale", "num_inference_steps"]
PROMPT_FIELDS += ["width", "height", "scheduler", "image", "id"]
records = st.dictionaries(st.sampled_from([*PROMPT_FIELDS, "file_name", "text", "other"]), json_values, max_size=6)
texts = st.binary(max_size=300) | st.text(max_size=200).map(str.encode)


def accepts_or_refuses(call) -> None:
    try:
        call()
    except BadInput:
        pass


def in_folder(name: str, data: bytes) -> Path:
    folder = Path(tempfile.mkdtemp(prefix="parsers-"))
    (folder / name).write_bytes(data)
    return folder / name


@RUNS
@given(data=texts, suffix=st.sampled_from([".txt", ".jsonl", ".yaml"]), img2img=st.booleans())
def test_prompts_files_of_any_bytes(data: bytes, suffix: str, img2img: bool):
    path = in_folder(f"prompts{suffix}", data)
    config_cls = Img2ImgConfig if img2img else GenerateConfig
    config = config_cls(prompts_file=path)
    accepts_or_refuses(lambda: plan(config, img2img, resolution=32))


@RUNS
@given(lines=st.lists(records, max_size=5), as_yaml=st.booleans(), img2img=st.booleans())
def test_prompts_records_of_any_json_values(lines: list[dict], as_yaml: bool, img2img: bool):
    if as_yaml:
        path = in_folder("prompts.yaml", yaml.safe_dump(lines, allow_unicode=True).encode())
    else:
        path = in_folder("prompts.jsonl", "\n".join(json.dumps(line) for line in lines).encode())
    config = (Img2ImgConfig if img2img else GenerateConfig)(prompts_file=path)
    accepts_or_refuses(lambda: plan(config, img2img, resolution=32))


@RUNS
@given(data=texts)
def test_metadata_jsonl_of_any_bytes(data: bytes):
    path = in_folder("metadata.jsonl", data)
    accepts_or_refuses(lambda: open_source(LoraConfig(train_data_dir=str(path.parent)), None))


@RUNS
@given(lines=st.lists(records, max_size=5), image=st.booleans())
def test_metadata_jsonl_of_any_json_values(lines: list[dict], image: bool):
    path = in_folder("metadata.jsonl", "\n".join(json.dumps(line) for line in lines).encode())
    if image:
        (path.parent / "a.png").write_bytes(b"not checked until used")
    accepts_or_refuses(lambda: open_source(LoraConfig(train_data_dir=str(path.parent)), None))


@RUNS
@given(data=texts | st.dictionaries(st.text(max_size=30), json_values, max_size=5).map(yaml.safe_dump).map(str.encode))
def test_config_files_of_any_bytes_or_values(data: bytes):
    path = in_folder("job.yaml", data)
    accepts_or_refuses(lambda: load(GenerateConfig, ["--prompt", "猫"], {"CONFIG_FILE": str(path)}))
    accepts_or_refuses(lambda: load(LoraConfig, [], {"CONFIG_FILE": str(path), "TRAIN_DIR": "/data"}))
