"""The diffusers configs of the standard Stable Diffusion 1.5 and 2.1 models, as product data.

A single-file checkpoint carries weights only: what the weights cannot tell (head counts, the scheduler, the
text encoder's token ids) comes from these, the values of the reference diffusers folders
(runwayml/stable-diffusion-v1-5, stabilityai/stable-diffusion-2-1 and -2-1-base, stabilityai/sd-turbo,
SimianLuo/LCM_Dreamshaper_v7). Scheduler dicts keep only keys their diffusers class takes (the hub files
carry a few leftovers, e.g. `skip_prk_steps` in a DDIM config, which diffusers ignores), except SD 1.5's,
kept as sdlite has always written it.

Treat them as read-only: copy (`copy.deepcopy`) before changing one.
"""

from __future__ import annotations

_BETAS = {"beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "scaled_linear", "num_train_timesteps": 1000}

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

# SD 2.1 (768 px, v-prediction): OpenCLIP ViT-H context (1024 wide), 64-wide heads, linear projections.
# stabilityai/stable-diffusion-2-1-base has the same UNet with sample_size 64.
SD21_UNET = {
    **SD15_UNET,
    "sample_size": 96,
    "cross_attention_dim": 1024,
    "attention_head_dim": [5, 10, 20, 20],
    "use_linear_projection": True,
    "upcast_attention": True,
}

SD21_VAE = {**SD15_VAE, "sample_size": 768}

# diffusers' 23-layer CLIPTextModel: OpenCLIP ViT-H's text tower without its last layer (SD 2.x conditions on
# the penultimate layer, then the final layer norm). projection_dim as stabilityai's folders write it.
SD21_TEXT = {
    **SD15_TEXT,
    "hidden_size": 1024,
    "intermediate_size": 4096,
    "num_hidden_layers": 23,
    "num_attention_heads": 16,
    "hidden_act": "gelu",
    "projection_dim": 512,
}

SD21_SCHEDULER = {
    "_class_name": "DDIMScheduler",
    **_BETAS,
    "clip_sample": False,
    "prediction_type": "v_prediction",
    "set_alpha_to_one": False,
    "steps_offset": 1,
    "trained_betas": None,
}

# SD 2.0-base / 2.1-base (512 px): epsilon-prediction, PNDM
SD21_BASE_SCHEDULER = {
    "_class_name": "PNDMScheduler",
    **_BETAS,
    "prediction_type": "epsilon",
    "set_alpha_to_one": False,
    "skip_prk_steps": True,
    "steps_offset": 1,
    "trained_betas": None,
}

# stabilityai/sd-turbo: Euler with "trailing" spacing (1 to 4 steps, no guidance)
SD_TURBO_SCHEDULER = {
    "_class_name": "EulerDiscreteScheduler",
    **_BETAS,
    "interpolation_type": "linear",
    "prediction_type": "epsilon",
    "steps_offset": 1,
    "timestep_spacing": "trailing",
    "trained_betas": None,
    "use_karras_sigmas": False,
}

# SimianLuo/LCM_Dreamshaper_v7 (latent consistency distillation of an SD 1.5 fine-tune)
LCM_SCHEDULER = {
    "_class_name": "LCMScheduler",
    **_BETAS,
    "clip_sample": False,
    "clip_sample_range": 1.0,
    "dynamic_thresholding_ratio": 0.995,
    "original_inference_steps": 50,
    "prediction_type": "epsilon",
    "rescale_betas_zero_snr": False,
    "sample_max_value": 1.0,
    "set_alpha_to_one": True,
    "steps_offset": 1,
    "thresholding": False,
    "timestep_scaling": 10.0,
    "timestep_spacing": "leading",
    "trained_betas": None,
}

__all__ = ["LCM_SCHEDULER", "SD15_SCHEDULER", "SD15_TEXT", "SD15_UNET", "SD15_VAE", "SD21_BASE_SCHEDULER",
           "SD21_SCHEDULER", "SD21_TEXT", "SD21_UNET", "SD21_VAE", "SD_TURBO_SCHEDULER"]
