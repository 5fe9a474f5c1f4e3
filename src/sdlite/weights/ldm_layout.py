"""The original (CompVis / Stability "LDM") single-file layout of SD 1.x / 2.x, read from key names and shapes.

A checkpoint such as `v1-5-pruned-emaonly.safetensors` or `v2-1_768-ema-pruned.safetensors` holds the three
networks under one roof:

    model.diffusion_model.*       the UNet (time_embed, input_blocks, middle_block, output_blocks, out)
    first_stage_model.*           the VAE (encoder.down.N.block.M, mid.block_1/attn_1/block_2, decoder.up.N...)
    cond_stage_model.transformer.*  SD 1.x: OpenAI CLIP ViT-L, already in transformers' names
    cond_stage_model.model.*        SD 2.x: OpenCLIP ViT-H (resblocks with fused q/k/v)

plus what no network here uses: EMA copies (`model_ema.*`), the training noise schedule (betas, ...),
`position_ids`, OpenCLIP's last layer and projection. `read_layout` turns the key set and shapes (no tensor is
read) into a `Layout`: for each network, module name (diffusers' / transformers' names, which sdlite's modules
use) -> `Source`, where in the file that tensor is and how to view it, and the diffusers configs the shapes
imply. Every key is either mapped or counted in `Layout.ignored`; anything else is refused, naming the key.

Nothing is copied: `apply(source, tensor)` is a rename plus, for OpenCLIP's fused q/k/v, a slice along dim 0
and, for the VAE attention's 1x1 convolutions, a reshape to the linear weight; both are views.

What the weights cannot tell follows the SD conventions: SD 1.x has 8 heads per attention, SD 2.x 64-wide
heads with linear projections and upcast attention; the rest as the SD 1.5 / 2.1 diffusers configs
(`standard_configs`). `sample_size` is 64 (512 px); the caller sets 96 for the 768-px v-prediction models.
"""

from __future__ import annotations

import copy
import re
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass, field

import torch

from ..errors import WeightsError
from .standard_configs import SD15_TEXT, SD15_UNET, SD15_VAE, SD21_TEXT
from .state_dict import format_names

__all__ = ["Layout", "Source", "UnsupportedCheckpoint", "apply", "read_layout", "read_vae_layout"]

Shapes = Mapping[str, tuple[int, ...]]

UNET_PREFIX = "model.diffusion_model."
VAE_PREFIX = "first_stage_model."
CLIP_PREFIX = "cond_stage_model.transformer."
OPENCLIP_PREFIX = "cond_stage_model.model."
ONLY = "sdlite runs SD 1.x and SD 2.x checkpoints only"

EMA = "EMA copies (model_ema.*)"
POSITION_IDS = "position_ids"
SCHEDULE = "noise schedule buffers"
LAST_LAYER = "OpenCLIP's last layer (SD 2.x uses the penultimate)"
PROJECTION = "text projection / logit scale"
LOGVAR = "logvar (training only)"
LOSS = "VAE training loss (loss.*)"
ATTN_MASK = "OpenCLIP's causal mask buffer"
OTHER_PARTS = "UNet and text encoder (a --vae file gives its VAE only)"
OTHER_KEYS = "other keys outside the three networks (LoRA leftovers, embedding managers, ...)"

SCHEDULE_BUFFERS = frozenset({
    "betas", "alphas_cumprod", "alphas_cumprod_prev", "sqrt_alphas_cumprod", "sqrt_one_minus_alphas_cumprod",
    "log_one_minus_alphas_cumprod", "sqrt_recip_alphas_cumprod", "sqrt_recipm1_alphas_cumprod",
    "posterior_variance", "posterior_log_variance_clipped", "posterior_mean_coef1", "posterior_mean_coef2",
})

NORM_GROUPS = 32  # SD's GroupNorm groups; the weights cannot tell, every SD 1.x/2.x network uses 32
SD1_HEADS = 8  # SD 1.x: 8 heads in every attention
HEAD_WIDTH = 64  # SD 2.x UNet and both CLIP text towers: 64-wide heads


class UnsupportedCheckpoint(WeightsError):
    """The file is not an SD 1.x / 2.x checkpoint in the original layout (SDXL, SD3, Flux, an inpainting
    UNet, a LoRA, a VAE, diffusers-named weights, unknown keys...); the message says what it is."""


@dataclass(frozen=True)
class Source:
    """How one module tensor is read from the file, without copying.

    key: the file's key. chunk: (index, count), take part `index` of `count` equal parts along dim 0 (OpenCLIP's
    fused q/k/v). shape: view the tensor with this shape (the VAE attention's [C, C, 1, 1] -> [C, C])."""

    key: str
    chunk: tuple[int, int] | None = None
    shape: tuple[int, ...] | None = None


@dataclass(frozen=True)
class Layout:
    """A single-file checkpoint read as sdlite's three networks. `unet`, `vae`, `text_encoder`: module
    state-dict name -> `Source`; `*_config`: the diffusers / transformers config dicts the shapes imply;
    `ignored`: the file's keys no network uses, counted by reason."""

    family: str  # "sd1" (CLIP ViT-L text, 768 wide) or "sd2" (OpenCLIP ViT-H, 1024)
    unet: dict[str, Source]
    vae: dict[str, Source]
    text_encoder: dict[str, Source]
    unet_config: dict
    vae_config: dict
    text_config: dict
    ignored: dict[str, int] = field(default_factory=dict)

    @property
    def text_encoder_config(self) -> dict:
        """`text_config` under the part's name ("text_encoder"), like `unet_config` and `vae_config`."""
        return self.text_config


def apply(source: Source, tensor: torch.Tensor) -> torch.Tensor:
    """The module tensor `source` describes, from the file's `tensor`: a view of it, never a copy. Raises
    WeightsError if the tensor cannot be viewed that way (a shape that does not divide or match)."""
    t = tensor
    if source.chunk is not None:
        index, count = source.chunk
        if t.ndim == 0 or count < 1 or not 0 <= index < count or t.shape[0] % count:
            raise WeightsError(f"{source.key!r}: shape {list(t.shape)} does not split into {count} parts "
                               "along dim 0")
        size = t.shape[0] // count
        t = t.narrow(0, index * size, size)
    if source.shape is not None:
        try:
            t = t.view(source.shape)
        except RuntimeError:
            raise WeightsError(f"{source.key!r}: shape {list(t.shape)} cannot be viewed as "
                               f"{list(source.shape)} without a copy") from None
    return t


# ------------------------------------------------------------------------------------------------ entry points

def read_layout(shapes: Shapes) -> Layout:
    """Recognise an SD 1.x / 2.x single-file checkpoint from its keys and shapes (nothing else is read).

    Raises UnsupportedCheckpoint (one line) for another kind of file or keys that fit no rule, WeightsError
    for shapes that contradict each other."""
    shapes = {k: tuple(v) for k, v in shapes.items()}
    _refuse_other_kinds(shapes)
    split, ignored, unmapped = _split(shapes)
    _require_parts(split)
    family = "sd2" if split["sd2"] else "sd1"
    unet = _read_unet(split["unet"])
    vae = _read_vae(split["vae"], VAE_PREFIX)
    text = _read_openclip(split["sd2"]) if family == "sd2" else _read_clip(split["sd1"])
    for part in (unet, vae, text):
        ignored.update(part.ignored)
        unmapped.extend(part.unmapped)
    _refuse_unmapped(unmapped, "an SD 1.x/2.x checkpoint (model.diffusion_model.*, first_stage_model.*, "
                               "cond_stage_model.*)")
    unet_config = _unet_config(unet.structure, split["unet"], family)
    _check_coherent(unet_config, vae.config, text.config)
    return Layout(family, unet.mapping, vae.mapping, text.mapping, unet_config, vae.config, text.config,
                  dict(ignored))


def read_vae_layout(shapes: Shapes) -> tuple[dict[str, Source], dict, dict[str, int]]:
    """A standalone VAE file in the original layout (e.g. vae-ft-mse-840000-ema-pruned), with or without the
    "first_stage_model." prefix (a full checkpoint gives its VAE). Returns (AutoencoderKL name -> Source,
    the vae config, what was ignored by reason)."""
    shapes = {k: tuple(v) for k, v in shapes.items()}
    _refuse_other_kinds(shapes, vae_file=True)
    prefix = VAE_PREFIX if any(k.startswith(VAE_PREFIX) for k in shapes) else ""
    own: dict[str, tuple[int, ...]] = {}
    ignored: Counter = Counter()
    unmapped: list[str] = []
    for key, shape in shapes.items():
        reason = _vae_file_reason(key, prefix)
        if reason is not None:
            ignored[reason] += 1
        elif key.startswith(prefix) and key.startswith(_VAE_TOP, len(prefix)):
            own[key[len(prefix):]] = shape
        else:
            unmapped.append(key)
    if not own:
        raise UnsupportedCheckpoint("no VAE weights (encoder.*, decoder.*) in this file")
    vae = _read_vae(own, prefix)
    ignored.update(vae.ignored)
    _refuse_unmapped(unmapped + vae.unmapped, "an SD VAE in the original layout (encoder.*, decoder.*, "
                                              "quant_conv, post_quant_conv)")
    return vae.mapping, vae.config, dict(ignored)


_VAE_TOP = ("encoder.", "decoder.", "quant_conv.", "post_quant_conv.")


def _vae_file_reason(key: str, prefix: str) -> str | None:
    if prefix and key.startswith(prefix):
        return LOSS if key.startswith("loss.", len(prefix)) else None
    if key.startswith("loss."):
        return LOSS
    if key.startswith((UNET_PREFIX, "cond_stage_model.")):
        return OTHER_PARTS
    return _ignored_reason(key)


# ----------------------------------------------------------------------------------- refusing other kinds

def _lora(key: str) -> str | None:
    if key.startswith(("lora_unet_", "lora_te")) or any(s in key for s in (".lora_down.", ".lora_up.",
                                                                              ".lora_A.", ".lora_B.")):
        return "this is a LoRA, not a checkpoint; " + ONLY + " (LoRA files are not supported yet)"
    return None


def _prefixed(prefixes: tuple[str, ...], message: str):
    def test(key: str) -> str | None:
        return message if key.startswith(prefixes) else None
    return test


_DIFFUSERS_NAME = re.compile(r"(^|\.)(down_blocks|up_blocks|mid_block|text_model)\.")
_LDM_PREFIXES = ("model.", "first_stage_model.", "cond_stage_model.", "model_ema.")


def _diffusers_named(key: str) -> str | None:
    if not key.startswith(_LDM_PREFIXES) and _DIFFUSERS_NAME.search(key):
        return (f"this file holds diffusers-named weights (e.g. {key!r}), not the original single-file layout; "
                "it is one component of a diffusers folder: put it in a model folder's unet/, vae/ or "
                "text_encoder/ instead")
    return None


_OTHER_KINDS = (
    _lora,
    _prefixed(("conditioner.embedders.",), "this is an SDXL checkpoint; " + ONLY),
    _prefixed(("noise_augmentor.",), "this is an SD 2 unCLIP (image variation) checkpoint; " + ONLY),
    _prefixed((UNET_PREFIX + "label_emb.weight",), "this is the SD 2 x4 upscaler; " + ONLY + " (text-to-image)"),
    _prefixed((UNET_PREFIX + "label_emb.",), "this is an SDXL checkpoint (its UNet takes SDXL's size "
                                             "embedding, label_emb); " + ONLY),
    _prefixed((UNET_PREFIX + "joint_blocks.", "joint_blocks."), "this is a Stable Diffusion 3 checkpoint; " + ONLY),
    _prefixed(("double_blocks.", UNET_PREFIX + "double_blocks."), "this is a Flux checkpoint; " + ONLY),
    _prefixed(("control_model.",), "this is a ControlNet, not a checkpoint; " + ONLY + " (ControlNet is not "
                                   "supported)"),
    _prefixed(("depth_model.",), "this is an SD 2 depth-to-image model (depth_model.*, 5 input channels); "
                                 + ONLY + " (text-to-image)"),
    _diffusers_named,
)


def _refuse_other_kinds(shapes: Shapes, vae_file: bool = False) -> None:
    has_model = any(k.startswith((UNET_PREFIX, "cond_stage_model.")) for k in shapes)
    for rule in _OTHER_KINDS:
        if rule is _lora and (has_model or vae_file and any(k.startswith(_VAE_TOP + (VAE_PREFIX,)) for k in shapes)):
            continue  # a checkpoint with a LoRA's leftover keys is still a checkpoint (they are ignored)
        for key in shapes:
            message = rule(key)
            if message is not None:
                raise UnsupportedCheckpoint(message)
    looks_vae = any(k.startswith(_VAE_TOP + (VAE_PREFIX,)) for k in shapes)
    if not vae_file and not has_model and looks_vae:
        raise UnsupportedCheckpoint("this is a VAE; pass it as --vae, with a model (it holds no UNet and no "
                                    "text encoder)")


def _refuse_unmapped(unmapped: list[str], expected: str) -> None:
    if unmapped:
        count = "1 key fits" if len(unmapped) == 1 else f"{len(unmapped)} keys fit"
        raise UnsupportedCheckpoint(f"{count} no rule of {expected}: {format_names(unmapped)}")


# ------------------------------------------------------------------------------------- splitting the file

def _ignored_reason(key: str) -> str | None:
    """Why a key outside the three networks is left out, or None when it is not a known leftover."""
    if key.startswith("model_ema."):
        return EMA
    if key in SCHEDULE_BUFFERS:
        return SCHEDULE
    if key in ("logvar", "model.logvar"):
        return LOGVAR
    return None


_PARTS = (("unet", UNET_PREFIX), ("vae", VAE_PREFIX), ("sd1", CLIP_PREFIX), ("sd2", OPENCLIP_PREFIX))


def _split(shapes: dict[str, tuple[int, ...]]) -> tuple[dict[str, dict], Counter, list[str]]:
    """The keys of each network (prefix stripped), the ignored count by reason, and the keys of neither."""
    split: dict[str, dict] = {name: {} for name, _ in _PARTS}
    ignored: Counter = Counter()
    unmapped = []
    for key, shape in shapes.items():
        for name, prefix in _PARTS:
            if key.startswith(prefix):
                split[name][key[len(prefix):]] = shape
                break
        else:  # outside the three networks: known leftovers, or other keys A1111 and diffusers also skip
            ignored[_ignored_reason(key) or OTHER_KEYS] += 1
    return split, ignored, unmapped


def _require_parts(split: dict[str, dict]) -> None:
    missing = []
    if not split["unet"]:
        missing.append("the UNet (model.diffusion_model.*)")
    if not split["vae"]:
        missing.append("the VAE (first_stage_model.*)")
    if not split["sd1"] and not split["sd2"]:
        missing.append("the text encoder (cond_stage_model.*)")
    if missing:
        listed = ", ".join(missing[:-1]) + " and " + missing[-1] if len(missing) > 1 else missing[0]
        raise UnsupportedCheckpoint(f"this checkpoint lacks {listed}; sdlite needs the UNet, VAE and text encoder "
                                    "of an SD 1.x/2.x checkpoint in one file (for a partial file, use a diffusers "
                                    "model folder)")
    if split["sd1"] and split["sd2"]:
        raise UnsupportedCheckpoint("this checkpoint holds both a CLIP (cond_stage_model.transformer.*) and an "
                                    "OpenCLIP (cond_stage_model.model.*) text encoder; " + ONLY)


# ------------------------------------------------------------------------------------------ shared helpers

@dataclass
class _Part:
    mapping: dict[str, Source]
    config: dict
    ignored: Counter = field(default_factory=Counter)
    unmapped: list[str] = field(default_factory=list)
    structure: object = None


def _shape(shapes: Mapping[str, tuple[int, ...]], key: str, ndim: int | tuple[int, ...], prefix: str
           ) -> tuple[int, ...]:
    """The shape of `key` (a name inside a network), which must exist with `ndim` dims (one of them), all
    positive."""
    if key not in shapes:
        raise WeightsError(f"expected {prefix + key!r} in the checkpoint; it is missing")
    shape = shapes[key]
    if len(shape) not in ((ndim,) if isinstance(ndim, int) else ndim) or min(shape, default=1) < 1:
        raise WeightsError(f"{prefix + key!r} has shape {list(shape)}, which fits no SD 1.x/2.x layer")
    return shape


def _indices(keys, pattern: re.Pattern) -> list[int]:
    """The distinct values of the first group of `pattern` matched at the start of `keys`, sorted."""
    return sorted({int(m.group(1)) for k in keys if (m := pattern.match(k))})


def _contiguous(indices: list[int], what: str, start: int = 0) -> None:
    if indices != list(range(start, start + len(indices))):
        raise WeightsError(f"{what} are numbered {indices[:12]}, not {start}, {start + 1}, ...: not an SD 1.x/2.x "
                           "layout")


def _uniform(values: list):
    """One value if all are equal, else the list (as diffusers configs write per-block values)."""
    return values[0] if len(set(values)) == 1 else list(values)


def _heads(width: int) -> int:
    """Heads of 64-wide attention; one head for the tiny widths that do not divide (test models)."""
    return width // HEAD_WIDTH if width >= HEAD_WIDTH and width % HEAD_WIDTH == 0 else 1


def _rename(rest: str, table: Mapping[str, str]) -> str:
    for old, new in table.items():
        if rest.startswith(old + "."):
            return new + rest[len(old):]
    return rest


# kind -> (the names allowed after the prefix, module renames)
_KINDS: dict[str, tuple[re.Pattern, dict[str, str]]] = {
    "param": (re.compile(r"weight|bias"), {}),
    "res": (re.compile(r"(in_layers\.[02]|emb_layers\.1|out_layers\.[03]|skip_connection)\.(weight|bias)"),
            {"in_layers.0": "norm1", "in_layers.2": "conv1", "emb_layers.1": "time_emb_proj",
             "out_layers.0": "norm2", "out_layers.3": "conv2", "skip_connection": "conv_shortcut"}),
    "attn": (re.compile(r"(norm|proj_in|proj_out)\.(weight|bias)|transformer_blocks\.\d+\.("
                        r"norm[123]\.(weight|bias)|attn[12]\.(to_[qkv]\.weight|to_out\.0\.(weight|bias))"
                        r"|ff\.net\.(0\.proj|2)\.(weight|bias))"), {}),
    "vres": (re.compile(r"(norm1|conv1|norm2|conv2|nin_shortcut)\.(weight|bias)"),
             {"nin_shortcut": "conv_shortcut"}),
    "vattn": (re.compile(r"(norm|q|k|v|proj_out)\.(weight|bias)"),
              {"norm": "group_norm", "q": "to_q", "k": "to_k", "v": "to_v", "proj_out": "to_out.0"}),
}


def _map_by_table(shapes: Mapping[str, tuple[int, ...]], table: dict[str, tuple[str, str]], prefix: str,
                  part: _Part) -> None:
    """Map every key of a network through `table` (file prefix -> (module prefix, kind)), longest prefix
    first; keys no prefix or kind accepts go to `part.unmapped`."""
    for key, shape in shapes.items():
        parts = key.split(".")
        for n in range(min(len(parts) - 1, 5), 0, -1):
            head = ".".join(parts[:n]) + "."
            if head in table:
                _map_one(key, head, shape, table[head], prefix, part)
                break
        else:
            part.unmapped.append(prefix + key)


def _map_one(key: str, head: str, shape: tuple[int, ...], target: tuple[str, str], prefix: str,
             part: _Part) -> None:
    module_prefix, kind = target
    rest = key[len(head):]
    pattern, renames = _KINDS[kind]
    if not pattern.fullmatch(rest):
        part.unmapped.append(prefix + key)
        return
    view = None
    if kind == "vattn" and rest.endswith("weight") and not rest.startswith("norm") and len(shape) > 2 \
            and all(d == 1 for d in shape[2:]):
        view = tuple(shape[:2])  # a 1x1 convolution in the file, a linear layer in the module
    part.mapping[module_prefix + _rename(rest, renames)] = Source(prefix + key, shape=view)


# ---------------------------------------------------------------------------------------------------- UNet

_INPUT = re.compile(r"input_blocks\.(\d+)\.(\d+)\.(.+)")
_OUTPUT = re.compile(r"output_blocks\.(\d+)\.(\d+)\.(.+)")
_MIDDLE = re.compile(r"middle_block\.(\d+)\.")
_TBLOCK = re.compile(r"transformer_blocks\.(\d+)\.")


def _entries(keys, pattern: re.Pattern) -> dict[int, dict[int, set[str]]]:
    """input_blocks / output_blocks: entry index -> slot index -> the names under it."""
    out: dict[int, dict[int, set[str]]] = {}
    for key in keys:
        m = pattern.fullmatch(key)
        if m:
            out.setdefault(int(m[1]), {}).setdefault(int(m[2]), set()).add(m[3])
    return out


def _is_conv_only(names: set[str], conv: str) -> bool:
    return bool(names) and all(n in (f"{conv}.weight", f"{conv}.bias") for n in names)


@dataclass
class _Level:
    entries: list[int]
    attention: bool
    sampler: str | None  # the file prefix of its down/upsampler


@dataclass
class _UNetStructure:
    down: list[_Level]
    up: list[_Level]
    mid: bool
    attentions: list[str]  # file prefixes of every spatial transformer, down, mid, up


def _down_levels(inp: dict[int, dict[int, set[str]]]) -> list[_Level]:
    """input_blocks 1..: resnet(+attention) entries, a downsampler entry (`K.0.op`) closing each level but the
    last."""
    indices = sorted(inp)
    _contiguous(indices, UNET_PREFIX + "input_blocks")
    levels, current = [], []
    for k in indices[1:]:
        if set(inp[k]) == {0} and _is_conv_only(inp[k][0], "op"):
            if not current:
                raise WeightsError(f"{UNET_PREFIX}input_blocks.{k} downsamples a level without resnets")
            levels.append(_level(current, inp, f"input_blocks.{k}.0.op."))
            current = []
        else:
            current.append(k)
    if not current:
        raise WeightsError(f"{UNET_PREFIX}input_blocks end with a downsampler: not an SD 1.x/2.x UNet")
    levels.append(_level(current, inp, None))
    return levels


def _level(entries: list[int], blocks: dict[int, dict[int, set[str]]], sampler: str | None,
           section: str = "input_blocks") -> _Level:
    """A level whose entries all have attention (slot 1, not an upsampler) or none do."""
    def attends(k: int) -> bool:
        return 1 in blocks[k] and not _is_conv_only(blocks[k][1], "conv")
    flags = {attends(k) for k in entries}
    if len(flags) != 1:
        raise WeightsError(f"{UNET_PREFIX}{section}.{entries[0]}..{entries[-1]}: some resnets of one level "
                           "have attention and some not, which no SD 1.x/2.x UNet does")
    return _Level(entries, flags.pop(), sampler)


def _up_levels(out: dict[int, dict[int, set[str]]]) -> list[_Level]:
    """output_blocks 0..: entries up to one carrying an upsampler (`K.1.conv`, or `K.2.conv` after an
    attention) form a level; the last level has none."""
    indices = sorted(out)
    _contiguous(indices, UNET_PREFIX + "output_blocks")
    levels, current = [], []
    for k in indices:
        current.append(k)
        slot = next((s for s in sorted(out[k]) if s >= 1 and _is_conv_only(out[k][s], "conv")), None)
        if slot is not None:
            levels.append(_level(current, out, f"output_blocks.{k}.{slot}.conv.", "output_blocks"))
            current = []
    if not current:
        raise WeightsError(f"{UNET_PREFIX}output_blocks end with an upsampler: not an SD 1.x/2.x UNet")
    levels.append(_level(current, out, None, "output_blocks"))
    return levels


def _unet_structure(shapes: Mapping[str, tuple[int, ...]]) -> _UNetStructure:
    down = _down_levels(_entries(shapes, _INPUT))
    up = _up_levels(_entries(shapes, _OUTPUT))
    n = len(down)
    if len(up) != n:
        raise WeightsError(f"{UNET_PREFIX}: {n} down levels (input_blocks) but {len(up)} up levels "
                           "(output_blocks): not an SD 1.x/2.x UNet")
    for i, level in enumerate(up):
        if len(level.entries) != len(down[n - 1 - i].entries) + 1:
            raise WeightsError(f"{UNET_PREFIX}output_blocks.{level.entries[0]}: up level {i} has "
                               f"{len(level.entries)} resnets, expected {len(down[n - 1 - i].entries) + 1}")
    mid = _indices(shapes, _MIDDLE)
    if mid and mid != [0, 1, 2]:
        raise WeightsError(f"{UNET_PREFIX}middle_block has parts {mid}, expected 0, 1, 2 (resnet, attention, "
                           "resnet)")
    attentions = [f"input_blocks.{k}.1." for lv in down if lv.attention for k in lv.entries]
    attentions += ["middle_block.1."] if mid else []
    attentions += [f"output_blocks.{k}.1." for lv in up if lv.attention for k in lv.entries]
    return _UNetStructure(down, up, bool(mid), attentions)


_UNET_FIXED = {
    "input_blocks.0.0.": ("conv_in.", "param"),
    "time_embed.0.": ("time_embedding.linear_1.", "param"),
    "time_embed.2.": ("time_embedding.linear_2.", "param"),
    "time_embed.cond_proj.": ("time_embedding.cond_proj.", "param"),  # LCM's guidance embedding
    "out.0.": ("conv_norm_out.", "param"),
    "out.2.": ("conv_out.", "param"),
}


def _unet_table(s: _UNetStructure) -> dict[str, tuple[str, str]]:
    table = dict(_UNET_FIXED)
    for i, level in enumerate(s.down):
        for j, k in enumerate(level.entries):
            table[f"input_blocks.{k}.0."] = (f"down_blocks.{i}.resnets.{j}.", "res")
            if level.attention:
                table[f"input_blocks.{k}.1."] = (f"down_blocks.{i}.attentions.{j}.", "attn")
        if level.sampler:
            table[level.sampler] = (f"down_blocks.{i}.downsamplers.0.conv.", "param")
    if s.mid:
        table.update({"middle_block.0.": ("mid_block.resnets.0.", "res"),
                      "middle_block.1.": ("mid_block.attentions.0.", "attn"),
                      "middle_block.2.": ("mid_block.resnets.1.", "res")})
    for i, level in enumerate(s.up):
        for j, k in enumerate(level.entries):
            table[f"output_blocks.{k}.0."] = (f"up_blocks.{i}.resnets.{j}.", "res")
            if level.attention:
                table[f"output_blocks.{k}.1."] = (f"up_blocks.{i}.attentions.{j}.", "attn")
        if level.sampler:
            table[level.sampler] = (f"up_blocks.{i}.upsamplers.0.conv.", "param")
    return table


def _read_unet(shapes: Mapping[str, tuple[int, ...]]) -> _Part:
    structure = _unet_structure(shapes)
    part = _Part({}, {}, structure=structure)
    _map_by_table(shapes, _unet_table(structure), UNET_PREFIX, part)
    return part


def _in_channels(shapes: Mapping[str, tuple[int, ...]]) -> int:
    c = _shape(shapes, "input_blocks.0.0.weight", 4, UNET_PREFIX)[1]
    refusals = {8: "this is an instruct-pix2pix UNet (8 input channels: latents and the input image); " + ONLY
                   + " (text-to-image)",
                5: "this is an SD 2 depth-to-image UNet (5 input channels); " + ONLY + " (text-to-image)"}
    if c in refusals:
        raise UnsupportedCheckpoint(refusals[c])
    return c


def _transformer_depths(s: _UNetStructure, shapes: Mapping[str, tuple[int, ...]]) -> int | list[int]:
    """transformer_layers_per_block: transformer blocks per spatial transformer, per down block (the up and
    mid blocks must agree, as diffusers builds them)."""
    def depth(att_prefix: str) -> int:
        blocks = _indices((k[len(att_prefix):] for k in shapes if k.startswith(att_prefix)), _TBLOCK)
        _contiguous(blocks, f"{UNET_PREFIX}{att_prefix}transformer_blocks")
        if not blocks:
            raise WeightsError(f"{UNET_PREFIX}{att_prefix}: an attention without transformer blocks")
        return len(blocks)
    n = len(s.down)
    per_block = [1] * n
    users: list[tuple[int, str]] = [(i, f"input_blocks.{k}.1.") for i, lv in enumerate(s.down) if lv.attention
                                    for k in lv.entries]
    users += [(n - 1 - i, f"output_blocks.{k}.1.") for i, lv in enumerate(s.up) if lv.attention
              for k in lv.entries]
    users += [(n - 1, "middle_block.1.")] if s.mid else []
    seen: dict[int, int] = {}
    for block, att in users:
        d = depth(att)
        if seen.setdefault(block, d) != d:
            raise WeightsError(f"{UNET_PREFIX}{att}: {d} transformer blocks where block {block}'s other attentions "
                               f"have {seen[block]}")
        per_block[block] = d
    return _uniform(per_block)


def _attention_widths(s: _UNetStructure, shapes: Mapping[str, tuple[int, ...]]) -> tuple[int | None, bool]:
    """(cross_attention_dim, use_linear_projection), the same for every spatial transformer."""
    contexts, linear = set(), set()
    for att in s.attentions:
        contexts.add(_shape(shapes, att + "transformer_blocks.0.attn2.to_k.weight", 2, UNET_PREFIX)[1])
        linear.add(len(_shape(shapes, att + "proj_in.weight", (2, 4), UNET_PREFIX)) == 2)
    if len(contexts) > 1 or len(linear) > 1:
        what = "context widths" if len(contexts) > 1 else "projections (linear and 1x1 conv)"
        raise WeightsError(f"{UNET_PREFIX}: the spatial transformers differ in {what}: not an SD 1.x/2.x UNet")
    return (contexts.pop() if contexts else None), bool(linear and linear.pop())


def _unet_config(s: _UNetStructure, shapes: Mapping[str, tuple[int, ...]], family: str) -> dict:
    ch = [_shape(shapes, f"input_blocks.{lv.entries[0]}.0.in_layers.2.weight", 4, UNET_PREFIX)[0]
          for lv in s.down]
    context, linear = _attention_widths(s, shapes)
    cfg = copy.deepcopy(SD15_UNET)
    cfg.update({
        "in_channels": _in_channels(shapes),
        "out_channels": _shape(shapes, "out.2.weight", 4, UNET_PREFIX)[0],
        "down_block_types": ["CrossAttnDownBlock2D" if lv.attention else "DownBlock2D" for lv in s.down],
        "mid_block_type": "UNetMidBlock2DCrossAttn" if s.mid else None,
        "up_block_types": ["CrossAttnUpBlock2D" if lv.attention else "UpBlock2D" for lv in s.up],
        "block_out_channels": ch,
        "layers_per_block": _uniform([len(lv.entries) for lv in s.down]),
        "cross_attention_dim": context if context is not None else cfg["cross_attention_dim"],
        "use_linear_projection": linear,
    })
    if family == "sd2":
        cfg.update(attention_head_dim=[_heads(c) for c in ch], use_linear_projection=True, upcast_attention=True)
    depth = _transformer_depths(s, shapes)
    if depth != 1:
        cfg["transformer_layers_per_block"] = depth
    if "time_embed.cond_proj.weight" in shapes:
        cfg["time_cond_proj_dim"] = _shape(shapes, "time_embed.cond_proj.weight", 2, UNET_PREFIX)[1]
    _check_unet_widths(cfg, shapes)
    return cfg


def _check_unet_widths(cfg: dict, shapes: Mapping[str, tuple[int, ...]]) -> None:
    ch = cfg["block_out_channels"]
    for key, got, want in (("input_blocks.0.0.weight", shapes["input_blocks.0.0.weight"][0], ch[0]),
                           ("time_embed.0.weight", _shape(shapes, "time_embed.0.weight", 2, UNET_PREFIX)[0],
                            4 * ch[0])):
        if got != want:
            raise WeightsError(f"{UNET_PREFIX + key!r} has {got} channels where the blocks imply {want}")
    heads = cfg["attention_head_dim"]
    heads = heads if isinstance(heads, list) else [heads] * len(ch)
    for i, c in enumerate(ch):
        if c % NORM_GROUPS or c % heads[i]:
            raise WeightsError(f"{UNET_PREFIX}: block {i} is {c} channels wide, which does not divide into "
                               f"{NORM_GROUPS} norm groups and {heads[i]} heads: not an SD 1.x/2.x UNet")


# ----------------------------------------------------------------------------------------------------- VAE

_ENC_DOWN = re.compile(r"encoder\.down\.(\d+)\.")
_DEC_UP = re.compile(r"decoder\.up\.(\d+)\.")
_BLOCK = re.compile(r"block\.(\d+)\.")


def _vae_levels(shapes: Mapping[str, tuple[int, ...]], side: str, pattern: re.Pattern, prefix: str
                ) -> list[tuple[int, bool]]:
    """Per level of the encoder (down.N) or decoder (up.N): (resnet count, has a down/upsampler)."""
    levels = _indices(shapes, pattern)
    _contiguous(levels, f"{prefix}{side}")
    out = []
    sampler = "downsample" if side.startswith("encoder") else "upsample"
    for n in levels:
        head = f"{side}.{n}."
        names = [k[len(head):] for k in shapes if k.startswith(head)]
        blocks = _indices(names, _BLOCK)
        _contiguous(blocks, f"{prefix}{head}block")
        out.append((len(blocks), any(k.startswith(sampler + ".") for k in names)))
    return out


def _vae_structure(shapes: Mapping[str, tuple[int, ...]], prefix: str) -> tuple[int, int, bool]:
    """(levels, resnets per encoder level, has the encoder), after checking the decoder and encoder agree
    and the samplers sit where SD's VAE has them."""
    dec = _vae_levels(shapes, "decoder.up", _DEC_UP, prefix)
    if not dec:
        raise WeightsError(f"no VAE decoder levels ({prefix}decoder.up.N.*) in the checkpoint")
    n = len(dec)
    layers = dec[0][0] - 1
    has_encoder = any(k.startswith("encoder.") for k in shapes)
    enc = _vae_levels(shapes, "encoder.down", _ENC_DOWN, prefix) if has_encoder else \
        [(layers, i < n - 1) for i in range(n)]
    want_dec = [(layers + 1, i > 0) for i in range(n)]
    want_enc = [(layers, i < n - 1) for i in range(n)]
    if layers < 1 or dec != want_dec or enc != want_enc:
        raise WeightsError(f"{prefix}encoder.down / decoder.up levels (resnets, sampler) {enc} / {dec} do not form "
                           "an SD VAE (the decoder has one resnet more per level, samplers between levels)")
    return n, layers, has_encoder


def _vae_table(n: int, layers: int) -> dict[str, tuple[str, str]]:
    table = {}
    for side in ("encoder", "decoder"):
        table.update({f"{side}.conv_in.": (f"{side}.conv_in.", "param"),
                      f"{side}.norm_out.": (f"{side}.conv_norm_out.", "param"),
                      f"{side}.conv_out.": (f"{side}.conv_out.", "param"),
                      f"{side}.mid.block_1.": (f"{side}.mid_block.resnets.0.", "vres"),
                      f"{side}.mid.block_2.": (f"{side}.mid_block.resnets.1.", "vres"),
                      f"{side}.mid.attn_1.": (f"{side}.mid_block.attentions.0.", "vattn")})
    table.update({"quant_conv.": ("quant_conv.", "param"), "post_quant_conv.": ("post_quant_conv.", "param")})
    for i in range(n):
        up = n - 1 - i  # the file numbers decoder levels from the highest resolution, diffusers from the lowest
        for j in range(layers + 1):
            table[f"decoder.up.{up}.block.{j}."] = (f"decoder.up_blocks.{i}.resnets.{j}.", "vres")
            if j < layers:
                table[f"encoder.down.{i}.block.{j}."] = (f"encoder.down_blocks.{i}.resnets.{j}.", "vres")
        table[f"encoder.down.{i}.downsample.conv."] = (f"encoder.down_blocks.{i}.downsamplers.0.conv.", "param")
        table[f"decoder.up.{up}.upsample.conv."] = (f"decoder.up_blocks.{i}.upsamplers.0.conv.", "param")
    return table


def _read_vae(shapes: Mapping[str, tuple[int, ...]], prefix: str) -> _Part:
    n, layers, has_encoder = _vae_structure(shapes, prefix)
    part = _Part({}, {})
    _map_by_table(shapes, _vae_table(n, layers), prefix, part)
    ch = [_shape(shapes, f"decoder.up.{i}.block.0.conv2.weight", 4, prefix)[0] for i in range(n)]
    latent = _shape(shapes, "decoder.conv_in.weight", 4, prefix)[1]
    cfg = copy.deepcopy(SD15_VAE)
    cfg.update({
        "in_channels": _shape(shapes, "encoder.conv_in.weight", 4, prefix)[1] if has_encoder else 3,
        "out_channels": _shape(shapes, "decoder.conv_out.weight", 4, prefix)[0],
        "down_block_types": ["DownEncoderBlock2D"] * n,
        "up_block_types": ["UpDecoderBlock2D"] * n,
        "block_out_channels": ch,
        "layers_per_block": layers,
        "latent_channels": latent,
    })
    if "post_quant_conv.weight" not in shapes:
        cfg["use_post_quant_conv"] = False
    if has_encoder and "quant_conv.weight" not in shapes:
        cfg["use_quant_conv"] = False
    if not any(k.startswith("decoder.mid.attn_1.") for k in shapes):
        cfg["mid_block_add_attention"] = False
    _check_vae_widths(cfg, shapes, prefix, has_encoder)
    part.config = cfg
    return part


def _check_vae_widths(cfg: dict, shapes: Mapping[str, tuple[int, ...]], prefix: str, has_encoder: bool) -> None:
    ch, latent = cfg["block_out_channels"], cfg["latent_channels"]
    checks = [("decoder.conv_in.weight", 0, ch[-1])]
    if has_encoder:
        checks += [("encoder.conv_in.weight", 0, ch[0]), ("encoder.conv_out.weight", 0, 2 * latent)]
    for key, dim, want in checks:
        got = _shape(shapes, key, 4, prefix)[dim]
        if got != want:
            raise WeightsError(f"{prefix + key!r} has {got} channels where the VAE's blocks imply {want}")
    for c in ch:
        if c % NORM_GROUPS:
            raise WeightsError(f"{prefix}: a VAE level is {c} channels wide, not a multiple of {NORM_GROUPS} norm "
                               "groups: not an SD VAE")


# ---------------------------------------------------------------------------------------------- text encoders

_CLIP_NAME = re.compile(r"embeddings\.(token|position)_embedding\.weight|encoder\.layers\.\d+\.(self_attn\."
                        r"(q|k|v|out)_proj|layer_norm[12]|mlp\.fc[12])\.(weight|bias)|final_layer_norm\.(weight|bias)")
_LAYER = re.compile(r"encoder\.layers\.(\d+)\.")
_RESBLOCK = re.compile(r"transformer\.resblocks\.(\d+)\.")


def _text_config(base: dict, hidden: int, vocab: int, positions: int, layers: int, intermediate: int) -> dict:
    cfg = copy.deepcopy(base)
    cfg.update(vocab_size=vocab, hidden_size=hidden, intermediate_size=intermediate, num_hidden_layers=layers,
               num_attention_heads=_heads(hidden), max_position_embeddings=positions)
    return cfg


def _read_clip(shapes: Mapping[str, tuple[int, ...]]) -> _Part:
    """SD 1.x: OpenAI CLIP ViT-L in transformers' names, `text_model.*` (very old files lack that level)."""
    part = _Part({}, {})
    inner: dict[str, tuple[int, ...]] = {}
    for key in shapes:
        name = key[len("text_model."):] if key.startswith("text_model.") else key
        if name == "embeddings.position_ids":
            part.ignored[POSITION_IDS] += 1
        elif not _CLIP_NAME.fullmatch(name):
            part.unmapped.append(CLIP_PREFIX + key)
        elif "text_model." + name in part.mapping:
            raise WeightsError(f"{CLIP_PREFIX + key!r} and {part.mapping['text_model.' + name].key!r} are the same "
                               "text encoder weight")
        else:
            part.mapping["text_model." + name] = Source(CLIP_PREFIX + key)
            inner[name] = shapes[key]
    if part.unmapped:
        return part
    layers = _indices(inner, _LAYER)
    _contiguous(layers, CLIP_PREFIX + "text_model.encoder.layers")
    where = CLIP_PREFIX + "text_model."
    vocab, hidden = _shape(inner, "embeddings.token_embedding.weight", 2, where)
    positions = _shape(inner, "embeddings.position_embedding.weight", 2, where)[0]
    intermediate = _shape(inner, "encoder.layers.0.mlp.fc1.weight", 2, where)[0]
    part.config = _text_config(SD15_TEXT, hidden, vocab, positions, len(layers), intermediate)
    part.config["projection_dim"] = hidden
    return part


_OPENCLIP_FIXED = {
    "token_embedding.weight": "text_model.embeddings.token_embedding.weight",
    "positional_embedding": "text_model.embeddings.position_embedding.weight",
    "ln_final.weight": "text_model.final_layer_norm.weight",
    "ln_final.bias": "text_model.final_layer_norm.bias",
}
_OPENCLIP_IGNORED = {"text_projection": PROJECTION, "logit_scale": PROJECTION, "attn_mask": ATTN_MASK}
_OPENCLIP_LAYER = {
    "ln_1.weight": "layer_norm1.weight", "ln_1.bias": "layer_norm1.bias",
    "ln_2.weight": "layer_norm2.weight", "ln_2.bias": "layer_norm2.bias",
    "attn.out_proj.weight": "self_attn.out_proj.weight", "attn.out_proj.bias": "self_attn.out_proj.bias",
    "mlp.c_fc.weight": "mlp.fc1.weight", "mlp.c_fc.bias": "mlp.fc1.bias",
    "mlp.c_proj.weight": "mlp.fc2.weight", "mlp.c_proj.bias": "mlp.fc2.bias",
}
_FUSED = {"attn.in_proj_weight": "weight", "attn.in_proj_bias": "bias"}


def _map_resblock(key: str, rest: str, layer: int, part: _Part) -> None:
    out = f"text_model.encoder.layers.{layer}."
    if rest in _OPENCLIP_LAYER:
        part.mapping[out + _OPENCLIP_LAYER[rest]] = Source(OPENCLIP_PREFIX + key)
    elif rest in _FUSED:
        for i, proj in enumerate(("q_proj", "k_proj", "v_proj")):
            part.mapping[f"{out}self_attn.{proj}.{_FUSED[rest]}"] = Source(OPENCLIP_PREFIX + key, chunk=(i, 3))
    else:
        part.unmapped.append(OPENCLIP_PREFIX + key)


def _read_openclip(shapes: Mapping[str, tuple[int, ...]]) -> _Part:
    """SD 2.x: OpenCLIP ViT-H's text tower, as transformers' CLIPTextModel without its last layer (SD 2.x
    takes the penultimate layer's output through the final layer norm)."""
    part = _Part({}, {})
    blocks = _indices(shapes, _RESBLOCK)
    _contiguous(blocks, OPENCLIP_PREFIX + "transformer.resblocks")
    if len(blocks) < 2:
        raise WeightsError(f"{OPENCLIP_PREFIX}transformer.resblocks: {len(blocks)} layer(s); SD 2.x's text "
                           "encoder has 24 (it uses the penultimate)")
    last = blocks[-1]
    for key in shapes:
        m = _RESBLOCK.match(key)
        if m and int(m[1]) == last:
            part.ignored[LAST_LAYER] += 1
        elif m:
            _map_resblock(key, key[m.end():], int(m[1]), part)
        elif key in _OPENCLIP_FIXED:
            part.mapping[_OPENCLIP_FIXED[key]] = Source(OPENCLIP_PREFIX + key)
        elif key in _OPENCLIP_IGNORED:
            part.ignored[_OPENCLIP_IGNORED[key]] += 1
        else:
            part.unmapped.append(OPENCLIP_PREFIX + key)
    vocab, hidden = _shape(shapes, "token_embedding.weight", 2, OPENCLIP_PREFIX)
    positions = _shape(shapes, "positional_embedding", 2, OPENCLIP_PREFIX)[0]
    intermediate = _shape(shapes, "transformer.resblocks.0.mlp.c_fc.weight", 2, OPENCLIP_PREFIX)[0]
    fused = _shape(shapes, "transformer.resblocks.0.attn.in_proj_weight", 2, OPENCLIP_PREFIX)
    if fused != (3 * hidden, hidden):
        raise WeightsError(f"{OPENCLIP_PREFIX}transformer.resblocks.0.attn.in_proj_weight has shape {list(fused)}, "
                           f"expected [{3 * hidden}, {hidden}] (q, k and v of width {hidden})")
    part.config = _text_config(SD21_TEXT, hidden, vocab, positions, len(blocks) - 1, intermediate)
    return part


# ------------------------------------------------------------------------------------------------- coherence

def _check_coherent(unet: dict, vae: dict, text: dict) -> None:
    """The three networks fit together: the text width is the UNet's context width, the UNet denoises the
    VAE's latents."""
    if text["hidden_size"] != unet["cross_attention_dim"]:
        raise WeightsError(f"the text encoder is {text['hidden_size']} wide but the UNet attends to "
                           f"{unet['cross_attention_dim']}-wide context: parts of different models")
    inputs = (vae["latent_channels"], 2 * vae["latent_channels"] + 1)  # + mask and masked image: inpainting
    if unet["in_channels"] not in inputs or unet["out_channels"] != vae["latent_channels"]:
        raise UnsupportedCheckpoint(f"the UNet takes {unet['in_channels']} channels and predicts "
                                    f"{unet['out_channels']}, the VAE has {vae['latent_channels']} latent channels; "
                                    + ONLY + " (text-to-image UNets)")
