"""The request contract: what one generation asks for, checked in one place, and what it gets back.

Every front end (the Python API, `sdlite generate`, gRPC, HTTP A1111 and OpenAI) builds a
`GenerationRequest` from its own wire format and calls `validate(caps)` with its own `Caps` (a service
allows less than the library). A bad field raises `InvalidRequest` whose `.field` is the request's field
name; the front end renames it to its wire name (A1111 `sampler_name`, OpenAI `size`) when it answers.

A request is checked once: `validate` remembers the caps and the schedule it passed, and a later call
with caps at least as wide (the pipeline's) and the same schedule does nothing until a field changes.
"""

from __future__ import annotations

import math
import numbers
import random
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import TYPE_CHECKING

from . import samplers
from .errors import InvalidRequest

if TYPE_CHECKING:
    import torch
    from PIL import Image

    from .runtime.planner import Plan

MAX_SIDE = 2048         # pixels: the library's cap on width and height
MAX_STEPS = 1000        # the library's cap on sampler steps (a schedule may allow fewer)
SIZE_MULTIPLE = 8       # width and height are multiples of the VAE's 8x downscale
SEED_LIMIT = 2**64      # seeds are in [0, 2^64), as torch.Generator.manual_seed takes them
RANDOM_SEED = -1        # as in A1111: a seed of -1 (or None) means "draw one"


@dataclass(frozen=True)
class Caps:
    """A front end's limits on a request. The defaults are the library's own; `None`: no cap."""
    max_width: int = MAX_SIDE
    max_height: int = MAX_SIDE
    max_steps: int = MAX_STEPS
    max_cfg_scale: float | None = None
    max_clip_skip: int | None = None      # text encoder layers - 1: at least one layer must remain
    max_prompt_chars: int | None = None

    def within(self, other: "Caps") -> bool:
        """True when every limit here is at least as strict as `other`'s."""
        for f in fields(self):
            mine, theirs = getattr(self, f.name), getattr(other, f.name)
            if theirs is not None and (mine is None or mine > theirs):
                return False
        return True


LIBRARY_CAPS = Caps()


def check_int(name: str, value, low: int, high: int | None = None) -> int:
    """`value` as an int in [low, high] (`high` None: unbounded); InvalidRequest(name) otherwise.
    bool is refused; so is a float, even a whole one (front ends convert JSON numbers first)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise InvalidRequest(name, f"must be an integer, got {value!r}")
    value = int(value)
    if value < low or (high is not None and value > high):
        bound = f"[{low}, {high}]" if high is not None else f">= {low}"
        raise InvalidRequest(name, f"must be in {bound}, got {value}")
    return value


def check_size(name: str, value, cap: int) -> int:
    """The one size rule: a positive multiple of 8 pixels, at most `cap`."""
    value = check_int(name, value, SIZE_MULTIPLE, cap)
    if value % SIZE_MULTIPLE:
        raise InvalidRequest(name, f"must be a multiple of {SIZE_MULTIPLE}, got {value}")
    return value


def check_text(name: str, value, limit: int | None) -> str:
    """A str of at most `limit` characters that is valid Unicode text (no lone surrogates, as JSON's
    "\\ud800" or a non-UTF-8 command-line argument give)."""
    if not isinstance(value, str):
        raise InvalidRequest(name, f"must be a string, got {type(value).__name__}")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise InvalidRequest(name, f"is not valid Unicode text (character {exc.start} is a lone surrogate, "
                                   "e.g. from bytes that are not UTF-8)") from None
    if limit is not None and len(value) > limit:
        raise InvalidRequest(name, f"at most {limit} characters, got {len(value)}")
    return value


_UNCHECKED = (None, None)


@dataclass
class GenerationRequest:
    """One text-to-image generation.

    prompt, negative_prompt  text (str); tokens past the text encoder's 77 are dropped with a warning
    steps             sampler steps (int >= 1; at most what the model's schedule can place)
    cfg_scale         classifier-free guidance scale (float >= 0); at <= 1 the negative prompt is unused
    seed              int in [0, 2^64); None or -1: a random seed, chosen (and recorded) by `validate`
    width, height     image size in pixels (multiples of 8)
    sampler           a name of `sdlite.samplers.SAMPLERS`, an A1111 label ("Euler a") or alias; `validate`
                      turns it into the name
    clip_skip         text encoder layers to skip from the end (0: none; A1111's "Clip skip" minus 1)
    """
    prompt: str
    negative_prompt: str = ""
    steps: int = 20
    cfg_scale: float = 7.5
    seed: int | None = None
    width: int = 512
    height: int = 512
    sampler: str = "dpm++2m"
    clip_skip: int = 0

    def __setattr__(self, name: str, value) -> None:
        object.__setattr__(self, name, value)
        if not name.startswith("_"):
            object.__setattr__(self, "_checked", _UNCHECKED)  # a field changed: check again

    def validate(self, caps: Caps = LIBRARY_CAPS, scheduler_config: dict | None = None) -> "GenerationRequest":
        """Check every field against `caps`, and `steps` against `scheduler_config`'s schedule when given;
        fill in a random seed and the sampler's name. Returns self. Raises `InvalidRequest` naming the
        first bad field."""
        checked_caps, checked_schedule = getattr(self, "_checked", _UNCHECKED)
        if checked_caps is None or not checked_caps.within(caps):
            self._check_fields(caps)
            checked_caps = caps
        if scheduler_config is not None and checked_schedule is not scheduler_config:
            samplers.check_steps(self.sampler, self.steps, scheduler_config)
            checked_schedule = scheduler_config
        object.__setattr__(self, "_checked", (checked_caps, checked_schedule))
        return self

    def _check_fields(self, caps: Caps) -> None:
        self.prompt = check_text("prompt", self.prompt, caps.max_prompt_chars)
        self.negative_prompt = check_text("negative_prompt", self.negative_prompt, caps.max_prompt_chars)
        self.steps = check_int("steps", self.steps, 1, caps.max_steps)
        cfg = self.cfg_scale
        if isinstance(cfg, bool) or not isinstance(cfg, numbers.Real) or not math.isfinite(cfg) or cfg < 0 \
                or (caps.max_cfg_scale is not None and cfg > caps.max_cfg_scale):
            upper = f" and <= {caps.max_cfg_scale:g}" if caps.max_cfg_scale is not None else ""
            raise InvalidRequest("cfg_scale", f"must be a finite number >= 0{upper}, got {cfg!r}")
        self.cfg_scale = float(cfg)
        self.width = check_size("width", self.width, caps.max_width)
        self.height = check_size("height", self.height, caps.max_height)
        if not isinstance(self.sampler, str):
            raise InvalidRequest("sampler", f"must be a string, got {type(self.sampler).__name__}")
        self.sampler = samplers.resolve_sampler(self.sampler)
        if self.seed is None or (type(self.seed) is int and self.seed == RANDOM_SEED):
            self.seed = random.randrange(2**32)
        self.seed = check_int("seed", self.seed, 0, SEED_LIMIT - 1)
        self.clip_skip = check_int("clip_skip", self.clip_skip, 0, caps.max_clip_skip)


@dataclass
class StageTiming:
    """Wall time of one stage of a generation ("encode", "load_unet", "step 3", "decode", ...)."""
    name: str
    seconds: float


@dataclass
class GenerationResult:
    """What `Pipeline.generate` / `run` return.

    image        the RGB image, width x height pixels (PIL, mode "RGB", 8 bits per channel)
    request      the validated request (its seed filled in when it was random)
    parameters   the A1111-style parameters text written into the PNG
    timings      wall time per stage, in order
    latents      the final latents, (1, 4, height/8, width/8) float32, before VAE scaling
    plan         the memory plan the generation ran under
    profile      the profiler's summary (peak RSS anon/file and cgroup usage, bytes) or None
    """
    image: Image.Image
    request: GenerationRequest
    parameters: str
    timings: list[StageTiming] = field(default_factory=list)
    latents: torch.Tensor | None = None
    plan: Plan | None = None
    profile: dict | None = None

    def save(self, path: str | Path) -> Path:
        """Write the image with its parameters, atomically (nothing is left on failure): .png (a
        `parameters` text chunk), .jpg/.jpeg or .webp (EXIF UserComment, as A1111 writes them). Raises
        ValueError for another suffix, OSError when the file cannot be written."""
        from .image_io import save_image
        return save_image(self.image, path, self.parameters)


def printable_name(name: str) -> str:
    """A file or folder name as text that can be written anywhere (PNG chunks, JSON): a name that is not
    valid UTF-8 on disk reaches Python with lone surrogates (PEP 383); those bytes become U+FFFD."""
    return name.encode("utf-8", "surrogateescape").decode("utf-8", "replace")


def format_parameters(request: GenerationRequest, model_name: str, vae_name: str | None = None) -> str:
    """The A1111-style `parameters` text that image viewers and other tools read back from a PNG:
    the prompt, "Negative prompt: ..." when there is one, then "Steps: 20, Sampler: DPM++ 2M, ..."."""
    lines = [request.prompt]
    if request.negative_prompt:
        lines.append(f"Negative prompt: {request.negative_prompt}")
    items = [
        ("Steps", request.steps),
        ("Sampler", samplers.sampler_label(request.sampler)),
        ("CFG scale", f"{request.cfg_scale:g}"),
        ("Seed", request.seed),
        ("Size", f"{request.width}x{request.height}"),
        ("Model", printable_name(model_name)),
    ]
    if vae_name:
        items.append(("VAE", printable_name(vae_name)))
    if request.clip_skip:
        items.append(("Clip skip", request.clip_skip + 1))
    items.append(("Version", "sdlite"))
    lines.append(", ".join(f"{k}: {v}" for k, v in items))
    return "\n".join(lines)
