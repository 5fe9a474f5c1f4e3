"""Request fields -> a validated `GenerationRequest`, under the service's caps.

Every front end turns its wire format into one plain dict with the keys below (the library's names) and
calls `build_request`; a bad field raises `InvalidRequest` with `.field` set to that key, and the front end
renames it to its own wire name (A1111 `sampler_name`, OpenAI `size`, ...) before answering.

    prompt, negative_prompt, steps, cfg_scale, seed, width, height, sampler, clip_skip, n
"""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass

from ..errors import InvalidRequest
from ..pipeline import GenerationRequest
from ..samplers import SAMPLERS
from .config import Limits

FIELDS = ("prompt", "negative_prompt", "steps", "cfg_scale", "seed", "width", "height", "sampler",
          "clip_skip", "n")


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


def _integer(name: str, value) -> int:
    if isinstance(value, bool):
        raise InvalidRequest(name, f"must be an integer, got {value!r}")
    if isinstance(value, numbers.Integral):
        return int(value)
    if isinstance(value, float) and math.isfinite(value) and value == int(value):
        return int(value)
    raise InvalidRequest(name, f"must be an integer, got {value!r}")


def _bounded(name: str, value, low: int, high: int) -> int:
    v = _integer(name, value)
    if not low <= v <= high:
        raise InvalidRequest(name, f"must be in [{low}, {high}], got {v}")
    return v


def _text(name: str, value, limit: int) -> str:
    if not isinstance(value, str):
        raise InvalidRequest(name, f"must be a string, got {type(value).__name__}")
    if len(value) > limit:
        raise InvalidRequest(name, f"at most {limit} characters, got {len(value)}")
    return value


def build_request(fields: dict, limits: Limits, defaults: Defaults) -> tuple[GenerationRequest, int]:
    """(request, number of images). Unknown keys are a programming error of the front end."""
    unknown = set(fields) - set(FIELDS)
    if unknown:
        raise ValueError(f"unknown request keys {sorted(unknown)}")

    def get(key, default):
        value = fields.get(key)
        return default if value is None else value

    prompt = _text("prompt", get("prompt", ""), limits.max_prompt_chars)
    negative = _text("negative_prompt", get("negative_prompt", ""), limits.max_prompt_chars)
    steps = _bounded("steps", get("steps", defaults.steps), 1, limits.max_steps)
    cfg = get("cfg_scale", defaults.cfg_scale)
    if isinstance(cfg, bool) or not isinstance(cfg, numbers.Real) or not math.isfinite(cfg) \
            or not 0 <= cfg <= 100:
        raise InvalidRequest("cfg_scale", f"must be a finite number in [0, 100], got {cfg!r}")
    width = _bounded("width", get("width", defaults.width), 8, limits.max_width)
    height = _bounded("height", get("height", defaults.height), 8, limits.max_height)
    for name, v in (("width", width), ("height", height)):
        if v % 8:
            raise InvalidRequest(name, f"must be a multiple of 8, got {v}")
    sampler = get("sampler", "") or defaults.sampler
    if not isinstance(sampler, str) or sampler not in SAMPLERS:
        raise InvalidRequest("sampler", f"unknown sampler {sampler!r}; choose one of {', '.join(SAMPLERS)}")
    seed = fields.get("seed")
    if seed is not None:
        seed = _integer("seed", seed)
        if not 0 <= seed < 2**64:
            raise InvalidRequest("seed", f"must be in [0, 2^64), got {seed}")
    clip_skip = _bounded("clip_skip", get("clip_skip", 0), 0, defaults.text_layers - 1)
    n = _bounded("n", get("n", 1), 1, limits.max_images)
    request = GenerationRequest(prompt, negative, steps, float(cfg), seed, width, height, sampler,
                                clip_skip).validate()
    return request, n
