"""One text-to-image generation: tokenize -> encode -> denoise loop -> decode -> image.

    pipe = Pipeline.load("path/to/model")
    image = pipe.generate("a lighthouse at dusk", steps=20, seed=42)
    image.save("out.png", pnginfo=png_info(image))   # or sdlite.image_io.save_png(image, path)

Results follow diffusers' StableDiffusionPipeline for the same weights, seed and sampler: the initial
noise is `torch.randn` from a CPU generator seeded with `seed`, the same generator then feeds the
sampler's own draws, and classifier-free guidance runs as [uncond, cond].
"""

from __future__ import annotations

import random
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from PIL import Image

from . import samplers
from .errors import Cancelled, InvalidRequest
from .models.config import read_json
from .runtime.components import LoadedComponent, load_text_encoder, load_unet, load_vae
from .tokenizer import ClipTokenizer
from .weights.model_folder import ModelFolder

MAX_SIDE = 2048
MAX_STEPS = 1000

SAMPLER_LABELS = {  # A1111 names, for the PNG parameters text
    "ddim": "DDIM",
    "dpm++2m": "DPM++ 2M",
    "dpm++2m_karras": "DPM++ 2M Karras",
    "euler": "Euler",
    "euler_a": "Euler a",
    "lcm": "LCM",
}

ProgressFn = Callable[[int, int], None]


@dataclass
class GenerationRequest:
    prompt: str
    negative_prompt: str = ""
    steps: int = 20
    cfg_scale: float = 7.5
    seed: int | None = None
    width: int = 512
    height: int = 512
    sampler: str = "dpm++2m"
    clip_skip: int = 0

    def validate(self) -> "GenerationRequest":
        if not isinstance(self.prompt, str):
            raise InvalidRequest("prompt", "must be a string")
        if not isinstance(self.negative_prompt, str):
            raise InvalidRequest("negative_prompt", "must be a string")
        if isinstance(self.steps, bool) or not isinstance(self.steps, int) or self.steps < 1:
            raise InvalidRequest("steps", f"must be a positive integer, got {self.steps!r}")
        if self.steps > MAX_STEPS:
            raise InvalidRequest("steps", f"at most {MAX_STEPS}, got {self.steps}")
        if not isinstance(self.cfg_scale, (int, float)) or not np.isfinite(self.cfg_scale) \
                or self.cfg_scale < 0:
            raise InvalidRequest("cfg_scale", f"must be a finite number >= 0, got {self.cfg_scale!r}")
        for name in ("width", "height"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 8 or v % 8:
                raise InvalidRequest(name, f"must be a positive multiple of 8, got {v!r}")
            if v > MAX_SIDE:
                raise InvalidRequest(name, f"at most {MAX_SIDE}, got {v}")
        if self.sampler not in samplers.SAMPLERS:
            raise InvalidRequest("sampler", f"unknown sampler {self.sampler!r}; choose one of "
                                 f"{', '.join(samplers.SAMPLERS)}")
        if self.seed is None:
            self.seed = random.randrange(2**32)
        if isinstance(self.seed, bool) or not isinstance(self.seed, int) or not 0 <= self.seed < 2**64:
            raise InvalidRequest("seed", f"must be an integer in [0, 2^64), got {self.seed!r}")
        if isinstance(self.clip_skip, bool) or not isinstance(self.clip_skip, int) or self.clip_skip < 0:
            raise InvalidRequest("clip_skip", f"must be an integer >= 0, got {self.clip_skip!r}")
        return self


@dataclass
class StageTiming:
    name: str
    seconds: float


@dataclass
class GenerationResult:
    image: Image.Image
    request: GenerationRequest
    parameters: str
    timings: list[StageTiming] = field(default_factory=list)
    latents: torch.Tensor | None = None

    def save(self, path: str | Path) -> Path:
        from .image_io import save_png
        return save_png(self.image, path, self.parameters)


class Pipeline:
    def __init__(self, folder: ModelFolder, tokenizer: ClipTokenizer, text_encoder: LoadedComponent,
                 unet: LoadedComponent, vae: LoadedComponent, scheduler_config: dict,
                 dtype: torch.dtype = torch.float32):
        self.folder = folder
        self.tokenizer = tokenizer
        self.text_encoder = text_encoder
        self.unet = unet
        self.vae = vae
        self.scheduler_config = scheduler_config
        self.dtype = dtype
        self._lock = threading.Lock()

    @classmethod
    def load(cls, path: str | Path, *, dtype: torch.dtype = torch.float32,
             threads: int | None = None) -> "Pipeline":
        """Open a diffusers model folder. Weights stay in the mapped files where their dtype allows."""
        if threads is not None:
            torch.set_num_threads(threads)
        folder = ModelFolder.open(path)
        tokenizer = ClipTokenizer.from_folder(folder.component("tokenizer"))
        scheduler_config = read_json(folder.component("scheduler") / "scheduler_config.json")
        text_encoder = load_text_encoder(folder, dtype)
        try:
            unet = load_unet(folder, dtype)
            try:
                vae = load_vae(folder, dtype)
            except Exception:
                unet.close()
                raise
        except Exception:
            text_encoder.close()
            raise
        if text_encoder.module.config.max_position_embeddings < tokenizer.max_length:
            tokenizer.max_length = text_encoder.module.config.max_position_embeddings
        return cls(folder, tokenizer, text_encoder, unet, vae, scheduler_config, dtype)

    @property
    def vae_scale_factor(self) -> int:
        return 2 ** (len(self.vae.module.config.block_out_channels) - 1)

    @property
    def latent_channels(self) -> int:
        return self.unet.module.config.in_channels

    def close(self) -> None:
        for part in (self.text_encoder, self.unet, self.vae):
            part.close()

    # --- the stages -----------------------------------------------------------------------------

    def encode_prompt(self, prompt: str, clip_skip: int = 0) -> torch.Tensor:
        ids = self.tokenizer([prompt])
        with torch.inference_mode():
            return self.text_encoder.module(ids, clip_skip=clip_skip).to(self.dtype)

    def initial_noise(self, request: GenerationRequest, generator: torch.Generator) -> torch.Tensor:
        f = self.vae_scale_factor
        shape = (1, self.latent_channels, request.height // f, request.width // f)
        return torch.randn(shape, generator=generator, dtype=torch.float32)

    def denoise(self, noise: torch.Tensor, cond: torch.Tensor, uncond: torch.Tensor | None,
                request: GenerationRequest, generator: torch.Generator,
                on_step: Callable[[int, int, torch.Tensor], None] | None = None) -> torch.Tensor:
        unet = self.unet.module
        scale = request.cfg_scale
        if uncond is not None:
            context = torch.cat([uncond, cond])

            def model(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
                out = unet(torch.cat([x, x]).to(self.dtype), t, context).float()
                out_uncond, out_cond = out.chunk(2)
                return out_uncond + scale * (out_cond - out_uncond)
        else:
            def model(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
                return unet(x.to(self.dtype), t, cond).float()

        with torch.inference_mode():
            return samplers.sample(request.sampler, model, noise, request.steps, self.scheduler_config,
                                   generator=generator, callback=on_step)

    def decode(self, latents: torch.Tensor) -> Image.Image:
        vae = self.vae.module
        with torch.inference_mode():
            z = latents / vae.config.scaling_factor
            if vae.config.shift_factor:
                z = z + vae.config.shift_factor
            image = vae.decode(z.to(self.dtype)).float()
        image = (image / 2 + 0.5).clamp(0, 1)
        array = (image[0].permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)
        return Image.fromarray(array)

    # --- the whole job --------------------------------------------------------------------------

    def generate(self, prompt: str, *, negative_prompt: str = "", steps: int = 20,
                 cfg_scale: float = 7.5, seed: int | None = None, width: int = 512, height: int = 512,
                 sampler: str = "dpm++2m", clip_skip: int = 0,
                 progress: ProgressFn | None = None,
                 cancel: threading.Event | Callable[[], bool] | None = None,
                 latents: torch.Tensor | None = None) -> GenerationResult:
        """Generate one image. `progress(step, total)` is called after each sampler step; `cancel`
        (an Event or a callable) is checked between steps and raises `Cancelled` when set.
        `latents` replaces the seeded initial noise (for tests)."""
        request = GenerationRequest(prompt, negative_prompt, steps, cfg_scale, seed, width, height,
                                    sampler, clip_skip).validate()
        return self.run(request, progress=progress, cancel=cancel, latents=latents)

    def run(self, request: GenerationRequest, *, progress: ProgressFn | None = None,
            cancel: threading.Event | Callable[[], bool] | None = None,
            latents: torch.Tensor | None = None) -> GenerationResult:
        request.validate()
        is_cancelled = _cancel_check(cancel)
        timings: list[StageTiming] = []

        def timed(name, fn, *args):
            t0 = time.perf_counter()
            out = fn(*args)
            timings.append(StageTiming(name, time.perf_counter() - t0))
            return out

        def on_step(i: int, total: int, x: torch.Tensor) -> None:
            if progress is not None:
                progress(i + 1, total)
            if is_cancelled():
                raise Cancelled(f"cancelled after step {i + 1} of {total}")

        with self._lock:
            if is_cancelled():
                raise Cancelled("cancelled before start")
            cond = timed("encode", self.encode_prompt, request.prompt, request.clip_skip)
            uncond = None
            if request.cfg_scale > 1.0:
                uncond = timed("encode_negative", self.encode_prompt, request.negative_prompt,
                               request.clip_skip)
            generator = torch.Generator().manual_seed(request.seed)
            noise = self.initial_noise(request, generator)
            if latents is not None:
                if latents.shape != noise.shape:
                    raise InvalidRequest("latents", f"expected shape {tuple(noise.shape)}, "
                                         f"got {tuple(latents.shape)}")
                noise = latents.float()
            final = timed("denoise", self.denoise, noise, cond, uncond, request, generator, on_step)
            image = timed("decode", self.decode, final)
        return GenerationResult(image, request, format_parameters(request, self.folder.name), timings,
                                final)


def _cancel_check(cancel) -> Callable[[], bool]:
    if cancel is None:
        return lambda: False
    if isinstance(cancel, threading.Event):
        return cancel.is_set
    return cancel


def format_parameters(request: GenerationRequest, model_name: str) -> str:
    """The A1111-style `parameters` text that image viewers and other tools read back."""
    lines = [request.prompt]
    if request.negative_prompt:
        lines.append(f"Negative prompt: {request.negative_prompt}")
    fields = [
        ("Steps", request.steps),
        ("Sampler", SAMPLER_LABELS.get(request.sampler, request.sampler)),
        ("CFG scale", f"{request.cfg_scale:g}"),
        ("Seed", request.seed),
        ("Size", f"{request.width}x{request.height}"),
        ("Model", model_name),
    ]
    if request.clip_skip:
        fields.append(("Clip skip", request.clip_skip + 1))
    fields.append(("Version", "sdlite"))
    lines.append(", ".join(f"{k}: {v}" for k, v in fields))
    return "\n".join(lines)


def request_dict(request: GenerationRequest) -> dict:
    return asdict(request)
