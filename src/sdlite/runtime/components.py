"""Building a component's network and putting its weights in place.

Networks are constructed on the `meta` device (no memory), then their parameters are pointed at the
mapped safetensors file: zero-copy when the file's dtype is the compute dtype, converted otherwise.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn

from ..models.clip_text import CLIPTextConfig, CLIPTextModel
from ..models.config import load_config
from ..models.unet import UNet2DConditionModel, UNetConfig
from ..models.vae import AutoencoderKL, VAEConfig
from ..weights.model_folder import ModelFolder
from ..weights.state_dict import ComponentWeights, load_component_weights, load_into


@dataclass
class LoadedComponent:
    name: str
    module: nn.Module
    weights: ComponentWeights  # keeps the mapping alive while the module reads from it
    num_parameters: int

    def close(self) -> None:
        self.module = None
        self.weights.close()


def text_encoder_key(key: str) -> str | None:
    """Checkpoints written by transformers >= 5 drop the `text_model.` prefix; old ones have position_ids."""
    if key.endswith("position_ids"):
        return None
    return key if key.startswith("text_model.") else "text_model." + key


def decoder_only_key(key: str) -> str | None:
    return None if key.startswith(("encoder.", "quant_conv.")) else key


def _build(factory: Callable[[], nn.Module]) -> nn.Module:
    with torch.device("meta"):
        module = factory()
    return module.eval().requires_grad_(False)


def _load(folder: ModelFolder, name: str, module: nn.Module, dtype: torch.dtype,
          key_map=None) -> LoadedComponent:
    weights = load_component_weights(folder.component(name))
    try:
        load_into(module, weights, source=str(folder.component(name)), dtype=dtype, key_map=key_map)
    except Exception:
        weights.close()
        raise
    n = sum(p.numel() for p in module.parameters())
    return LoadedComponent(name, module, weights, n)


def unet_config(folder: ModelFolder) -> UNetConfig:
    return load_config(UNetConfig, folder.component("unet") / "config.json")


def vae_config(folder: ModelFolder) -> VAEConfig:
    return load_config(VAEConfig, folder.component("vae") / "config.json")


def text_config(folder: ModelFolder) -> CLIPTextConfig:
    return load_config(CLIPTextConfig, folder.component("text_encoder") / "config.json")


def load_unet(folder: ModelFolder, dtype: torch.dtype = torch.float32) -> LoadedComponent:
    cfg = unet_config(folder)
    return _load(folder, "unet", _build(lambda: UNet2DConditionModel(cfg)), dtype)


def load_vae(folder: ModelFolder, dtype: torch.dtype = torch.float32,
             with_encoder: bool = False) -> LoadedComponent:
    cfg = vae_config(folder)
    module = _build(lambda: AutoencoderKL(cfg, with_encoder=with_encoder))
    return _load(folder, "vae", module, dtype, None if with_encoder else decoder_only_key)


def load_text_encoder(folder: ModelFolder, dtype: torch.dtype = torch.float32) -> LoadedComponent:
    cfg = text_config(folder)
    return _load(folder, "text_encoder", _build(lambda: CLIPTextModel(cfg)), dtype, text_encoder_key)
