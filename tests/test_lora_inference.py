"""LORA_PATH at inference: the diffusers/PEFT format the `lora` job writes, and legacy PAI files."""

from __future__ import annotations

import pytest
import torch
from conftest import manifest_records, pixels
from diffusers import StableDiffusionPipeline, UNet2DConditionModel
from diffusers.utils import convert_state_dict_to_diffusers
from peft import LoraConfig
from peft.utils import get_peft_model_state_dict

PROMPT = "一只可爱的猫坐在窗台上"
TARGETS = ["to_q", "to_k", "to_v", "to_out.0"]


@pytest.fixture(scope="module")
def peft_lora(tiny_model, tmp_path_factory):
    """A folder as `pipe.save_lora_weights` writes it, with random (not zero) weights so it has an effect."""
    torch.manual_seed(1)
    unet = UNet2DConditionModel.from_pretrained(tiny_model / "unet")
    unet.add_adapter(LoraConfig(r=4, lora_alpha=4, init_lora_weights=False, target_modules=TARGETS))
    folder = tmp_path_factory.mktemp("lora")
    layers = convert_state_dict_to_diffusers(get_peft_model_state_dict(unet))
    StableDiffusionPipeline.save_lora_weights(folder, unet_lora_layers=layers)
    return folder


def legacy_pai_lora(peft_folder, out):
    """The same weights in the old attention-processor layout of the PAI LoRAs: a pickle, no `unet.` prefix."""
    from safetensors.torch import load_file

    legacy = {}
    for key, value in load_file(peft_folder / "pytorch_lora_weights.safetensors").items():
        # unet.<module>.to_out.0.lora.down.weight -> <module>.processor.to_out_lora.down.weight
        target, down_or_up = key.removeprefix("unet.").split(".lora.")
        module, projection = target.removesuffix(".0").rsplit(".", 1)
        legacy[f"{module}.processor.{projection}_lora.{down_or_up}"] = value
    assert "down_blocks.0.attentions.0.transformer_blocks.0.attn1.processor.to_q_lora.down.weight" in legacy
    out.mkdir()
    torch.save(legacy, out / "pytorch_lora_weights.bin")
    return out


def render(cli, tiny_model, out, **env) -> bytes:
    assert cli("generate", MODEL_NAME=tiny_model, PROMPT=PROMPT, OUTPUT_DIR=out, NUM_INFERENCE_STEPS=3, **env) == 0
    (record,) = manifest_records(out)
    return pixels(out / record["file"])


def test_lora_changes_the_image_and_scale_zero_does_not(cli, tiny_model, peft_lora, tmp_path):
    plain = render(cli, tiny_model, tmp_path / "plain")
    with_lora = render(cli, tiny_model, tmp_path / "lora", LORA_PATH=peft_lora, LORA_SCALE=0.8)
    zero = render(cli, tiny_model, tmp_path / "zero", LORA_PATH=peft_lora, LORA_SCALE=0)
    weights_file = render(cli, tiny_model, tmp_path / "file", LORA_PATH=peft_lora / "pytorch_lora_weights.safetensors")
    assert with_lora != plain
    assert zero == plain
    assert weights_file not in (plain, with_lora)  # scale 1, not 0.8
    (record,) = manifest_records(tmp_path / "lora")
    assert [(lora["path"], lora["scale"]) for lora in record["loras"]] == [(str(peft_lora), 0.8)]


def test_legacy_pai_lora_gives_the_same_image_as_its_peft_twin(cli, tiny_model, peft_lora, tmp_path):
    legacy = legacy_pai_lora(peft_lora, tmp_path / "legacy")
    assert render(cli, tiny_model, tmp_path / "a", LORA_PATH=legacy, LORA_SCALE=0.4) == render(
        cli, tiny_model, tmp_path / "b", LORA_PATH=peft_lora, LORA_SCALE=0.4
    )


def test_lora_matching_no_layer_is_bad_input(cli, capsys, tiny_model, tmp_path):
    folder = tmp_path / "stranger"
    folder.mkdir()
    torch.save(
        {"mid_block.nothing.processor.to_q_lora.down.weight": torch.zeros(4, 8)}, folder / "pytorch_lora_weights.bin"
    )
    assert cli("generate", MODEL_NAME=tiny_model, PROMPT=PROMPT, OUTPUT_DIR=tmp_path / "out", LORA_PATH=folder) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and "error: LORA_PATH" in err
    assert not list((tmp_path / "out").glob("*.png"))


@pytest.mark.parametrize("mixed_precision", ["no", "bf16"])
def test_lora_job_output_applies_with_lora_path_like_its_merged_pipeline(
    cli, tiny_model, dataset, tmp_path, mixed_precision
):
    """What the `lora` job writes is what `generate` reads: base + LORA_PATH renders as the merged pipeline,
    also after training in bf16 (the merged copy is built from the fp32 base, not the loop's bf16 UNet)."""
    trained = tmp_path / "trained"
    assert (
        cli(
            "lora",
            f"--pretrained_model_name_or_path={tiny_model}",
            f"--train_data_dir={dataset}",
            "--resolution=32",
            "--train_batch_size=2",
            "--max_train_steps=2",
            "--learning_rate=1e-2",  # large enough that two steps visibly move the adapters
            "--lr_warmup_steps=0",
            "--report_to=none",
            f"--mixed_precision={mixed_precision}",
            f"--output_dir={trained}",
        )
        == 0
    )
    plain = render(cli, tiny_model, tmp_path / "plain")
    with_lora = render(cli, tiny_model, tmp_path / "with-lora", LORA_PATH=trained)
    merged = render(cli, trained, tmp_path / "merged")
    assert with_lora != plain
    assert with_lora == merged


def test_lora_alpha_in_the_files_metadata_sets_its_strength(tiny_model, tmp_path):
    """A LoRA trained with lora_alpha = 2 x rank (`lora --lora_alpha 8 --rank 4`) applies as it trained,
    not at alpha = rank: LORA_PATH reads the adapter metadata diffusers saves beside the weights."""
    from jobs.models import apply_loras, read_lora

    torch.manual_seed(1)
    trained = UNet2DConditionModel.from_pretrained(tiny_model / "unet")
    trained.add_adapter(LoraConfig(r=4, lora_alpha=8, init_lora_weights=False, target_modules=TARGETS))
    StableDiffusionPipeline.save_lora_weights(
        tmp_path,
        unet_lora_layers=convert_state_dict_to_diffusers(get_peft_model_state_dict(trained)),
        unet_lora_adapter_metadata=trained.peft_config["default"].to_dict(),
    )
    pipe = StableDiffusionPipeline.from_pretrained(tiny_model)
    apply_loras(pipe, [read_lora(tmp_path, str(tmp_path))], [1.0])
    latents, timestep, text = torch.randn(1, 4, 16, 16), torch.tensor([500]), torch.randn(1, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(pipe.unet(latents, timestep, text).sample, trained(latents, timestep, text).sample)
