"""From a memory budget to a plan: which levers to pull, and what each stage will peak at.

The estimate of a stage's peak (what the memory cgroup is charged: anonymous memory plus the page
cache of the files read) is

    base                       python + torch + sdlite, their code pages included
  + resident weights           the stage's weight bytes as stored (fp32/fp16/int8), read via mmap;
                               with `residency="all"` every stage's weights, with "staged" only its own
  + converted weights          fp32 copies made at load (`weights_mode="materialize"` of fp16/int8
                               files, and the small norm/bias tensors of lazy fp16/int8 files)
  + workspace                  the largest single layer in fp32 (lazy fp16/int8 dequantization)
  + activations                measured coefficients x batch x pixels (see ACTIVATION_BYTES)
  + LoRAs                      their low-rank pairs as fp32 (runtime.lora), per stage they target

When the weights do not fit next to everything else, they are streamed: the kernel drops clean
pages of the mapped file and reads them again when a layer needs them, so the run still completes
within the budget but pays a re-read of the weights on every UNet call. The planner allows that as
long as the non-reclaimable part (anonymous memory) plus a minimal working set of weights fits.

The levers it chooses among, fastest first: everything resident / one stage at a time; whole layers /
the largest in channel slices; CFG as one batch of 2 / two passes of 1; VAE untiled / tiled (smaller
tiles as needed). fp16/int8 weights are always dequantized per layer from the mapped file (converting
them at load, `weights_mode="materialize"`, is a lever only when asked for). Attention is always torch's
blocked fused kernel (see runtime.attention).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from pathlib import Path

from ..errors import PlanError
from ..units import MiB, format_bytes
from ..weights.model_folder import ModelFolder
from ..weights.sources import open_model

# Calibrated with bench/calibrate_memory.py on the SD 1.5-size random model, fp32, 2 threads
# (anonymous-memory peak above the loaded state). UNet: 399 MB at batch 2 x 64x64 latents, 363 MB at
# batch 1 x 64x64, 339 MB at batch 2 x 32x32 -> a constant of about 2.7x the largest conv weight
# (oneDNN reorders each conv weight into a blocked copy per call, and the allocator keeps the
# freed blocks) plus 9.9 KB per latent pixel and batch element. VAE decoder: 1086 MB at 512x512
# output, 305 MB at 256x256, 121 MB at 128x128 -> 45 MB + 3.97 KB per output pixel. Tiled decoding
# through the pipeline (int8 model, staged, allocator configured): +755 / +456 / +351 MB for 384 /
# 256 / 192 px tiles -> 217 MB + 3.65 KB per tile pixel.
# With the allocator configured (runtime.memory.configure_allocator), CFG split, int8 weights: the
# UNet stage peaks at +480 MB above the loaded state with whole layers (largest 118 MB) and +236 MB
# with layers computed in 16 MB slices -> 164 MB + 2.39 x the largest (sliced) layer, of which one
# is the dequantization workspace counted separately for fp16/int8 weights.
# TAESD decoder (SD 1.x shapes, 64 wide; `bench/calibrate_memory.py --taesd DIR --only taesd`): 1074 MB at
# 1024x1024 output, 321 MB at 512x512, 119 MB at 256x256 -> 67 MiB + 960 B per output pixel (a quarter of
# the SD VAE's per-pixel cost).
ACTIVATION_BYTES = {
    "unet_const": 164 * MiB,
    "unet_const_x_largest_layer": 1.39,
    "unet_per_latent_px": 9_900,       # per latent pixel per batch element, SD 1.5 widths (320)
    "vae_const": 45 * MiB,
    "vae_per_image_px": 3_970,         # per output pixel (whole image), SD VAE widths (128)
    "vae_tiled_const": 217 * MiB,
    "vae_per_tile_px": 3_650,          # per pixel of one tile, tiled decoding
    "text": 24 * MiB,                  # CLIP-L over 77 tokens, batch 1 (measured 11 MB)
    "taesd_const": 67 * MiB,           # TAESD decoder, 64 wide (see above)
    "taesd_per_image_px": 960,
    "taesd_tiled_const": 67 * MiB,     # a tile costs what a whole image of its size does (no norms,
    "taesd_per_tile_px": 960,          # no attention: nothing is shared across tiles)
}
# Activations in a 16-bit compute dtype against fp32 at the same size (the text encoder stays fp32). Measured
# with `bench/calibrate_memory.py --precision bf16` (weights converted at load), SD 1.5 size, 2 threads:
# UNet +296 MB against +582 MB at batch 2 x 64x64 (0.51), 0.60 at batch 1, 0.54 at 2 x 32x32; VAE decoder
# +872 against +1062 MB at 512x512 (0.82; its group norms compute in fp32), 0.73 at 256x256.
ACTIVATION_DTYPE_RATIO = {("unet", "bfloat16"): 0.6, ("unet", "float16"): 0.6,
                          ("vae", "bfloat16"): 0.85, ("vae", "float16"): 0.85}
SAFETY = 1.05                          # on anonymous memory: the samplers above miss short spikes
# python + torch + sdlite imported and warmed up, as charged to a fresh cgroup: 164 MB anon at import,
# 240 MB measured in the cgroup between stages (the shared libraries' pages are charged to whoever
# read them first; on a freshly booted device that is sdlite, add about 90 MB there)
BASE_BYTES = 240 * MiB
MIN_STREAM_BYTES = 128 * MiB           # page cache a streamed stage needs for its current layers
LAYER_CHUNK = 16 * MiB                 # slice size of the largest layers when chunking is on


@dataclass
class ComponentSize:
    stored_bytes: int          # bytes of weight data in the files as stored
    fp32_bytes: int            # the same weights as fp32
    largest_layer_fp32: int    # the biggest single weight tensor, as fp32
    small_fp32_bytes: int      # 1-d tensors (norms, biases, scales) as fp32: converted at load
    lazy: bool                 # stored in a dtype other than fp32
    lookup_bytes: int = 0      # embedding tables: only the rows looked up are ever read
    stored_dtypes: frozenset = frozenset()  # the dtypes of the weight matrices (2-d and more), as "float16"...
    transformer_linear_params: int = 0  # weights of the Linear layers in attention blocks (int8 compute's)

    def converts(self, dtype: str = "float32") -> bool:
        """Whether computing in `dtype` ("float32", "bfloat16", "float16") converts stored weights per layer."""
        return self.lazy if not self.stored_dtypes else self.stored_dtypes != {dtype}

    @classmethod
    def of(cls, folder: ModelFolder, name: str) -> "ComponentSize":
        with folder.part(name).open_weights() as w:
            stored = fp32 = largest = small = lookup = 0
            lazy, dtypes, tlin = False, set(), 0
            for k in w.keys():
                n = math.prod(w.shape_of(k))
                stored += w.nbytes_of(k)
                if "token_embedding" in k:
                    lookup += w.nbytes_of(k)
                fp32 += 4 * n
                if len(w.shape_of(k)) >= 2:
                    largest = max(largest, 4 * n)
                    dtypes.add(str(w.dtype_of(k)).replace("torch.", ""))
                    if len(w.shape_of(k)) == 2 and "attentions." in k:
                        tlin += n
                else:
                    small += 4 * n
                if str(w.dtype_of(k)) != "torch.float32":
                    lazy = True
        return cls(stored, fp32, largest, small, lazy, lookup, frozenset(dtypes), tlin)


@dataclass
class ModelSizes:
    text_encoder: ComponentSize
    unet: ComponentSize
    vae: ComponentSize
    unet_channels: int
    vae_factor: int
    latent_channels: int
    vae_channels: int = 128
    vae_kind: str = "kl"       # "kl": the SD VAE (AutoencoderKL); "taesd": the tiny autoencoder
    lora_bytes: dict = field(default_factory=dict)  # stage -> fp32 bytes of the LoRAs applied to it
    compute: dict = field(default_factory=lambda: dict.fromkeys(("text_encoder", "unet", "vae"), "float32"))
    int8_bytes_per_weight: int = 0  # int8 compute of the UNet's transformer Linear layers: heap bytes a weight
    kv_width: int = 0          # the UNet's cross-attention layers' inner widths, summed (K/V cache size)

    def element_ratio(self, stage: str) -> float:
        """Bytes per element of `stage`'s compute dtype over fp32's (1 fp32, 0.5 bf16 / fp16)."""
        return {"float32": 1.0}.get(self.compute[stage], 0.5)

    @classmethod
    def of(cls, folder: ModelFolder) -> "ModelSizes":
        from .components import is_taesd, unet_config, vae_config, vae_factor
        ucfg, vcfg = unet_config(folder), vae_config(folder)
        kind = "taesd" if is_taesd(vcfg) else "kl"
        # the widest full-resolution layer sets the activation sizes: the SD VAE's last up block, TAESD's
        vae_channels = vcfg.block_out_channels[-1 if kind == "taesd" else 0]
        return cls(ComponentSize.of(folder, "text_encoder"), ComponentSize.of(folder, "unet"),
                   ComponentSize.of(folder, "vae"), ucfg.block_out_channels[0],
                   vae_factor(vcfg), ucfg.in_channels, vae_channels, kind, kv_width=cross_attention_width(ucfg))

    def component(self, name: str) -> ComponentSize:
        return getattr(self, name)


def cross_attention_width(cfg) -> int:
    """The sum of the inner widths of a UNet config's cross-attention layers: K or V of one text token in
    every layer has this many elements."""
    ch, n = cfg.block_out_channels, len(cfg.block_out_channels)
    layers = cfg.per_block(cfg.layers_per_block, "layers_per_block")
    depth = cfg.per_block(cfg.transformer_layers_per_block, "transformer_layers_per_block")
    total = sum(layers[i] * depth[i] * ch[i] for i, t in enumerate(cfg.down_block_types) if t.startswith("CrossAttn"))
    total += sum((layers[n - 1 - i] + 1) * depth[n - 1 - i] * ch[n - 1 - i]
                 for i, t in enumerate(cfg.up_block_types) if t.startswith("CrossAttn"))
    if cfg.mid_block_type is not None:
        total += depth[-1] * ch[-1]
    return total


KV_TOKENS_PLANNED = 77      # a one-chunk prompt; "eot" keeps fewer, how many depends on the prompt


def kv_cache_bytes(sizes: "ModelSizes", plan: "Plan") -> int:
    """The cached text K/V of the UNet's cross-attention layers: K and V, for the prompt and the negative
    prompt, 77 tokens each (the planner does not count on "eot" truncation), as `plan.kv_store` keeps them."""
    if not plan.kv_cache:
        return 0
    per = {"bf16": 2, "int8": 1}.get(plan.kv_store, 4 * sizes.element_ratio("unet"))
    return int(2 * 2 * KV_TOKENS_PLANNED * sizes.kv_width * per)


@dataclass
class Plan:
    residency: str = "all"            # "all": load once, keep; "staged": one stage's network at a time
    cfg: str = "batch"                # "batch": uncond+cond as a batch of 2; "split": two passes of 1
    vae_tile: int | None = None       # latent tile size for tiled VAE decoding; None: untiled
    vae_overlap: int = 8
    weights_mode: str = "lazy"        # "lazy": convert stored weights per layer; "materialize": at load
    precision: str = "fp32"           # the compute precision (runtime.precision): fp32, bf16, fp16
    convert_16: bool = False          # 16-bit stages convert their weights at load, not per layer
    attention: str = "sdpa"
    layer_chunk: int | None = None    # compute layers above this many fp32 bytes in channel slices
    kv_cache: bool = True
    kv_store: str = "compute"         # the cached text K/V: as computed, or "bf16" / "int8" (runtime.kv_cache)
    kv_tokens: str = "all"            # "all" 77 a chunk, or "eot": through each chunk's first end-of-text
    trim: bool = True                 # gc + malloc_trim between stages
    budget: int | None = None
    estimates: dict = field(default_factory=dict)   # stage -> estimated peak bytes
    streamed: list = field(default_factory=list)    # stages whose weights do not fit and stream
    width: int = 512
    height: int = 512

    def describe(self) -> str:
        parts = [f"precision={self.precision}", f"residency={self.residency}", f"cfg={self.cfg}",
                 f"vae={'tiled ' + str(self.vae_tile * 8) + 'px' if self.vae_tile else 'untiled'}",
                 f"weights={self.weights_mode}{'+convert16' if self.convert_16 else ''}",
                 f"attention={self.attention}",
                 f"layer_chunk={format_bytes(self.layer_chunk) if self.layer_chunk else 'off'}",
                 f"kv_cache={self._kv()}"]
        if self.streamed:
            parts.append("streamed=" + "+".join(self.streamed))
        return ", ".join(parts)

    def _kv_changes(self) -> list[str]:
        """How the cached text K/V differ from the exact ones: [] or e.g. ["int8", "eot"]."""
        if not self.kv_cache:
            return []
        return [x for x in (self.kv_store if self.kv_store != "compute" else None,
                            "eot" if self.kv_tokens == "eot" else None) if x]

    def _kv(self) -> str:
        extra = self._kv_changes()
        return "off" if not self.kv_cache else "on" + (f" ({', '.join(extra)})" if extra else "")

    def kv_inexact(self) -> str | None:
        """For the PNG parameters: "int8 + tokens through first EOT" when the K/V are not kept exactly, else None."""
        words = {"eot": "tokens through first EOT"}
        return " + ".join(words.get(x, x) for x in self._kv_changes()) or None

    def validate(self) -> None:
        """ValueError for an unknown `kv_store` / `kv_tokens`."""
        from .kv_cache import check_kv_options
        check_kv_options(self.kv_store, self.kv_tokens)

    def weights_mode_of(self, stage_dtype: str) -> str:
        """The weights mode of a stage computing in `stage_dtype` ("float32", "bfloat16", "float16")."""
        return "materialize" if self.convert_16 and stage_dtype != "float32" else self.weights_mode

    def peak(self) -> int:
        return max(self.estimates.values()) if self.estimates else 0

    def to_dict(self) -> dict:
        return asdict(self)


def _activations(sizes: ModelSizes, stage: str, plan: Plan, width: int, height: int) -> int:
    if stage == "text_encoder":
        return ACTIVATION_BYTES["text"]
    f = sizes.vae_factor
    if stage == "unet":
        batch = 1 if plan.cfg == "split" else 2
        px = (width // f) * (height // f)
        scale = sizes.unet_channels / 320
        const = (ACTIVATION_BYTES["unet_const"] * scale
                 + ACTIVATION_BYTES["unet_const_x_largest_layer"] * _largest(sizes.unet, plan))
        return int(const + ACTIVATION_BYTES["unet_per_latent_px"] * scale * batch * px + kv_cache_bytes(sizes, plan))
    if sizes.vae_kind == "taesd":
        scale, key = sizes.vae_channels / 64, "taesd"
    else:
        scale, key = sizes.vae_channels / 128, "vae"
    if plan.vae_tile:
        tw = min(plan.vae_tile, width // f) * f
        th = min(plan.vae_tile, height // f) * f
        px_out = width * height  # the blended output and its weights (fp32)
        return int(ACTIVATION_BYTES[f"{key}_tiled_const"] + ACTIVATION_BYTES[f"{key}_per_tile_px"] * scale * tw * th
                   + 16 * px_out)
    return int(ACTIVATION_BYTES[f"{key}_const"] + ACTIVATION_BYTES[f"{key}_per_image_px"] * scale * width * height)


STAGES = ("text_encoder", "unet", "vae")


def _largest(c: ComponentSize, plan: Plan) -> int:
    return min(c.largest_layer_fp32, plan.layer_chunk) if plan.layer_chunk else c.largest_layer_fp32


def stage_needs(sizes: ModelSizes, plan: Plan, stage: str, width: int, height: int) -> tuple[int, int]:
    """(anonymous bytes, file-backed bytes) a stage wants resident at its peak, in its compute dtype."""
    ratio = sizes.element_ratio(stage)
    act_ratio = ACTIVATION_DTYPE_RATIO.get((stage, sizes.compute[stage]), 1.0)
    anon = BASE_BYTES + _activations(sizes, stage, plan, width, height) * act_ratio
    anon += sizes.lora_bytes.get(stage, 0) * ratio + _int8_bytes(sizes, stage)
    extra_anon, file_bytes = _weight_bytes(sizes, stage, plan, current=True)
    anon += extra_anon
    if plan.residency == "all":
        for other in STAGES:
            if other != stage:
                more_anon, more_file = _weight_bytes(sizes, other, plan, current=False)
                anon += more_anon + sizes.lora_bytes.get(other, 0) * sizes.element_ratio(other) + _int8_bytes(sizes, other)
                file_bytes += more_file
    return int(anon * SAFETY), int(file_bytes)


def _int8_bytes(sizes: ModelSizes, stage: str) -> int:
    """The packed int8 copies of the UNet's transformer Linear weights (int8 compute), on the heap."""
    return sizes.unet.transformer_linear_params * sizes.int8_bytes_per_weight if stage == "unet" else 0


def _weight_bytes(sizes: ModelSizes, stage: str, plan: Plan, current: bool) -> tuple[int, int]:
    """(anonymous, file-backed) bytes of `stage`'s weights: mapped from the file as stored, plus the small
    tensors converted at load and, while the stage runs (`current`), the workspace its largest layer is
    converted into; or, materialized, the whole network converted at load."""
    c = sizes.component(stage)
    ratio = sizes.element_ratio(stage)
    converts = c.converts(sizes.compute[stage])
    if plan.weights_mode_of(sizes.compute[stage]) == "materialize" and converts:
        return int(c.fp32_bytes * ratio), 0
    anon = c.small_fp32_bytes * ratio if (converts or ratio != 1.0) else 0
    if current and converts:
        anon += _largest(c, plan) * ratio
    return int(anon), c.stored_bytes - (c.lookup_bytes if current else 0)


def estimate(sizes: ModelSizes, plan: Plan, width: int, height: int, budget: int | None = None
             ) -> tuple[dict, list]:
    """Peak bytes per stage for `plan`, and which stages must stream their weights (their mapped
    pages do not all fit next to the anonymous memory, so the kernel recycles them)."""
    estimates, streamed = {}, []
    for stage in STAGES:
        anon, file_bytes = stage_needs(sizes, plan, stage, width, height)
        want = anon + file_bytes
        if budget is not None and want > budget and anon + MIN_STREAM_BYTES <= budget and file_bytes:
            streamed.append(stage)
            want = budget  # the page cache fills up to the limit and is recycled
        estimates[stage] = int(want)
    return estimates, streamed


def reread_per_step(sizes: ModelSizes, plan: Plan, width: int, height: int, budget: int) -> int:
    """Bytes of UNet weights read again from disk on every step when the UNet stage streams."""
    anon, file_bytes = stage_needs(sizes, plan, "unet", width, height)
    deficit = max(0, anon + file_bytes - budget)
    return deficit * (2 if plan.cfg == "split" else 1)


def candidates(sizes: ModelSizes, width: int, height: int, kv_stores=("compute",)):
    """Lever combinations, fastest first; the lossy K/V stores (`kv_stores` after the first) only after every
    exact combination."""
    f = sizes.vae_factor
    lat = max(width, height) // f
    tiles = [None] + [t for t in (64, 48, 32, 24, 16) if t < lat]
    converts = [True, False] if _converts_16(sizes) else [False]
    for kv_store in kv_stores:
        for residency in ("all", "staged"):  # reloading every stage per request costs most
            for convert in converts:          # then converting per layer at every call (~25 % a step)
                for chunk in (None, LAYER_CHUNK):
                    for cfg in ("batch", "split"):
                        for tile in tiles:
                            yield Plan(residency=residency, cfg=cfg, vae_tile=tile, layer_chunk=chunk,
                                       convert_16=convert, kv_store=kv_store)


def _converts_16(sizes: ModelSizes) -> bool:
    """Whether a stage computes in 16 bits from weights stored otherwise: converting them once at load
    is faster than per layer at every call (SD 1.5 UNet, fp16 file, bf16 compute, 2 threads: 2.9 s a step
    against 3.7 s), at the cost of the converted copy in anonymous memory."""
    return any(sizes.compute[stage] != "float32" and sizes.component(stage).converts(sizes.compute[stage])
               for stage in STAGES)


def make_plan(folder: ModelFolder | str, budget: int | None, width: int = 512, height: int = 512,
              sizes: ModelSizes | None = None, lora_bytes: dict | None = None, precision=None,
              kv_store: str | None = None, kv_tokens: str = "all") -> Plan:
    """The fastest plan whose estimated peak fits `budget` with all weights cached if there is one;
    else the one that re-reads the fewest weight bytes per step; PlanError naming the smallest budget
    that would fit when none does. With no budget: every network resident, fp16/int8 weights read from
    the mapped file. A budget never costs more memory than no budget: the candidates never convert
    fp16/int8 weights to fp32 at load (measured: lazy dequantization runs within the run-to-run spread of
    fp32, README "Memory budget"); `Plan(weights_mode="materialize")` still does, when asked for.
    `precision` (runtime.precision: a Precision, a name or None for fp32) sets each stage's compute dtype:
    its activations, workspace and converted tensors are counted in it.
    `kv_store` (runtime.kv_cache): how the text K/V are kept; None lets the planner choose: as computed, or,
    only when no exact plan fits without streaming weights, bf16 then int8 (measured: README "Lighter UNets").
    `kv_tokens` ("all" / "eot") is the caller's choice: what it saves depends on the prompt."""
    from .precision import STAGE_NAMES, resolve_precision
    if isinstance(folder, (str, Path)):
        folder = open_model(folder)
    sizes = sizes or ModelSizes.of(folder)
    prec = resolve_precision(precision if precision is not None else "fp32")
    sizes.compute = {stage: str(prec.dtype_of(stage)).replace("torch.", "") for stage in STAGE_NAMES}
    if prec.int8_linear:
        from .int8_compute import bytes_per_weight
        sizes.int8_bytes_per_weight = bytes_per_weight()
    stores = (kv_store,) if kv_store is not None else (
        ("compute", "bf16", "int8") if prec.unet.itemsize == 4 else ("compute", "int8"))  # 16-bit: bf16 saves nothing
    plan = _make_plan(sizes, budget, width, height, lora_bytes, stores)
    plan.precision, plan.kv_tokens = prec.name, kv_tokens
    plan.validate()
    return plan


def _make_plan(sizes: ModelSizes, budget: int | None, width: int, height: int, lora_bytes: dict | None,
               kv_stores=("compute",)) -> Plan:
    if lora_bytes is not None:  # stage -> fp32 bytes of the LoRAs applied (runtime.lora)
        sizes.lora_bytes = dict(lora_bytes)
    if budget is None:
        plan = Plan(width=width, height=height, convert_16=_converts_16(sizes), kv_store=kv_stores[0])
        plan.estimates, plan.streamed = estimate(sizes, plan, width, height)
        return plan
    best, best_cost, smallest = None, None, None
    for order, plan in enumerate(candidates(sizes, width, height, kv_stores)):
        est, streamed = estimate(sizes, plan, width, height, budget)
        plan.estimates, plan.streamed, plan.budget = est, streamed, budget
        plan.width, plan.height = width, height
        if all(v <= budget for v in est.values()):
            if not streamed:
                return plan
            cost = (reread_per_step(sizes, plan, width, height, budget), order)
            if best_cost is None or cost < best_cost:
                best, best_cost = plan, cost
        full, _ = estimate(sizes, plan, width, height)
        stream_need = max(_anon_only(sizes, plan, width, height).values()) + MIN_STREAM_BYTES
        need = min(max(full.values()), stream_need)
        smallest = need if smallest is None else min(smallest, need)
    if best is not None:
        return best
    hint = ", a smaller image"
    if sizes.unet.stored_bytes > 0.3 * sizes.unet.fp32_bytes:
        hint += ", or int8 weights (sdlite convert MODEL OUT --weights int8)"
    raise PlanError(
        f"a {width}x{height} generation does not fit in {format_bytes(budget)}: the leanest plan needs "
        f"about {format_bytes(smallest)} (try --memory-budget {math.ceil(smallest / MiB)}M{hint})")


def _anon_only(sizes: ModelSizes, plan: Plan, width: int, height: int) -> dict:
    return {stage: stage_needs(sizes, plan, stage, width, height)[0] for stage in STAGES}


class SizePlans:
    """The plans of one loaded model for each request size.

    A model is loaded under one plan, made for one size. A request of another size under a memory budget
    gets its own plan for the same budget, which keeps the loaded plan's residency and weights mode (the
    networks are already built that way); plans are cached per size. Without a budget every size uses
    the loaded plan."""

    def __init__(self, folder: ModelFolder, loaded: Plan, lora_bytes: dict | None = None, precision=None,
                 kv_store: str | None = None):
        self.folder, self.loaded, self.lora_bytes = folder, loaded, lora_bytes
        self.kv_store = kv_store  # as asked at load (None: the planner's choice)
        self.precision = precision if precision is not None else loaded.precision
        self._sizes: ModelSizes | None = None
        self._plans: dict[tuple[int, int], Plan] = {}

    def plan_for(self, width: int, height: int) -> Plan:
        """The plan for a `width` x `height` (pixels) request. Raises PlanError when that size does not
        fit the budget, or needs one stage at a time while the model was loaded with every network
        resident."""
        plan = self.loaded
        if plan.budget is None or (plan.width, plan.height) == (width, height):
            return plan
        cached = self._plans.get((width, height))
        if cached is not None:
            return cached
        if self._sizes is None:
            self._sizes = ModelSizes.of(self.folder)
        new = make_plan(self.folder, plan.budget, width, height, sizes=self._sizes, lora_bytes=self.lora_bytes,
                        precision=self.precision, kv_store=self.kv_store, kv_tokens=plan.kv_tokens)
        if plan.residency == "staged":
            new.residency = "staged"
        elif new.residency == "staged":
            raise PlanError(f"{width}x{height} needs one stage at a time in {format_bytes(plan.budget)}, "
                            f"but this pipeline was loaded for {plan.width}x{plan.height} with every "
                            "network resident; load it for the larger size")
        new.weights_mode = plan.weights_mode
        self._plans[(width, height)] = new
        return new
