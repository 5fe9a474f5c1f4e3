"""Named architectures as diffusers config dicts: real SD 1.5 / BK-SDM shapes and tiny test shapes.

`random_model.write_random_model(arch, folder)` writes a complete random-weight diffusers folder for any
of these, so tests and benches can exercise the real loading paths without downloadable weights.
"""

from __future__ import annotations

import copy

SD15_SCHEDULER = {
    "_class_name": "PNDMScheduler",
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "num_train_timesteps": 1000,
    "set_alpha_to_one": False,
    "skip_prk_steps": True,
    "steps_offset": 1,
    "clip_sample": False,
    "trained_betas": None,
}

SD15_UNET = {
    "_class_name": "UNet2DConditionModel",
    "sample_size": 64,
    "in_channels": 4,
    "out_channels": 4,
    "center_input_sample": False,
    "flip_sin_to_cos": True,
    "freq_shift": 0,
    "down_block_types": ["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D",
                         "DownBlock2D"],
    "mid_block_type": "UNetMidBlock2DCrossAttn",
    "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"],
    "only_cross_attention": False,
    "block_out_channels": [320, 640, 1280, 1280],
    "layers_per_block": 2,
    "downsample_padding": 1,
    "mid_block_scale_factor": 1,
    "act_fn": "silu",
    "norm_num_groups": 32,
    "norm_eps": 1e-05,
    "cross_attention_dim": 768,
    "attention_head_dim": 8,
    "use_linear_projection": False,
    "upcast_attention": False,
}

SD15_VAE = {
    "_class_name": "AutoencoderKL",
    "in_channels": 3,
    "out_channels": 3,
    "down_block_types": ["DownEncoderBlock2D"] * 4,
    "up_block_types": ["UpDecoderBlock2D"] * 4,
    "block_out_channels": [128, 256, 512, 512],
    "layers_per_block": 2,
    "act_fn": "silu",
    "latent_channels": 4,
    "norm_num_groups": 32,
    "sample_size": 512,
    "scaling_factor": 0.18215,
}

SD15_TEXT = {
    "architectures": ["CLIPTextModel"],
    "model_type": "clip_text_model",
    "vocab_size": 49408,
    "hidden_size": 768,
    "intermediate_size": 3072,
    "num_hidden_layers": 12,
    "num_attention_heads": 12,
    "max_position_embeddings": 77,
    "hidden_act": "quick_gelu",
    "layer_norm_eps": 1e-05,
    "projection_dim": 768,
    "bos_token_id": 0,
    "eos_token_id": 2,
    "pad_token_id": 1,
    "torch_dtype": "float32",
}


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

# arch name -> (unet, vae, text_encoder, scheduler, tokenizer vocab size or None for full CLIP size)
ARCHITECTURES: dict[str, dict] = {
    "tiny": {"unet": TINY_UNET, "vae": TINY_VAE, "text_encoder": TINY_TEXT,
             "scheduler": SD15_SCHEDULER, "vocab_size": 1000},
    "tiny-bk": {"unet": TINY_BK_UNET, "vae": TINY_VAE, "text_encoder": TINY_TEXT,
                "scheduler": SD15_SCHEDULER, "vocab_size": 1000},
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
