"""LoRA files: low-rank weight deltas for the UNet and the text encoder, read from `.safetensors` (mapped).

Two layouts are read:

- kohya / A1111 (also LyCORIS "LoCon" and LCM-LoRA): `lora_unet_<module>.lora_down.weight`,
  `.lora_up.weight`, optional `.alpha`; `lora_te_<module>` for the text encoder. `<module>` is the module's
  name with `_` for `.`, in diffusers' names (`down_blocks_0_attentions_0_proj_in`, how kohya trains SD 1.x)
  or the original LDM ones (`input_blocks_1_1_proj_in`). A conv layer's LoRA is a conv of the layer's kernel
  (in -> rank) followed by a 1x1 conv (rank -> out).
- diffusers / PEFT: `unet.<module>.lora_A.weight` / `.lora_B.weight` (`text_encoder.` for the text encoder),
  the rank and alpha from the file's `lora_adapter_metadata` when present (else alpha = rank).

`read_lora(path)` reads the key names (no tensor data); `bind(lora, network, shapes)` matches them to a
network's Linear/Conv2d layers by name and shape and returns, per module name (sdlite's = diffusers' names),
a `LoRALayer` (down, up, alpha / rank, kind). The delta a layer gets is user_scale * alpha/rank * up @ down.
Keys this reader does not know, or that name modules the model lacks or with other shapes (an SD 2.x LoRA on
SD 1.x), raise WeightsError naming the first keys.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field

import torch

from ..errors import WeightsError
from .safetensors_mmap import SafetensorsFile, open_safetensors
from .state_dict import format_names

__all__ = ["LoRAFile", "LoRALayer", "NETWORKS", "bind", "read_lora", "short_hash"]

NETWORKS = ("unet", "text_encoder")
KOHYA_PREFIXES = {"lora_unet_": "unet", "lora_te_": "text_encoder", "lora_te1_": "text_encoder"}
KOHYA_SUFFIXES = {"lora_down.weight": "down", "lora_up.weight": "up", "alpha": "alpha"}
PEFT_PREFIXES = {"unet.": "unet", "text_encoder.": "text_encoder"}
PEFT_SUFFIXES = {"lora_A.weight": "down", "lora_B.weight": "up", "alpha": "alpha"}
METADATA_KEY = "lora_adapter_metadata"


@dataclass(frozen=True)
class LoRALayer:
    """One layer's low-rank pair, as stored (mapped views): down [r, in] or [r, in, kh, kw], up [out, r] or
    [out, r, 1, 1]; `alpha_scale` = alpha / r; `kind` "linear" or "conv" (the layer's); `keys` its file keys."""
    down: torch.Tensor
    up: torch.Tensor
    alpha_scale: float
    kind: str
    keys: tuple[str, ...]

    @property
    def rank(self) -> int:
        return self.down.shape[0]

    def fp32_bytes(self) -> int:
        return 4 * (self.down.numel() + self.up.numel())


@dataclass
class _Entry:
    network: str
    name: str   # the flat kohya name, or the PEFT module name
    keys: dict[str, str] = field(default_factory=dict)  # "down" / "up" / "alpha" -> file key


@dataclass
class LoRAFile:
    """A mapped LoRA file: its layers by network and name as the file names them (not yet matched)."""
    path: str
    format: str                     # "kohya" or "peft"
    file: SafetensorsFile
    entries: dict[str, dict[str, _Entry]]   # network -> name -> entry
    alphas: dict[str, tuple[float, int, dict, dict]] = field(default_factory=dict)  # PEFT metadata per network
    _hash: str | None = None

    @property
    def name(self) -> str:
        """The file name without `.safetensors`: what A1111's `<lora:NAME:...>` tags and infotext use."""
        base = os.path.basename(self.path)
        return base[:-len(".safetensors")] if base.endswith(".safetensors") else base

    def networks(self) -> list[str]:
        return [n for n in NETWORKS if self.entries.get(n)]

    def short_hash(self) -> str:
        """A1111's LoRA hash (`Lora hashes:` in infotext): the first 12 hex digits of the sha256 of the file's
        tensor data (the bytes after the header), as the additional-networks extension computes it."""
        if self._hash is None:
            self._hash = short_hash(self.path)
        return self._hash

    def close(self) -> None:
        self.file.close()


def short_hash(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        n = int.from_bytes(f.read(8), "little")
        f.seek(8 + n)
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()[:12]


def _split(key: str, prefixes: Mapping[str, str], suffixes: Mapping[str, str]):
    for prefix, network in prefixes.items():
        if key.startswith(prefix):
            for suffix, role in suffixes.items():
                if key.endswith("." + suffix) and len(key) > len(prefix) + len(suffix) + 1:
                    return network, key[len(prefix):-len(suffix) - 1], role
    return None


def read_lora(path: str | os.PathLike) -> LoRAFile:
    """Map a LoRA `.safetensors` file and sort its keys into layers. Raises WeightsError for another file
    type, unknown keys (naming the first), or a layer missing its down or up weight."""
    path = os.fspath(path)
    if not path.endswith(".safetensors"):
        raise WeightsError(f"{path}: LoRAs are read from .safetensors files only")
    f = open_safetensors(path)
    try:
        keys = list(f.keys())
        fmt = "peft" if any(".lora_A." in k or ".lora_B." in k for k in keys) else "kohya"
        prefixes, suffixes = (PEFT_PREFIXES, PEFT_SUFFIXES) if fmt == "peft" else (KOHYA_PREFIXES, KOHYA_SUFFIXES)
        entries: dict[str, dict[str, _Entry]] = {}
        unknown = []
        for key in keys:
            parts = _split(key, prefixes, suffixes)
            if parts is None:
                unknown.append(key)
                continue
            network, name, role = parts
            entry = entries.setdefault(network, {}).setdefault(name, _Entry(network, name))
            entry.keys[role] = key
        if unknown:
            raise WeightsError(f"{path}: not a LoRA this reader knows ({fmt} layout): unknown keys "
                               f"{format_names(unknown)} (read: kohya lora_down/lora_up/alpha, PEFT lora_A/lora_B)")
        incomplete = [e.keys.get("down") or e.keys.get("up") or e.keys["alpha"]
                      for net in entries.values() for e in net.values() if not {"down", "up"} <= set(e.keys)]
        if incomplete:
            raise WeightsError(f"{path}: layers without both a down and an up weight: {format_names(incomplete)}")
        if not entries:
            raise WeightsError(f"{path}: holds no LoRA layers")
        lora = LoRAFile(path, fmt, f, entries)
        if fmt == "peft":
            lora.alphas = _peft_alphas(path, f.metadata)
        return lora
    except BaseException:
        f.close()
        raise


def _peft_alphas(path: str, metadata: Mapping[str, str]) -> dict:
    """network -> (lora_alpha, r, alpha_pattern, rank_pattern) from diffusers' `lora_adapter_metadata`."""
    raw = (metadata or {}).get(METADATA_KEY)
    if not raw:
        return {}
    try:
        meta = json.loads(raw)
    except ValueError:
        raise WeightsError(f"{path}: {METADATA_KEY} is not JSON") from None
    out = {}
    for network in NETWORKS:
        r, alpha = meta.get(f"{network}.r"), meta.get(f"{network}.lora_alpha")
        if isinstance(r, (int, float)) and isinstance(alpha, (int, float)) and r > 0:
            out[network] = (float(alpha), int(r), meta.get(f"{network}.alpha_pattern") or {},
                            meta.get(f"{network}.rank_pattern") or {})
    return out


def _pattern_value(patterns: Mapping, module: str):
    for pattern, value in patterns.items():
        if re.fullmatch(rf"(.*\.)?{pattern}", module):
            return value
    return None


# --- names: the flat kohya names of a network's modules ------------------------------------------------------

_BLOCK = re.compile(r"(down_blocks|up_blocks)\.(\d+)\.(resnets|attentions)\.(\d+)\.")
_RESNET_LDM = {"conv1": "in_layers.2", "time_emb_proj": "emb_layers.1", "conv2": "out_layers.3",
               "conv_shortcut": "skip_connection"}
_UNET_FIXED_LDM = {"conv_in": "input_blocks.0.0", "time_embedding.linear_1": "time_embed.0",
                   "time_embedding.linear_2": "time_embed.2", "conv_out": "out.2"}


def _ldm_prefixes(names) -> dict[str, str]:
    """diffusers block prefix -> LDM prefix ("down_blocks.1.attentions.0." -> "input_blocks.4.1."), from the
    blocks the module names show (SD's layout: each level's resnets, then its down/upsampler)."""
    counts: dict[tuple[str, int], int] = {}
    attn: set[tuple[str, int]] = set()
    samplers: set[tuple[str, int]] = set()
    for n in names:
        m = _BLOCK.match(n)
        if m:
            level = (m[1], int(m[2]))
            counts[level] = max(counts.get(level, 0), int(m[4]) + 1)
            if m[3] == "attentions":
                attn.add(level)
        elif re.match(r"(down|up)_blocks\.\d+\.(down|up)samplers\.0\.conv$", n):
            side = n.split(".")[0]
            samplers.add((side, int(n.split(".")[1])))
    table = {"mid_block.resnets.0.": "middle_block.0.", "mid_block.attentions.0.": "middle_block.1.",
             "mid_block.resnets.1.": "middle_block.2."}
    k = 1
    for i in range(sum(1 for s, _ in counts if s == "down_blocks")):
        for j in range(counts[("down_blocks", i)]):
            table[f"down_blocks.{i}.resnets.{j}."] = f"input_blocks.{k}.0."
            table[f"down_blocks.{i}.attentions.{j}."] = f"input_blocks.{k}.1."
            k += 1
        if ("down_blocks", i) in samplers:
            table[f"down_blocks.{i}.downsamplers.0.conv."] = f"input_blocks.{k}.0.op."
            k += 1
    k = 0
    for i in range(sum(1 for s, _ in counts if s == "up_blocks")):
        for j in range(counts[("up_blocks", i)]):
            table[f"up_blocks.{i}.resnets.{j}."] = f"output_blocks.{k}.0."
            table[f"up_blocks.{i}.attentions.{j}."] = f"output_blocks.{k}.1."
            k += 1
        if ("up_blocks", i) in samplers:
            slot = 2 if ("up_blocks", i) in attn else 1
            table[f"up_blocks.{i}.upsamplers.0.conv."] = f"output_blocks.{k - 1}.{slot}.conv."
    return table


def _ldm_name(name: str, table: Mapping[str, str]) -> str | None:
    if name in _UNET_FIXED_LDM:
        return _UNET_FIXED_LDM[name]
    for prefix, ldm in table.items():
        if (name + ".").startswith(prefix):
            rest = name[len(prefix):]
            if "resnets." in prefix:
                rest = _RESNET_LDM.get(rest, rest)
            return (ldm + rest).rstrip(".")
    return None


def _text_model_less(network: str, names) -> dict[str, str]:
    """The text encoder's module names as transformers >= 5 spells them (no `text_model.`) -> sdlite's."""
    if network != "text_encoder":
        return {}
    return {n[len("text_model."):]: n for n in names if n.startswith("text_model.")}


def kohya_names(network: str, names) -> dict[str, str]:
    """Flat kohya name -> module name, for a network's module names: diffusers' spelling always, the LDM
    spelling too for the UNet."""
    names = list(names)
    out = {n.replace(".", "_"): n for n in names}
    out.update({k.replace(".", "_"): n for k, n in _text_model_less(network, names).items()})
    if network == "unet":
        table = _ldm_prefixes(names)
        for n in names:
            ldm = _ldm_name(n, table)
            if ldm is not None:
                out.setdefault(ldm.replace(".", "_"), n)
    return out


# --- binding to a network ------------------------------------------------------------------------------------

def _fit(entry: _Entry, down: torch.Tensor, up: torch.Tensor, shape: tuple[int, ...]) -> str | None:
    """None when the pair fits a layer of weight shape `shape`, else the reason."""
    out_dim, in_dim = shape[0], shape[1]
    kernel = tuple(shape[2:])
    if down.ndim not in (2, 4) or up.ndim != down.ndim or down.shape[0] != up.shape[1]:
        return f"down {list(down.shape)} and up {list(up.shape)} are not a low-rank pair"
    if up.ndim == 4 and tuple(up.shape[2:]) != (1, 1):
        return f"up {list(up.shape)} is not a 1x1 conv"
    if down.shape[1] != in_dim or up.shape[0] != out_dim:
        return f"down {list(down.shape)} / up {list(up.shape)} do not fit the layer's weight {list(shape)}"
    down_kernel = tuple(down.shape[2:]) or (1, 1)
    if down_kernel != (kernel or (1, 1)):
        return f"down kernel {list(down_kernel)} does not fit the layer's weight {list(shape)}"
    return None


def _alpha_scale(lora: LoRAFile, entry: _Entry, module: str, rank: int) -> float:
    if "alpha" in entry.keys:
        return float(lora.file[entry.keys["alpha"]].float().reshape(-1)[0]) / rank
    meta = lora.alphas.get(entry.network)
    if meta is None:
        return 1.0
    alpha, r, alpha_pattern, rank_pattern = meta
    alpha = _pattern_value(alpha_pattern, module) or alpha
    r = _pattern_value(rank_pattern, module) or r
    return float(alpha) / float(r)


def bind(lora: LoRAFile, network: str, shapes: Mapping[str, tuple[int, ...]]) -> dict[str, LoRALayer]:
    """Match `lora`'s layers for `network` to its Linear/Conv2d layers, `shapes`: module name -> weight shape.
    Returns module name -> LoRALayer. Raises WeightsError naming the first keys that name no module of the
    model, or whose shapes do not fit it (a LoRA made for another model)."""
    entries = lora.entries.get(network, {})
    if lora.format == "kohya":
        lookup = kohya_names(network, shapes)
    else:
        lookup = {**_text_model_less(network, shapes), **{n: n for n in shapes}}
    out: dict[str, LoRALayer] = {}
    missing, misfit = [], []
    for name, entry in entries.items():
        module = lookup.get(name)
        if module is None:
            missing.append(entry.keys["down"])
            continue
        down, up = lora.file[entry.keys["down"]], lora.file[entry.keys["up"]]
        problem = _fit(entry, down, up, tuple(shapes[module]))
        if problem:
            misfit.append(f"{entry.keys['down']} ({problem})")
            continue
        kind = "conv" if len(shapes[module]) == 4 else "linear"
        out[module] = LoRALayer(down, up, _alpha_scale(lora, entry, module, down.shape[0]), kind,
                                tuple(entry.keys.values()))
    if missing:
        raise WeightsError(f"{lora.path}: {len(missing)} LoRA layers name no {network} module of this model "
                           f"(a LoRA for another model?): {format_names(missing)}")
    if misfit:
        raise WeightsError(f"{lora.path}: {len(misfit)} LoRA layers do not fit this model's {network} (a LoRA "
                           f"for another model?): {format_names(misfit, 3)}")
    return out
