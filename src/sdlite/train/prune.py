"""`sdlite prune SRC DST`: a smaller UNet by removing whole blocks, as the BK-SDM recipes do.

Kim et al. 2023, "BK-SDM: A Lightweight, Fast, and Cheap Version of Stable Diffusion" (arXiv:2305.15798):
a UNet becomes 30-50 % smaller by removing residual+attention pairs and the mid block, then is distilled
from the original (see `train.distill`); removal alone, without distillation, loses most of the quality.

Only removals that the diffusers config can still express are made, so the result is an ordinary diffusers
folder that sdlite and diffusers load with no special code. The units that can go:

    mid                       the mid block (`mid_block_type: null`, as BK-SDM-Small)
    layer:I                   one resnet (+ its attention) fewer in down block I and in up block N-1-I
                              (`layers_per_block[I]` - 1, as BK-SDM-Base; only where it is 2 or more:
                              diffusers gives up block N-1-I one layer more than down block I, so one
                              per down block is the least)
    down_blocks.I.attentions  every attention of down block I (its type becomes DownBlock2D)
    up_blocks.J.attentions    every attention of up block J (UpBlock2D)

Which resnet of a stage goes is chosen by importance among those whose removal keeps every remaining
weight's shape (the first resnet of a stage changes the width, so it often must stay):

    l1      the mean absolute weight of the unit's tensors (weight-magnitude pruning): smallest goes first
    output  the measured change of the UNet's output when the unit is removed (the relative L2 change
            of the noise prediction on the prompts given, at several timesteps): with `--target`, the
            smallest change per parameter removed goes first, measured again after each removal

The weights of everything that stays are copied unchanged (renumbered where a resnet before them went).
"""

from __future__ import annotations

import json
import math
import re
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..errors import SdliteError
from ..models.config import config_from_dict
from ..models.unet import UNet2DConditionModel, UNetConfig

RECIPES = {
    "bk-sdm-small": ("mid", "layers"),   # BK-SDM-Small: fewer resnet+attention pairs, no mid block
    "bk-sdm-base": ("layers",),          # BK-SDM-Base: fewer pairs, the mid block kept
    "no-mid": ("mid",),
    "inner-attentions": ("inner-attentions",),
}
DROPS = ("mid", "layers", "inner-attentions")  # and any block's attentions by name: "up_blocks.1.attentions"
BLOCK_ATTENTIONS = re.compile(r"(down|up)_blocks\.(\d+)\.attentions")
IMPORTANCE = ("l1", "output")


@dataclass
class Layout:
    """Which old layers a pruned UNet keeps: per down / up block the old resnet indices, in order, and
    whether the block keeps its attentions; whether the mid block stays."""

    down: list[list[int]]
    up: list[list[int]]
    down_attn: list[bool]
    up_attn: list[bool]
    mid: bool
    removed: list[str] = field(default_factory=list)

    @classmethod
    def of(cls, cfg: UNetConfig) -> "Layout":
        layers = cfg.per_block(cfg.layers_per_block, "layers_per_block")
        n = len(layers)
        return cls([list(range(layers[i])) for i in range(n)],
                   [list(range(layers[n - 1 - j] + 1)) for j in range(n)],
                   [t == "CrossAttnDownBlock2D" for t in cfg.down_block_types],
                   [t == "CrossAttnUpBlock2D" for t in cfg.up_block_types],
                   cfg.mid_block_type is not None)

    def copy(self) -> "Layout":
        return Layout([list(x) for x in self.down], [list(x) for x in self.up], list(self.down_attn),
                      list(self.up_attn), self.mid, list(self.removed))

    def config(self, base: dict) -> dict:
        """The diffusers unet config.json of this layout, from the original's."""
        cfg = dict(base)
        counts = [len(x) for x in self.down]
        cfg["layers_per_block"] = counts[0] if len(set(counts)) == 1 else counts
        cfg["down_block_types"] = ["CrossAttnDownBlock2D" if a else "DownBlock2D" for a in self.down_attn]
        cfg["up_block_types"] = ["CrossAttnUpBlock2D" if a else "UpBlock2D" for a in self.up_attn]
        cfg["mid_block_type"] = "UNetMidBlock2DCrossAttn" if self.mid else None
        return cfg

    def source_of(self, key: str) -> str | None:
        """The original's key that the pruned model's `key` takes its tensor from."""
        parts = key.split(".")
        if parts[0] in ("down_blocks", "up_blocks") and parts[2] in ("resnets", "attentions"):
            keep = (self.down if parts[0] == "down_blocks" else self.up)[int(parts[1])]
            parts[3] = str(keep[int(parts[3])])
        return ".".join(parts)


@dataclass
class Unit:
    """One removable part: `name` as the module docstring lists it, with the resnet indices it removes."""

    name: str
    kind: str                      # "mid", "layer", "attentions"
    block: int = 0                 # the down block (layer, down attentions) or up block (up attentions)
    down_index: int | None = None  # layer: which resnet of down block `block` goes
    up_index: int | None = None    # layer: which resnet of up block N-1-`block` goes
    up: bool = False               # attentions: of an up block

    def apply(self, layout: Layout) -> Layout:
        out = layout.copy()
        if self.kind == "mid":
            out.mid = False
        elif self.kind == "attentions":
            (out.up_attn if self.up else out.down_attn)[self.block] = False
        else:
            n = len(out.down)
            del out.down[self.block][self.down_index]
            del out.up[n - 1 - self.block][self.up_index]
        out.removed.append(self.name)
        return out


def _meta_shapes(config: dict) -> dict[str, tuple]:
    """Parameter name -> shape of the UNet a config builds (on the meta device: no memory)."""
    cfg = config_from_dict(UNetConfig, config)
    with torch.device("meta"):
        model = UNet2DConditionModel(cfg)
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


def fits(layout: Layout, base: dict, old_shapes: dict[str, tuple]) -> bool:
    """Whether every weight of the pruned model has the shape of the original's weight it comes from."""
    try:
        new = _meta_shapes(layout.config(base))
    except Exception:  # noqa: BLE001 - a layout the config cannot build is one that does not fit
        return False
    return all(old_shapes.get(layout.source_of(k)) == shape for k, shape in new.items())


def candidate_units(layout: Layout, base: dict, old_shapes: dict[str, tuple]) -> list[Unit]:
    """Every unit that can go from `layout` now (shape-preserving choices only)."""
    n = len(layout.down)
    units = []
    if layout.mid:
        units.append(Unit("mid", "mid"))
    for i in range(n):
        if len(layout.down[i]) >= 2:
            for di in range(len(layout.down[i])):
                for ui in range(len(layout.up[n - 1 - i])):
                    u = Unit(f"layer:{i} (down_blocks.{i}.resnets.{layout.down[i][di]}, "
                             f"up_blocks.{n - 1 - i}.resnets.{layout.up[n - 1 - i][ui]})", "layer", i, di, ui)
                    if fits(u.apply(layout), base, old_shapes):
                        units.append(u)
    for up, flags in ((False, layout.down_attn), (True, layout.up_attn)):
        for i, has in enumerate(flags):
            if has:
                units.append(Unit(f"{'up' if up else 'down'}_blocks.{i}.attentions", "attentions", i, up=up))
    return units


def _unit_keys(unit: Unit, layout: Layout, keys) -> list[str]:
    """The original's keys of the weights `unit` removes from `layout`."""
    n = len(layout.down)
    if unit.kind == "mid":
        prefixes = ["mid_block."]
    elif unit.kind == "attentions":
        prefixes = [f"{'up' if unit.up else 'down'}_blocks.{unit.block}.attentions."]
    else:
        d, u = layout.down[unit.block][unit.down_index], layout.up[n - 1 - unit.block][unit.up_index]
        prefixes = [f"down_blocks.{unit.block}.resnets.{d}.", f"up_blocks.{n - 1 - unit.block}.resnets.{u}."]
        if layout.down_attn[unit.block]:
            prefixes.append(f"down_blocks.{unit.block}.attentions.{d}.")
        if layout.up_attn[n - 1 - unit.block]:
            prefixes.append(f"up_blocks.{n - 1 - unit.block}.attentions.{u}.")
    return [k for k in keys if k.startswith(tuple(prefixes))]


def l1_importance(unit: Unit, layout: Layout, weights: dict[str, torch.Tensor]) -> float:
    """Mean absolute value of the unit's weight matrices and kernels (2-d and more)."""
    total, count = 0.0, 0
    for k in _unit_keys(unit, layout, weights):
        t = weights[k]
        if t.ndim >= 2:
            total += float(t.float().abs().sum())
            count += t.numel()
    return total / max(count, 1)


def unit_params(unit: Unit, layout: Layout, shapes: dict[str, tuple]) -> int:
    return sum(math.prod(shapes[k]) for k in _unit_keys(unit, layout, shapes))


class OutputProbe:
    """The 'output' importance: relative L2 change of the noise prediction when a unit is removed, on
    fixed noisy latents (`samples`: (x_t, t, context) triples)."""

    def __init__(self, base: dict, weights: dict[str, torch.Tensor], samples: list):
        self.base, self.weights, self.samples = base, weights, samples
        self.reference = [self._run(Layout.of(config_from_dict(UNetConfig, base)), s) for s in samples]

    def _model(self, layout: Layout) -> UNet2DConditionModel:
        model = UNet2DConditionModel(config_from_dict(UNetConfig, layout.config(self.base)))
        model.load_state_dict(pruned_state(layout, self.weights, model.state_dict().keys()))
        return model.eval()

    def _run(self, layout: Layout, sample) -> torch.Tensor:
        x, t, context = sample
        with torch.inference_mode():
            return self._model(layout)(x, t, context)

    def __call__(self, unit: Unit, layout: Layout) -> float:
        model = self._model(unit.apply(layout))
        change = 0.0
        with torch.inference_mode():
            for (x, t, context), ref in zip(self.samples, self.reference):
                out = model(x, t, context)
                change += float((out - ref).norm() / ref.norm().clamp_min(1e-12))
        return change / len(self.samples)


def pruned_state(layout: Layout, weights: dict[str, torch.Tensor], keys) -> dict[str, torch.Tensor]:
    """The pruned model's tensors (`keys`), each the original's tensor it comes from."""
    return {k: weights[layout.source_of(k)] for k in keys}


class _Pruner:
    """The removals in order, with their records (see `plan_pruning`)."""

    def __init__(self, base: dict, weights: dict[str, torch.Tensor], importance: str, probe: OutputProbe | None):
        self.base, self.weights, self.importance, self.probe = base, weights, importance, probe
        self.shapes = {k: tuple(v.shape) for k, v in weights.items()}
        self.layout = Layout.of(config_from_dict(UNetConfig, base))
        self.total = sum(math.prod(s) for s in self.shapes.values())
        self.records: list[dict] = []

    def score(self, unit: Unit) -> float:
        if self.importance == "output":
            return self.probe(unit, self.layout)
        return l1_importance(unit, self.layout, self.weights)

    def per_param(self, unit: Unit, value: float) -> float:
        """"output" per parameter removed; "l1" is a per-parameter mean already."""
        return value if self.importance == "l1" else value / max(unit_params(unit, self.layout, self.shapes), 1)

    def take(self, unit: Unit, value: float) -> None:
        self.records.append({"unit": unit.name, "params": unit_params(unit, self.layout, self.shapes),
                             f"importance_{self.importance}": round(value, 6)})
        self.layout = unit.apply(self.layout)

    def removed(self) -> int:
        return sum(r["params"] for r in self.records)

    def to_target(self, target: float) -> None:
        """The least importance per parameter removed first (a knapsack's greedy order: a big block that
        barely matters goes before a small one that matters a little), measured again after each removal."""
        if not 0 < target < 1:
            raise SdliteError(f"--target must be between 0 and 1 (a fraction of the parameters), got {target}")
        while self.removed() < target * self.total:
            units = candidate_units(self.layout, self.base, self.shapes)
            if not units:
                raise SdliteError(f"no more blocks can be removed: {self.removed() / self.total:.0%} of the "
                                  "parameters is the most this UNet can lose this way")
            scored = [(self.score(u), i, u) for i, u in enumerate(units)]
            value, _, unit = min(scored, key=lambda s: (self.per_param(s[2], s[0]), s[1]))
            self.take(unit, value)

    def attentions(self, name: str) -> None:
        """Remove the attentions of the block `name` ("down_blocks.I.attentions"); SdliteError when it has
        none or there is no such block."""
        kind, i = BLOCK_ATTENTIONS.fullmatch(name).groups()
        flags = self.layout.up_attn if kind == "up" else self.layout.down_attn
        if int(i) >= len(flags) or not flags[int(i)]:
            raise SdliteError(f"{name}: this UNet has no such attentions (its blocks with attentions: "
                              f"{', '.join(u.name for u in candidate_units(self.layout, self.base, self.shapes) if u.kind == 'attentions') or 'none'})")
        unit = Unit(name, "attentions", int(i), up=kind == "up")
        self.take(unit, self.score(unit))

    def recipe(self, drops) -> None:
        n = len(self.layout.down)
        if "mid" in drops and self.layout.mid:
            self.take(Unit("mid", "mid"), self.score(Unit("mid", "mid")))
        if "inner-attentions" in drops:
            for name in (f"down_blocks.{n - 1}.attentions", "up_blocks.0.attentions"):
                kind = self.layout.up_attn if name.startswith("up") else self.layout.down_attn
                if kind[int(name.split(".")[1])]:
                    self.attentions(name)
        for name in [d for d in drops if BLOCK_ATTENTIONS.fullmatch(d)]:
            self.attentions(name)
        if "layers" in drops:
            for i in range(n):
                units = [u for u in candidate_units(self.layout, self.base, self.shapes)
                         if u.kind == "layer" and u.block == i]
                if units:
                    value, _, unit = min(((self.score(u), j, u) for j, u in enumerate(units)), key=lambda s: s[:2])
                    self.take(unit, value)


def plan_pruning(base: dict, weights: dict[str, torch.Tensor], drops=("mid", "layers"), *,
                 target: float | None = None, importance: str = "l1", probe: OutputProbe | None = None
                 ) -> tuple[Layout, list[dict]]:
    """The layout to keep, and one record per removed unit (name, parameters, importance).

    `drops` (DROPS): the recipe's kinds of unit ("layers": one resnet fewer in every stage that can lose
    one, the least important of the shape-keeping choices; "inner-attentions": the innermost stage's
    attentions, down and up; "down_blocks.I.attentions" / "up_blocks.J.attentions": that block's). `target` (0..1) instead: remove units one at a time, the least importance per
    parameter first (importances measured again after each removal), until that fraction of the UNet's
    parameters is gone. `importance`: "l1" or "output" (needs `probe`). Raises SdliteError for an unknown
    drop or importance, or a target no sequence of units reaches."""
    if importance not in IMPORTANCE:
        raise SdliteError(f"importance must be one of {', '.join(IMPORTANCE)}, got {importance!r}")
    if importance == "output" and probe is None:
        raise SdliteError("importance 'output' needs prompts to measure on")
    unknown = [d for d in drops if d not in DROPS and not BLOCK_ATTENTIONS.fullmatch(d)]
    if unknown:
        raise SdliteError(f"unknown removal {unknown[0]!r} (one of {', '.join(DROPS)}, or a block's attentions: "
                          "down_blocks.I.attentions / up_blocks.J.attentions)")
    pruner = _Pruner(base, weights, importance, probe)
    if target is not None:
        pruner.to_target(target)
    else:
        pruner.recipe(drops)
    return pruner.layout, pruner.records


def probe_samples(folder, prompts: list[str], seed: int = 0, timesteps=(900, 600, 300, 100)) -> list:
    """Noisy latents for the 'output' importance: per timestep, a batch of the prompts' text embeddings and
    pure-noise latents scaled as the sampler would see them at that timestep (no image data needed)."""
    from ..pipeline import Pipeline
    from ..samplers import schedule
    pipe = Pipeline.load(folder, precision="fp32")
    with torch.inference_mode():
        context = torch.cat([pipe.encode_prompt(p) for p in prompts])
    h = w = pipe.native_size // pipe.vae_scale_factor
    alphas = schedule.alphas_cumprod(pipe.scheduler_config)
    gen = torch.Generator().manual_seed(seed)
    samples = []
    for t in timesteps:
        x = torch.randn((len(prompts), pipe.latent_channels, h, w), generator=gen)
        samples.append((x * float((1 - alphas[t]).sqrt()), torch.tensor(float(t)), context))
    pipe.close()
    return samples


def prune_model(src: str | Path, dst: str | Path, drops=RECIPES["bk-sdm-small"], *, target: float | None = None,
                importance: str = "l1", prompts: list[str] | None = None, seed: int = 0) -> dict:
    """Write `dst`: `src` (a diffusers folder) with its UNet pruned (see `plan_pruning`); the other parts
    copied unchanged. Returns the report: removed units, parameters and bytes before / after. Raises
    SdliteError (nothing to remove, `dst` exists, bad options), ModelFolderError / WeightsError for `src`;
    nothing is left at `dst` on failure."""
    import os

    from ..runtime.components import unet_config
    from ..weights.model_folder import ModelFolderWriter
    from ..weights.sources import open_model
    folder = open_model(src)
    if folder.source != "folder":
        raise SdliteError(f"{src}: prune reads a diffusers folder; convert a single file first (sdlite convert)")
    if os.path.lexists(dst):
        raise SdliteError(f"{dst}: already exists")
    unet_config(folder)  # validates
    base = json.loads((folder.component("unet") / "config.json").read_text(encoding="utf-8"))
    t0 = time.perf_counter()
    with folder.part("unet").open_weights() as w:  # the tensors are views of the mapped file: used inside
        weights = {k: w[k] for k in w.keys()}
        stored = {k: w.nbytes_of(k) for k in w.keys()}
        probe = None
        if importance == "output":
            if not prompts:
                raise SdliteError("--importance output needs --prompts FILE (the prompts to measure the change on)")
            probe = OutputProbe(base, weights, probe_samples(src, prompts, seed))
        layout, records = plan_pruning(base, weights, drops, target=target, importance=importance, probe=probe)
        if not records:
            raise SdliteError("nothing to remove: " + _why_nothing(base))
        config = layout.config(base)
        keys = _meta_shapes(config).keys()
        tensors = pruned_state(layout, weights, keys)
        params_before = sum(t.numel() for t in weights.values())
        params_after = sum(t.numel() for t in tensors.values())
        report = {"removed": records, "params_before": params_before, "params_after": params_after,
                  "params_removed": round(1 - params_after / params_before, 4),
                  "bytes_before": sum(stored.values()),
                  "bytes_after": sum(stored[layout.source_of(k)] for k in keys),
                  "importance": importance, "target": target, "drops": list(drops) if target is None else None}
        with ModelFolderWriter(dst) as out:
            for item in folder.root.iterdir():
                if item.name == "unet":
                    for f in item.iterdir():
                        if f.is_file() and f.name != "config.json" and not f.name.endswith((".safetensors", ".bin")):
                            out.copy(f, f"unet/{f.name}")
                    out.write_component("unet", config, tensors, metadata={"format": "pt", "sdlite_pruned": "1"})
                elif item.name not in ("sdlite_pruned.json", "sdlite_distill.json", "distill", "adherence.json"):  # (measured on the original)
                    out.copy(item, item.name)
            report["seconds"] = round(time.perf_counter() - t0, 2)
            out.write_json("sdlite_pruned.json", {"source": str(src), **report})
    return report


def _why_nothing(base: dict) -> str:
    cfg = config_from_dict(UNetConfig, base)
    layers = cfg.per_block(cfg.layers_per_block, "layers_per_block")
    parts = []
    if cfg.mid_block_type is None:
        parts.append("the UNet has no mid block")
    if max(layers) < 2:
        parts.append("every down block has one resnet already (the fewest the diffusers config can express)")
    return "; ".join(parts) or "the chosen removals do not apply to this UNet"


# --- before / after: s/step and peak memory, each model in a fresh process ---------------------------

def measure_unet(folder: str | Path, threads: int | None = None, calls: int = 3) -> dict:
    """s per UNet call at batch 2 (classifier-free guidance as one batch) at the model's native size, fp32,
    median of `calls` after a warm-up, and the process's peak RSS (VmHWM: anonymous memory plus the mapped
    weights read), measured in a fresh Python process so that nothing else is counted. RuntimeError when
    the child fails."""
    import subprocess
    import sys
    cmd = [sys.executable, "-m", "sdlite.train.prune", "--measure", str(folder), str(calls)]
    if threads:
        cmd.append(str(threads))
    out = subprocess.run(cmd, capture_output=True, text=True)
    if out.returncode != 0:
        raise RuntimeError(f"measuring {folder} failed: {out.stderr.strip().splitlines()[-1:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def _measure_child(folder: str, calls: int, threads: int | None) -> dict:
    import statistics

    from ..pipeline import Pipeline
    pipe = Pipeline.load(folder, precision="fp32", threads=threads)
    unet = pipe.unet.module
    f = pipe.vae_scale_factor
    size = pipe.native_size // f
    gen = torch.Generator().manual_seed(0)
    x = torch.randn((2, pipe.latent_channels, size, size), generator=gen)
    context = torch.randn((2, 77, pipe.unet_config.cross_attention_dim), generator=gen)
    times = []
    with torch.inference_mode():
        for i in range(calls + 1):
            t0 = time.perf_counter()
            unet(x, torch.tensor(500.0), context)
            if i:
                times.append(time.perf_counter() - t0)
    from ..runtime.memory import peak_rss
    return {"s_per_step": round(statistics.median(times), 4), "peak_rss": peak_rss(), "size": pipe.native_size,
            "threads": torch.get_num_threads()}


if __name__ == "__main__":
    import sys
    if len(sys.argv) >= 4 and sys.argv[1] == "--measure":
        print(json.dumps(_measure_child(sys.argv[2], int(sys.argv[3]), int(sys.argv[4]) if len(sys.argv) > 4 else None)))
