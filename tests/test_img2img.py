"""`img2img` end to end: input fitting, strength, and the seed's editing snippet."""

from __future__ import annotations

import json

import numpy as np
from conftest import manifest_records, pixels
from PIL import Image

PROMPT = "水彩画风格"


def make_inputs(folder, sizes):
    """Smooth colour gradients of the given sizes, so an edit's distance from its input is measurable."""
    folder.mkdir()
    for index, (width, height) in enumerate(sizes):
        x = np.linspace(0, 255, width)[None, :, None]
        y = np.linspace(255, 0, height)[:, None, None]
        rgb = np.concatenate(
            [
                np.broadcast_to(x, (height, width, 1)),
                np.broadcast_to(y, (height, width, 1)),
                np.full((height, width, 1), 40 * index),
            ],
            axis=2,
        )
        Image.fromarray(rgb.astype(np.uint8)).save(folder / f"input-{index}.png")
    (folder / "notes.txt").write_text("not an image, and not an input")
    return folder


def distance(a: bytes, b: bytes) -> float:
    return float(np.abs(np.frombuffer(a, np.uint8).astype(int) - np.frombuffer(b, np.uint8).astype(int)).mean())


def test_inputs_are_fitted_to_the_model_resolution_keeping_aspect(cli, tiny_model, tmp_path):
    inputs = make_inputs(tmp_path / "in", [(64, 32), (20, 40), (32, 32)])
    out = tmp_path / "out"
    code = cli("img2img", MODEL_NAME=tiny_model, INPUT_DIR=inputs, PROMPT=PROMPT, OUTPUT_DIR=out, NUM_INFERENCE_STEPS=4)
    assert code == 0
    sizes = {r["id"]: (r["width"], r["height"]) for r in manifest_records(out)}
    # The longer side becomes the model's 32 pixels; both sides are multiples of 8.
    assert sizes == {"input-0-0": (32, 16), "input-1-0": (16, 32), "input-2-0": (32, 32)}
    for record in manifest_records(out):
        assert Image.open(out / record["file"]).size == (record["width"], record["height"])
        assert record["strength"] == 0.75 and record["input_image"].endswith(".png")


def test_lower_strength_stays_closer_to_the_input(cli, tiny_model, tmp_path):
    inputs = make_inputs(tmp_path / "in", [(32, 32)])
    original = pixels(inputs / "input-0.png")
    distances = []
    for strength in (0.25, 1.0):
        out = tmp_path / f"out-{strength}"
        code = cli(
            "img2img", MODEL_NAME=tiny_model, INPUT_DIR=inputs, PROMPT=PROMPT, OUTPUT_DIR=out,
            STRENGTH=strength, NUM_INFERENCE_STEPS=4, SAFETY_CHECKER="false",
        )  # fmt: skip
        assert code == 0
        distances.append(distance(original, pixels(out / "input-0-0.png")))
    assert distances[0] < distances[1]


def test_records_name_their_images(cli, tiny_model, tmp_path):
    inputs = make_inputs(tmp_path / "in", [(32, 32), (32, 32)])
    records = [
        {"prompt": PROMPT, "image": "in/input-0.png", "id": "first"},
        {"prompt": "油画", "image": str(inputs / "input-1.png"), "seed": 3},
    ]
    prompts = tmp_path / "edits.jsonl"
    prompts.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records), encoding="utf-8")
    out = tmp_path / "out"
    assert cli("img2img", MODEL_NAME=tiny_model, PROMPTS_FILE=prompts, OUTPUT_DIR=out, NUM_INFERENCE_STEPS=4) == 0
    by_id = {r["id"]: r for r in manifest_records(out)}
    assert sorted(by_id) == ["00002-0", "first-0"]
    assert by_id["00002-0"]["seed"] == 3 and by_id["00002-0"]["prompt"] == "油画"


def test_seed_snippet_runs_on_the_fixture_model(tiny_model, tmp_path, monkeypatch):
    """The seed document's image-editing snippet, as written but for the model id and the device."""
    make_inputs(tmp_path / "in", [(48, 32)])
    monkeypatch.chdir(tmp_path / "in")
    from diffusers import StableDiffusionImg2ImgPipeline

    Image.open("input-0.png").save("image.png")
    init_image = Image.open("image.png").convert("RGB")
    init_image.thumbnail((512, 512))

    model_id = str(tiny_model)
    pipe = StableDiffusionImg2ImgPipeline.from_pretrained(model_id)
    pipe = pipe.to("cpu")
    prompt = "输入文本"
    image = pipe(prompt=prompt, image=init_image, strength=0.75, guidance_scale=7.5).images[0]
    image.save("result.png")
    assert Image.open("result.png").size == (48, 32)
