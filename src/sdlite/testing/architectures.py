"""Named architectures as diffusers config dicts: real SD 1.5 / BK-SDM shapes and tiny test shapes
(the SD 1.5 configs themselves are product data, `sdlite.weights.standard_configs`, re-exported here).

`random_model.write_random_model(arch, folder)` writes a complete random-weight diffusers folder for any
of these, so tests and benches can exercise the real loading paths without downloadable weights.
"""

from __future__ import annotations

import copy

from ..weights.standard_configs import (
    LCM_SCHEDULER,
    SD15_SCHEDULER,
    SD15_TEXT,
    SD15_UNET,
    SD15_VAE,
    SD21_BASE_SCHEDULER,
)


def _merged(base: dict, **changes) -> dict:
    out = copy.deepcopy(base)
    out.update(changes)
    return out


# BK-SDM-Tiny: no mid block, one resnet(+attention) per down stage, the innermost stage removed.
BK_SDM_TINY_UNET = _merged(
    SD15_UNET,
    down_block_types=["CrossAttnDownBlock2D"] * 3,
    up_block_types=["CrossAttnUpBlock2D"] * 3,
    block_out_channels=[320, 640, 1280],
    layers_per_block=1,
    mid_block_type=None,
)

TINY_UNET = _merged(
    SD15_UNET,
    sample_size=8,
    down_block_types=["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
    up_block_types=["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"],
    block_out_channels=[32, 64, 64],
    norm_num_groups=8,
    cross_attention_dim=32,
    attention_head_dim=4,
)

TINY_BK_UNET = _merged(
    TINY_UNET,
    down_block_types=["CrossAttnDownBlock2D"] * 3,
    up_block_types=["CrossAttnUpBlock2D"] * 3,
    layers_per_block=1,
    mid_block_type=None,
)

TINY_VAE = _merged(SD15_VAE, block_out_channels=[32, 64], down_block_types=["DownEncoderBlock2D"] * 2,
                   up_block_types=["UpDecoderBlock2D"] * 2, layers_per_block=1, norm_num_groups=8,
                   sample_size=64)

# TAESD as diffusers' AutoencoderTiny (madebyollin/taesd): a drop-in decoder for SD 1.x latents
TAESD = {
    "_class_name": "AutoencoderTiny",
    "in_channels": 3,
    "out_channels": 3,
    "encoder_block_out_channels": [64, 64, 64, 64],
    "decoder_block_out_channels": [64, 64, 64, 64],
    "act_fn": "relu",
    "upsample_fn": "nearest",
    "latent_channels": 4,
    "upsampling_scaling_factor": 2,
    "num_encoder_blocks": [1, 3, 3, 3],
    "num_decoder_blocks": [3, 3, 3, 1],
    "latent_magnitude": 3,
    "latent_shift": 0.5,
    "force_upcast": False,
    "scaling_factor": 1.0,
}

# matches the tiny models' VAE: one 2x upsampling (latents at half the image size)
TINY_TAESD = _merged(TAESD, encoder_block_out_channels=[16, 16], decoder_block_out_channels=[16, 16],
                     num_encoder_blocks=[1, 1], num_decoder_blocks=[1, 2])

TINY_TEXT = _merged(SD15_TEXT, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                    num_attention_heads=4, projection_dim=32)

# SD 2.x-shaped tiny model: linear projections, upcast attention, a head count per block (16-wide heads),
# GELU text encoder whose width is the UNet's context width (as OpenCLIP ViT-H's 1024 is SD 2.x's)
TINY_SD2_UNET = _merged(TINY_UNET, attention_head_dim=[2, 4, 4], use_linear_projection=True,
                        upcast_attention=True)

TINY_SD2_TEXT = _merged(TINY_TEXT, hidden_size=TINY_SD2_UNET["cross_attention_dim"], num_attention_heads=2,
                        hidden_act="gelu")

# Tiny, but by SD 1.x's conventions where the weights cannot tell (8 heads per block, 64-wide text heads,
# 32 norm groups, the full CLIP vocabulary), so that a single file of it runs with no config folder.
TINY_STD_UNET = _merged(TINY_UNET, norm_num_groups=32, attention_head_dim=8, cross_attention_dim=64)
TINY_STD_VAE = _merged(TINY_VAE, norm_num_groups=32)
TINY_STD_TEXT = _merged(SD15_TEXT, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                        num_attention_heads=1, projection_dim=64)

# arch name -> (unet, vae, text_encoder, scheduler, tokenizer vocab size or None for full CLIP size)
ARCHITECTURES: dict[str, dict] = {
    "tiny": {"unet": TINY_UNET, "vae": TINY_VAE, "text_encoder": TINY_TEXT,
             "scheduler": SD15_SCHEDULER, "vocab_size": 1000},
    "tiny-sd2": {"unet": TINY_SD2_UNET, "vae": TINY_VAE, "text_encoder": TINY_SD2_TEXT,
                 "scheduler": SD21_BASE_SCHEDULER, "vocab_size": 1000},
    "tiny-bk": {"unet": TINY_BK_UNET, "vae": TINY_VAE, "text_encoder": TINY_TEXT,
                "scheduler": SD15_SCHEDULER, "vocab_size": 1000},
    "tiny-lcm": {"unet": _merged(TINY_UNET, time_cond_proj_dim=32), "vae": TINY_VAE, "text_encoder": TINY_TEXT,
                 "scheduler": LCM_SCHEDULER, "vocab_size": 1000},
    "tiny-std": {"unet": TINY_STD_UNET, "vae": TINY_STD_VAE, "text_encoder": TINY_STD_TEXT,
                 "scheduler": SD15_SCHEDULER, "vocab_size": 49408},
    "bk-sdm-tiny": {"unet": BK_SDM_TINY_UNET, "vae": SD15_VAE, "text_encoder": SD15_TEXT,
                    "scheduler": SD15_SCHEDULER, "vocab_size": 49408},
    "sd15": {"unet": SD15_UNET, "vae": SD15_VAE, "text_encoder": SD15_TEXT,
             "scheduler": SD15_SCHEDULER, "vocab_size": 49408},
}


# VAE-only folders (`sdlite random-model taesd DIR`), to pass as `--vae DIR`
VAE_ARCHITECTURES: dict[str, dict] = {"taesd": TAESD, "tiny-taesd": TINY_TAESD}


def architecture(name: str) -> dict:
    if name not in ARCHITECTURES:
        raise KeyError(f"unknown architecture {name!r}; choose one of {', '.join(ARCHITECTURES)}")
    return copy.deepcopy(ARCHITECTURES[name])
