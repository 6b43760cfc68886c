"""Outputs the Stable Diffusion ecosystem reads: A1111 infotext in the PNGs (read here by sd-parsers, a
parser that is not ours), several LoRAs stacked, and records that set their own steps, size and sampler."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from conftest import manifest_records, pixels
from diffusers import StableDiffusionPipeline, UNet2DConditionModel
from diffusers.utils import convert_state_dict_to_diffusers
from peft import LoraConfig
from peft.utils import get_peft_model_state_dict
from PIL import Image
from sd_parsers import ParserManager

PROMPT = "一只可爱的猫坐在窗台上"
TARGETS = ["to_q", "to_k", "to_v", "to_out.0"]


def random_lora(model: Path, folder: Path, seed: int) -> Path:
    """A LoRA with random (not zero) weights, as `pipe.save_lora_weights` writes it."""
    torch.manual_seed(seed)
    unet = UNet2DConditionModel.from_pretrained(model / "unet")
    unet.add_adapter(LoraConfig(r=4, lora_alpha=4, init_lora_weights=False, target_modules=TARGETS))
    folder.mkdir()
    layers = convert_state_dict_to_diffusers(get_peft_model_state_dict(unet))
    StableDiffusionPipeline.save_lora_weights(folder, unet_lora_layers=layers)
    return folder


def test_pngs_carry_a1111_infotext_that_a_foreign_parser_reads(cli, tiny_model, tmp_path):
    records = [{"prompt": PROMPT, "negative_prompt": "模糊, 低质量", "seed": 42, "guidance_scale": 6.5, "id": "cat"}]
    prompts = tmp_path / "p.jsonl"
    prompts.write_text(json.dumps(records[0], ensure_ascii=False) + "\n", encoding="utf-8")
    out = tmp_path / "out"
    lora = random_lora(tiny_model, tmp_path / "style", seed=1)
    code = cli(
        "generate", MODEL_NAME=tiny_model, PROMPTS_FILE=prompts, OUTPUT_DIR=out, NUM_INFERENCE_STEPS=3, LORA_PATH=lora
    )
    assert code == 0
    (record,) = manifest_records(out)
    info = ParserManager().parse(out / "cat-0.png")
    assert info is not None and info.generator.name == "AUTOMATIC1111"
    (sampler,) = info.samplers
    assert sampler.name == "DPM++ 2M"
    assert [p.value for p in sampler.prompts] == [PROMPT] and [p.value for p in sampler.negative_prompts] == [
        "模糊, 低质量"
    ]
    assert sampler.parameters == {"steps": "3", "cfg_scale": "6.5", "seed": "42"}
    assert sampler.model.name == tiny_model.name
    assert info.metadata["Size"] == "32x32"
    with Image.open(out / "cat-0.png") as image:
        # A1111 quotes a value with commas or colons; sd-parsers skips such values, A1111 reads them.
        assert f'Lora hashes: "style: {record["loras"][0]["sha256"][:12]}"' in image.text["parameters"]
        assert json.loads(image.text["pai-diffusion"]) == record  # ours, for recovery


def test_a_png_from_before_infotext_still_recovers(cli, tiny_model, tmp_path):
    """PNGs written before the change carried our JSON under `parameters`; one whose manifest line a
    kill lost is still recognised and listed again, not rendered twice."""
    out = tmp_path / "out"
    settings = dict(MODEL_NAME=tiny_model, PROMPT=PROMPT, OUTPUT_DIR=out, NUM_INFERENCE_STEPS=2)
    assert cli("generate", **settings) == 0
    (record,) = manifest_records(out)
    png = out / record["file"]
    old = {key: value for key, value in record.items() if key not in ("revision", "loras", "input_image_sha256")}
    with Image.open(png) as image:
        from PIL.PngImagePlugin import PngInfo

        info = PngInfo()
        info.add_text("parameters", json.dumps(old, ensure_ascii=False))
        image.save(png, pnginfo=info)
    (out / "manifest-00000.jsonl").unlink()
    written = png.stat().st_mtime_ns
    assert cli("generate", **settings) == 0
    assert png.stat().st_mtime_ns == written
    assert [r["id"] for r in manifest_records(out)] == [record["id"]]


def test_several_loras_stack_each_at_its_scale(cli, tiny_model, tmp_path):
    style, subject = random_lora(tiny_model, tmp_path / "style", 1), random_lora(tiny_model, tmp_path / "subject", 2)

    def render(name: str, **env) -> bytes:
        out = tmp_path / name
        settings = dict(MODEL_NAME=tiny_model, PROMPT=PROMPT, OUTPUT_DIR=out, NUM_INFERENCE_STEPS=3, DTYPE="fp32")
        settings |= {"SCHEDULER": "pndm"}  # the stock pipeline's sampler, for the comparison below
        assert cli("generate", **settings, **env) == 0
        (record,) = manifest_records(out)
        return pixels(out / record["file"]), record

    both, record = render("both", LORA_PATH=f"{style},{subject}", LORA_SCALE="0.8,0.5")
    as_json, _ = render("json", LORA_PATH=json.dumps([str(style), str(subject)]), LORA_SCALE="[0.8, 0.5]")
    style_only, _ = render("style", LORA_PATH=style, LORA_SCALE=0.8)
    assert both == as_json and both != style_only
    assert [(lora["path"], lora["scale"]) for lora in record["loras"]] == [(str(style), 0.8), (str(subject), 0.5)]
    # Fused once at load: the same as the two LoRAs applied unfused, each at its scale, by stock diffusers.
    pipe = StableDiffusionPipeline.from_pretrained(tiny_model, safety_checker=None)
    pipe.load_lora_weights(style, adapter_name="a")
    pipe.load_lora_weights(subject, adapter_name="b")
    pipe.set_adapters(["a", "b"], adapter_weights=[0.8, 0.5])
    generator = torch.Generator().manual_seed(record["seed"])
    stock = pipe(PROMPT, num_inference_steps=3, generator=generator, height=32, width=32)
    stock.images[0].save(tmp_path / "stock.png")
    difference = torch.tensor(list(pixels(tmp_path / "stock.png"))) - torch.tensor(list(both))
    assert difference.abs().max() <= 2


def test_a_bad_entry_of_several_loras_is_named(cli, capsys, tiny_model, tmp_path):
    good = random_lora(tiny_model, tmp_path / "good", 1)
    stranger = tmp_path / "stranger"  # legacy keys that match no layer of the model
    stranger.mkdir()
    torch.save(
        {"mid_block.x.processor.to_q_lora.down.weight": torch.zeros(4, 8)}, stranger / "pytorch_lora_weights.bin"
    )
    missing = tmp_path / "missing"
    for paths, named in [
        (f"{good},{missing}", f"LORA_PATH {missing}: no such file"),
        (f"{good},{stranger}", f"LORA_PATH {stranger}: "),
    ]:
        code = cli("generate", MODEL_NAME=tiny_model, PROMPT=PROMPT, OUTPUT_DIR=tmp_path / "out", LORA_PATH=paths)
        assert code == 2
        err = capsys.readouterr().err
        assert "Traceback" not in err and f"error: {named}" in err, err[-2000:]


def test_records_set_their_own_steps_size_and_sampler(cli, tiny_model, tmp_path):
    records = [
        {"prompt": PROMPT, "id": "wide", "width": 48, "height": 32, "num_inference_steps": 3, "scheduler": "euler_a"},
        {"prompt": PROMPT, "id": "plain"},
        {"prompt": PROMPT, "id": "ddim", "scheduler": "ddim", "num_inference_steps": 2},
    ]
    prompts = tmp_path / "p.jsonl"
    prompts.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records), encoding="utf-8")
    out = tmp_path / "out"
    assert cli("generate", MODEL_NAME=tiny_model, PROMPTS_FILE=prompts, OUTPUT_DIR=out, NUM_INFERENCE_STEPS=4) == 0
    by_id = {r["id"]: r for r in manifest_records(out)}
    assert (by_id["wide-0"]["width"], by_id["wide-0"]["height"], by_id["wide-0"]["steps"]) == (48, 32, 3)
    assert by_id["wide-0"]["scheduler"] == "euler_a" and Image.open(out / "wide-0.png").size == (48, 32)
    assert (by_id["plain-0"]["scheduler"], by_id["plain-0"]["steps"], by_id["plain-0"]["width"]) == ("dpm++", 4, 32)
    assert (by_id["ddim-0"]["scheduler"], by_id["ddim-0"]["steps"]) == ("ddim", 2)
    info = ParserManager().parse(out / "wide-0.png")
    assert info.samplers[0].name == "Euler a" and info.metadata["Size"] == "48x32"

    # The same record with another sampler is another request: refused, or rendered again with OVERWRITE.
    records[2]["scheduler"] = "unipc"
    prompts.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records), encoding="utf-8")
    assert cli("generate", MODEL_NAME=tiny_model, PROMPTS_FILE=prompts, OUTPUT_DIR=out, NUM_INFERENCE_STEPS=4) == 2
