"""Configuration: flag > env > CONFIG_FILE > default, the design card's aliases, secrets masked."""

from __future__ import annotations

import json

import pytest

from jobs.config import GenerateConfig, LoraConfig, load
from jobs.errors import BadInput


def test_flag_beats_env_beats_yaml_beats_default(tmp_path):
    yaml_file = tmp_path / "job.yaml"
    yaml_file.write_text("prompt: 来自文件\nguidance_scale: 5.0\nbatch_size: 2\nseed: 9\n", encoding="utf-8")
    env = {"CONFIG_FILE": str(yaml_file), "GUIDANCE_SCALE": "6.0", "BATCH_SIZE": "3"}
    config = load(GenerateConfig, ["--guidance_scale", "7.0"], env)
    assert config.guidance_scale == 7.0  # flag
    assert config.batch_size == 3  # env over YAML
    assert config.seed == 9 and config.prompt == "来自文件"  # YAML over default
    assert config.num_images_per_prompt == 1  # default


def test_design_card_aliases(tmp_path):
    env = {
        "MODEL_NAME": "/models/pai",
        "OUTPUT_DIR": str(tmp_path),
        "PROMPT": "猫",
        "JOB_COMPLETION_INDEX": "2",
        "NUM_SHARDS": "4",
    }
    config = load(GenerateConfig, [], env)
    assert config.pretrained_model_name_or_path == "/models/pai"
    assert config.output_dir == tmp_path
    assert config.shard_index == 2
    # The flag's own name wins over the alias.
    assert load(GenerateConfig, ["--shard_index", "1"], env).shard_index == 1


def test_lora_rank_comes_from_lora_rank_not_the_launchers_rank():
    env = {"TRAIN_DIR": "/data", "RANK": "3"}  # RANK is the process rank under torchrun
    assert load(LoraConfig, [], env).rank == 4
    assert load(LoraConfig, [], {**env, "LORA_RANK": "16"}).rank == 16
    assert load(LoraConfig, ["--rank", "8"], {**env, "LORA_RANK": "16"}).rank == 8


def test_boolean_options_are_bare_flags_as_in_the_seed():
    argv = ["--pretrained_model_name_or_path=alibaba-pai/pai-diffusion-artist-large-zh", "--prompt", "猫"]
    assert load(GenerateConfig, [*argv, "--no-safety_checker"], {}).safety_checker is False
    assert load(GenerateConfig, [*argv, "--skip_invalid"], {}).skip_invalid is True
    assert load(GenerateConfig, argv, {"SKIP_INVALID": "true"}).skip_invalid is True


@pytest.mark.parametrize(
    "argv, prompts",
    [
        (["--validation_prompts", "一只猫", "a cat, by the sea"], ["一只猫", "a cat, by the sea"]),  # upstream's nargs
        (["--validation_prompts", "a, b", "--validation_prompts=c"], ["a, b", "c"]),
        (["--validation_prompts", '["x, y", "z"]'], ["x, y", "z"]),
    ],
)
def test_validation_prompts_take_several_values_and_keep_their_commas(argv, prompts):
    config = load(LoraConfig, [*argv, "--seed", "3"], {"TRAIN_DIR": "/data"})
    assert config.validation_prompts == prompts and config.seed == 3
    assert load(LoraConfig, [], {"TRAIN_DIR": "/data", "VALIDATION_PROMPTS": '["e, f"]'}).validation_prompts == ["e, f"]
    with pytest.raises(BadInput, match="expected at least one argument"):
        load(LoraConfig, ["--validation_prompts", "--seed", "3"], {"TRAIN_DIR": "/data"})


@pytest.mark.parametrize(
    "argv, env",
    [
        ([], {}),  # no prompt source
        (["--prompt", "猫", "--lora_scale", "100"], {}),
        (["--prompt", "猫", "--prompts_file", "p.txt"], {}),
        (["--prompt", "猫"], {"CONFIG_FILE": "/nonexistent.yaml"}),
        (["--prompt", "猫", "--no_such_flag", "1"], {}),
    ],
)
def test_invalid_configuration_is_bad_input(argv, env):
    with pytest.raises(BadInput):
        load(GenerateConfig, argv, env)


def test_resolved_configuration_is_printed_with_the_token_masked(cli, capsys, tmp_path):
    code = cli("generate", PROMPT="猫", MODEL_NAME=tmp_path / "no-model", HF_TOKEN="hf_secret123")
    assert code == 2  # stops at the missing model, after printing the configuration
    err = capsys.readouterr().err
    assert "hf_secret123" not in err
    printed = json.loads(next(line for line in err.splitlines() if line.startswith('{"config"')))["config"]
    assert printed["hf_token"] == "***" and printed["prompt"] == "猫"


def test_config_file_with_a_bom_and_crlf_reads_as_any_other(tmp_path):
    yaml_file = tmp_path / "job.yaml"
    yaml_file.write_bytes("prompt: 来自文件\r\nguidance_scale: 5.0\r\n".encode("utf-8-sig"))
    config = load(GenerateConfig, [], {"CONFIG_FILE": str(yaml_file)})
    assert (config.prompt, config.guidance_scale) == ("来自文件", 5.0)
