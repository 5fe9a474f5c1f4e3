"""Applying LoRAs to loaded networks, without a dense copy of any network.

Each targeted Linear/Conv2d layer gets an `Adapter` holding its LoRAs' low-rank pairs in fp32, the user scale
times alpha/rank folded into `up`, and several LoRAs on one layer concatenated along the rank. Two ways to use
it (`METHODS`):

- "side" (the default): y = layer(x) + up(down(x)), a side path of two small matmuls (convs for LoCon: the
  layer's kernel, stride and padding in -> rank, then 1x1 rank -> out) beside the layer's own;
- "merge": W + up @ down computed per layer at dequantization time, into the per-layer workspace (and per
  channel slice when the layer is chunked), so no persistent copy either.

Residency attaches adapters when it loads a network and detaches them when it drops it (`attach` / `detach`).
Measured on the bk-sdm-tiny random model (64x64 latents, CFG batch 2, 2 threads), rank-16 LoRA on every
layer it names: see README "LoRA" and bench numbers there.
"""

from __future__ import annotations

import os
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import InvalidRequest, WeightsError
from ..models.clip_text import CLIPTextModel
from ..models.unet import UNet2DConditionModel
from ..tokenizer.prompt_syntax import extract_extra_networks
from ..weights.lora import LoRAFile, LoRALayer, bind, read_lora
from .lazy_weights import _Lazy

METHODS = ("side", "merge")
DEFAULT_METHOD = "side"
STAGES = ("text_encoder", "unet")


@dataclass
class ActiveLoRA:
    """A LoRA file at a scale, bound to the model: stage -> module name -> its layer."""
    file: LoRAFile
    scale: float
    bound: dict[str, dict[str, LoRALayer]]

    @property
    def name(self) -> str:
        return self.file.name

    def fp32_bytes(self, stage: str) -> int:
        return sum(layer.fp32_bytes() for layer in self.bound.get(stage, {}).values())


def _shapes(folder, stage: str) -> dict[str, tuple[int, ...]]:
    """Module name -> weight shape of the stage's Linear/Conv2d layers, built on `meta` (no memory)."""
    from .components import text_config, unet_config
    with torch.device("meta"):
        net = UNet2DConditionModel(unet_config(folder)) if stage == "unet" else CLIPTextModel(text_config(folder))
    return {name: tuple(m.weight.shape) for name, m in net.named_modules() if isinstance(m, (nn.Linear, nn.Conv2d))}


class LoRASet:
    """The LoRAs one model has opened, bound once per file (shapes of its networks computed once)."""

    def __init__(self, folder, lora_dir: str | os.PathLike | None = None):
        self.folder, self.lora_dir = folder, lora_dir
        self._shapes: dict[str, dict] = {}
        self._files: dict[str, tuple[LoRAFile, dict]] = {}

    def resolve(self, name: str, paths: bool = True) -> Path:
        """A path as given (when `paths`), or NAME / NAME.safetensors in the LoRA folder. InvalidRequest("loras")
        if none."""
        bare = os.sep not in name and "/" not in name and name not in (".", "..")
        candidates = [Path(name)] if paths else []
        if self.lora_dir is not None and bare:
            candidates += [Path(self.lora_dir) / name, Path(self.lora_dir) / f"{name}.safetensors"]
        for c in candidates:
            if c.is_file():
                return c
        where = f" nor in {self.lora_dir}" if self.lora_dir is not None else " (no LoRA folder given)"
        raise InvalidRequest("loras", f"no LoRA file {name!r}{where}")

    def open(self, name_or_path: str | os.PathLike, scale: float, paths: bool = True) -> ActiveLoRA:
        path = str(self.resolve(os.fspath(name_or_path), paths).resolve())
        cached = self._files.get(path)
        if cached is None:
            lora = read_lora(path)
            try:
                bound = {}
                for stage in STAGES:
                    if stage not in self._shapes:
                        self._shapes[stage] = _shapes(self.folder, stage)
                    bound[stage] = bind(lora, stage, self._shapes[stage])
            except BaseException:
                lora.close()
                raise
            cached = self._files[path] = (lora, bound)
        return ActiveLoRA(cached[0], float(scale), cached[1])

    def open_all(self, specs, paths: bool = True) -> list[ActiveLoRA]:
        """[(name or path, scale), ...] -> the LoRAs to apply; scale 0 leaves a LoRA out (it is still read
        and checked). `paths` False: names in the LoRA folder only (prompt tags, which a service's users write)."""
        out = [self.open(name, scale, paths) for name, scale in specs]
        return [a for a in out if a.scale != 0]

    def close(self) -> None:
        for lora, _ in self._files.values():
            lora.close()
        self._files.clear()


def compute_dtype(layer: nn.Module) -> torch.dtype:
    """The dtype `layer` computes in: a lazy layer's (runtime.lazy_weights), else its weight's float dtype."""
    dtype = getattr(layer, "compute_dtype", None)
    if dtype is not None:
        return dtype
    w = getattr(layer, "weight", None)
    return w.dtype if w is not None and w.is_floating_point() else torch.float32


class Adapter:
    """The low-rank pairs of one layer, user scale and alpha/rank folded into `up`, held in the layer's
    compute dtype (fp32; bf16 / fp16 under a reduced precision, see runtime.precision)."""

    def __init__(self, layer: nn.Module, parts: list[tuple[LoRALayer, float]], method: str):
        conv = isinstance(layer, nn.Conv2d)
        dtype = compute_dtype(layer)
        downs, ups = [], []
        for lora, scale in parts:
            down, up = lora.down.float(), lora.up.float() * (scale * lora.alpha_scale)
            if conv:
                down = down.reshape(down.shape[0], down.shape[1], *layer.kernel_size)
                up = up.reshape(up.shape[0], up.shape[1], 1, 1)
            else:
                down, up = down.reshape(down.shape[0], -1), up.reshape(up.shape[0], -1)
            downs.append(down)
            ups.append(up)
        self.down = torch.cat(downs, 0).to(dtype).contiguous()
        self.up = torch.cat(ups, 1).to(dtype).contiguous()
        self.layer, self.conv, self.method = layer, conv, method

    def nbytes(self) -> int:
        return self.down.element_size() * (self.down.numel() + self.up.numel())

    def side(self, x: torch.Tensor) -> torch.Tensor:
        if self.conv:
            c = self.layer
            h = F.conv2d(x, self.down, None, c.stride, c.padding, c.dilation)
            return F.conv2d(h, self.up)
        return F.linear(F.linear(x, self.down), self.up)

    def merge(self, rows: torch.Tensor, start: int, stop: int) -> None:
        """Add up[start:stop] @ down to `rows`, the layer's weight rows start:stop in its compute dtype (a
        workspace)."""
        rows.view(stop - start, -1).addmm_(self.up[start:stop].reshape(stop - start, -1),
                                           self.down.reshape(self.down.shape[0], -1))

    def hook(self, module: nn.Module, inputs, output: torch.Tensor) -> torch.Tensor:
        """A forward hook for layers that are not lazy (weights materialized at load)."""
        return output + self.side(inputs[0].to(self.down.dtype)).to(output.dtype)


@dataclass
class Attached:
    """What `attach` did to one network: undone by `detach`."""
    adapters: dict[str, Adapter]
    handles: list

    def nbytes(self) -> int:
        return sum(a.nbytes() for a in self.adapters.values())


def attach(module: nn.Module, stage: str, loras: list[ActiveLoRA], method: str = DEFAULT_METHOD) -> Attached:
    """Give every layer of `module` that a LoRA targets its adapter."""
    if method not in METHODS:
        raise ValueError(f"LoRA method must be one of {METHODS}, got {method!r}")
    parts: dict[str, list] = {}
    for lora in loras:
        for name, layer in lora.bound.get(stage, {}).items():
            parts.setdefault(name, []).append((layer, lora.scale))
    layers = dict(module.named_modules())
    attached = Attached({}, [])
    for name, pairs in parts.items():
        layer = layers.get(name)
        if layer is None:
            raise WeightsError(f"LoRA targets {name!r}, which the loaded {stage} lacks")
        adapter = Adapter(layer, pairs, method)
        if isinstance(layer, _Lazy):
            layer.lora = adapter
        else:
            attached.handles.append(layer.register_forward_hook(adapter.hook))
        attached.adapters[name] = adapter
    return attached


def detach(attached: Attached | None) -> None:
    """Undo `attach`: no adapter, hook or LoRA tensor stays on the network."""
    if attached is None:
        return
    for adapter in attached.adapters.values():
        if adapter.layer.__dict__.get("lora") is adapter:
            del adapter.layer.lora
        adapter.layer = None
    for handle in attached.handles:
        handle.remove()
    attached.adapters.clear()
    attached.handles.clear()


def attached_adapters(module: nn.Module) -> int:
    """How many layers of `module` carry a LoRA now (lazy adapters and forward hooks)."""
    return sum(1 for m in module.modules() if m.__dict__.get("lora") is not None or m._forward_hooks)


def loras_from_prompt(prompt: str) -> tuple[str, list[tuple[str, float]]]:
    """A1111's `<lora:NAME:SCALE>` (and `<lyco:...>`) prompt tags: (the prompt without its tags, [(name, scale)]),
    read by `tokenizer.prompt_syntax` (whose encoder takes the tags out of the text and warns about bad ones:
    they are not warned about twice here)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return extract_extra_networks(prompt)


def lora_bytes(loras: list[ActiveLoRA]) -> dict[str, int]:
    """stage -> fp32 bytes the LoRAs' adapters take there (what the planner counts)."""
    return {stage: sum(a.fp32_bytes(stage) for a in loras) for stage in STAGES}
