"""Write a complete random-weight diffusers model folder for a named architecture.

    sdlite random-model tiny ./tiny-model          # seconds; what the tests use
    sdlite random-model sd15 ./sd15-random         # full SD 1.5 size (about 4 GB in fp32)

The folder has everything a downloaded SD 1.x folder has (model_index.json, configs, safetensors,
tokenizer files), so it exercises exactly the code paths real checkpoints use, and diffusers loads it too.
"""

from __future__ import annotations

import contextlib
import json
import math
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import torch

from .model_configs import VAE_ARCHITECTURES, architecture
from .models.clip_text import CLIPTextConfig, CLIPTextModel
from .models.config import config_from_dict
from .models.taesd import AutoencoderTiny, TAESDConfig
from .models.unet import UNet2DConditionModel, UNetConfig
from .models.vae import AutoencoderKL, VAEConfig
from .runtime.compute_thread import run_on_compute_thread
from .tokenizer_files import write_clip_tokenizer
from .weights.safetensors_mmap import save_safetensors

MODEL_INDEX = {
    "_class_name": "StableDiffusionPipeline",
    "_diffusers_version": "0.30.0",
    "feature_extractor": [None, None],
    "requires_safety_checker": False,
    "safety_checker": [None, None],
    "scheduler": ["diffusers", "PNDMScheduler"],
    "text_encoder": ["transformers", "CLIPTextModel"],
    "tokenizer": ["transformers", "CLIPTokenizer"],
    "unet": ["diffusers", "UNet2DConditionModel"],
    "vae": ["diffusers", "AutoencoderKL"],
}


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


def _write_json(path: Path, data: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=2) + "\n", encoding="utf-8")


@contextlib.contextmanager
def _atomic_folder(folder: str | Path) -> Iterator[Path]:
    """Yield a temporary sibling of `folder` to fill; renamed into place when the block completes,
    removed when it raises, so a failed write leaves nothing behind."""
    folder = Path(folder)
    if folder.exists():
        raise FileExistsError(f"{folder}: already exists")
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}.", dir=folder.parent))
    try:
        yield tmp
        tmp.rename(folder)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def write_random_model(arch: str, folder: str | Path, seed: int = 0,
                       dtype: torch.dtype = torch.float32) -> Path:
    """Write the folder atomically: built in a temporary sibling, renamed into place when complete.
    The torch work runs on sdlite's compute thread, like the generations that follow."""
    return run_on_compute_thread(_write_random_model, arch, folder, seed, dtype)


def _write_random_model(arch: str, folder: str | Path, seed: int, dtype: torch.dtype) -> Path:
    spec = architecture(arch)
    with _atomic_folder(folder) as tmp:
        g = torch.Generator().manual_seed(seed)
        vocab = write_clip_tokenizer(tmp / "tokenizer", vocab_size=min(spec["vocab_size"], 4000))
        text_cfg = spec["text_encoder"]
        text_cfg["vocab_size"] = max(text_cfg["vocab_size"], vocab) if arch in ("sd15", "bk-sdm-tiny") \
            else vocab
        text_cfg["bos_token_id"], text_cfg["eos_token_id"] = vocab - 2, vocab - 1
        parts = [
            ("text_encoder", "model.safetensors", text_cfg,
             lambda: CLIPTextModel(config_from_dict(CLIPTextConfig, text_cfg))),
            ("unet", "diffusion_pytorch_model.safetensors", spec["unet"],
             lambda: UNet2DConditionModel(config_from_dict(UNetConfig, spec["unet"]))),
            ("vae", "diffusion_pytorch_model.safetensors", spec["vae"],
             lambda: AutoencoderKL(config_from_dict(VAEConfig, spec["vae"]))),
        ]
        for name, filename, cfg, build in parts:
            with torch.device("meta"):
                module = build()
            _write_json(tmp / name / "config.json", cfg)
            tensors = random_state_dict(module, g, dtype)
            save_safetensors(tensors, tmp / name / filename, metadata={"format": "pt"})
            del tensors
        _write_json(tmp / "scheduler" / "scheduler_config.json", spec["scheduler"])
        _write_json(tmp / "model_index.json", MODEL_INDEX)
        (tmp / "README.md").write_text(
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
    with _atomic_folder(folder) as tmp:
        with torch.device("meta"):
            module = AutoencoderTiny(config_from_dict(TAESDConfig, cfg), with_encoder=True)
        tensors = random_state_dict(module, torch.Generator().manual_seed(seed), dtype)
        _write_json(tmp / "config.json", cfg)
        save_safetensors(tensors, tmp / "diffusion_pytorch_model.safetensors", metadata={"format": "pt"})
    return Path(folder)
