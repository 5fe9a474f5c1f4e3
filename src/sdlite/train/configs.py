"""Configs (diffusers field names) of the shipped shapes model: sized to train on two CPU cores."""

from __future__ import annotations

import copy

from ..testing.architectures import SD15_SCHEDULER, SD15_TEXT, SD15_UNET, SD15_VAE

IMAGE_SIZE = 64

VAE = {
    **copy.deepcopy(SD15_VAE),
    "block_out_channels": [16, 32, 64],          # factor 4: 64x64x3 -> 16x16x4
    "down_block_types": ["DownEncoderBlock2D"] * 3,
    "up_block_types": ["UpDecoderBlock2D"] * 3,
    "layers_per_block": 1,
    "norm_num_groups": 8,
    "latent_channels": 4,
    "sample_size": IMAGE_SIZE,
    "scaling_factor": 1.0,                       # replaced by 1/std of the latents after training
}

TEXT = {
    **copy.deepcopy(SD15_TEXT),
    "hidden_size": 128,
    "intermediate_size": 512,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "projection_dim": 128,
    "max_position_embeddings": 77,
    # vocab_size, bos/eos ids: set from the learned tokenizer
}

UNET = {
    **copy.deepcopy(SD15_UNET),
    "sample_size": IMAGE_SIZE // 4,
    # cross-attention at 8x8 and 4x4 (and the mid block), none at 16x16: a third of the cost
    "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
    "up_block_types": ["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
    "block_out_channels": [48, 96, 96],
    "layers_per_block": 1,
    "norm_num_groups": 16,
    "cross_attention_dim": 128,
    "attention_head_dim": 4,
}

SCHEDULER = copy.deepcopy(SD15_SCHEDULER)
