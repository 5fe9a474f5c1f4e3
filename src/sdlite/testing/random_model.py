"""Write a complete random-weight diffusers model folder for a named architecture.

    sdlite random-model tiny ./tiny-model          # seconds; what the tests use
    sdlite random-model sd15 ./sd15-random         # full SD 1.5 size (about 4 GB in fp32)

The folder has everything a downloaded SD 1.x folder has (model_index.json, configs, safetensors,
tokenizer files), so it exercises exactly the code paths real checkpoints use, and diffusers loads it too.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch

from ..models.clip_text import CLIPTextConfig, CLIPTextModel
from ..models.config import config_from_dict
from ..models.taesd import AutoencoderTiny, TAESDConfig
from ..models.unet import UNet2DConditionModel, UNetConfig
from ..models.vae import AutoencoderKL, VAEConfig
from ..runtime.compute_thread import run_on_compute_thread
from ..tokenizer import write_clip_tokenizer
from ..weights.model_folder import SD_MODEL_INDEX, ModelFolderWriter
from .architectures import VAE_ARCHITECTURES, architecture


def random_state_dict(module: torch.nn.Module, generator: torch.Generator,
                      dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
    """Random weights shaped like `module`'s (which may live on the meta device), scaled so that
    activations stay in a sane range: weights ~ N(0, 1/fan_in), norms ~ 1 + N(0, 0.1^2)."""
    out = {}
    for name, p in module.state_dict().items():
        shape = tuple(p.shape)
        if name.endswith("embedding.weight"):
            t = 0.02 * torch.randn(shape, generator=generator)
        elif len(shape) == 1 and name.endswith("weight"):
            t = 1.0 + 0.1 * torch.randn(shape, generator=generator)
        elif len(shape) == 1:
            t = 0.02 * torch.randn(shape, generator=generator)
        else:
            fan_in = math.prod(shape[1:])
            t = torch.randn(shape, generator=generator) / math.sqrt(fan_in)
        out[name] = t.to(dtype)
    return out


def write_random_model(arch: str, folder: str | Path, seed: int = 0,
                       dtype: torch.dtype = torch.float32) -> Path:
    """Write the folder atomically: built in a temporary sibling, renamed into place when complete.
    The torch work runs on sdlite's compute thread, like the generations that follow."""
    return run_on_compute_thread(_write_random_model, arch, folder, seed, dtype)


def _write_random_model(arch: str, folder: str | Path, seed: int, dtype: torch.dtype) -> Path:
    spec = architecture(arch)
    with ModelFolderWriter(folder) as out:
        g = torch.Generator().manual_seed(seed)
        vocab = write_clip_tokenizer(out.root / "tokenizer", vocab_size=min(spec["vocab_size"], 4000))
        text_cfg = spec["text_encoder"]
        text_cfg["vocab_size"] = max(text_cfg["vocab_size"], vocab) if arch in ("sd15", "bk-sdm-tiny", "tiny-std") \
            else vocab
        text_cfg["bos_token_id"], text_cfg["eos_token_id"] = vocab - 2, vocab - 1
        parts = [
            ("text_encoder", text_cfg, lambda: CLIPTextModel(config_from_dict(CLIPTextConfig, text_cfg))),
            ("unet", spec["unet"], lambda: UNet2DConditionModel(config_from_dict(UNetConfig, spec["unet"]))),
            ("vae", spec["vae"], lambda: AutoencoderKL(config_from_dict(VAEConfig, spec["vae"]))),
        ]
        for name, cfg, build in parts:
            with torch.device("meta"):
                module = build()
            out.write_component(name, cfg, random_state_dict(module, g, dtype))
        out.write_json("scheduler/scheduler_config.json", spec["scheduler"])
        out.write_json("model_index.json", SD_MODEL_INDEX)
        (out.root / "README.md").write_text(
            f"# random {arch}\n\nRandom weights (seed {seed}) written by `sdlite random-model`; "
            "for tests and benchmarks only: it draws noise, not pictures.\n", encoding="utf-8")
    return Path(folder)


def write_random_vae(arch: str, folder: str | Path, seed: int = 0, dtype: torch.dtype = torch.float32) -> Path:
    """A random-weight VAE folder (config.json + diffusion_pytorch_model.safetensors), written atomically:
    `taesd` (SD 1.x TAESD shapes) or `tiny-taesd` (for the tiny test models). On the compute thread."""
    if arch not in VAE_ARCHITECTURES:
        raise KeyError(f"unknown VAE architecture {arch!r}; choose one of {', '.join(VAE_ARCHITECTURES)}")
    return run_on_compute_thread(_write_random_vae, dict(VAE_ARCHITECTURES[arch]), folder, seed, dtype)


def _write_random_vae(cfg: dict, folder: str | Path, seed: int, dtype: torch.dtype) -> Path:
    with ModelFolderWriter(folder) as out:
        with torch.device("meta"):
            module = AutoencoderTiny(config_from_dict(TAESDConfig, cfg), with_encoder=True)
        out.write_component("vae", cfg, random_state_dict(module, torch.Generator().manual_seed(seed), dtype),
                            folder=".")
    return Path(folder)
