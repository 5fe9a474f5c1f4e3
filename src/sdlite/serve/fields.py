"""Request fields -> a validated `GenerationRequest`, under the service's caps.

Every front end turns its wire format into one plain dict with the keys below (the library's names) and
calls `build_request`, which checks it with the request contract (`sdlite.request`) under the service's
`Caps`; a bad field raises `InvalidRequest` with `.field` set to that key, and the front end renames it to
its own wire name (A1111 `sampler_name`, OpenAI `size`, ...) before answering.

    prompt, negative_prompt, steps, cfg_scale, seed, width, height, sampler, clip_skip, n,
    init_image, mask (PIL images: `decode_image_field`), denoising_strength, subseed, subseed_strength, eta,
    deep_cache
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from ..request import Caps, GenerationRequest, check_int
from .config import Limits

FIELDS = ("prompt", "negative_prompt", "steps", "cfg_scale", "seed", "width", "height", "sampler",
          "clip_skip", "n", "init_image", "mask", "denoising_strength", "subseed", "subseed_strength", "eta",
          "deep_cache")
IMAGE_PIXEL_CAP = 4096 * 4096  # init images and masks: larger ones are refused before their pixels are decoded


@dataclass
class Defaults:
    """What an unset field becomes; width/height are the model's native size."""
    width: int = 512
    height: int = 512
    steps: int = 20
    cfg_scale: float = 7.5
    sampler: str = "dpm++2m"
    text_layers: int = 12  # clip_skip must leave at least one text encoder layer

    @classmethod
    def for_pipeline(cls, pipe) -> "Defaults":
        """From the model's configs, without loading a network (a staged plan loads them per job)."""
        native = getattr(pipe, "native_size", None) \
            or pipe.unet.module.config.sample_size * pipe.vae_scale_factor
        text = getattr(pipe, "text_config", None) or pipe.text_encoder.module.config
        return cls(width=native, height=native, text_layers=text.num_hidden_layers)

    def follow(self, pipe) -> None:
        """After a model switch: take the new model's native size and text depth, in place (the front
        ends share this object); the operator's steps, cfg_scale and sampler stay."""
        new = Defaults.for_pipeline(pipe)
        self.width, self.height, self.text_layers = new.width, new.height, new.text_layers


def _whole(value):
    """A JSON number that is a whole float (20.0) becomes an int; anything else is left to the contract."""
    if isinstance(value, float) and math.isfinite(value) and value == int(value):
        return int(value)
    return value


def caps_for(limits: Limits, defaults: Defaults) -> Caps:
    """The service's caps on a request: the operator's limits, cfg_scale at most 100, and clip_skip
    leaving at least one text encoder layer."""
    return Caps(max_width=limits.max_width, max_height=limits.max_height, max_steps=limits.max_steps,
                max_cfg_scale=100.0, max_clip_skip=defaults.text_layers - 1,
                max_prompt_chars=limits.max_prompt_chars)


def build_request(fields: dict, limits: Limits, defaults: Defaults) -> tuple[GenerationRequest, int]:
    """(request validated under the service's caps, number of images). A bad field raises InvalidRequest
    naming it; unknown keys are a programming error of the front end (ValueError)."""
    unknown = set(fields) - set(FIELDS)
    if unknown:
        raise ValueError(f"unknown request keys {sorted(unknown)}")

    def get(key, default):
        value = fields.get(key)
        return default if value is None else value

    request = GenerationRequest(
        prompt=get("prompt", ""), negative_prompt=get("negative_prompt", ""),
        steps=_whole(get("steps", defaults.steps)),
        cfg_scale=get("cfg_scale", defaults.cfg_scale),
        seed=_whole(fields.get("seed")),
        width=_whole(get("width", defaults.width)),
        height=_whole(get("height", defaults.height)),
        sampler=get("sampler", "") or defaults.sampler,
        clip_skip=_whole(get("clip_skip", 0)),
        init_image=fields.get("init_image"), mask=fields.get("mask"),
        denoising_strength=get("denoising_strength", 0.75), subseed=_whole(fields.get("subseed")),
        subseed_strength=get("subseed_strength", 0.0), eta=fields.get("eta"),
        deep_cache=_whole(get("deep_cache", 0)),
    ).validate(caps_for(limits, defaults))
    n = check_int("n", _whole(get("n", 1)), 1, limits.max_images)
    return request, n


def decode_image_field(name: str, data: bytes, mode: str):
    """An uploaded image's bytes -> a PIL image in `mode` ("RGB", "L" or "RGBA"); InvalidRequest(name)
    for bytes that are no image or one over IMAGE_PIXEL_CAP pixels."""
    import io

    from PIL import Image, UnidentifiedImageError

    from ..errors import InvalidRequest
    try:
        with Image.open(io.BytesIO(data)) as im:
            if im.width * im.height > IMAGE_PIXEL_CAP:
                raise InvalidRequest(name, f"at most {IMAGE_PIXEL_CAP} pixels, got {im.width}x{im.height}")
            return im.convert(mode)
    except (OSError, UnidentifiedImageError, ValueError, Image.DecompressionBombError):
        raise InvalidRequest(name, "not a readable image (PNG, JPEG, WebP)") from None
