"""AutoencoderKL (the SD VAE), with diffusers' parameter names: encoder, decoder, quant convs.

Source: diffusers' `AutoencoderKL` (`diffusers/models/autoencoders/autoencoder_kl.py` and `vae.py`), the
KL-regularised autoencoder of Rombach et al. 2022, "High-Resolution Image Synthesis with Latent Diffusion
Models" (LDM, arXiv:2112.10752). It maps an image to latents f = 2**(len(block_out_channels) - 1) times
smaller per side (8 for SD) and back. Latents here are *unscaled*: the diffusion model's latents are
these times `scaling_factor` (0.18215 for SD 1.x), which the pipeline applies, not this module.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import ModelFolderError
from .config import (
    MAX_CHANNELS,
    MAX_LAYERS_PER_BLOCK,
    MAX_SAMPLE_SIZE,
    check_divides,
    check_field_types,
    check_latent_scaling,
    check_length,
    check_range,
    show,
)
from .layers import Attention, Downsample2D, ResnetBlock2D, Upsample2D, check_channels

WHERE = "vae config"


@dataclass
class VAEConfig:
    """The fields of diffusers' `vae/config.json`, by its names; the defaults are SD 1.5's."""

    in_channels: int = 3
    out_channels: int = 3
    down_block_types: tuple[str, ...] = ("DownEncoderBlock2D",) * 4
    up_block_types: tuple[str, ...] = ("UpDecoderBlock2D",) * 4
    block_out_channels: tuple[int, ...] = (128, 256, 512, 512)
    layers_per_block: int = 2
    act_fn: str = "silu"
    latent_channels: int = 4
    norm_num_groups: int = 32
    sample_size: int = 512
    scaling_factor: float = 0.18215
    shift_factor: float | None = None
    force_upcast: bool = True
    use_quant_conv: bool = True
    use_post_quant_conv: bool = True
    mid_block_add_attention: bool = True

    def validate(self) -> None:
        """Raise ModelFolderError for a config this port does not implement, or whose values are of the
        wrong type or out of range (checked once, before anything is built)."""
        check_field_types(self, WHERE)
        if self.act_fn != "silu":
            raise ModelFolderError(f"vae config: act_fn={show(self.act_fn)} is not supported")
        if any(t != "DownEncoderBlock2D" for t in self.down_block_types):
            raise ModelFolderError(f"vae config: down_block_types {show(self.down_block_types)} not supported")
        if any(t != "UpDecoderBlock2D" for t in self.up_block_types):
            raise ModelFolderError(f"vae config: up_block_types {show(self.up_block_types)} not supported")
        check_length(WHERE, "block_out_channels", self.block_out_channels)
        if len(self.down_block_types) != len(self.block_out_channels) or \
                len(self.up_block_types) != len(self.block_out_channels):
            raise ModelFolderError("vae config: block types and block_out_channels differ in length")
        for name in ("in_channels", "out_channels", "latent_channels", "block_out_channels"):
            check_range(WHERE, name, getattr(self, name), 1, MAX_CHANNELS)
        check_range(WHERE, "layers_per_block", self.layers_per_block, 1, MAX_LAYERS_PER_BLOCK)
        check_range(WHERE, "norm_num_groups", self.norm_num_groups, 1, MAX_CHANNELS)
        check_divides(WHERE, "block_out_channels", self.block_out_channels, self.norm_num_groups,
                      "norm_num_groups")
        check_range(WHERE, "sample_size", self.sample_size, 1, MAX_SAMPLE_SIZE)
        check_latent_scaling(WHERE, self.scaling_factor, self.shift_factor)


class UNetMidBlock2D(nn.Module):
    """resnet, single-head self-attention over the feature map, resnet; (B, ch, h, w) in and out."""

    def __init__(self, ch: int, groups: int, add_attention: bool):
        super().__init__()
        self.resnets = nn.ModuleList([ResnetBlock2D(ch, ch, None, groups, 1e-6) for _ in range(2)])
        self.attentions = nn.ModuleList(
            [Attention(ch, 1, ch, bias=True, norm_groups=groups, norm_eps=1e-6, residual=True)]
        ) if add_attention else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.resnets[0](x)
        if self.attentions is not None:
            x = self.attentions[0](x)
        return self.resnets[1](x)


class DownEncoderBlock2D(nn.Module):
    """resnets, then (except in the last block) a halving: (B, in_ch, H, W) -> (B, out_ch, H//2, W//2)."""

    def __init__(self, in_ch: int, out_ch: int, layers: int, groups: int, add_downsample: bool):
        super().__init__()
        self.resnets = nn.ModuleList([ResnetBlock2D(in_ch if i == 0 else out_ch, out_ch, None, groups, 1e-6)
                                      for i in range(layers)])
        self.downsamplers = nn.ModuleList([Downsample2D(out_ch, padding=0)]) if add_downsample else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for resnet in self.resnets:
            x = resnet(x)
        if self.downsamplers is not None:
            x = self.downsamplers[0](x)
        return x


class UpDecoderBlock2D(nn.Module):
    """resnets, then (except in the last block) a doubling: (B, in_ch, h, w) -> (B, out_ch, 2h, 2w)."""

    def __init__(self, in_ch: int, out_ch: int, layers: int, groups: int, add_upsample: bool):
        super().__init__()
        self.resnets = nn.ModuleList([ResnetBlock2D(in_ch if i == 0 else out_ch, out_ch, None, groups, 1e-6)
                                      for i in range(layers)])
        self.upsamplers = nn.ModuleList([Upsample2D(out_ch)]) if add_upsample else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for resnet in self.resnets:
            x = resnet(x)
        if self.upsamplers is not None:
            x = self.upsamplers[0](x)
        return x


class Encoder(nn.Module):
    """(B, in_channels, H, W) image -> (B, 2 * latent_channels, H//f, W//f) moments (mean, logvar)."""

    def __init__(self, cfg: VAEConfig):
        super().__init__()
        ch, g = cfg.block_out_channels, cfg.norm_num_groups
        self.conv_in = nn.Conv2d(cfg.in_channels, ch[0], 3, padding=1)
        self.down_blocks = nn.ModuleList()
        out_ch = ch[0]
        for i in range(len(ch)):
            in_ch, out_ch = out_ch, ch[i]
            self.down_blocks.append(DownEncoderBlock2D(in_ch, out_ch, cfg.layers_per_block, g,
                                                       add_downsample=i < len(ch) - 1))
        self.mid_block = UNetMidBlock2D(ch[-1], g, cfg.mid_block_add_attention)
        self.conv_norm_out = nn.GroupNorm(g, ch[-1], eps=1e-6)
        self.conv_out = nn.Conv2d(ch[-1], 2 * cfg.latent_channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv_in(x)
        for block in self.down_blocks:
            x = block(x)
        x = self.mid_block(x)
        return self.conv_out(F.silu(self.conv_norm_out(x)))


class Decoder(nn.Module):
    """(B, latent_channels, h, w) latents -> (B, out_channels, h*f, w*f) image."""

    def __init__(self, cfg: VAEConfig):
        super().__init__()
        rch, g = tuple(reversed(cfg.block_out_channels)), cfg.norm_num_groups
        self.conv_in = nn.Conv2d(cfg.latent_channels, rch[0], 3, padding=1)
        self.mid_block = UNetMidBlock2D(rch[0], g, cfg.mid_block_add_attention)
        self.up_blocks = nn.ModuleList()
        out_ch = rch[0]
        for i in range(len(rch)):
            in_ch, out_ch = out_ch, rch[i]
            self.up_blocks.append(UpDecoderBlock2D(in_ch, out_ch, cfg.layers_per_block + 1, g,
                                                   add_upsample=i < len(rch) - 1))
        self.conv_norm_out = nn.GroupNorm(g, rch[-1], eps=1e-6)
        self.conv_out = nn.Conv2d(rch[-1], cfg.out_channels, 3, padding=1)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        x = self.conv_in(z)
        x = self.mid_block(x)
        for block in self.up_blocks:
            x = block(x)
        return self.conv_out(F.silu(self.conv_norm_out(x)))


class AutoencoderKL(nn.Module):
    """The SD VAE. `with_encoder=False` builds the decoder side only (all that text-to-image needs)."""

    def __init__(self, cfg: VAEConfig, with_encoder: bool = True):
        super().__init__()
        cfg.validate()
        self.config = cfg
        lc = cfg.latent_channels
        self.encoder = Encoder(cfg) if with_encoder else None
        self.quant_conv = nn.Conv2d(2 * lc, 2 * lc, 1) if cfg.use_quant_conv and with_encoder else None
        self.decoder = Decoder(cfg)
        self.post_quant_conv = nn.Conv2d(lc, lc, 1) if cfg.use_post_quant_conv else None

    def encode(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Encode images to the parameters of the latent distribution.

        Args:
            x: (B, in_channels, H, W) float32 images (or the module's compute dtype) with values in
                [-1, 1]. H and W should be multiples of f = 2**(len(block_out_channels) - 1); other
                sizes are floored at each halving.

        Returns:
            (mean, logvar), each (B, latent_channels, H//f, W//f) in the dtype of `x`: the diagonal
            Gaussian over the *unscaled* latents (multiply a sample by `scaling_factor` for the UNet);
            logvar is clamped to [-30, 20] as diffusers does.

        Raises:
            RuntimeError: the module was built with `with_encoder=False`.
            ValueError: `x` is not 4-d or its channel count is not `config.in_channels`.
        """
        if self.encoder is None:
            raise RuntimeError("this AutoencoderKL was built without its encoder")
        check_channels(x, self.config.in_channels, "AutoencoderKL.encode input")
        moments = self.encoder(x)
        if self.quant_conv is not None:
            moments = self.quant_conv(moments)
        mean, logvar = moments.chunk(2, dim=1)
        return mean, logvar.clamp(-30.0, 20.0)

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """Decode latents to images.

        Args:
            z: (B, latent_channels, h, w) float32 latents (or the module's compute dtype), already
                divided by `scaling_factor` (then plus `shift_factor`, if the config has one).
                Any h, w >= 1.

        Returns:
            (B, out_channels, h*f, w*f) images in the dtype of `z`, f = 2**(len(block_out_channels) - 1)
            (8 for SD), values in about [-1, 1] (not clamped).

        Raises:
            ValueError: `z` is not 4-d or its channel count is not `config.latent_channels`.
        """
        check_channels(z, self.config.latent_channels, "AutoencoderKL.decode input")
        if self.post_quant_conv is not None:
            z = self.post_quant_conv(z)
        return self.decoder(z)
