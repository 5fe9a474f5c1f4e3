"""DeepCache: reuse the UNet's deep features across neighbouring evaluations, run only its shallow path.

Source: Ma, Fang and Wang 2023, "DeepCache: Accelerating Diffusion Models for Free" (arXiv:2312.00858),
reference code github.com/horseee/DeepCache. Adjacent denoising steps change the UNet's deep (low
resolution) features little; its skip connections carry the high-frequency part. So of every N
evaluations, the first runs the whole network and keeps the deep feature entering the shallowest skip
branch; the next N - 1 run only the shallow path around that branch and take the kept feature in place
of everything deeper ("uniform 1:N" in the paper).

The branch is the paper's SD 1.5 default, `cache_layer_id=0, cache_block_id=0` in the reference code
(the skip after the first down block's first layer): a cached call runs the time embedding, conv_in, the
first down block's first resnet + transformer, the last up block's last two resnets + transformers (on
[feature, that layer's output] and [.., conv_in's output]), then conv_out. For SD 1.5 that is 3 of its
22 resnets and 3 of its 16 transformers (down_blocks.0 layer 0, up_blocks.3 layers 1 and 2), all at the
latents' full resolution; the feature is (B, 320, h, w), the output of up_blocks.3's layer 0. Any UNet
config sdlite builds has that path (see `UNet2DConditionModel.forward_shallow`): BK-SDM without a mid
block (its feature is the previous up block's upsampled output), 2-stage test UNets, LCM's
`timestep_cond`, 9-channel inpainting UNets.

N semantics: `n` counts UNet evaluations, not sampler steps: calls 0, n, 2n, ... of a wrapper are full,
the others shallow. 2nd-order samplers (Heun, DPM2, DPM2 a) evaluate the model twice per step, so each
of their evaluations counts once. n = 0 or 1: no caching (`deep_cache_unet` returns the UNet itself).
With classifier-free guidance as two passes (uncond, cond) the pipeline gives each pass its own wrapper,
so each caches its own feature; batched guidance caches the (2, C, h, w) feature of both halves at once.
A call whose sample's batch or size differs from the cached feature's runs in full and caches anew.

Memory: one feature map per wrapper, B x C x h x w in the compute dtype (SD 1.5 at 512 x 512, fp32:
1 x 320 x 64 x 64 x 4 bytes = 5.2 MB; 10.5 MB for batched guidance or two split passes). It is a copy
(the network's own tensor is freed when the full call returns), held until the wrapper is dropped.
The output of a cached call is an approximation (the authors report SD 1.5 over 50 PLMS steps 2.3x faster
on GPU with a CLIP score 0.05 lower); with few steps each shallow call covers a larger stretch of the
schedule and the error grows. Work: a shallow call of SD 1.5 at 512 x 512 is about 22% of a full call's
FLOPs (torch's FlopCounterMode on the meta device; BK-SDM-Tiny: 39%), so N = 3 does about 48% of the
UNet's arithmetic, N = 5 about 38%.
"""

from __future__ import annotations

import torch
from torch import nn


class DeepCacheUNet:
    """A UNet (`models.unet.UNet2DConditionModel` or anything with its `forward_with_feature` /
    `forward_shallow`) called as the UNet is, (sample, timestep, encoder_hidden_states, timestep_cond=None)
    -> prediction, reusing its deep feature for n - 1 of every n calls. Counts its own calls: `calls` in
    all, `full_calls` of them whole. One wrapper per stream of calls whose inputs follow each other (one
    sampler run, one guidance pass); it keeps state, so it is not shared between generations."""

    def __init__(self, unet: nn.Module, n: int):
        if isinstance(n, bool) or not isinstance(n, int) or n < 2:
            raise ValueError(f"DeepCache needs n >= 2 (an int), got {n!r}")
        self.unet = unet
        self.n = n
        self.calls = 0
        self.full_calls = 0
        self.feature: torch.Tensor | None = None

    def __call__(self, sample: torch.Tensor, timestep: torch.Tensor | float, encoder_hidden_states: torch.Tensor,
                 timestep_cond: torch.Tensor | None = None) -> torch.Tensor:
        k, self.calls = self.calls, self.calls + 1
        if k % self.n and self._fits(sample):
            return self.unet.forward_shallow(sample, timestep, encoder_hidden_states, self.feature,
                                             timestep_cond=timestep_cond)
        self.feature = None  # the old one is not kept through the full call
        out, feature = self.unet.forward_with_feature(sample, timestep, encoder_hidden_states,
                                                      timestep_cond=timestep_cond)
        self.feature = feature.clone()
        self.full_calls += 1
        return out

    def _fits(self, sample: torch.Tensor) -> bool:
        f = self.feature
        return f is not None and f.shape[0] == sample.shape[0] and f.shape[2:] == sample.shape[2:]

    def feature_bytes(self) -> int:
        """Bytes of the cached feature (0 before the first call)."""
        f = self.feature
        return 0 if f is None else f.numel() * f.element_size()


def deep_cache_unet(unet: nn.Module, n: int):
    """`unet` wrapped in a fresh `DeepCacheUNet` for n >= 2; `unet` itself for n = 0 or 1."""
    return DeepCacheUNet(unet, n) if n >= 2 else unet
