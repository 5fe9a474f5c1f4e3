"""Where a model's networks live while it generates: the runtime side of the memory plan.

The pipeline only says which stage comes next (`acquire("unet")`) and that a stage is over
(`release("unet", plan)`); this module decides, from the plan, what that means:

- `residency="all"`: every network is loaded once at `prepare` (weights mapped, not copied), the garbage
  collector's view of them frozen (`gc.freeze`), and kept; between stages the heap is trimmed.
- `residency="staged"`: a network is loaded when its stage starts and dropped when it ends: the module
  freed, its weight files unmapped and their clean pages dropped from the page cache, the heap trimmed;
  only one stage's weights and activations are ever in memory.
- with a memory budget, glibc's allocator is told to return large blocks to the kernel at once
  (`memory.configure_allocator`).

A loaded network gets the plan's levers (attention kernel, layer chunking, weights mode) before first use,
and the LoRAs in use (`runtime.lora`: adapters attached on load, detached when the network is dropped).
This is the only place, with `runtime.memory`, that calls gc, malloc_trim or the page-cache functions.
"""

from __future__ import annotations

import gc

import torch

from ..weights.model_folder import ModelFolder
from . import memory
from .attention import set_attention
from .components import LOADERS, LoadedComponent, load_vae
from .int8_compute import apply_int8_compute
from .lazy_weights import set_layer_chunking
from .lora import DEFAULT_METHOD, ActiveLoRA, Attached, attach, detach
from .planner import STAGES, Plan
from .precision import Precision, resolve_precision
from .profiler import Profiler


class Residency:
    """The loaded networks of one model folder, held per the plan it was loaded with."""

    def __init__(self, folder: ModelFolder, plan: Plan, precision: Precision | torch.dtype | str = torch.float32,
                 loras: list[ActiveLoRA] | None = None, lora_method: str = DEFAULT_METHOD):
        self.folder, self.plan = folder, plan
        self.precision = resolve_precision(precision)
        self._dtypes = {stage: self.precision.dtype_of(stage) for stage in STAGES}
        self._loaded: dict[str, LoadedComponent] = {}
        self.loras, self.lora_method = list(loras or []), lora_method
        self._attached: dict[str, Attached] = {}

    def use_loras(self, loras: list[ActiveLoRA]) -> None:
        """Apply `loras` (in place of those applied now) to the loaded networks and to those loaded later."""
        if [(id(a.file), a.scale) for a in loras] == [(id(a.file), a.scale) for a in self.loras]:
            return
        self.loras = list(loras)
        for stage, part in self._loaded.items():
            detach(self._attached.pop(stage, None))
            self._attach(stage, part)

    def _attach(self, stage: str, part: LoadedComponent) -> None:
        if any(a.bound.get(stage) for a in self.loras):
            self._attached[stage] = attach(part.module, stage, self.loras, self.lora_method)

    def prepare(self, profiler: Profiler | None = None) -> None:
        """At load time: configure the allocator under a budget; with every network resident, load them
        all now (profiled as the "load" stage) and freeze the GC's view of them. Raises WeightsError /
        ModelFolderError for a bad network, with nothing left loaded."""
        if self.plan.budget is not None:
            memory.configure_allocator()
        if self.plan.residency != "all":
            return
        handle = profiler.begin("load") if profiler else None
        try:
            for stage in STAGES:
                self.acquire(stage)
        except BaseException:
            self.close()
            raise
        finally:
            if handle:
                profiler.end(handle)
        gc.collect()
        gc.freeze()

    def loaded(self) -> list[str]:
        """The stages whose networks are in memory now."""
        return list(self._loaded)

    def acquire(self, stage: str) -> LoadedComponent:
        """The network of `stage` ("text_encoder", "unet" or "vae"), loading it with the plan's levers
        if it is not in memory."""
        part = self._loaded.get(stage)
        if part is None:
            part = LOADERS[stage](self.folder, self._dtypes[stage], weights_mode=self._mode(stage))
            if part.weights_mode == "materialize" and part.dtype != torch.float32:
                self._unmap(part)  # converted at load: nothing reads the file again
                if stage == "unet":  # NHWC conv weights: oneDNN's own layout (bench/speed.py: 1.2-1.4x a bf16 step)
                    part.module.to(memory_format=torch.channels_last)
            if stage == "unet" and self.precision.int8_linear:
                apply_int8_compute(part.module, "unet")
                memory.trim()
            set_attention(part.module, self.plan.attention)
            set_layer_chunking(part.module, self.plan.layer_chunk)
            self._attach(stage, part)
            self._loaded[stage] = part
        return part

    def acquire_encoder(self) -> LoadedComponent:
        """The VAE with its encoder (img2img, inpainting): the decoder-only VAE text-to-image loads is
        replaced by the whole one, which then stays the "vae" stage (released as it is)."""
        part = self._loaded.get("vae")
        if part is not None and getattr(part.module, "encoder", None) is not None:
            return part
        if part is not None:
            self._drop("vae")
        part = load_vae(self.folder, self._dtypes["vae"], with_encoder=True, weights_mode=self._mode("vae"))
        set_attention(part.module, self.plan.attention)
        set_layer_chunking(part.module, self.plan.layer_chunk)
        self._loaded["vae"] = part
        return part

    @staticmethod
    def _unmap(part: LoadedComponent) -> None:
        """Close the mapping of a network whose weights were all converted (no view of the file is left, so
        it is unmapped at once) and drop its pages from the page cache."""
        files = [f.path for f in getattr(part.weights, "files", [])]
        part.weights.close()
        for path in files:
            memory.drop_file_cache(path)

    def _mode(self, stage: str) -> str:
        return self.plan.weights_mode_of(str(self._dtypes[stage]).replace("torch.", ""))

    def dtype_of(self, stage: str) -> torch.dtype:
        """The dtype `stage`'s network computes in (the precision's, unless `fall_back_to_fp32` changed it)."""
        return self._dtypes[stage]

    def fall_back_to_fp32(self, stage: str) -> bool:
        """From now on compute `stage` in fp32 (its reduced-precision output was not finite): the loaded
        network is dropped, the next `acquire` builds it in fp32. False when it already is fp32."""
        if self._dtypes[stage] == torch.float32:
            return False
        self._dtypes[stage] = torch.float32
        self._drop(stage)
        return True

    def release(self, stage: str, plan: Plan | None = None) -> None:
        """`stage` is over. Staged residency: drop its network, unmap its files and evict their pages.
        Otherwise the network stays, and the heap is trimmed when `plan` (the request's plan) asks for it."""
        if self.plan.residency == "staged":
            self._drop(stage)
        elif plan is not None and plan.trim:
            memory.trim()

    def release_all(self) -> None:
        """After a failed or cancelled generation: release every stage (no-op when all are resident)."""
        if self.plan.residency == "staged":
            for stage in STAGES:
                self._drop(stage)

    def _drop(self, stage: str) -> None:
        part = self._loaded.pop(stage, None)
        if part is None:
            return
        detach(self._attached.pop(stage, None))
        files = [f.path for f in getattr(part.weights, "files", [])]
        part.close()
        del part
        memory.trim()
        for f in files:
            memory.drop_file_cache(f)

    def close(self) -> None:
        """Drop every network and unmap its weights."""
        for attached in self._attached.values():
            detach(attached)
        self._attached.clear()
        for part in self._loaded.values():
            part.close()
        self._loaded.clear()
