"""A live preview of a generation from its latents, without the VAE: a cheap linear map per pixel.

SD 1.x / 2.x latents (4 channels) map roughly linearly to RGB; the factors below are the ones A1111's
"Approx cheap" live preview uses (`modules/sd_samplers_common.py`, a least-squares fit of decoded colours
to latents), also used by ComfyUI's latent previews. Good enough to see composition and colour while the
steps run; it costs microseconds, where a VAE decode costs seconds on a small CPU. Other channel counts
get a grey image of the first channel.
"""

from __future__ import annotations

import io

import numpy as np
import torch
from PIL import Image

# rows: latent channels 0..3; columns: R, G, B contribution (A1111's cheap approximation for SD 1.x/2.x)
SD_LATENT_RGB = torch.tensor([
    [0.298, 0.207, 0.208],
    [0.187, 0.286, 0.173],
    [-0.158, 0.189, 0.264],
    [-0.184, -0.271, -0.473],
])


def latents_to_rgb(latents: torch.Tensor, size: int | None = None) -> Image.Image:
    """(1, C, h, w) or (C, h, w) latents (any float dtype, the sampler's scale) -> an RGB image of h x w
    pixels, or scaled so that its longer side is `size` (nearest-neighbour, since these are blocks)."""
    x = latents.detach().float()
    if x.ndim == 4:
        x = x[0]
    if x.shape[0] == SD_LATENT_RGB.shape[0]:
        rgb = torch.einsum("chw,cr->hwr", x, SD_LATENT_RGB)
    else:
        rgb = x[0].unsqueeze(-1).expand(-1, -1, 3) / 4
    array = ((rgb.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).numpy()
    image = Image.fromarray(np.ascontiguousarray(array), "RGB")
    if size:
        h, w = array.shape[:2]
        scale = size / max(h, w)
        image = image.resize((max(1, round(w * scale)), max(1, round(h * scale))), Image.NEAREST)
    return image


def preview_png(latents: torch.Tensor, size: int | None = 256) -> bytes:
    """`latents_to_rgb` as PNG bytes (no parameters chunk: a preview is not a result)."""
    buf = io.BytesIO()
    latents_to_rgb(latents, size).save(buf, format="PNG")
    return buf.getvalue()
