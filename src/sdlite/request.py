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
from .tokenizer.prompt_syntax import PROMPT_SYNTAXES

if TYPE_CHECKING:
    import torch
    from PIL import Image

    from .runtime.planner import Plan

MAX_SIDE = 2048         # pixels: the library's cap on width and height
MAX_STEPS = 1000        # the library's cap on sampler steps (a schedule may allow fewer)
SIZE_MULTIPLE = 8       # width and height are multiples of the VAE's 8x downscale
SEED_LIMIT = 2**64      # seeds are in [0, 2^64), as torch.Generator.manual_seed takes them
RANDOM_SEED = -1        # as in A1111: a seed of -1 (or None) means "draw one"
MAX_DEEP_CACHE = 100    # DeepCache's N: a full UNet evaluation at least once every 100


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

    prompt, negative_prompt  text (str), read as `prompt_syntax` says; in "plain" tokens past the text
                      encoder's 77 are dropped with a warning
    steps             sampler steps (int >= 1; at most what the model's schedule can place)
    cfg_scale         classifier-free guidance scale (float >= 0); at <= 1 the negative prompt is unused
    seed              int in [0, 2^64); None or -1: a random seed, chosen (and recorded) by `validate`
    width, height     image size in pixels (multiples of 8)
    sampler           a name of `sdlite.samplers.SAMPLERS`, an A1111 label ("Euler a") or alias; `validate`
                      turns it into the name
    clip_skip         text encoder layers to skip from the end (0: none; A1111's "Clip skip" minus 1)
    init_image        img2img: a PIL image to start from (None: text-to-image); resized to width x height
                      as A1111's "Just resize" does (stretched, aspect ratio not kept)
    denoising_strength  img2img: how much of the schedule is run over the init image (0 < s <= 1)
    mask              inpainting (needs init_image): a PIL image, white = repaint, black = keep
    subseed, subseed_strength  A1111's variation seed: the initial noise is slerp(subseed_strength, noise of
                      seed, noise of subseed); subseed None or -1: drawn by `validate` when the strength is > 0
    eta               A1111's eta: DDIM's eta (default 0) and Euler a's ancestral noise scale (default 1);
                      None: the sampler's default; ignored by the other samplers
    loras             ((name or path, scale), ...): LoRAs for this request on top of the pipeline's own; a
                      name is looked up in the pipeline's LoRA folder (NAME.safetensors); scale 0: left out
    prompt_syntax     "a1111" (default: (word:1.3), [word], BREAK, prompts past 75 tokens in chunks; see
                      `sdlite.runtime.prompt_encoding`) or "plain" (diffusers: one 77-token chunk, brackets literal)
    deep_cache        DeepCache N (int in [0, MAX_DEEP_CACHE]): of every N UNet evaluations, N - 1 run only the
                      shallow path on the cached deep feature (faster, approximate; see
                      `sdlite.runtime.deep_cache`); 0 or 1: off
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
    init_image: Image.Image | None = None
    denoising_strength: float = 0.75
    mask: Image.Image | None = None
    subseed: int | None = None
    subseed_strength: float = 0.0
    eta: float | None = None
    loras: tuple = ()
    prompt_syntax: str = "a1111"
    deep_cache: int = 0

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
        if self.prompt_syntax not in PROMPT_SYNTAXES:
            raise InvalidRequest("prompt_syntax", f"must be one of {', '.join(PROMPT_SYNTAXES)}, "
                                                  f"got {self.prompt_syntax!r}")
        self.loras = check_loras(self.loras)
        self.deep_cache = check_int("deep_cache", self.deep_cache, 0, MAX_DEEP_CACHE)
        self._check_image_fields()
        self._check_variation_fields()

    def _check_image_fields(self) -> None:
        """img2img / inpainting: init_image and mask are PIL images (converted to RGB / L), the strength
        in (0, 1]."""
        from PIL import Image as PILImage
        for name in ("init_image", "mask"):
            value = getattr(self, name)
            if value is not None and not isinstance(value, PILImage.Image):
                raise InvalidRequest(name, f"must be a PIL image, got {type(value).__name__}")
        if self.mask is not None and self.init_image is None:
            raise InvalidRequest("mask", "a mask needs an init_image to inpaint")
        if self.init_image is not None and self.init_image.mode != "RGB":
            self.init_image = self.init_image.convert("RGB")
        if self.mask is not None and self.mask.mode != "L":
            self.mask = self.mask.convert("L")
        self.denoising_strength = check_unit("denoising_strength", self.denoising_strength, open_low=True)

    def _check_variation_fields(self) -> None:
        self.subseed_strength = check_unit("subseed_strength", self.subseed_strength, open_low=False)
        if self.subseed is None or (type(self.subseed) is int and self.subseed == RANDOM_SEED):
            self.subseed = random.randrange(2**32) if self.subseed_strength > 0 else None
        if self.subseed is not None:
            self.subseed = check_int("subseed", self.subseed, 0, SEED_LIMIT - 1)
        if self.eta is not None:
            eta = self.eta
            if isinstance(eta, bool) or not isinstance(eta, numbers.Real) or not math.isfinite(eta) or eta < 0:
                raise InvalidRequest("eta", f"must be a finite number >= 0, got {eta!r}")
            self.eta = float(eta)


MAX_LORAS = 16


def check_loras(value) -> tuple:
    """((name or path, scale), ...) with non-empty names and finite scales; InvalidRequest("loras") otherwise."""
    if isinstance(value, (str, bytes)) or not isinstance(value, (tuple, list)) or len(value) > MAX_LORAS:
        raise InvalidRequest("loras", f"must be a list of at most {MAX_LORAS} (name, scale) pairs, got {value!r}")
    out = []
    for item in value:
        if not isinstance(item, (tuple, list)) or len(item) != 2:
            raise InvalidRequest("loras", f"each LoRA is a (name, scale) pair, got {item!r}")
        name, scale = item
        name = check_text("loras", name, 4096)
        if not name or isinstance(scale, bool) or not isinstance(scale, numbers.Real) or not math.isfinite(scale):
            raise InvalidRequest("loras", f"each LoRA needs a name and a finite scale, got {item!r}")
        out.append((name, float(scale)))
    return tuple(out)


def check_unit(name: str, value, open_low: bool) -> float:
    """A finite number in (0, 1] (`open_low`) or [0, 1]; InvalidRequest(name) otherwise."""
    low_ok = (lambda v: v > 0) if open_low else (lambda v: v >= 0)
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value) \
            or not low_ok(value) or value > 1:
        raise InvalidRequest(name, f"must be a number in {'(0' if open_low else '[0'}, 1], got {value!r}")
    return float(value)


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


def format_parameters(request: GenerationRequest, model_name: str, vae_name: str | None = None,
                      loras=(), kv: str | None = None) -> str:
    """The A1111-style `parameters` text that image viewers and other tools read back from a PNG:
    the prompt, "Negative prompt: ..." when there is one, then "Steps: 20, Sampler: DPM++ 2M, ...".
    `kv`: how the text's K/V were kept when not exactly ("int8 + tokens through first EOT"), an sdlite field."""
    lines = [_with_lora_tags(request.prompt, loras)]
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
    if request.init_image is not None:
        items.append(("Denoising strength", f"{request.denoising_strength:g}"))
    if request.subseed_strength:
        items += [("Variation seed", request.subseed), ("Variation seed strength", f"{request.subseed_strength:g}")]
    if request.eta is not None:
        items.append(("Eta", f"{request.eta:g}"))
    if request.deep_cache >= 2:
        items.append(("DeepCache", request.deep_cache))
    if kv:
        items.append(("K/V cache", kv))
    if loras:
        hashes = ", ".join(f"{printable_name(name)}: {h}" for name, _, h in loras)
        items.append(("Lora hashes", f'"{hashes}"'))
    items.append(("Version", "sdlite"))
    lines.append(", ".join(f"{k}: {v}" for k, v in items))
    return "\n".join(lines)


def _with_lora_tags(prompt: str, loras) -> str:
    """The prompt with A1111's `<lora:NAME:SCALE>` tag for each applied LoRA (name, scale, hash) that it does
    not carry already, as A1111 records them (the tags stay in its prompt text)."""
    tags = [f"<lora:{printable_name(name)}:{scale:g}>" for name, scale, _ in loras
            if f"<lora:{name}:" not in prompt and f"<lora:{name}>" not in prompt]
    return " ".join([prompt] + tags) if tags else prompt
