"""VAE decoding in overlapping latent tiles, blended with linear ramps so that no seam shows.

Peak activation memory scales with the tile's area instead of the image's: at 512x512 the SD VAE
decoder's untiled activations are the largest single allocation of a generation. Each tile sees only
its own neighbourhood (GroupNorm statistics and the mid-block attention are per tile), so the result
differs slightly from the untiled decode; the overlap hides the borders.
"""

from __future__ import annotations

import torch


def tile_starts(size: int, tile: int, overlap: int) -> list[int]:
    if size <= tile:
        return [0]
    step = tile - overlap
    starts = list(range(0, size - tile, step))
    starts.append(size - tile)
    return starts


def _ramp(length: int, ramp: int, rise: bool, fall: bool) -> torch.Tensor:
    w = torch.ones(length)
    if ramp > 0:
        edge = (torch.arange(ramp, dtype=torch.float32) + 0.5) / ramp
        if rise:
            w[:ramp] = torch.minimum(w[:ramp], edge)
        if fall:
            w[-ramp:] = torch.minimum(w[-ramp:], edge.flip(0))
    return w


def decode_tiled(decode, z: torch.Tensor, factor: int, tile: int = 32, overlap: int = 8) -> torch.Tensor:
    """`decode(z_tile) -> image tile` (scaled latent already unscaled); z: [B, C, h, w] latents.
    tile/overlap in latent pixels. Returns [B, 3, h*factor, w*factor]."""
    if overlap >= tile:
        raise ValueError("overlap must be smaller than the tile")
    b, _, h, w = z.shape
    ys, xs = tile_starts(h, tile, overlap), tile_starts(w, tile, overlap)
    if len(ys) == 1 and len(xs) == 1:
        return decode(z)
    out = None
    weight = torch.zeros(1, 1, h * factor, w * factor)
    for y in ys:
        for x in xs:
            th, tw = min(tile, h - y), min(tile, w - x)
            img = decode(z[:, :, y:y + th, x:x + tw]).float()
            if out is None:
                out = torch.zeros(b, img.shape[1], h * factor, w * factor)
            wy = _ramp(th * factor, overlap * factor, rise=y > 0, fall=y + th < h)
            wx = _ramp(tw * factor, overlap * factor, rise=x > 0, fall=x + tw < w)
            mask = (wy[:, None] * wx[None, :])[None, None]
            ys_, xs_ = slice(y * factor, (y + th) * factor), slice(x * factor, (x + tw) * factor)
            out[:, :, ys_, xs_] += img * mask
            weight[:, :, ys_, xs_] += mask
            del img
    return out / weight


def encode_tiled(encode, x: torch.Tensor, factor: int, tile: int = 32, overlap: int = 8) -> torch.Tensor:
    """The encoder's side of `decode_tiled` (img2img under a plan that tiles the VAE): `encode(x_tile) ->
    moments tile` (B, K, th/factor, tw/factor); x: [B, 3, H, W] pixels, H and W multiples of `factor`.
    tile/overlap in latent pixels, as for decoding. Returns [B, K, H/factor, W/factor], the tiles blended
    with linear ramps over the overlaps (each tile's GroupNorm statistics are its own: close to, not equal
    to, the untiled encode)."""
    if overlap >= tile:
        raise ValueError("overlap must be smaller than the tile")
    h, w = x.shape[2] // factor, x.shape[3] // factor
    ys, xs = tile_starts(h, tile, overlap), tile_starts(w, tile, overlap)
    if len(ys) == 1 and len(xs) == 1:
        return encode(x)
    out = weight = None
    for y in ys:
        for x0 in xs:
            th, tw = min(tile, h - y), min(tile, w - x0)
            part = encode(x[:, :, y * factor:(y + th) * factor, x0 * factor:(x0 + tw) * factor]).float()
            if out is None:
                out = torch.zeros(x.shape[0], part.shape[1], h, w)
                weight = torch.zeros(1, 1, h, w)
            wy = _ramp(th, overlap, rise=y > 0, fall=y + th < h)
            wx = _ramp(tw, overlap, rise=x0 > 0, fall=x0 + tw < w)
            mask = (wy[:, None] * wx[None, :])[None, None]
            out[:, :, y:y + th, x0:x0 + tw] += part * mask
            weight[:, :, y:y + th, x0:x0 + tw] += mask
    return out / weight
