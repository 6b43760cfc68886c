"""Build a PAI-shaped Stable Diffusion folder with random weights, for tests, `make demo` and `bench/`.

It has what the hub's PAI folders have: a BERT WordPiece tokenizer with a Chinese vocabulary
(`vocab.txt` only, no `tokenizer.json`), a CLIPTextModel, an SD 1.x-style UNet and VAE, a PNDM
scheduler and a safety checker. Sizes are small so a CPU runs it in seconds; the tokenizer's
`model_max_length` is 32, not CLIP's 77, so code that assumes 77 breaks here as it would on PAI.

    python tests/tiny_model.py OUT_DIR [--size tiny|medium]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
from diffusers import AutoencoderKL, PNDMScheduler, StableDiffusionPipeline, UNet2DConditionModel
from diffusers.pipelines.stable_diffusion.safety_checker import StableDiffusionSafetyChecker
from transformers import BertTokenizer, CLIPConfig, CLIPImageProcessor, CLIPTextConfig, CLIPTextModel

MAX_LENGTH = 32
SPECIAL_TOKENS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]

# Widths of the text encoder, the UNet blocks and the VAE blocks. `medium` is wide enough that
# compute, not Python overhead, dominates on a CPU, and its VAE downsamples 8x like SD's: its encoder
# costs about one UNet forward pass (SD 1.x's: 1.4-1.5x), which is what latent caching saves. `sd1`
# is the full SD 1.x architecture (an 860M-parameter UNet at 512x512) for GPU benchmarks.
TWO_LEVELS = {"down": ("CrossAttnDownBlock2D", "DownBlock2D"), "up": ("UpBlock2D", "CrossAttnUpBlock2D")}
SIZES = {
    "tiny": {"text": 32, "layers_text": 2, "unet": (32, 64), "vae": (32, 64), "sample": 16, "layers": 1, **TWO_LEVELS},
    "medium": {
        "text": 256,
        "layers_text": 2,
        "unet": (128, 256),
        "vae": (32, 64, 128, 128),
        "sample": 32,
        "layers": 2,
        **TWO_LEVELS,
    },
    "sd1": {
        "text": 768,
        "layers_text": 12,
        "unet": (320, 640, 1280, 1280),
        "vae": (128, 256, 512, 512),
        "sample": 64,
        "layers": 2,
        "down": ("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
        "up": ("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
    },
}


def chinese_vocab() -> list[str]:
    """bert-base-chinese's shape: special tokens, ASCII, CJK punctuation, every common CJK character."""
    ascii_chars = [chr(c) for c in range(33, 127)]
    punctuation = list("，。！？、；：“”‘’（）《》【】…—·")
    cjk = [chr(c) for c in range(0x4E00, 0x9FA6)]
    return SPECIAL_TOKENS + ascii_chars + ["##" + c for c in ascii_chars] + punctuation + cjk


def write_tokenizer(folder: Path) -> BertTokenizer:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.txt").write_text("\n".join(chinese_vocab()) + "\n", encoding="utf-8")
    tokenizer_config = {"tokenizer_class": "BertTokenizer", "do_lower_case": True, "model_max_length": MAX_LENGTH}
    (folder / "tokenizer_config.json").write_text(json.dumps(tokenizer_config, indent=2))
    return BertTokenizer.from_pretrained(folder)


def autoencoder(size: str) -> AutoencoderKL:
    """The VAE of a `size` model, with random weights (also built alone by bench/vae_decode.py)."""
    widths = SIZES[size]
    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        latent_channels=4,
        layers_per_block=widths["layers"],
        block_out_channels=widths["vae"],
        down_block_types=("DownEncoderBlock2D",) * len(widths["vae"]),
        up_block_types=("UpDecoderBlock2D",) * len(widths["vae"]),
        norm_num_groups=32,
        sample_size=widths["sample"] * 2 ** (len(widths["vae"]) - 1),
    )


def build(out: Path, size: str = "tiny", seed: int = 0) -> Path:
    """Write a whole StableDiffusionPipeline folder to `out` and return it."""
    widths = SIZES[size]
    torch.manual_seed(seed)
    out = Path(out)
    tokenizer = write_tokenizer(out / "tokenizer")
    text_encoder = CLIPTextModel(
        CLIPTextConfig(
            vocab_size=len(tokenizer),
            hidden_size=widths["text"],
            intermediate_size=widths["text"] * 2,
            num_hidden_layers=widths["layers_text"],
            num_attention_heads=4 if widths["text"] < 768 else 12,
            max_position_embeddings=MAX_LENGTH,
            pad_token_id=0,
            bos_token_id=2,
            eos_token_id=3,
        )
    )
    unet = UNet2DConditionModel(
        sample_size=widths["sample"],
        in_channels=4,
        out_channels=4,
        layers_per_block=widths["layers"],
        block_out_channels=widths["unet"],
        down_block_types=widths["down"],
        up_block_types=widths["up"],
        cross_attention_dim=widths["text"],
        attention_head_dim=8,
        norm_num_groups=32,
    )
    vae = autoencoder(size)
    # SD 1.x's own noise schedule and sampler, as in the PAI folders.
    scheduler = PNDMScheduler(
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        skip_prk_steps=True,
        set_alpha_to_one=False,
        steps_offset=1,
    )
    safety_checker = StableDiffusionSafetyChecker(
        CLIPConfig(
            text_config={"hidden_size": 16, "intermediate_size": 32, "num_hidden_layers": 1, "num_attention_heads": 2},
            vision_config={
                "hidden_size": 16,
                "intermediate_size": 32,
                "num_hidden_layers": 1,
                "num_attention_heads": 2,
                "image_size": 32,
                "patch_size": 8,
            },
            projection_dim=16,
        )
    )
    feature_extractor = CLIPImageProcessor(crop_size=32, size={"shortest_edge": 32})
    pipe = StableDiffusionPipeline(
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        unet=unet,
        scheduler=scheduler,
        safety_checker=safety_checker,
        feature_extractor=feature_extractor,
    )
    pipe.save_pretrained(out)
    # transformers 5 writes tokenizer.json and drops vocab.txt; the PAI folders have vocab.txt only.
    (out / "tokenizer" / "tokenizer.json").unlink(missing_ok=True)
    write_tokenizer(out / "tokenizer")
    return out


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path)
    parser.add_argument("--size", choices=sorted(SIZES), default="tiny")
    args = parser.parse_args()
    print(build(args.out, args.size))
