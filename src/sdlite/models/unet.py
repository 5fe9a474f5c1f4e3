"""UNet2DConditionModel of Stable Diffusion 1.x/2.x, with diffusers' parameter names.

Source: diffusers' `UNet2DConditionModel` (`diffusers/models/unets/unet_2d_condition.py` and
`unet_2d_blocks.py`), the latent denoiser of Rombach et al. 2022, "High-Resolution Image Synthesis with
Latent Diffusion Models" (LDM, arXiv:2112.10752). Module attribute names match diffusers' state-dict
keys exactly, so its checkpoints load without renaming.

Built from the `unet/config.json` of a diffusers folder, so the distilled shapes (BK-SDM, Kim et al.
2023: one resnet per down block, no mid block, fewer stages) need no special code.
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
    check_length,
    check_range,
    show,
)
from .layers import (
    Downsample2D,
    ResnetBlock2D,
    TimestepEmbedding,
    Transformer2DModel,
    Upsample2D,
    check_channels,
    timestep_embedding,
)

IntOrTuple = int | tuple[int, ...]
WHERE = "unet config"


@dataclass
class UNetConfig:
    """The fields of diffusers' `unet/config.json`, by its names; the defaults are SD 1.5's.
    `validate` refuses the variants this port does not implement."""

    sample_size: int = 64
    in_channels: int = 4
    out_channels: int = 4
    center_input_sample: bool = False
    flip_sin_to_cos: bool = True
    freq_shift: int = 0
    down_block_types: tuple[str, ...] = ("CrossAttnDownBlock2D", "CrossAttnDownBlock2D",
                                         "CrossAttnDownBlock2D", "DownBlock2D")
    mid_block_type: str | None = "UNetMidBlock2DCrossAttn"
    up_block_types: tuple[str, ...] = ("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D",
                                       "CrossAttnUpBlock2D")
    only_cross_attention: bool | tuple[bool, ...] = False
    block_out_channels: tuple[int, ...] = (320, 640, 1280, 1280)
    layers_per_block: IntOrTuple = 2
    downsample_padding: int = 1
    mid_block_scale_factor: float = 1.0
    act_fn: str = "silu"
    norm_num_groups: int = 32
    norm_eps: float = 1e-5
    cross_attention_dim: int = 768
    transformer_layers_per_block: IntOrTuple = 1
    attention_head_dim: IntOrTuple = 8
    num_attention_heads: IntOrTuple | None = None
    use_linear_projection: bool = False
    # Read from diffusers configs (SD 2.x sets it) and not acted on. With it, diffusers' classic
    # attention processor computes the scores Q K^T in fp32 when the model runs in fp16. Here the compute
    # dtype is fp32 by default (fp16/int8 stored weights are dequantized to fp32 per layer), so attention
    # already runs in fp32; only a half compute dtype (`Pipeline.load(dtype=torch.float16)`) is not upcast.
    upcast_attention: bool = False
    time_cond_proj_dim: int | None = None
    class_embed_type: str | None = None
    addition_embed_type: str | None = None
    resnet_time_scale_shift: str = "default"
    time_embedding_type: str = "positional"
    conv_in_kernel: int = 3
    conv_out_kernel: int = 3
    dual_cross_attention: bool = False

    def validate(self) -> None:
        """Raise ModelFolderError for a config this port does not implement, or whose values are of the
        wrong type or out of range (checked once, before anything is built)."""
        check_field_types(self, WHERE)
        unsupported = {
            "class_embed_type": (self.class_embed_type, None),
            "addition_embed_type": (self.addition_embed_type, None),
            "resnet_time_scale_shift": (self.resnet_time_scale_shift, "default"),
            "time_embedding_type": (self.time_embedding_type, "positional"),
            "act_fn": (self.act_fn, "silu"),
            "dual_cross_attention": (self.dual_cross_attention, False),
        }
        for name, (value, wanted) in unsupported.items():
            if value != wanted:
                raise ModelFolderError(f"unet config: {name}={show(value)} is not supported (only {wanted!r})")
        n = len(self.down_block_types)
        check_length(WHERE, "down_block_types", self.down_block_types)
        if len(self.up_block_types) != n or len(self.block_out_channels) != n:
            raise ModelFolderError("unet config: down_block_types, up_block_types and "
                                   "block_out_channels must have the same length")
        known_down = {"CrossAttnDownBlock2D", "DownBlock2D"}
        known_up = {"CrossAttnUpBlock2D", "UpBlock2D"}
        for t in self.down_block_types:
            if t not in known_down:
                raise ModelFolderError(f"unet config: down block type {show(t)} is not supported")
        for t in self.up_block_types:
            if t not in known_up:
                raise ModelFolderError(f"unet config: up block type {show(t)} is not supported")
        if self.mid_block_type not in (None, "UNetMidBlock2DCrossAttn"):
            raise ModelFolderError(f"unet config: mid_block_type {show(self.mid_block_type)} is not supported")
        self._validate_sizes()
        self._validate_attention()

    def _validate_sizes(self) -> None:
        """Widths, counts and numbers in range; every width divisible by the norm groups."""
        ch = self.block_out_channels
        for name in ("in_channels", "out_channels", "block_out_channels", "cross_attention_dim"):
            check_range(WHERE, name, getattr(self, name), 1, MAX_CHANNELS)
        # LCM's guidance-scale embedding spreads its frequencies over dim/2 - 1 steps: at least 4 wide
        check_range(WHERE, "time_cond_proj_dim", self.time_cond_proj_dim, 4, MAX_CHANNELS)
        check_range(WHERE, "sample_size", self.sample_size, 1, MAX_SAMPLE_SIZE)
        self.per_block(self.layers_per_block, "layers_per_block")
        check_range(WHERE, "layers_per_block", self.layers_per_block, 1, MAX_LAYERS_PER_BLOCK)
        check_range(WHERE, "norm_num_groups", self.norm_num_groups, 1, MAX_CHANNELS)
        check_divides(WHERE, "block_out_channels", ch, self.norm_num_groups, "norm_num_groups")
        check_range(WHERE, "norm_eps", self.norm_eps, 1e-12, 1.0)
        check_range(WHERE, "mid_block_scale_factor", self.mid_block_scale_factor, 1e-6, 1e6)
        check_range(WHERE, "downsample_padding", self.downsample_padding, 0, 2)
        check_range(WHERE, "freq_shift", self.freq_shift, 0, ch[0] // 2 - 1)
        for name in ("conv_in_kernel", "conv_out_kernel"):
            value = getattr(self, name)
            if not (1 <= value <= 15 and value % 2 == 1):
                raise ModelFolderError(f"unet config: {name} must be an odd number from 1 to 15, got {value}")

    def _validate_attention(self) -> None:
        """Heads and transformer depths per block; each attention width divisible by its heads."""
        check_range(WHERE, "num_attention_heads", self.num_attention_heads, 1, MAX_CHANNELS)
        check_range(WHERE, "attention_head_dim", self.attention_head_dim, 1, MAX_CHANNELS)
        heads = self.per_block(self.num_attention_heads or self.attention_head_dim, "attention_head_dim")
        self.per_block(self.transformer_layers_per_block, "transformer_layers_per_block")
        check_range(WHERE, "transformer_layers_per_block", self.transformer_layers_per_block, 1,
                    MAX_LAYERS_PER_BLOCK)
        self.per_block(self.only_cross_attention, "only_cross_attention")
        name = "num_attention_heads" if self.num_attention_heads else "attention_head_dim"
        ch = self.block_out_channels
        with_attention = [i for i, t in enumerate(self.down_block_types) if t == "CrossAttnDownBlock2D"]
        with_attention += [len(ch) - 1 - i for i, t in enumerate(self.up_block_types) if t == "CrossAttnUpBlock2D"]
        if self.mid_block_type is not None:
            with_attention.append(len(ch) - 1)
        for i in sorted(set(with_attention)):
            check_divides(WHERE, f"block_out_channels[{i}]", (ch[i],), heads[i], f"{name}[{i}]")

    def per_block(self, value, name: str) -> tuple:
        """`value` for each down block: a scalar repeated, or a sequence of the right length."""
        n = len(self.down_block_types)
        if isinstance(value, (tuple, list)):
            if len(value) != n:
                raise ModelFolderError(f"unet config: {name} needs {n} entries, has {len(value)}")
            return tuple(value)
        return (value,) * n


def _attentions(with_attention: bool, layers: int, heads: int, ch: int, context_dim: int,
                cfg: UNetConfig, transformer_layers: int, only_cross: bool) -> nn.ModuleList | None:
    """The spatial transformers of a block, one after each resnet (None for a block without)."""
    if not with_attention:
        return None
    return nn.ModuleList([
        Transformer2DModel(heads, ch // heads, ch, context_dim, transformer_layers, cfg.norm_num_groups,
                           cfg.use_linear_projection, only_cross)
        for _ in range(layers)])


class DownBlock(nn.Module):
    """CrossAttnDownBlock2D, or DownBlock2D when `with_attention` is False (same keys, minus attentions)."""

    def __init__(self, in_ch: int, out_ch: int, temb: int, layers: int, heads: int, context_dim: int,
                 cfg: UNetConfig, transformer_layers: int, only_cross: bool, add_downsample: bool,
                 with_attention: bool):
        super().__init__()
        self.resnets = nn.ModuleList([
            ResnetBlock2D(in_ch if i == 0 else out_ch, out_ch, temb, cfg.norm_num_groups, cfg.norm_eps)
            for i in range(layers)])
        self.attentions = _attentions(with_attention, layers, heads, out_ch, context_dim, cfg,
                                      transformer_layers, only_cross)
        self.downsamplers = (nn.ModuleList([Downsample2D(out_ch, padding=cfg.downsample_padding)])
                             if add_downsample else None)

    def layer(self, i: int, x, temb, context):
        """Resnet i, then its spatial transformer if the block has them: (B, in, H, W) -> (B, out_ch, H, W)."""
        x = self.resnets[i](x, temb)
        if self.attentions is not None:
            x = self.attentions[i](x, context)
        return x

    def forward(self, x, temb, context):
        """(B, in_ch, H, W) -> ((B, out_ch, H', W'), the outputs the up path takes as skips)."""
        states = []
        for i in range(len(self.resnets)):
            x = self.layer(i, x, temb, context)
            states.append(x)
        if self.downsamplers is not None:
            x = self.downsamplers[0](x)
            states.append(x)
        return x, states


class UpBlock(nn.Module):
    """CrossAttnUpBlock2D, or UpBlock2D when `with_attention` is False."""

    def __init__(self, in_ch: int, prev_ch: int, out_ch: int, temb: int, layers: int, heads: int,
                 context_dim: int, cfg: UNetConfig, transformer_layers: int, only_cross: bool,
                 add_upsample: bool, with_attention: bool):
        super().__init__()
        resnets = []
        for i in range(layers):
            skip_ch = in_ch if i == layers - 1 else out_ch
            res_in = prev_ch if i == 0 else out_ch
            resnets.append(ResnetBlock2D(res_in + skip_ch, out_ch, temb, cfg.norm_num_groups, cfg.norm_eps))
        self.resnets = nn.ModuleList(resnets)
        self.attentions = _attentions(with_attention, layers, heads, out_ch, context_dim, cfg,
                                      transformer_layers, only_cross)
        self.upsamplers = nn.ModuleList([Upsample2D(out_ch)]) if add_upsample else None

    def layer(self, i: int, x, skip: torch.Tensor, temb, context):
        """Resnet i on [x, skip] (concatenated on channels), then its spatial transformer if any."""
        x = self.resnets[i](torch.cat([x, skip], dim=1), temb)
        if self.attentions is not None:
            x = self.attentions[i](x, context)
        return x

    def forward(self, x, skips: list[torch.Tensor], temb, context, upsample_size=None, start: int = 0):
        """Consumes `skips` from the end (one per resnet run); upsamples to `upsample_size` if given.
        `start` > 0 enters the block at resnet `start` (x is then that resnet's input, as `layer`s 0 ..
        start-1 would have left it; `skips` holds one per resnet from `start` on)."""
        for i in range(start, len(self.resnets)):
            x = self.layer(i, x, skips.pop(), temb, context)
        if self.upsamplers is not None:
            x = self.upsamplers[0](x, upsample_size)
        return x


class UNetMidBlock2DCrossAttn(nn.Module):
    """resnet, spatial transformer, resnet at the lowest resolution; (B, ch, h, w) in and out."""

    def __init__(self, ch: int, temb: int, heads: int, context_dim: int, cfg: UNetConfig,
                 transformer_layers: int):
        super().__init__()
        self.resnets = nn.ModuleList([
            ResnetBlock2D(ch, ch, temb, cfg.norm_num_groups, cfg.norm_eps, cfg.mid_block_scale_factor)
            for _ in range(2)])
        self.attentions = nn.ModuleList([
            Transformer2DModel(heads, ch // heads, ch, context_dim, transformer_layers,
                               cfg.norm_num_groups, cfg.use_linear_projection)])

    def forward(self, x, temb, context):
        x = self.resnets[0](x, temb)
        x = self.attentions[0](x, context)
        return self.resnets[1](x, temb)


class UNet2DConditionModel(nn.Module):
    """The text-conditioned denoiser: noisy latents, timestep, text embeddings -> noise prediction."""

    def __init__(self, cfg: UNetConfig):
        super().__init__()
        cfg.validate()
        self.config = cfg
        ch = cfg.block_out_channels
        n = len(ch)
        temb = ch[0] * 4
        heads = cfg.per_block(cfg.num_attention_heads or cfg.attention_head_dim, "attention_head_dim")
        layers = cfg.per_block(cfg.layers_per_block, "layers_per_block")
        tlayers = cfg.per_block(cfg.transformer_layers_per_block, "transformer_layers_per_block")
        only_cross = cfg.per_block(cfg.only_cross_attention, "only_cross_attention")
        ctx = cfg.cross_attention_dim

        pad = (cfg.conv_in_kernel - 1) // 2
        self.conv_in = nn.Conv2d(cfg.in_channels, ch[0], cfg.conv_in_kernel, padding=pad)
        self.time_embedding = TimestepEmbedding(ch[0], temb, cfg.time_cond_proj_dim)

        self.down_blocks = nn.ModuleList()
        out_ch = ch[0]
        for i, kind in enumerate(cfg.down_block_types):
            in_ch, out_ch = out_ch, ch[i]
            self.down_blocks.append(DownBlock(
                in_ch, out_ch, temb, layers[i], heads[i], ctx, cfg, tlayers[i], only_cross[i],
                add_downsample=i < n - 1, with_attention=kind == "CrossAttnDownBlock2D"))

        if cfg.mid_block_type is None:
            self.mid_block = None
        else:
            self.mid_block = UNetMidBlock2DCrossAttn(ch[-1], temb, heads[-1], ctx, cfg, tlayers[-1])

        self.up_blocks = nn.ModuleList()
        rch = tuple(reversed(ch))
        rheads, rlayers = tuple(reversed(heads)), tuple(reversed(layers))
        rtlayers, ronly = tuple(reversed(tlayers)), tuple(reversed(only_cross))
        out_ch = rch[0]
        for i, kind in enumerate(cfg.up_block_types):
            prev_ch, out_ch = out_ch, rch[i]
            in_ch = rch[min(i + 1, n - 1)]
            self.up_blocks.append(UpBlock(
                in_ch, prev_ch, out_ch, temb, rlayers[i] + 1, rheads[i], ctx, cfg, rtlayers[i], ronly[i],
                add_upsample=i < n - 1, with_attention=kind == "CrossAttnUpBlock2D"))

        self.conv_norm_out = nn.GroupNorm(cfg.norm_num_groups, ch[0], eps=cfg.norm_eps)
        pad = (cfg.conv_out_kernel - 1) // 2
        self.conv_out = nn.Conv2d(ch[0], cfg.out_channels, cfg.conv_out_kernel, padding=pad)

    def forward(self, sample: torch.Tensor, timestep: torch.Tensor | float,
                encoder_hidden_states: torch.Tensor,
                timestep_cond: torch.Tensor | None = None) -> torch.Tensor:
        """Predict the noise (epsilon, or v: whatever the checkpoint was trained for) in `sample`.

        Args:
            sample: (B, in_channels, h, w) float32 noisy latents (or the module's compute dtype), in
                the UNet's space, i.e. VAE latents times `scaling_factor`, with any input scaling the
                sampler applies (Euler's 1/sqrt(sigma^2 + 1)) already applied. h, w = H/8, W/8 for
                SD's VAE; odd sizes work (the up path resizes to each skip's size, as diffusers).
            timestep: a Python number, a 0-d or (1,) tensor (shared by the batch) or a (B,) tensor,
                any real dtype: the DDPM training timestep, nominally in [0, num_train_timesteps),
                fractional for Euler/DPM samplers. It only feeds the sinusoidal embedding; its range
                is not checked.
            encoder_hidden_states: (B, S, cross_attention_dim) float32 text embeddings (the text
                encoder's output, S = 77 for CLIP); with batched classifier-free guidance B holds
                the unconditional and the conditional halves.
            timestep_cond: optional (B, time_cond_proj_dim) extra timestep conditioning (LCM's
                guidance-scale embedding); ignored unless the config has `time_cond_proj_dim`.

        Returns:
            (B, out_channels, h, w) prediction in the dtype of `sample`, unscaled: the sampler
            reads it per the scheduler's `prediction_type`.

        Raises:
            ValueError: `sample` is not 4-d or its channel count is not `config.in_channels`.
            RuntimeError: torch's, for a timestep with neither 1 nor B elements, or an
                `encoder_hidden_states` whose last dim is not `cross_attention_dim` or whose
                batch is neither B nor 1. Nothing else is checked.
        """
        return self._run(sample, timestep, encoder_hidden_states, timestep_cond, keep_feature=False)[0]

    def forward_with_feature(self, sample: torch.Tensor, timestep: torch.Tensor | float,
                             encoder_hidden_states: torch.Tensor, timestep_cond: torch.Tensor | None = None
                             ) -> tuple[torch.Tensor, torch.Tensor]:
        """`forward`, bit-identical, also returning the deep feature at the first skip branch: the input
        of the last up block's second-to-last resnet, (B, C, h, w) at the latents' size (C = block_out_channels[0],
        or the next stage's width for one resnet per block, as BK-SDM). It is everything the network computes
        below the first down block's first layer, as `forward_shallow` takes it."""
        return self._run(sample, timestep, encoder_hidden_states, timestep_cond, keep_feature=True)

    def forward_shallow(self, sample: torch.Tensor, timestep: torch.Tensor | float,
                        encoder_hidden_states: torch.Tensor, feature: torch.Tensor,
                        timestep_cond: torch.Tensor | None = None) -> torch.Tensor:
        """The network with its deep part replaced by `feature` (from `forward_with_feature`, possibly of
        another call): conv_in, the first down block's first layer (resnet and transformer), the last up
        block's last two layers on [feature, skips], conv_out. Same arguments and result as `forward`.

        This is the shallowest skip branch of DeepCache (Ma et al. 2023, arXiv:2312.00858; branch 0 of its
        reference code, github.com/horseee/DeepCache); the caching policy lives in `runtime.deep_cache`.
        Raises ValueError when `feature`'s batch or spatial size is not `sample`'s."""
        temb = self._time_embedding(sample, timestep, timestep_cond)
        if feature.ndim != 4 or feature.shape[0] != sample.shape[0] or feature.shape[2:] != sample.shape[2:]:
            raise ValueError(f"UNet shallow path: the cached feature {tuple(feature.shape)} does not match "
                             f"the sample {tuple(sample.shape)} (batch and size)")
        x = self._conv_in(sample)
        first = self.down_blocks[0].layer(0, x, temb, encoder_hidden_states)
        last = self.up_blocks[-1]
        x = last(feature, [x, first], temb, encoder_hidden_states, None, start=len(last.resnets) - 2)
        return self.conv_out(F.silu(self.conv_norm_out(x)))

    def _time_embedding(self, sample: torch.Tensor, timestep: torch.Tensor | float,
                        timestep_cond: torch.Tensor | None) -> torch.Tensor:
        """(B, 4 * block_out_channels[0]) embedding of the timestep (and LCM's `timestep_cond`); checks
        `sample`'s channels."""
        cfg = self.config
        check_channels(sample, cfg.in_channels, "UNet sample")
        if not torch.is_tensor(timestep):
            timestep = torch.tensor([timestep], dtype=torch.float32)
        t = timestep.reshape(-1).expand(sample.shape[0])
        emb = timestep_embedding(t, cfg.block_out_channels[0], cfg.flip_sin_to_cos, cfg.freq_shift)
        return self.time_embedding(emb.to(sample.dtype), timestep_cond)

    def _conv_in(self, sample: torch.Tensor) -> torch.Tensor:
        if self.config.center_input_sample:
            sample = 2 * sample - 1.0
        return self.conv_in(sample)

    def _run(self, sample, timestep, encoder_hidden_states, timestep_cond, keep_feature: bool):
        """(prediction, the feature at the first skip branch if `keep_feature`, else None)."""
        temb = self._time_embedding(sample, timestep, timestep_cond)
        context = encoder_hidden_states
        x = self._conv_in(sample)
        skips = [x]
        for block in self.down_blocks:
            x, states = block(x, temb, context)
            skips.extend(states)
        if self.mid_block is not None:
            x = self.mid_block(x, temb, context)
        feature = None
        for block in self.up_blocks:
            n_res = len(block.resnets)
            block_skips = skips[-n_res:]
            del skips[-n_res:]
            size = skips[-1].shape[2:] if skips and block.upsamplers is not None else None
            start = 0
            if keep_feature and block is self.up_blocks[-1]:  # stop before its last two layers, keep x
                start = n_res - 2
                for i in range(start):
                    x = block.layer(i, x, block_skips.pop(), temb, context)
                feature = x
            x = block(x, block_skips, temb, context, size, start)
        return self.conv_out(F.silu(self.conv_norm_out(x))), feature
