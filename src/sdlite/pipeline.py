"""One text-to-image generation: tokenize -> encode -> denoise loop -> decode -> image.

    pipe = Pipeline.load("path/to/model")
    image = pipe.generate("a lighthouse at dusk", steps=20, seed=42)
    image.save("out.png", pnginfo=png_info(image))   # or sdlite.image_io.save_png(image, path)

Results follow diffusers' StableDiffusionPipeline for the same weights, seed and sampler: the initial
noise is `torch.randn` from a CPU generator seeded with `seed`, the same generator then feeds the
sampler's own draws, and classifier-free guidance runs as [uncond, cond].
"""

from __future__ import annotations

import contextlib
import gc
import random
import threading
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from PIL import Image

from . import samplers
from .errors import Cancelled, InvalidRequest
from .models.config import read_json
from .runtime import memory
from .runtime.attention import set_attention
from .runtime.compute_thread import run_on_compute_thread
from .runtime.components import (LOADERS, LoadedComponent, check_vae_matches, native_size, text_config,
                                 unet_config, vae_config, vae_factor)
from .runtime.kv_cache import cross_attention_cache
from .runtime.lazy_weights import set_layer_chunking
from .runtime.planner import (STAGES, ModelSizes, Plan, PlanError, fmt_bytes, make_plan,
                              parse_bytes)
from .runtime.profiler import Profiler
from .runtime.tiled_vae import decode_tiled
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
    plan: Plan | None = None
    profile: dict | None = None

    def save(self, path: str | Path) -> Path:
        from .image_io import save_png
        return save_png(self.image, path, self.parameters)


class Pipeline:
    """A loaded model plus the memory plan that decides how it runs.

    With `residency="all"` the three networks are loaded once (weights mapped, not copied) and kept;
    with `"staged"` each is loaded for its stage and released after it (module dropped, file unmapped,
    heap trimmed), so only one stage's weights and activations are ever in memory.
    """

    def __init__(self, folder: ModelFolder, tokenizer: ClipTokenizer, scheduler_config: dict,
                 plan: Plan, dtype: torch.dtype = torch.float32):
        self.folder = folder
        self.tokenizer = tokenizer
        self.scheduler_config = scheduler_config
        self.plan = plan
        self.dtype = dtype
        self.unet_config = unet_config(folder)
        self.vae_config = vae_config(folder)
        self.text_config = text_config(folder)
        self._components: dict[str, LoadedComponent] = {}
        self._sizes = None
        self._plans: dict[tuple[int, int], Plan] = {}  # per request size, for a budgeted pipeline
        self._lock = threading.Lock()
        if self.text_config.max_position_embeddings < tokenizer.max_length:
            tokenizer.max_length = self.text_config.max_position_embeddings

    @classmethod
    def load(cls, path: str | Path, *, memory_budget: int | str | None = None, plan: Plan | None = None,
             width: int | None = None, height: int | None = None, dtype: torch.dtype = torch.float32,
             threads: int | None = None, profiler: Profiler | None = None,
             vae: str | Path | None = None) -> "Pipeline":
        """Open a diffusers model folder. With `memory_budget` (bytes or '1.5G'), plan the levers for
        `width` x `height` (default: the model's native size) first and refuse, before loading anything,
        when nothing fits (`PlanError`, with the smallest budget that would). `vae`: another VAE folder
        to decode with, e.g. TAESD (a diffusers AutoencoderTiny folder).

        Loading, like every generation, runs on sdlite's compute thread (see runtime.compute_thread)."""
        return run_on_compute_thread(cls._load, path, memory_budget, plan, width, height, dtype, threads,
                                     profiler, vae)

    @classmethod
    def _load(cls, path, memory_budget, plan, width, height, dtype, threads, profiler, vae) -> "Pipeline":
        if threads is not None:
            torch.set_num_threads(threads)
        folder = ModelFolder.open(path, vae=vae)
        check_vae_matches(folder)
        tokenizer = ClipTokenizer.from_folder(folder.component("tokenizer"))
        scheduler_config = read_json(folder.component("scheduler") / "scheduler_config.json")
        if isinstance(memory_budget, str):
            memory_budget = parse_bytes(memory_budget)
        if plan is None:
            native = native_size(folder)
            plan = make_plan(folder, memory_budget, width or native, height or native)
        pipe = cls(folder, tokenizer, scheduler_config, plan, dtype)
        if plan.budget is not None:
            memory.configure_allocator()
        if plan.residency == "all":
            handle = profiler.begin("load") if profiler else None
            try:
                for name in STAGES:
                    pipe._component(name)
            except Exception:
                pipe.close()
                raise
            finally:
                if handle:
                    profiler.end(handle)
            gc.collect()
            gc.freeze()
        return pipe

    # --- components, loaded on demand -----------------------------------------------------------

    def _component(self, name: str) -> LoadedComponent:
        part = self._components.get(name)
        if part is None:
            part = LOADERS[name](self.folder, self.dtype, weights_mode=self.plan.weights_mode)
            set_attention(part.module, self.plan.attention)
            set_layer_chunking(part.module, self.plan.layer_chunk)
            self._components[name] = part
        return part

    def _release(self, name: str) -> None:
        """After a stage: in staged residency, drop the network and unmap its weights."""
        if self.plan.residency != "staged":
            return
        part = self._components.pop(name, None)
        if part is not None:
            files = [f.path for f in getattr(part.weights, "files", [])]
            part.close()
            del part
            memory.trim()
            for f in files:
                memory.drop_file_cache(f)

    @property
    def text_encoder(self) -> LoadedComponent:
        return self._component("text_encoder")

    @property
    def unet(self) -> LoadedComponent:
        return self._component("unet")

    @property
    def vae(self) -> LoadedComponent:
        return self._component("vae")

    @property
    def vae_name(self) -> str | None:
        """The folder name of a VAE given instead of the model's own (None for the model's own)."""
        path = self.folder.replacement("vae")
        return None if path is None else path.resolve().name

    @property
    def vae_scale_factor(self) -> int:
        return vae_factor(self.vae_config)

    @property
    def latent_channels(self) -> int:
        return self.unet_config.in_channels

    @property
    def native_size(self) -> int:
        return self.unet_config.sample_size * self.vae_scale_factor

    def close(self) -> None:
        for part in self._components.values():
            part.close()
        self._components.clear()

    def plan_for(self, width: int, height: int) -> Plan:
        """The plan for a request size: the loaded plan when the size matches or no budget was given,
        else a fresh one for the same budget (PlanError when that size does not fit)."""
        plan = self.plan
        if plan.budget is None or (plan.width, plan.height) == (width, height):
            return plan
        cached = self._plans.get((width, height))
        if cached is not None:
            return cached
        if self._sizes is None:
            self._sizes = ModelSizes.of(self.folder)
        new = make_plan(self.folder, plan.budget, width, height, sizes=self._sizes)
        if plan.residency == "staged":
            new.residency = "staged"
        elif new.residency == "staged":
            raise PlanError(f"{width}x{height} needs one stage at a time in {fmt_bytes(plan.budget)}, "
                            f"but this pipeline was loaded for {plan.width}x{plan.height} with every "
                            "network resident; load it for the larger size")
        new.weights_mode = plan.weights_mode
        self._plans[(width, height)] = new
        return new

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
                on_step: Callable[[int, int, torch.Tensor], None] | None = None,
                plan: Plan | None = None) -> torch.Tensor:
        plan = plan or self.plan
        unet = self.unet.module
        scale = request.cfg_scale
        if uncond is None:
            def model(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
                return unet(x.to(self.dtype), t, cond).float()
        elif plan.cfg == "split":
            def model(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
                x = x.to(self.dtype)
                out_uncond = unet(x, t, uncond).float()
                out_cond = unet(x, t, cond).float()
                return out_uncond + scale * (out_cond - out_uncond)
        else:
            context = torch.cat([uncond, cond])

            def model(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
                out = unet(torch.cat([x, x]).to(self.dtype), t, context).float()
                out_uncond, out_cond = out.chunk(2)
                return out_uncond + scale * (out_cond - out_uncond)

        cache = cross_attention_cache(unet) if plan.kv_cache else contextlib.nullcontext()
        with torch.inference_mode(), cache:
            return samplers.sample(request.sampler, model, noise, request.steps, self.scheduler_config,
                                   generator=generator, callback=on_step)

    def decode(self, latents: torch.Tensor, plan: Plan | None = None) -> Image.Image:
        plan = plan or self.plan
        vae = self.vae.module
        with torch.inference_mode():
            z = latents / vae.config.scaling_factor
            if vae.config.shift_factor:
                z = z + vae.config.shift_factor
            z = z.to(self.dtype)
            if plan.vae_tile:
                image = decode_tiled(vae.decode, z, self.vae_scale_factor, plan.vae_tile,
                                     min(plan.vae_overlap, plan.vae_tile // 2))
            else:
                image = vae.decode(z)
            image = image.float()
        image = (image / 2 + 0.5).clamp(0, 1)
        array = (image[0].permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)
        return Image.fromarray(array)

    # --- the whole job --------------------------------------------------------------------------

    def generate(self, prompt: str, *, negative_prompt: str = "", steps: int = 20,
                 cfg_scale: float = 7.5, seed: int | None = None, width: int | None = None,
                 height: int | None = None, sampler: str = "dpm++2m", clip_skip: int = 0,
                 progress: ProgressFn | None = None,
                 cancel: threading.Event | Callable[[], bool] | None = None,
                 latents: torch.Tensor | None = None,
                 profiler: Profiler | None = None) -> GenerationResult:
        """Generate one image (default size: the model's native size). `progress(step, total)` is
        called after each sampler step; `cancel` (an Event or a callable) is checked between steps and
        raises `Cancelled` when set. `latents` replaces the seeded initial noise (for tests)."""
        request = GenerationRequest(prompt, negative_prompt, steps, cfg_scale, seed,
                                    width or self.native_size, height or self.native_size,
                                    sampler, clip_skip).validate()
        return self.run(request, progress=progress, cancel=cancel, latents=latents, profiler=profiler)

    def run(self, request: GenerationRequest, *, progress: ProgressFn | None = None,
            cancel: threading.Event | Callable[[], bool] | None = None,
            latents: torch.Tensor | None = None,
            profiler: Profiler | None = None) -> GenerationResult:
        request.validate()
        samplers.timesteps_for(request.sampler, request.steps, self.scheduler_config)  # steps fit the schedule
        cancelled = _cancel_check(cancel)
        interrupted = threading.Event()  # the caller stopped waiting (e.g. Ctrl-C): stop at the next step

        def is_cancelled() -> bool:
            return interrupted.is_set() or cancelled()

        own_profiler = profiler is None
        prof = profiler or Profiler(sample=False)
        try:
            with self._lock:
                return run_on_compute_thread(self._run, request, progress, is_cancelled, latents, prof,
                                             on_interrupt=interrupted.set)
        finally:
            if own_profiler:
                prof.close()

    def _run(self, request, progress, is_cancelled, latents, prof: Profiler) -> GenerationResult:
        plan = self.plan_for(request.width, request.height)
        if is_cancelled():
            raise Cancelled("cancelled before start")
        first = len(prof.records)
        try:
            with prof.stage("encode"):
                cond = self.encode_prompt(request.prompt, request.clip_skip)
                uncond = None
                if request.cfg_scale > 1.0:
                    uncond = self.encode_prompt(request.negative_prompt, request.clip_skip)
            self._release("text_encoder")
            if plan.trim:
                memory.trim()
            generator = torch.Generator().manual_seed(request.seed)
            noise = self.initial_noise(request, generator)
            if latents is not None:
                if latents.shape != noise.shape:
                    raise InvalidRequest("latents", f"expected shape {tuple(noise.shape)}, "
                                         f"got {tuple(latents.shape)}")
                noise = latents.float()

            with prof.stage("load_unet" if "unet" not in self._components else "unet_ready"):
                self._component("unet")
            step_handle = [prof.begin("step 1", "step")]

            def on_step(i: int, total: int, x: torch.Tensor) -> None:
                prof.end(step_handle[0])
                step_handle[0] = None
                if progress is not None:
                    progress(i + 1, total)
                if is_cancelled():
                    raise Cancelled(f"cancelled after step {i + 1} of {total}")
                step_handle[0] = prof.begin(f"step {i + 2}", "step") if i + 1 < total else None

            try:
                final = self.denoise(noise, cond, uncond, request, generator, on_step, plan)
            finally:
                if step_handle[0] is not None:
                    prof.end(step_handle[0])
            self._release("unet")
            if plan.trim:
                memory.trim()
            with prof.stage("decode"):
                image = self.decode(final, plan)
            self._release("vae")
        except BaseException:
            for name in STAGES:
                self._release(name)
            raise
        records = prof.records[first:]
        timings = [StageTiming(r.name, r.seconds) for r in records]
        return GenerationResult(image, request, format_parameters(request, self.folder.name, self.vae_name),
                                timings, final, plan, prof.to_dict())


def _cancel_check(cancel) -> Callable[[], bool]:
    if cancel is None:
        return lambda: False
    if isinstance(cancel, threading.Event):
        return cancel.is_set
    return cancel


def format_parameters(request: GenerationRequest, model_name: str, vae_name: str | None = None) -> str:
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
    if vae_name:
        fields.append(("VAE", vae_name))
    if request.clip_skip:
        fields.append(("Clip skip", request.clip_skip + 1))
    fields.append(("Version", "sdlite"))
    lines.append(", ".join(f"{k}: {v}" for k, v in fields))
    return "\n".join(lines)


def request_dict(request: GenerationRequest) -> dict:
    return asdict(request)
