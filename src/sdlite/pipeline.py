"""One text-to-image generation: tokenize -> encode -> denoise loop -> decode -> image.

    from sdlite import Pipeline
    pipe = Pipeline.load("path/to/model", memory_budget="1.5G")
    result = pipe.generate("a lighthouse at dusk", steps=20, seed=42)
    result.save("out.png")          # a PNG with the A1111-style `parameters` text chunk

Results follow diffusers' StableDiffusionPipeline for the same weights, seed and sampler: the initial
noise is `torch.randn` from a CPU generator seeded with `seed`, the same generator then feeds the
sampler's own draws, and classifier-free guidance runs as [uncond, cond].

The pipeline says which stage comes next; where the networks live (loaded once, or one stage at a time,
trimmed and evicted after) is the runtime's decision (`runtime.residency`), made from the memory plan.
"""

from __future__ import annotations

import contextlib
import threading
import warnings
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from PIL import Image

from . import samplers
from .errors import Cancelled, GenerationError, InvalidRequest, ModelFolderError, OutdatedConfigWarning
from .request import Caps, GenerationRequest, GenerationResult, StageTiming, format_parameters
from .runtime.components import (
    LoadedComponent,
    check_vae_matches,
    native_size,
    recommended_settings,
    text_config,
    unet_config,
    vae_config,
    vae_factor,
)
from .runtime.compute_thread import run_on_compute_thread
from .runtime.kv_cache import cross_attention_cache
from .runtime.planner import Plan, SizePlans, make_plan
from .runtime.prediction import settle_prediction_type
from .runtime.profiler import Profiler
from .runtime.progress import CancelFn, LatentsFn, ProgressFn, StepReporter, cancel_check
from .runtime.residency import Residency
from .runtime.threads import configure_threads
from .runtime.tiled_vae import decode_tiled
from .samplers.schedule import fix_outdated_scheduler_config
from .tokenizer import ClipTokenizer
from .units import parse_bytes
from .weights.model_folder import ModelFolder, shipped_model
from .weights.sources import open_model

__all__ = ["Pipeline", "GenerationRequest", "GenerationResult", "StageTiming", "format_parameters",
           "request_caps"]

# the guided network as the samplers call it: (latents (1, C, h, w) float32, timestep 0-d float32) -> same
GuidedModel = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


class Pipeline:
    """A loaded model folder plus the memory plan that decides how it runs. Build it with `load`."""

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
        self.residency = Residency(folder, plan, dtype)
        self.plans = SizePlans(folder, plan)
        self.caps = _caps(self.text_config)
        self.recommended = recommended_settings(folder)  # steps, cfg_scale, sampler where none are given
        self._lock = threading.Lock()
        if self.text_config.max_position_embeddings < tokenizer.max_length:
            tokenizer.max_length = self.text_config.max_position_embeddings

    @classmethod
    def load(cls, path: str | Path | None = None, *, memory_budget: int | str | None = None, plan: Plan | None = None,
             width: int | None = None, height: int | None = None, dtype: torch.dtype = torch.float32,
             threads: int | None = None, profiler: Profiler | None = None,
             vae: str | Path | None = None, config: str | Path | None = None,
             prediction_type: str | None = None) -> "Pipeline":
        """Open a model and prepare it to generate: a diffusers folder, or a single-file SD 1.x / 2.x
        checkpoint (`.safetensors`, or `.ckpt` read without running its pickle's code). With no `path`, the
        model sdlite ships (sdlite-shapes: 64x64 flat shapes on flat backgrounds, a few dozen words; see
        its README.md).

        memory_budget   bytes (int) or a size ('1.5G', '768M'); None: no limit. The levers are planned
                        for `width` x `height` pixels (default: the model's native size) before anything
                        is loaded.
        plan            a ready plan instead of planning (tests, benches)
        dtype           the compute dtype of the networks (torch.float32)
        threads         torch intra-op threads (default: the physical cores this process may use; set
                        either way, with MKL's dynamic threading off: see runtime.threads)
        profiler        records the "load" stage when every network is loaded up front
        vae             another VAE to decode with: a folder (e.g. TAESD, a diffusers AutoencoderTiny) or
                        a single-file VAE in the original layout (e.g. vae-ft-mse-840000-ema-pruned)
        config          for a single file: a diffusers folder whose configs, tokenizer and scheduler to use
                        (weights not needed), for shapes the weights cannot tell
        prediction_type "epsilon" or "v_prediction": overrides the scheduler config / detection

        Raises ModelFolderError / WeightsError for a bad folder, file or weights (before any network is
        built when the configs are bad), PlanError when nothing fits the budget (the message names the
        smallest budget that would), ValueError for a malformed `memory_budget` string. Loading, like
        every generation, runs on sdlite's compute thread (see runtime.compute_thread)."""
        return run_on_compute_thread(cls._load, path, memory_budget, plan, width, height, dtype, threads,
                                     profiler, vae, config, prediction_type)

    @classmethod
    def _load(cls, path, memory_budget, plan, width, height, dtype, threads, profiler, vae, config,
              prediction_type) -> "Pipeline":
        configure_threads(threads)
        if path is None:
            path = shipped_model()
            if path is None:
                raise ModelFolderError("no model given, and the model sdlite ships is not installed")
        folder = open_model(path, vae=vae, config=config, prediction_type=prediction_type)
        check_vae_matches(folder)
        settle_prediction_type(folder, dtype)
        tokenizer = _tokenizer(folder)
        scheduler_config = scheduler_config_of(folder)
        if isinstance(memory_budget, str):
            memory_budget = parse_bytes(memory_budget)
        if plan is None:
            native = native_size(folder)
            plan = make_plan(folder, memory_budget, width or native, height or native)
        pipe = cls(folder, tokenizer, scheduler_config, plan, dtype)
        pipe.residency.prepare(profiler)
        return pipe

    # --- the model's networks and shapes -----------------------------------------------------------

    @property
    def text_encoder(self) -> LoadedComponent:
        """The CLIP text encoder, loaded if it is not in memory."""
        return self.residency.acquire("text_encoder")

    @property
    def unet(self) -> LoadedComponent:
        """The denoising UNet, loaded if it is not in memory."""
        return self.residency.acquire("unet")

    @property
    def vae(self) -> LoadedComponent:
        """The VAE (or TAESD) decoder, loaded if it is not in memory."""
        return self.residency.acquire("vae")

    @property
    def vae_name(self) -> str | None:
        """The folder name of a VAE given instead of the model's own (None for the model's own)."""
        path = self.folder.replacement("vae")
        return None if path is None else path.resolve().name

    @property
    def vae_scale_factor(self) -> int:
        """Image pixels per latent pixel, per side (8 for SD)."""
        return vae_factor(self.vae_config)

    @property
    def latent_channels(self) -> int:
        """Channels of the latents the UNet denoises (4 for SD 1.x/2.x)."""
        return self.unet_config.in_channels

    @property
    def native_size(self) -> int:
        """The image side, in pixels, the model was trained at (512 for SD 1.5)."""
        return self.unet_config.sample_size * self.vae_scale_factor

    def close(self) -> None:
        """Drop every network and unmap the weight files; the pipeline reloads them if used again."""
        self.residency.close()

    def plan_for(self, width: int, height: int) -> Plan:
        """The memory plan for a `width` x `height` request (see `runtime.planner.SizePlans`).
        Raises PlanError when that size does not fit the budget."""
        return self.plans.plan_for(width, height)

    # --- the stages -----------------------------------------------------------------------------

    def encode_prompt(self, prompt: str, clip_skip: int = 0) -> torch.Tensor:
        """Text embeddings of `prompt`: (1, 77, cross_attention_dim) in the pipeline's dtype. Tokens past
        the encoder's length are dropped (with a TokenTruncationWarning)."""
        ids = self.tokenizer([prompt])
        with torch.inference_mode():
            return self.text_encoder.module(ids, clip_skip=clip_skip).to(self.dtype)

    def initial_noise(self, request: GenerationRequest, generator: torch.Generator) -> torch.Tensor:
        """Standard-normal latents (1, C, height/f, width/f) float32 from `generator`, f the VAE factor."""
        f = self.vae_scale_factor
        shape = (1, self.latent_channels, request.height // f, request.width // f)
        return torch.randn(shape, generator=generator, dtype=torch.float32)

    def guided_model(self, cond: torch.Tensor, uncond: torch.Tensor | None, cfg_scale: float,
                     plan: Plan) -> GuidedModel:
        """The UNet with classifier-free guidance, eps = uncond + cfg_scale * (cond - uncond) (Ho &
        Salimans 2022, arXiv:2207.12598): as one batch of 2, or as two passes of 1 when the plan splits
        it; without `uncond`, the conditional output alone.

        A guidance-distilled UNet (LCM: its config has `time_cond_proj_dim`) was trained to give the guided
        output in one pass: it runs once per step on `cond` alone (`uncond` is ignored), with the embedding
        of w = cfg_scale - 1 as `timestep_cond`, as diffusers' LatentConsistencyModelPipeline runs it."""
        unet = self.unet.module
        dtype = self.dtype
        cond_dim = self.unet_config.time_cond_proj_dim
        if cond_dim:
            w = torch.tensor([cfg_scale - 1.0], dtype=torch.float32)
            w_emb = samplers.lcm.guidance_scale_embedding(w, cond_dim).to(dtype)
            return lambda x, t: unet(x.to(dtype), t, cond, timestep_cond=w_emb).float()
        if uncond is None:
            return lambda x, t: unet(x.to(dtype), t, cond).float()
        if plan.cfg == "split":
            def split(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
                x = x.to(dtype)
                out_uncond = unet(x, t, uncond).float()
                out_cond = unet(x, t, cond).float()
                return out_uncond + cfg_scale * (out_cond - out_uncond)
            return split
        context = torch.cat([uncond, cond])

        def batched(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
            out_uncond, out_cond = unet(torch.cat([x, x]).to(dtype), t, context).float().chunk(2)
            return out_uncond + cfg_scale * (out_cond - out_uncond)
        return batched

    def denoise(self, noise: torch.Tensor, cond: torch.Tensor, uncond: torch.Tensor | None,
                request: GenerationRequest, generator: torch.Generator,
                on_step: Callable[[int, int, torch.Tensor], None] | None = None,
                plan: Plan | None = None) -> torch.Tensor:
        """Run the request's sampler from `noise` (1, C, h, w) float32; returns the final latents, same
        shape. `on_step(i, total, x)` runs after step i (0-based); whatever it raises propagates."""
        plan = plan or self.plan
        model = self.guided_model(cond, uncond, request.cfg_scale, plan)
        cache = cross_attention_cache(self.unet.module) if plan.kv_cache else contextlib.nullcontext()
        with torch.inference_mode(), cache:
            return samplers.sample(request.sampler, model, noise, request.steps, self.scheduler_config,
                                   generator=generator, callback=on_step)

    def decode(self, latents: torch.Tensor, plan: Plan | None = None) -> Image.Image:
        """Latents (1, C, h, w) float32, as the sampler leaves them -> an RGB image of h*f x w*f pixels;
        tiled with blended overlaps when the plan says so."""
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
        _check_finite(image, "decode", "pixels")
        image = (image / 2 + 0.5).clamp(0, 1)
        array = (image[0].permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)
        return Image.fromarray(array)

    # --- the whole job --------------------------------------------------------------------------

    def generate(self, prompt: str, *, negative_prompt: str = "", steps: int | None = None,
                 cfg_scale: float | None = None, seed: int | None = None, width: int | None = None,
                 height: int | None = None, sampler: str | None = None, clip_skip: int = 0,
                 progress: ProgressFn | None = None,
                 cancel: threading.Event | CancelFn | None = None,
                 latents: torch.Tensor | None = None,
                 profiler: Profiler | None = None) -> GenerationResult:
        """Generate one image. The fields are `GenerationRequest`'s (width/height default to the model's
        native size; steps, cfg_scale and sampler to what the model is meant to run with, `recommended`:
        20 / 7.5 / dpm++2m, LCM 4 / 8 / lcm, SD-Turbo 1 / 0 / euler_a; `sampler` takes a name or an A1111
        label). `progress(step, total)` is called after
        each sampler step; `cancel` (an Event or a callable) is checked between steps. `latents`
        (1, C, height/8, width/8) replaces the seeded initial noise.

        Raises InvalidRequest (bad field, or steps the schedule cannot place), PlanError (this size does
        not fit the memory budget), GenerationError (NaN or infinite latents or pixels: no image is
        returned), Cancelled (cancel was set, or the waiting caller was interrupted)."""
        rec = self.recommended
        request = GenerationRequest(prompt, negative_prompt, rec["steps"] if steps is None else steps,
                                    rec["cfg_scale"] if cfg_scale is None else cfg_scale, seed,
                                    width or self.native_size, height or self.native_size,
                                    sampler or rec["sampler"], clip_skip)
        return self.run(request, progress=progress, cancel=cancel, latents=latents, profiler=profiler)

    def run(self, request: GenerationRequest, *, progress: ProgressFn | None = None,
            cancel: threading.Event | CancelFn | None = None,
            latents: torch.Tensor | None = None,
            profiler: Profiler | None = None,
            on_latents: LatentsFn | None = None) -> GenerationResult:
        """Generate the image `request` describes (see `generate` for the arguments and errors). The
        request is validated against the library's caps and the model's schedule unless it already was.
        `on_latents(step, total, x)` gets the latents (1, C, h, w) float32 after each step, on the compute
        thread, before `progress` (for previews: do not modify x, copy what you keep)."""
        request.validate(self.caps, self.scheduler_config)
        cancelled = cancel_check(cancel)
        interrupted = threading.Event()  # the caller stopped waiting (e.g. Ctrl-C): stop at the next step

        def is_cancelled() -> bool:
            return interrupted.is_set() or cancelled()

        own_profiler = profiler is None
        prof = profiler or Profiler(sample=False)
        try:
            with self._lock:
                return run_on_compute_thread(self._run, request, progress, is_cancelled, latents, prof,
                                             on_latents, on_interrupt=interrupted.set)
        finally:
            if own_profiler:
                prof.close()

    def _run(self, request: GenerationRequest, progress: ProgressFn | None, is_cancelled: CancelFn,
             latents: torch.Tensor | None, prof: Profiler, on_latents: LatentsFn | None = None
             ) -> GenerationResult:
        plan = self.plan_for(request.width, request.height)
        if is_cancelled():
            raise Cancelled("cancelled before start")
        first = len(prof.records)
        stages = self.residency
        try:
            # 1. the prompts -> text embeddings
            with prof.stage("encode"):
                cond = self.encode_prompt(request.prompt, request.clip_skip)
                uncond = None  # none below cfg 1, nor for a guidance-distilled (LCM) UNet: see guided_model
                if request.cfg_scale > 1.0 and not self.unet_config.time_cond_proj_dim:
                    uncond = self.encode_prompt(request.negative_prompt, request.clip_skip)
            stages.release("text_encoder", plan)
            # 2. the seeded initial noise (or the caller's latents)
            generator = torch.Generator().manual_seed(request.seed)
            noise = self._initial_latents(request, generator, latents)
            # 3. the sampler loop over the UNet
            with prof.stage("unet_ready" if "unet" in stages.loaded() else "load_unet"):
                stages.acquire("unet")
            with StepReporter(prof, progress, is_cancelled, on_latents) as on_step:
                final = self.denoise(noise, cond, uncond, request, generator, on_step, plan)
            _check_finite(final, "denoise", "latents")
            stages.release("unet", plan)
            # 4. the latents -> pixels
            with prof.stage("decode"):
                image = self.decode(final, plan)
            stages.release("vae", plan)
        except BaseException:
            stages.release_all()
            raise
        timings = [StageTiming(r.name, r.seconds) for r in prof.records[first:]]
        return GenerationResult(image, request, format_parameters(request, self.folder.name, self.vae_name),
                                timings, final, plan, prof.to_dict())

    def _initial_latents(self, request: GenerationRequest, generator: torch.Generator,
                         latents: torch.Tensor | None) -> torch.Tensor:
        noise = self.initial_noise(request, generator)
        if latents is None:
            return noise
        if latents.shape != noise.shape:
            raise InvalidRequest("latents", f"expected shape {tuple(noise.shape)}, got {tuple(latents.shape)}")
        return latents.float()


def _check_finite(x: torch.Tensor, stage: str, what: str) -> None:
    """A NaN or an infinity would be saved as a black (or white) image: refuse it, naming the stage."""
    if not bool(torch.isfinite(x).all()):
        bad = int((~torch.isfinite(x)).sum())
        raise GenerationError(f"{stage}: the {what} hold {bad} NaN or infinite values of {x.numel()}; no image "
                              "was made (check the model's weights and configs)")


def _tokenizer(folder: ModelFolder) -> ClipTokenizer:
    """The model's tokenizer folder, or (a single file without a config folder) the CLIP tokenizer sdlite
    ships, as SD 1.x or SD 2.x sets it up."""
    if folder.tokenizer_dir is not None:
        return ClipTokenizer.from_folder(folder.tokenizer_dir)
    return ClipTokenizer.standard(folder.tokenizer_kind)


def scheduler_config_of(folder: ModelFolder) -> dict:
    """The model's scheduler config, with the outdated values old SD 1.x uploads carry fixed as diffusers'
    StableDiffusionPipeline fixes them (each fix warned about, once per load). An LCM-distilled UNet's
    config is left as it is, as diffusers' LatentConsistencyModelPipeline leaves it."""
    if unet_config(folder).time_cond_proj_dim:
        return folder.scheduler_config()
    config, notes = fix_outdated_scheduler_config(folder.scheduler_config())
    for note in notes:
        warnings.warn(f"{folder.scheduler_config_path}: {note}", OutdatedConfigWarning, stacklevel=2)
    return config


def request_caps(folder: ModelFolder) -> Caps:
    """The library's limits on a request for this model: its own caps, and clip_skip below the text
    encoder's depth (from the config; nothing is loaded)."""
    return _caps(text_config(folder))


def _caps(text_cfg) -> Caps:
    return Caps(max_clip_skip=text_cfg.num_hidden_layers - 1)
