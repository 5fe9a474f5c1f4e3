"""Building a component's network and putting its weights in place.

Networks are constructed on the `meta` device (no memory), then their parameters are pointed at the
mapped safetensors file: zero-copy when the file's dtype is the compute dtype, converted otherwise.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Callable, Iterator

import torch
from torch import nn

from ..errors import ModelFolderError
from ..models.clip_text import CLIPTextConfig, CLIPTextModel
from ..models.config import load_config, show
from ..models.taesd import CLASS_NAME as TAESD_CLASS
from ..models.taesd import AutoencoderTiny, TAESDConfig
from ..models.unet import UNet2DConditionModel, UNetConfig
from ..models.vae import AutoencoderKL, VAEConfig
from ..samplers.schedule import check_scheduler_config
from ..tokenizer.clip import max_token_id
from ..weights.model_folder import ModelFolder
from ..weights.state_dict import ComponentWeights, check_fits, load_into
from .lazy_weights import SCALE_SUFFIX, dequantize, prepare_stored_weight, swap_layers

WEIGHT_MODES = ("lazy", "materialize")
STANDARD_MAX_ID = 49407  # the shipped CLIP vocabulary: 49408 ids


@dataclass
class LoadedComponent:
    name: str
    module: nn.Module
    weights: ComponentWeights  # keeps the mapping alive while the module reads from it
    num_parameters: int
    weights_mode: str = "lazy"
    dtype: torch.dtype = torch.float32  # what the network computes in

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


class DequantizedView(Mapping):
    """The checkpoint with int8 weights multiplied by their scales into `dtype` (fp32 by default), scale keys
    hidden; other tensors as stored. Dequantizing straight into the dtype the network is loaded in means a
    load never holds a whole fp32 copy beside the converted one (an int8 SD 1.5 UNet loaded in bf16: 1.7 GB,
    not 1.7 + 3.4)."""

    def __init__(self, weights: ComponentWeights, dtype: torch.dtype = torch.float32):
        self.weights, self.dtype = weights, dtype
        self._keys = [k for k in weights.keys()
                      if not (k.endswith(SCALE_SUFFIX) and k[: -len(SCALE_SUFFIX)] in weights)]

    def __getitem__(self, key: str) -> torch.Tensor:
        t = self.weights[key]
        scale_key = key + SCALE_SUFFIX
        if not t.is_floating_point() and scale_key in self.weights:
            return dequantize(t, self.weights[scale_key].float(), torch.empty(t.shape, dtype=self.dtype))
        return t

    def __iter__(self) -> Iterator[str]:
        return iter(self._keys)

    def __len__(self) -> int:
        return len(self._keys)


def _load(folder: ModelFolder, name: str, module: nn.Module, dtype: torch.dtype,
          key_map=None, weights_mode: str = "lazy") -> LoadedComponent:
    """Put `folder`'s weights for `name` into `module` (built on meta), to compute in `dtype` (fp32, bf16,
    fp16). `lazy`: Linear/Conv2d/Embedding weights stay in the file as stored, zero-copy, and are converted
    per layer at use when their stored dtype is not `dtype` (fp16 -> bf16, int8 -> fp32, ...); the small
    tensors (norms, biases) become `dtype` at load. `materialize`: everything becomes `dtype` at load."""
    if weights_mode not in WEIGHT_MODES:
        raise ValueError(f"weights_mode must be one of {WEIGHT_MODES}, got {weights_mode!r}")
    part = folder.part(name)
    weights = part.open_weights()
    source = part.describe()
    try:
        if weights_mode == "lazy":
            module.to(dtype)  # on meta: the slots of the small tensors take the compute dtype
            file_key = {}
            for k in weights.keys():
                mapped = key_map(k) if key_map else k
                if mapped is not None:
                    file_key[mapped] = k
            for lname, layer in swap_layers(module).items():
                layer.compute_dtype = dtype
                k = file_key.get(f"{lname}.weight")
                if k is None:
                    continue  # load_into reports it as missing
                stored = weights.dtype_of(k)
                if stored != dtype or k + SCALE_SUFFIX in weights:
                    prepare_stored_weight(layer, stored, quantized=k + SCALE_SUFFIX in weights)
            load_into(module, weights, source=source, dtype=None, key_map=key_map)
        else:
            load_into(module, DequantizedView(weights, dtype), source=source, dtype=dtype, key_map=key_map)
    except Exception:
        weights.close()
        raise
    n = sum(p.numel() for p in module.parameters())
    return LoadedComponent(name, module, weights, n, weights_mode, dtype)


def _config(folder: ModelFolder, name: str, cls):
    part = folder.part(name)
    return load_config(cls, part.config_path, part.read_config())


def unet_config(folder: ModelFolder) -> UNetConfig:
    return _config(folder, "unet", UNetConfig)


VAE_CLASSES = {"AutoencoderKL": VAEConfig, TAESD_CLASS: TAESDConfig}


def vae_config(folder: ModelFolder, part=None) -> VAEConfig | TAESDConfig:
    """The SD VAE's config, or TAESD's when the vae folder holds an AutoencoderTiny. `part`: another VAE
    part than the model's (e.g. its own when --vae replaces it)."""
    part = part or folder.part("vae")
    path = part.config_path
    data = part.read_config()
    name = data.get("_class_name", "AutoencoderKL")
    cls = VAE_CLASSES.get(name) if isinstance(name, str) else None
    if cls is None:
        raise ModelFolderError(f"{path}: VAE class {show(name)} is not supported "
                               f"(supported: {', '.join(VAE_CLASSES)})")
    return load_config(cls, path, data)


def is_taesd(cfg) -> bool:
    return isinstance(cfg, TAESDConfig)


def text_config(folder: ModelFolder) -> CLIPTextConfig:
    return _config(folder, "text_encoder", CLIPTextConfig)


def check_folder(folder: ModelFolder) -> None:
    """Every config of the folder read and checked (types, ranges, shapes this port builds), and the parts
    checked against each other, before any network is built or any weight read: the UNet's, the VAE's and
    the text encoder's config.json, the scheduler's config, and the tokenizer's files against the text
    encoder (every id the tokenizer can emit below the encoder's vocab_size).
    Raises ModelFolderError naming the file. `check_vae_matches` runs it, so `sdlite info`, `generate`,
    the service and `Pipeline.load` all refuse the same folders."""
    unet_config(folder)
    vae_config(folder)
    text = text_config(folder)
    scheduler_path = folder.scheduler_config_path
    try:
        check_scheduler_config(folder.scheduler_config())
    except ModelFolderError as exc:
        message = str(exc)
        raise ModelFolderError(message if message.startswith(str(scheduler_path))
                               else f"{scheduler_path}: {message}") from None
    tokenizer_dir = folder.tokenizer_dir
    if tokenizer_dir is None:
        max_id, tokenizer_dir = STANDARD_MAX_ID, f"the CLIP tokenizer sdlite ships ({folder.tokenizer_kind})"
    else:
        max_id = max_token_id(tokenizer_dir)
    if max_id >= text.vocab_size:
        raise ModelFolderError(
            f"{folder.part('text_encoder').config_path}: vocab_size is {text.vocab_size}, but the "
            f"tokenizer ({tokenizer_dir}) emits ids up to {max_id}: the text encoder does not fit this tokenizer")


def check_vae_matches(folder: ModelFolder) -> None:
    """The VAE (the model's own, or one given instead) must read the latents this UNet makes, and a VAE
    given instead must scale them as the model's own does (else images come out at another size than
    asked). Runs `check_folder` first, so every config is checked. Raises ModelFolderError."""
    check_folder(folder)
    unet, vae = unet_config(folder), vae_config(folder)
    if vae.latent_channels != unet.out_channels:
        raise ModelFolderError(f"{folder.part('vae').describe()}: this VAE decodes {vae.latent_channels}-channel "
                               f"latents, but the UNet makes {unet.out_channels}-channel ones")
    if folder.replacement("vae") is not None and folder.own_vae is not None:
        own = vae_config(folder, folder.own_vae)
        if vae_factor(vae) != vae_factor(own):
            raise ModelFolderError(
                f"{folder.part('vae').describe()}: this VAE scales latents {vae_factor(vae)}x per side, but the "
                f"model's own VAE {vae_factor(own)}x: images would come out at another size than asked")


def vae_factor(cfg: VAEConfig | TAESDConfig) -> int:
    """How many image pixels one latent pixel spans, per side."""
    return 2 ** (len(cfg.block_out_channels) - 1)


def native_size(folder: ModelFolder) -> int:
    """The image side the model was trained at: UNet sample size x the VAE's downscale factor."""
    return unet_config(folder).sample_size * vae_factor(vae_config(folder))


def load_unet(folder: ModelFolder, dtype: torch.dtype = torch.float32,
              weights_mode: str = "lazy") -> LoadedComponent:
    cfg = unet_config(folder)
    return _load(folder, "unet", _build(lambda: UNet2DConditionModel(cfg)), dtype,
                 weights_mode=weights_mode)


def load_vae(folder: ModelFolder, dtype: torch.dtype = torch.float32, with_encoder: bool = False,
             weights_mode: str = "lazy") -> LoadedComponent:
    cfg = vae_config(folder)
    network = AutoencoderTiny if is_taesd(cfg) else AutoencoderKL
    module = _build(lambda: network(cfg, with_encoder=with_encoder))
    return _load(folder, "vae", module, dtype, None if with_encoder else decoder_only_key,
                 weights_mode=weights_mode)


def load_text_encoder(folder: ModelFolder, dtype: torch.dtype = torch.float32,
                      weights_mode: str = "lazy") -> LoadedComponent:
    cfg = text_config(folder)
    return _load(folder, "text_encoder", _build(lambda: CLIPTextModel(cfg)), dtype, text_encoder_key,
                 weights_mode=weights_mode)


LOADERS = {"text_encoder": load_text_encoder, "unet": load_unet, "vae": load_vae}


def check_weights_fit(folder: ModelFolder, names=("text_encoder", "unet", "vae")) -> None:
    """Every network's tensors against the network its config builds (names, shapes, float vs integer), on
    the `meta` device with no tensor data read: WeightsError naming the file and the first mismatches.
    What `sdlite info` and `sdlite convert` run, so that neither calls a model good that cannot load."""
    builders = {"unet": lambda: UNet2DConditionModel(unet_config(folder)),
                "text_encoder": lambda: CLIPTextModel(text_config(folder))}
    for name in names:
        part = folder.part(name)
        with part.open_weights() as weights:
            if name == "vae":
                cfg = vae_config(folder)
                network = AutoencoderTiny if is_taesd(cfg) else AutoencoderKL
                encoder = any(k.startswith("encoder.") for k in weights.keys())  # decoder-only files exist
                build, key_map = (lambda: network(cfg, with_encoder=encoder)), None
            else:
                build, key_map = builders[name], text_encoder_key if name == "text_encoder" else None
            check_fits(_build(build), DequantizedNames(weights), source=part.describe(), key_map=key_map)


class DequantizedNames(DequantizedView):
    """`DequantizedView`'s names (int8 scale keys hidden) for a shape check: an int8 weight with scales is
    shown as an fp32 tensor of its shape on `meta`, nothing is dequantized; `origin` is the source's."""

    def __init__(self, weights):
        super().__init__(weights)
        self.origin = getattr(weights, "origin", None)

    def __getitem__(self, key: str) -> torch.Tensor:
        t = self.weights[key]
        if not t.is_floating_point() and key + SCALE_SUFFIX in self.weights:
            return torch.empty(t.shape, dtype=torch.float32, device="meta")
        return t


# What diffusers' pipelines and the model cards use when the user says nothing (steps, cfg_scale, sampler).
STANDARD_SETTINGS = {"steps": 20, "cfg_scale": 7.5, "sampler": "dpm++2m"}
# LCM-distilled UNets (LCM-Dreamshaper's card: 4 steps, guidance 8, the LCM scheduler)
LCM_SETTINGS = {"steps": 4, "cfg_scale": 8.0, "sampler": "lcm"}
# SD-Turbo's card: 1 step, guidance 0 (off), Euler ancestral on trailing timesteps
TURBO_SETTINGS = {"steps": 1, "cfg_scale": 0.0, "sampler": "euler_a"}


def recommended_settings(folder: ModelFolder) -> dict:
    """The generation settings this model is meant to run with, where the request gives none: LCM's for an
    LCM-distilled UNet (or an LCMScheduler config), SD-Turbo's for a Turbo file, else diffusers' defaults.
    A dict with "steps", "cfg_scale", "sampler" (a registry name)."""
    if unet_config(folder).time_cond_proj_dim or \
            folder.scheduler_config().get("_class_name") == "LCMScheduler":
        return dict(LCM_SETTINGS)
    if getattr(folder, "is_turbo", False):
        return dict(TURBO_SETTINGS)
    return dict(STANDARD_SETTINGS)

