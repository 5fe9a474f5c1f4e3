"""TAESD, the tiny autoencoder (diffusers' AutoencoderTiny): convs and ReLUs only, no norms, no attention.

Source: TAESD by madebyollin (github.com/madebyollin/taesd), as ported to diffusers'
`AutoencoderTiny` (`diffusers/models/autoencoders/autoencoder_tiny.py`, blocks in `vae.py`); a distilled
stand-in for the VAE of Rombach et al. 2022 (LDM, arXiv:2112.10752).

About 1.2 M decoder parameters against the SD VAE's 49 M: a decode that costs a fraction of the time and
memory, at some loss of fine detail. It reads and writes the *scaled* SD latents (`scaling_factor` 1.0).
Parameter names are diffusers': `decoder.layers.<i>...` / `encoder.layers.<i>...`, where `<i>` counts the
parameter-free ReLU and Upsample entries too, so the layer lists below are built in diffusers' order.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ..errors import ModelFolderError
from .config import (
    MAX_CHANNELS,
    MAX_LAYERS_PER_BLOCK,
    check_field_types,
    check_latent_scaling,
    check_length,
    check_range,
    show,
)
from .layers import check_channels

CLASS_NAME = "AutoencoderTiny"
WHERE = "taesd config"


@dataclass
class TAESDConfig:
    """The fields of diffusers' AutoencoderTiny `config.json`, by its names; the defaults are TAESD's
    for SD 1.x/2.x (madebyollin/taesd). `latent_magnitude`/`latent_shift` are read, not used here."""

    in_channels: int = 3
    out_channels: int = 3
    encoder_block_out_channels: tuple[int, ...] = (64, 64, 64, 64)
    decoder_block_out_channels: tuple[int, ...] = (64, 64, 64, 64)
    act_fn: str = "relu"
    upsample_fn: str = "nearest"
    latent_channels: int = 4
    upsampling_scaling_factor: int = 2
    num_encoder_blocks: tuple[int, ...] = (1, 3, 3, 3)
    num_decoder_blocks: tuple[int, ...] = (3, 3, 3, 1)
    latent_magnitude: int = 3
    latent_shift: float = 0.5
    force_upcast: bool = False
    scaling_factor: float = 1.0
    shift_factor: float = 0.0
    block_out_channels: tuple[int, ...] | None = None  # diffusers saves the decoder's widths here too

    def __post_init__(self) -> None:
        if self.block_out_channels is None and isinstance(self.decoder_block_out_channels, (tuple, list)):
            self.block_out_channels = tuple(self.decoder_block_out_channels)

    def validate(self) -> None:
        """Raise ModelFolderError for a config this port does not implement, or whose values are of the
        wrong type or out of range (checked once, before anything is built)."""
        check_field_types(self, WHERE)
        if self.act_fn != "relu":
            raise ModelFolderError(f"taesd config: act_fn={show(self.act_fn)} is not supported (relu only)")
        if self.upsample_fn not in ("nearest", "bilinear", "bicubic"):
            raise ModelFolderError(f"taesd config: upsample_fn={show(self.upsample_fn)} is not supported")
        for name in ("encoder_block_out_channels", "decoder_block_out_channels", "num_encoder_blocks",
                     "num_decoder_blocks"):
            check_length(WHERE, name, getattr(self, name))
        for name in ("in_channels", "out_channels", "latent_channels", "encoder_block_out_channels",
                     "decoder_block_out_channels", "block_out_channels"):
            check_range(WHERE, name, getattr(self, name), 1, MAX_CHANNELS)
        for name in ("num_encoder_blocks", "num_decoder_blocks"):
            check_range(WHERE, name, getattr(self, name), 1, MAX_LAYERS_PER_BLOCK)
        check_range(WHERE, "upsampling_scaling_factor", self.upsampling_scaling_factor, 1, 8)
        check_range(WHERE, "latent_magnitude", self.latent_magnitude, 1, 1e4)
        check_range(WHERE, "latent_shift", self.latent_shift, -1e4, 1e4)
        check_latent_scaling(WHERE, self.scaling_factor, self.shift_factor)
        if len(self.num_decoder_blocks) != len(self.decoder_block_out_channels):
            raise ModelFolderError("taesd config: num_decoder_blocks and decoder_block_out_channels "
                                   "differ in length")
        if len(self.num_encoder_blocks) != len(self.encoder_block_out_channels):
            raise ModelFolderError("taesd config: num_encoder_blocks and encoder_block_out_channels "
                                   "differ in length")
        for name in ("encoder_block_out_channels", "decoder_block_out_channels"):
            if len(set(getattr(self, name))) != 1:  # each stage's last conv keeps its width
                raise ModelFolderError(f"taesd config: {name} must all be equal, got {getattr(self, name)}")
        if self.upsampling_scaling_factor ** (len(self.num_decoder_blocks) - 1) != \
                2 ** (len(self.num_encoder_blocks) - 1):
            raise ModelFolderError("taesd config: encoder and decoder scale by different factors")


def conv(cin: int, cout: int, stride: int = 1, bias: bool = True) -> nn.Conv2d:
    """3x3 conv, padding 1: (B, cin, H, W) -> (B, cout, ceil(H/stride), ceil(W/stride))."""
    return nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=bias)


class AutoencoderTinyBlock(nn.Module):
    """relu(conv-relu-conv-relu-conv(x) + skip(x)); the skip is a 1x1 conv only when the width changes.

    (B, cin, H, W) -> (B, cout, H, W).
    """

    def __init__(self, cin: int, cout: int):
        super().__init__()
        self.conv = nn.Sequential(conv(cin, cout), nn.ReLU(inplace=True), conv(cout, cout),
                                  nn.ReLU(inplace=True), conv(cout, cout))
        self.skip = nn.Conv2d(cin, cout, 1, bias=False) if cin != cout else nn.Identity()
        self.fuse = nn.ReLU(inplace=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv(x)
        h += self.skip(x)
        return self.fuse(h)


class EncoderTiny(nn.Module):
    """(B, in_channels, H, W) image in [-1, 1] -> (B, latent_channels, H/f, W/f) latents (rounded up).

    Each stage after the first halves the size with a strided conv.
    """

    def __init__(self, cfg: TAESDConfig):
        super().__init__()
        layers: list[nn.Module] = []
        for i, (blocks, ch) in enumerate(zip(cfg.num_encoder_blocks, cfg.encoder_block_out_channels)):
            layers.append(conv(cfg.in_channels, ch) if i == 0 else conv(ch, ch, stride=2, bias=False))
            layers += [AutoencoderTinyBlock(ch, ch) for _ in range(blocks)]
        layers.append(conv(cfg.encoder_block_out_channels[-1], cfg.latent_channels))
        self.layers = nn.Sequential(*layers)

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        return self.layers((image + 1) / 2)  # TAESD works on images in [0, 1]


class DecoderTiny(nn.Module):
    """(B, latent_channels, h, w) latents -> (B, out_channels, h*f, w*f) image in about [-1, 1].

    Latents are soft-clamped to (-3, 3) first, as TAESD was trained.
    """

    def __init__(self, cfg: TAESDConfig):
        super().__init__()
        widths = cfg.decoder_block_out_channels
        layers: list[nn.Module] = [conv(cfg.latent_channels, widths[0]), nn.ReLU(inplace=True)]
        last = len(widths) - 1
        for i, (blocks, ch) in enumerate(zip(cfg.num_decoder_blocks, widths)):
            layers += [AutoencoderTinyBlock(ch, ch) for _ in range(blocks)]
            if i < last:
                layers.append(nn.Upsample(scale_factor=cfg.upsampling_scaling_factor, mode=cfg.upsample_fn))
            layers.append(conv(ch, cfg.out_channels if i == last else ch, bias=i == last))
        self.layers = nn.Sequential(*layers)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        x = torch.tanh(z / 3) * 3
        return self.layers(x) * 2 - 1


class AutoencoderTiny(nn.Module):
    """TAESD. `with_encoder=False` (the default) builds the decoder only, all text-to-image needs."""

    def __init__(self, cfg: TAESDConfig, with_encoder: bool = False):
        super().__init__()
        cfg.validate()
        self.config = cfg
        self.encoder = EncoderTiny(cfg) if with_encoder else None
        self.decoder = DecoderTiny(cfg)

    def encode(self, image: torch.Tensor) -> torch.Tensor:
        """Encode images to latents.

        Args:
            image: (B, in_channels, H, W) float32 images (or the module's compute dtype), values in
                [-1, 1]. f = upsampling_scaling_factor**(len(num_decoder_blocks) - 1) (8 for SD);
                sizes that are not multiples of f round up at each halving.

        Returns:
            (B, latent_channels, ceil(H/f), ceil(W/f)) latents in the dtype of `image`, already in
            the UNet's scaled space (`scaling_factor` 1.0): no multiplication needed.

        Raises:
            RuntimeError: the module was built with `with_encoder=False`.
            ValueError: `image` is not 4-d or its channel count is not `config.in_channels`.
        """
        if self.encoder is None:
            raise RuntimeError("this TAESD was loaded without its encoder")
        check_channels(image, self.config.in_channels, "AutoencoderTiny.encode input")
        return self.encoder(image)

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """Decode latents to images.

        Args:
            z: (B, latent_channels, h, w) float32 latents (or the module's compute dtype) as the
                sampler produces them, i.e. SD's *scaled* latents: with `scaling_factor` 1.0 and
                `shift_factor` 0.0 the pipeline's unscaling leaves them unchanged. Any h, w >= 1.

        Returns:
            (B, out_channels, h*f, w*f) images in the dtype of `z`, f =
            upsampling_scaling_factor**(len(num_decoder_blocks) - 1) (8 for SD), values in about
            [-1, 1] (not clamped).

        Raises:
            ValueError: `z` is not 4-d or its channel count is not `config.latent_channels`.
        """
        check_channels(z, self.config.latent_channels, "AutoencoderTiny.decode input")
        return self.decoder(z)
