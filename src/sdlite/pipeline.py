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
import dataclasses
import functools
import threading
import warnings
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from PIL import Image

from . import samplers
from .errors import (
    Cancelled,
    GenerationError,
    InvalidRequest,
    ModelFolderError,
    OutdatedConfigWarning,
    PrecisionFallbackWarning,
    WeightsError,
)
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
from .runtime.deep_cache import deep_cache_unet
from .runtime.kv_cache import TokenKeep, check_kv_options, cross_attention_cache, keep_through_first_eot
from .runtime.lora import DEFAULT_METHOD, ActiveLoRA, LoRASet, lora_bytes, loras_from_prompt
from .runtime.planner import STAGES, Plan, SizePlans, make_plan
from .runtime.precision import Precision, resolve_precision
from .runtime.prediction import settle_prediction_type
from .runtime.profiler import Profiler
from .runtime.progress import CancelFn, LatentsFn, ProgressFn, StepReporter, cancel_check
from .runtime.prompt_encoding import DEFAULT_SYNTAX, EmbeddingTable, empty_chunk, encode_chunks, tokenize_prompt
from .runtime.residency import Residency
from .runtime.threads import configure_threads
from .runtime.tiled_vae import decode_tiled, encode_tiled
from .samplers.schedule import fix_outdated_scheduler_config
from .tokenizer import ClipTokenizer
from .units import parse_bytes
from .weights.embeddings import load_embeddings
from .weights.model_folder import ModelFolder, shipped_model
from .weights.sources import open_model

__all__ = ["Pipeline", "GenerationRequest", "GenerationResult", "StageTiming", "format_parameters",
           "request_caps"]

# the guided network as the samplers call it: (latents (1, C, h, w) float32, timestep 0-d float32) -> same
GuidedModel = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


class Pipeline:
    """A loaded model folder plus the memory plan that decides how it runs. Build it with `load`."""

    def __init__(self, folder: ModelFolder, tokenizer: ClipTokenizer, scheduler_config: dict,
                 plan: Plan, precision: Precision | torch.dtype | str = torch.float32, lora_set: LoRASet | None = None,
                 loras: list[ActiveLoRA] | None = None, lora_method: str = DEFAULT_METHOD):
        self.folder = folder
        self.lora_set = lora_set or LoRASet(folder)
        self.loras = list(loras or [])  # applied to every generation; a request's own come on top
        self.tokenizer = tokenizer
        self.scheduler_config = scheduler_config
        self.precision = resolve_precision(precision)
        self.dtype = self.precision.unet  # what the UNet computes in (and the text embeddings it reads)
        if plan.precision != self.precision.name:  # a plan given ready-made (tests, benches): say what runs
            plan = dataclasses.replace(plan, precision=self.precision.name)
        self.plan = plan
        self.unet_config = unet_config(folder)
        self.vae_config = vae_config(folder)
        self.text_config = text_config(folder)
        self.residency = Residency(folder, plan, self.precision, self.loras, lora_method)
        self.plans = SizePlans(folder, plan, lora_bytes(self.loras), self.precision)
        self.caps = _caps(self.text_config)
        self.recommended = recommended_settings(folder)  # steps, cfg_scale, sampler where none are given
        self._lock = threading.Lock()
        self.embeddings: dict = {}  # textual inversion: name -> weights.embeddings.Embedding (load's `embeddings`)
        if self.text_config.max_position_embeddings < tokenizer.max_length:
            tokenizer.max_length = self.text_config.max_position_embeddings

    @classmethod
    def load(cls, path: str | Path | None = None, *, memory_budget: int | str | None = None, plan: Plan | None = None,
             width: int | None = None, height: int | None = None, precision: str | Precision | None = None,
             threads: int | None = None, profiler: Profiler | None = None,
             vae: str | Path | None = None, config: str | Path | None = None,
             prediction_type: str | None = None, loras=(), lora_dir: str | Path | None = None,
             lora_method: str = DEFAULT_METHOD, embeddings: str | Path | None = None,
             dtype: torch.dtype | None = None, kv_store: str | None = None, kv_tokens: str | None = None
             ) -> "Pipeline":
        """Open a model and prepare it to generate: a diffusers folder, or a single-file SD 1.x / 2.x
        checkpoint (`.safetensors`, or `.ckpt` read without running its pickle's code). With no `path`, the
        model sdlite ships (sdlite-shapes: 64x64 flat shapes on flat backgrounds, a few dozen words; see
        its README.md).

        memory_budget   bytes (int) or a size ('1.5G', '768M'); None: no limit. The levers are planned
                        for `width` x `height` pixels (default: the model's native size) before anything
                        is loaded.
        plan            a ready plan instead of planning (tests, benches)
        precision       "auto" (bf16 where the CPU computes it natively, else fp32), "fp32", "bf16" or
                        "fp16"; None: $SDLITE_PRECISION, else "auto". Which stage computes in what:
                        runtime.precision (the text encoder stays fp32; the VAE is fp32 under fp16)
        threads         torch intra-op threads (default: the physical cores this process may use; set
                        either way, with MKL's dynamic threading off: see runtime.threads)
        profiler        records the "load" stage when every network is loaded up front
        vae             another VAE to decode with: a folder (e.g. TAESD, a diffusers AutoencoderTiny) or
                        a single-file VAE in the original layout (e.g. vae-ft-mse-840000-ema-pruned)
        config          for a single file: a diffusers folder whose configs, tokenizer and scheduler to use
                        (weights not needed), for shapes the weights cannot tell
        prediction_type "epsilon" or "v_prediction": overrides the scheduler config / detection
        loras           [(path or name, scale), ...]: LoRAs (kohya/A1111 or diffusers/PEFT .safetensors) applied
                        to every generation (scale 0: left out); a name is looked up in `lora_dir`, where
                        requests' own LoRAs (`GenerationRequest.loras`) are looked up too
        lora_method     "side" (y = layer(x) + scale * up(down(x))) or "merge" (W + scale * up @ down per layer
                        at dequantization); see runtime.lora
        embeddings      a folder of textual-inversion embeddings (A1111's embeddings/: .pt, .safetensors),
                        used by name (the file's stem) in prompts; files of another width are skipped
                        with a warning (see weights.embeddings)
        dtype           older spelling of `precision` (torch.float32 / bfloat16 / float16); wins over it
        kv_store        how the text's cross-attention K/V are kept for the steps: "compute" (exact), "bf16"
                        or "int8" (one scale per head); None: the planner's choice (exact unless only a
                        lossy store fits the budget). See runtime.kv_cache; errors: README "Lighter UNets"
        kv_tokens       "all" (default, as diffusers) or "eot": attend only to each chunk's tokens through
                        its first end-of-text token (faster; changes the image)

        Raises ModelFolderError / WeightsError for a bad folder, file or weights (before any network is
        built when the configs are bad), PlanError when nothing fits the budget (the message names the
        smallest budget that would), ValueError for a malformed `memory_budget` string or an unknown
        `precision`, `kv_store` or `kv_tokens`. Loading, like
        every generation, runs on sdlite's compute thread (see runtime.compute_thread)."""
        precision = resolve_precision(dtype if dtype is not None else precision)
        check_kv_options(kv_store, kv_tokens)
        return run_on_compute_thread(cls._load, path, memory_budget, plan, width, height, precision, threads,
                                     profiler, vae, config, prediction_type, loras, lora_dir, lora_method,
                                     embeddings, (kv_store, kv_tokens))

    @classmethod
    def _load(cls, path, memory_budget, plan, width, height, precision, threads, profiler, vae, config,
              prediction_type, loras=(), lora_dir=None, lora_method=DEFAULT_METHOD,
              embeddings=None, kv=(None, None)) -> "Pipeline":
        configure_threads(threads)
        if path is None:
            path = shipped_model()
            if path is None:
                raise ModelFolderError("no model given, and the model sdlite ships is not installed")
        folder = open_model(path, vae=vae, config=config, prediction_type=prediction_type)
        check_vae_matches(folder)
        settle_prediction_type(folder, torch.float32)
        tokenizer = _tokenizer(folder)
        scheduler_config = scheduler_config_of(folder)
        if isinstance(memory_budget, str):
            memory_budget = parse_bytes(memory_budget)
        lora_set = LoRASet(folder, lora_dir)
        active = lora_set.open_all(loras)
        if plan is None:
            native = native_size(folder)
            plan = make_plan(folder, memory_budget, width or native, height or native, lora_bytes=lora_bytes(active),
                             precision=precision, kv_store=kv[0], kv_tokens=kv[1] or "all")
        else:
            plan = dataclasses.replace(plan, **{k: v for k, v in zip(("kv_store", "kv_tokens"), kv) if v})
        pipe = cls(folder, tokenizer, scheduler_config, plan, precision, lora_set, active, lora_method)
        pipe.plans.kv_store = kv[0]
        if embeddings is not None:
            pipe.embeddings = load_embeddings(embeddings, pipe.text_config.hidden_size)
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
        """Channels of the latents the UNet denoises (4 for SD 1.x/2.x, inpainting UNets included)."""
        return self.unet_config.out_channels

    @property
    def native_size(self) -> int:
        """The image side, in pixels, the model was trained at (512 for SD 1.5)."""
        return self.unet_config.sample_size * self.vae_scale_factor

    def close(self) -> None:
        """Drop every network and unmap the weight files; the pipeline reloads them if used again."""
        self.residency.close()
        self.lora_set.close()

    def plan_for(self, width: int, height: int) -> Plan:
        """The memory plan for a `width` x `height` request (see `runtime.planner.SizePlans`).
        Raises PlanError when that size does not fit the budget."""
        return self.plans.plan_for(width, height)

    # --- the stages -----------------------------------------------------------------------------

    def encode_prompt(self, prompt: str, clip_skip: int = 0, prompt_syntax: str = DEFAULT_SYNTAX) -> torch.Tensor:
        """Text embeddings of `prompt`: (1, 77 * k, cross_attention_dim) in the pipeline's dtype. "a1111":
        weights, BREAK, k chunks of 75 tokens (see runtime.prompt_encoding); "plain": k = 1, tokens past the
        encoder's length dropped (with a TokenTruncationWarning). The pipeline's embeddings apply in both."""
        table = EmbeddingTable(self.tokenizer, self.embeddings) if self.embeddings else None
        chunks = tokenize_prompt(self.tokenizer, prompt, prompt_syntax, table)
        with torch.inference_mode():
            return encode_chunks(self.text_encoder.module, chunks, clip_skip).to(self.dtype)

    def _encode(self, text: str, request: GenerationRequest) -> torch.Tensor:
        # the syntax is passed only when it is not the default: callers that wrap encode_prompt(prompt, clip_skip)
        # keep working
        if request.prompt_syntax == DEFAULT_SYNTAX:
            return self.encode_prompt(text, request.clip_skip)
        return self.encode_prompt(text, request.clip_skip, request.prompt_syntax)

    def token_keep(self, request: GenerationRequest, cond: torch.Tensor, uncond: torch.Tensor | None) -> TokenKeep:
        """The tokens of the request's prompt (and negative prompt) that the K/V cache keeps under the plan's
        `kv_tokens="eot"`: per chunk BOS .. the first end-of-text token; chunks `same_length` padded with keep
        the empty prompt's two. `cond` / `uncond` are the embeddings the masks must match (S tokens)."""
        table = EmbeddingTable(self.tokenizer, self.embeddings) if self.embeddings else None
        tok = self.tokenizer

        def mask(text: str, length: int) -> torch.Tensor:
            chunks = tokenize_prompt(tok, text, request.prompt_syntax, table)
            ids = [i for c in chunks for i in c.ids]
            ids += empty_chunk(tok).ids * ((length - len(ids)) // tok.max_length)
            return keep_through_first_eot(ids, tok.bos_id, tok.eos_id, tok.max_length)
        return TokenKeep(mask(request.prompt, cond.shape[1]),
                         None if uncond is None else mask(request.negative_prompt, uncond.shape[1]))

    def same_length(self, cond: torch.Tensor, uncond: torch.Tensor | None, clip_skip: int = 0
                    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """`cond` and `uncond` with the shorter one padded with the empty prompt's chunk (as A1111's
        pad_cond_uncond does), so that classifier-free guidance can run them as one batch."""
        if uncond is None or cond.shape[1] == uncond.shape[1]:
            return cond, uncond
        with torch.inference_mode():
            empty = encode_chunks(self.text_encoder.module, [empty_chunk(self.tokenizer)], clip_skip).to(self.dtype)

        def pad(x: torch.Tensor, length: int) -> torch.Tensor:
            repeats = (length - x.shape[1]) // empty.shape[1]
            return torch.cat([x] + [empty] * repeats, dim=1) if repeats > 0 else x
        length = max(cond.shape[1], uncond.shape[1])
        return pad(cond, length), pad(uncond, length)

    def initial_noise(self, request: GenerationRequest, generator: torch.Generator) -> torch.Tensor:
        """Standard-normal latents (1, C, height/f, width/f) float32 from `generator`, f the VAE factor."""
        f = self.vae_scale_factor
        shape = (1, self.latent_channels, request.height // f, request.width // f)
        noise = torch.randn(shape, generator=generator, dtype=torch.float32)
        if request.subseed_strength:  # A1111's variation seed
            sub = torch.randn(shape, generator=torch.Generator().manual_seed(request.subseed), dtype=torch.float32)
            noise = slerp(request.subseed_strength, noise[0], sub[0])[None]
        return noise

    def guided_model(self, cond: torch.Tensor, uncond: torch.Tensor | None, cfg_scale: float,
                     plan: Plan, deep_cache: int = 0, keep: TokenKeep | None = None) -> GuidedModel:
        """The UNet with classifier-free guidance, eps = uncond + cfg_scale * (cond - uncond) (Ho &
        Salimans 2022, arXiv:2207.12598): as one batch of 2, or as two passes of 1 when the plan splits
        it; without `uncond`, the conditional output alone.

        A guidance-distilled UNet (LCM: its config has `time_cond_proj_dim`) was trained to give the guided
        output in one pass: it runs once per step on `cond` alone (`uncond` is ignored), with the embedding
        of w = cfg_scale - 1 as `timestep_cond`, as diffusers' LatentConsistencyModelPipeline runs it.

        `deep_cache` N >= 2: the UNet runs whole for 1 of every N of its evaluations and only its shallow
        path for the others, reusing the deep feature (DeepCache, see runtime.deep_cache). Evaluations, not
        steps, are counted: a 2nd-order sampler (Heun, DPM2) evaluates twice per step. The two passes of split
        guidance each count and cache on their own; a batch of 2 is one evaluation. 0 or 1: off.

        `keep` (the plan's `kv_tokens="eot"`): the contexts built here are registered with the token masks it
        carries, so that the K/V cache keeps only those tokens (runtime.kv_cache)."""
        module = self.unet.module
        if keep is not None:
            keep.register(cond, keep.cond)
            if uncond is not None and plan.cfg == "split":
                keep.register(uncond, keep.uncond)
        unet = deep_cache_unet(module, deep_cache)
        dtype = self.dtype
        cond_dim = self.unet_config.time_cond_proj_dim
        if cond_dim:
            w = torch.tensor([cfg_scale - 1.0], dtype=torch.float32)
            w_emb = samplers.lcm.guidance_scale_embedding(w, cond_dim).to(dtype)
            return lambda x, t: unet(x.to(dtype), t, cond, timestep_cond=w_emb).float()
        if uncond is None:
            return lambda x, t: unet(x.to(dtype), t, cond).float()
        if plan.cfg == "split":
            unet_cond = deep_cache_unet(module, deep_cache)  # a pass of its own: its own DeepCache feature

            def split(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
                x = x.to(dtype)
                out_uncond = unet(x, t, uncond).float()
                out_cond = unet_cond(x, t, cond).float()
                return out_uncond + cfg_scale * (out_cond - out_uncond)
            return split
        context = torch.cat([uncond, cond])
        if keep is not None:
            keep.register(context, torch.stack([keep.uncond, keep.cond]))

        def batched(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
            out_uncond, out_cond = unet(torch.cat([x, x]).to(dtype), t, context).float().chunk(2)
            return out_uncond + cfg_scale * (out_cond - out_uncond)
        return batched

    def denoise(self, noise: torch.Tensor, cond: torch.Tensor, uncond: torch.Tensor | None,
                request: GenerationRequest, generator: torch.Generator,
                on_step: Callable[[int, int, torch.Tensor], None] | None = None,
                plan: Plan | None = None, start: "ImageStart | None" = None) -> torch.Tensor:
        """Run the request's sampler from `noise` (1, C, h, w) float32; returns the final latents, same
        shape. `on_step(i, total, x)` runs after step i (0-based); whatever it raises propagates.
        `start` (img2img, inpainting: see `prepare_image`): the sampler starts at the strength's step from
        the init latents noised there, and a mask is kept to its area at every step."""
        plan = plan or self.plan
        keep = self.token_keep(request, cond, uncond) if plan.kv_cache and plan.kv_tokens == "eot" else None
        model = self.guided_model(cond, uncond, request.cfg_scale, plan, request.deep_cache, keep)
        options = sampler_options(request)
        cache = (cross_attention_cache(self.unet.module, plan.kv_store, keep) if plan.kv_cache
                 else contextlib.nullcontext())
        with torch.inference_mode(), cache:
            if start is not None:
                return start.run(request, model, noise, self.scheduler_config, generator, on_step, options)
            return samplers.sample(request.sampler, model, noise, request.steps, self.scheduler_config,
                                   generator=generator, callback=on_step, **options)

    def encode_image(self, image: Image.Image, generator: torch.Generator | None,
                     plan: Plan | None = None, keep: torch.Tensor | None = None) -> torch.Tensor:
        """An RGB image (sides multiples of the VAE factor) -> latents (1, C, h, w) float32 scaled for the
        UNet: a sample of the VAE's latent distribution drawn from `generator` (one normal draw of the
        latents' shape, as diffusers' `latent_dist.sample(generator)`; None: its mean), times
        scaling_factor. `keep` (1, 1, H, W) bool: pixels outside it are set to 0 (mid-gray) first. Loads the
        VAE with its encoder; tiled as the decode is when the plan tiles it."""
        plan = plan or self.plan
        vae = self.residency.acquire_encoder().module
        x = torch.from_numpy(np.asarray(image.convert("RGB"), dtype=np.float32) / 255.0)
        x = x.permute(2, 0, 1)[None] * 2.0 - 1.0
        x = (x if keep is None else x * keep).to(self.residency.dtype_of("vae"))
        with torch.inference_mode():
            def moments(t: torch.Tensor) -> torch.Tensor:
                out = vae.encode(t)
                return torch.cat(out, 1) if isinstance(out, tuple) else out
            if plan.vae_tile:
                out = encode_tiled(moments, x, self.vae_scale_factor, plan.vae_tile,
                                   min(plan.vae_overlap, plan.vae_tile // 2))
            else:
                out = moments(x)
            out = out.float()
            if out.shape[1] == 2 * self.latent_channels:  # AutoencoderKL: (mean, logvar)
                mean, logvar = out.chunk(2, dim=1)
                z = mean
                if generator is not None:
                    z = mean + torch.exp(0.5 * logvar) * torch.randn(mean.shape, generator=generator,
                                                                     dtype=torch.float32)
            else:  # TAESD: the latents themselves
                z = out
            z = (z - (vae.config.shift_factor or 0.0)) * vae.config.scaling_factor
        _check_finite(z, "encode_image", "latents")
        return z

    def prepare_image(self, request: GenerationRequest, generator: torch.Generator, plan: Plan | None = None,
                      latents: torch.Tensor | None = None) -> tuple[torch.Tensor, "ImageStart"]:
        """img2img / inpainting, as diffusers' StableDiffusionImg2ImgPipeline / InpaintPipeline draw from
        `generator`: the init image encoded (a draw), the noise (a draw), the masked image encoded (a
        draw; inpainting only). Returns (noise, ImageStart). The init image and mask are first resized to
        width x height as A1111's "Just resize" does (stretched, Lanczos); the mask is binarized (>= 50%
        white: repaint) and taken to the latent size by nearest neighbour. A 9-channel inpainting UNet
        without an init image paints on a mid-gray image with everything masked."""
        size = (request.width, request.height)
        init = request.init_image if request.init_image is not None else Image.new("RGB", size, (128, 128, 128))
        init = just_resize(init.convert("RGB"), size)
        nine = self.unet_config.in_channels == 2 * self.latent_channels + 1
        mask = None
        if request.mask is not None or nine:
            m = just_resize(request.mask.convert("L"), size) if request.mask is not None else Image.new("L", size, 255)
            mask = (torch.from_numpy(np.asarray(m, dtype=np.float32) / 255.0) >= 0.5).float()[None, None]
        full = request.init_image is None or request.denoising_strength >= 1.0
        image_latents = None
        if not (nine and full):  # a 9-channel UNet at strength 1 never sees the init latents (diffusers)
            image_latents = self.encode_image(init, generator, plan)
        noise = self._initial_latents(request, generator, latents)
        start = ImageStart(image_latents, request.denoising_strength if request.init_image is not None else 1.0,
                           pure_noise=mask is not None and full)
        if mask is not None:  # the masked image: the init image's pixels outside the mask, 0 (gray) inside
            masked = self.encode_image(init, generator, plan, keep=mask < 0.5)
            f = self.vae_scale_factor
            start.mask = torch.nn.functional.interpolate(mask, size=(request.height // f, request.width // f))
            if nine:
                start.masked_latents = masked
        return noise, start

    def decode(self, latents: torch.Tensor, plan: Plan | None = None) -> Image.Image:
        """Latents (1, C, h, w) float32, as the sampler leaves them -> an RGB image of h*f x w*f pixels;
        tiled with blended overlaps when the plan says so. A VAE computing in bf16 whose pixels come out
        NaN or infinite decodes again in fp32 (and stays fp32), with a PrecisionFallbackWarning."""
        plan = plan or self.plan
        image = self._decode_pixels(latents, plan)
        if not bool(torch.isfinite(image).all()):
            dtype = self.residency.dtype_of("vae")
            if self.residency.fall_back_to_fp32("vae"):
                warnings.warn(f"decode: the VAE gave NaN or infinite pixels in {dtype}; decoded again in "
                              "float32, which it keeps from now on", PrecisionFallbackWarning, stacklevel=2)
                image = self._decode_pixels(latents, plan)
        _check_finite(image, "decode", "pixels")
        image = (image / 2 + 0.5).clamp(0, 1)
        array = (image[0].permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)
        return Image.fromarray(array)

    def _decode_pixels(self, latents: torch.Tensor, plan: Plan) -> torch.Tensor:
        vae = self.vae.module
        with torch.inference_mode():
            z = latents / vae.config.scaling_factor
            if vae.config.shift_factor:
                z = z + vae.config.shift_factor
            z = z.to(self.residency.dtype_of("vae"))
            if plan.vae_tile:
                image = decode_tiled(vae.decode, z, self.vae_scale_factor, plan.vae_tile,
                                     min(plan.vae_overlap, plan.vae_tile // 2))
            else:
                image = vae.decode(z)
            return image.float()

    # --- the whole job --------------------------------------------------------------------------

    def generate(self, prompt: str, *, negative_prompt: str = "", steps: int | None = None,
                 cfg_scale: float | None = None, seed: int | None = None, width: int | None = None,
                 height: int | None = None, sampler: str | None = None, clip_skip: int = 0,
                 prompt_syntax: str = DEFAULT_SYNTAX, deep_cache: int = 0,
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
        request.prompt_syntax = prompt_syntax
        request.deep_cache = deep_cache
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
        sampler_options(request)  # an eta the sampler cannot take is refused before any work
        cancelled = cancel_check(cancel)
        interrupted = threading.Event()  # the caller stopped waiting (e.g. Ctrl-C): stop at the next step

        def is_cancelled() -> bool:
            return interrupted.is_set() or cancelled()

        own_profiler = profiler is None
        prof = profiler or Profiler(sample=False)
        try:
            with self._lock:
                return run_on_compute_thread(self._run_with_loras, request, progress, is_cancelled, latents, prof,
                                             on_latents, on_interrupt=interrupted.set)
        finally:
            if own_profiler:
                prof.close()

    def _run_with_loras(self, request: GenerationRequest, *args, **kwargs) -> GenerationResult:
        """`_run` with the request's LoRAs (its `loras` and its prompt's `<lora:...>` tags) on top of the
        pipeline's, taken off again after."""
        tags = loras_from_prompt(request.prompt)[1]
        if not request.loras and not tags:
            return self._run(request, *args, **kwargs)
        try:
            extra = self.lora_set.open_all(request.loras) + self.lora_set.open_all(tags, paths=False)
        except WeightsError as exc:
            raise InvalidRequest("loras", str(exc)) from None
        self.residency.use_loras(self.loras + extra)
        try:
            return self._run(request, *args, **kwargs)
        finally:
            self.residency.use_loras(self.loras)

    def _run(self, request: GenerationRequest, progress: ProgressFn | None, is_cancelled: CancelFn,
             latents: torch.Tensor | None, prof: Profiler, on_latents: LatentsFn | None = None
             ) -> GenerationResult:
        plan = self.plan_for(request.width, request.height)
        if is_cancelled():
            raise Cancelled("cancelled before start")
        first = len(prof.records)
        stages = self.residency
        prof.meta["precision"] = {stage: str(stages.dtype_of(stage)).replace("torch.", "") for stage in STAGES}
        try:
            # 1. the prompts -> text embeddings
            with prof.stage("encode"):
                cond = self._encode(request.prompt, request)
                uncond = None  # none below cfg 1, nor for a guidance-distilled (LCM) UNet: see guided_model
                if request.cfg_scale > 1.0 and not self.unet_config.time_cond_proj_dim:
                    uncond = self._encode(request.negative_prompt, request)
                cond, uncond = self.same_length(cond, uncond, request.clip_skip)
            stages.release("text_encoder", plan)
            # 2. the seeded initial noise (or the caller's latents)
            generator = torch.Generator().manual_seed(request.seed)
            noise, start = self._start(request, generator, latents, plan, prof)
            # 3. the sampler loop over the UNet
            with prof.stage("unet_ready" if "unet" in stages.loaded() else "load_unet"):
                stages.acquire("unet")
            with StepReporter(prof, progress, is_cancelled, on_latents) as on_step:
                final = self.denoise(noise, cond, uncond, request, generator, on_step, plan, start)
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
        applied = [(a.name, a.scale, a.file.short_hash()) for a in self.residency.loras]
        parameters = format_parameters(request, self.folder.name, self.vae_name, applied, kv=plan.kv_inexact())
        return GenerationResult(image, request, parameters, timings, final, plan, prof.to_dict())

    def _start(self, request: GenerationRequest, generator: torch.Generator, latents: torch.Tensor | None,
               plan: Plan, prof: Profiler) -> tuple[torch.Tensor, "ImageStart | None"]:
        """Step 2: the noise, and for img2img / inpainting (or a 9-channel UNet) the encoded images."""
        if request.init_image is None and self.unet_config.in_channels == self.latent_channels:
            return self._initial_latents(request, generator, latents), None
        with prof.stage("encode_image"):
            noise, start = self.prepare_image(request, generator, plan, latents)
        self.residency.release("vae", plan)
        return noise, start

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


# --- img2img, inpainting, variation seeds ---------------------------------------------------------------

def slerp(val: float, low: torch.Tensor, high: torch.Tensor) -> torch.Tensor:
    """A1111's variation-seed mix (`slerp` in modules/rng.py) of two (C, H, W) noises: spherical
    interpolation with the norms taken along dim 1, as A1111 takes them; nearly parallel noises (mean
    cosine > 0.9995) get A1111's linear fallback low * val + high * (1 - val)."""
    low_norm = low / torch.norm(low, dim=1, keepdim=True)
    high_norm = high / torch.norm(high, dim=1, keepdim=True)
    dot = (low_norm * high_norm).sum(1)
    if dot.mean() > 0.9995:
        return low * val + high * (1 - val)
    omega = torch.acos(dot)
    so = torch.sin(omega)
    return (torch.sin((1.0 - val) * omega) / so).unsqueeze(1) * low + (torch.sin(val * omega) / so).unsqueeze(1) * high


def just_resize(image: Image.Image, size: tuple[int, int]) -> Image.Image:
    """A1111's default resize mode "Just resize": stretched to `size` (width, height), Lanczos."""
    return image if image.size == size else image.resize(size, Image.LANCZOS)


def sampler_options(request: GenerationRequest) -> dict:
    """The sampler options a request's `eta` gives, as A1111 applies eta: DDIM's eta; Euler a's ancestral
    noise scale, which sdlite's sampler has at 1 only (another value is refused); ignored elsewhere."""
    eta = request.eta
    if eta is None:
        return {}
    if "eta" in samplers.get_spec(request.sampler).options:
        return {"eta": eta} if eta else {}
    if request.sampler == "euler_a" and eta != 1.0:
        raise InvalidRequest("eta", f"sdlite's euler_a sampler runs with eta 1 only, got {eta:g}")
    return {}


# how each scheduler noises clean latents x0 to schedule index k, as its diffusers `add_noise` does;
# `s` holds the untruncated schedule the sampler's loop was bound to
def _noise_ve(s: dict, x0: torch.Tensor, noise: torch.Tensor, k: int) -> torch.Tensor:
    return x0 + noise * s["sigmas"][k]


def _noise_vp_sigma(s: dict, x0: torch.Tensor, noise: torch.Tensor, k: int) -> torch.Tensor:
    sigma = s["sigmas"][k]
    alpha = 1 / (sigma**2 + 1) ** 0.5
    return alpha * x0 + alpha * sigma * noise


def _noise_vp_alpha(s: dict, x0: torch.Tensor, noise: torch.Tensor, k: int) -> torch.Tensor:
    a = s["alphas"][k]
    return a**0.5 * x0 + (1 - a) ** 0.5 * noise


def _noise_lcm(s: dict, x0: torch.Tensor, noise: torch.Tensor, k: int) -> torch.Tensor:
    a = s["alphas_cumprod"][s["timesteps"][k].long()]
    return a.sqrt() * x0 + (1 - a).sqrt() * noise


_NOISERS = {"EulerDiscreteScheduler": _noise_ve, "EulerAncestralDiscreteScheduler": _noise_ve,
            "DPMSolverMultistepScheduler": _noise_vp_sigma, "DDIMScheduler": _noise_vp_alpha,
            "LCMScheduler": _noise_lcm}
_SCHEDULE_KEYS = ("timesteps", "sigmas", "alphas", "alphas_next")  # per-step arrays a loop is bound to


class ImageStart:
    """What the init image gives the sampler (img2img, inpainting), from `Pipeline.prepare_image`.

    image_latents  the init image's latents (1, C, h, w) scaled for the UNet; None for a 9-channel UNet
                   at strength 1 (it never sees them)
    strength       the share of the schedule run: diffusers' `get_timesteps`, t_start = steps -
                   min(int(steps * strength), steps); the sampler runs from timestep index t_start
    pure_noise     inpainting at strength 1: start from noise * the sampler's initial sigma, as diffusers'
                   inpaint pipeline does (img2img noises the init latents to the first timestep instead)
    mask           (1, 1, h, w) 1 = repaint, at the latent size; None: img2img
    masked_latents a 9-channel UNet's conditioning: the masked image's latents, concatenated after the mask
    """

    def __init__(self, image_latents: torch.Tensor | None, strength: float, pure_noise: bool = False):
        self.image_latents, self.strength, self.pure_noise = image_latents, strength, pure_noise
        self.mask: torch.Tensor | None = None
        self.masked_latents: torch.Tensor | None = None

    def run(self, request: GenerationRequest, model: GuidedModel, noise: torch.Tensor, config: dict,
            generator: torch.Generator, callback, options: dict) -> torch.Tensor:
        """The sampler's loop bound to its schedule from t_start on, from the noised init latents. Raises
        InvalidRequest for a sampler without img2img or a strength that leaves no step."""
        spec = samplers.get_spec(request.sampler)
        noiser = _NOISERS.get(spec.diffusers_class)
        plan = spec.plan(config, request.steps, **options)
        if noiser is None or not isinstance(plan.run, functools.partial):
            names = ", ".join(n for n, sp in samplers.SAMPLER_SPECS.items() if sp.diffusers_class in _NOISERS)
            raise InvalidRequest("sampler", f"img2img and inpainting run with {names}, not {request.sampler}")
        steps = request.steps
        t_start = steps - min(int(steps * self.strength), steps)
        if t_start >= len(plan.timesteps):
            raise InvalidRequest("denoising_strength", f"{self.strength:g} of {steps} steps runs no step; "
                                 "raise the strength or the steps")
        schedule = dict(plan.run.keywords)
        bound = {k: (v[t_start:] if k in _SCHEDULE_KEYS else v) for k, v in schedule.items()}
        run = functools.partial(plan.run.func, *plan.run.args, **bound)

        def add_noise(k: int) -> torch.Tensor:
            return noiser(schedule, self.image_latents, noise, k)

        x = noise * plan.init_sigma if self.pure_noise else add_noise(t_start)
        if self.masked_latents is not None:  # a 9-channel UNet: [latents, mask, masked image latents]
            mask, masked = self.mask, self.masked_latents

            def model_9(x_in: torch.Tensor, t: torch.Tensor, base=model) -> torch.Tensor:
                return base(torch.cat([x_in, mask, masked], dim=1), t)
            model = model_9
        elif self.mask is not None:
            callback = self._blend(callback, add_noise, t_start)
        return run(model, x, generator=generator, callback=callback)

    def _blend(self, callback, add_noise, t_start: int):
        """A 4-channel UNet inpainting (diffusers): after each step, outside the mask the latents become
        the init latents noised to the next step's level (clean after the last step). The loops go on from
        the tensor they pass to the callback, so it is blended in place."""
        mask = self.mask

        def blend(i: int, n: int, x: torch.Tensor) -> None:
            proper = add_noise(t_start + i + 1) if i < n - 1 else self.image_latents
            x.copy_((1 - mask) * proper + mask * x)
            if callback is not None:
                callback(i, n, x)
        return blend
