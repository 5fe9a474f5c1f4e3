"""`sdlite convert SRC DST [--weights fp32|fp16|int8]`: a diffusers model folder, from a folder or a
single-file checkpoint, with the weights as stored or in another storage.

- as stored (no --weights): every tensor as the source holds it (a single file's fp16 stays fp16).
- fp32: every floating-point tensor stored as float32.

- fp16: every floating-point tensor stored as float16.
- int8: the weights of Linear, Conv2d and Embedding layers of the UNet and text encoder stored as
  int8 with one fp32 scale per output channel (`<name>.weight_scale`); everything else fp16. The VAE
  is stored fp16 (it is small and its errors show directly in the pixels).
The loader reads the result through mmap and dequantizes one layer at a time (`lazy_weights`).
The destination is written to a temporary sibling and renamed into place when complete.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

from ..errors import SdliteError
from ..weights.model_folder import SD_MODEL_INDEX, WEIGHT_FILES, ModelFolder, ModelFolderWriter
from ..weights.sources import open_model
from .components import (
    _build,
    check_vae_matches,
    check_weights_fit,
    text_config,
    text_encoder_key,
    unet_config,
    vae_config,
)
from .lazy_weights import SCALE_SUFFIX, quantizable_weights, quantize_int8

FORMATS = (None, "fp32", "fp16", "int8")


def _quantizable(folder: ModelFolder, part: str) -> tuple[set[str], object]:
    from ..models.clip_text import CLIPTextModel
    from ..models.unet import UNet2DConditionModel
    from ..models.vae import AutoencoderKL
    if part == "unet":
        cfg = unet_config(folder)
        return quantizable_weights(_build(lambda: UNet2DConditionModel(cfg))), None
    if part == "text_encoder":
        cfg = text_config(folder)
        return quantizable_weights(_build(lambda: CLIPTextModel(cfg))), text_encoder_key
    cfg = vae_config(folder)
    return quantizable_weights(_build(lambda: AutoencoderKL(cfg))), None


def convert_component(folder: ModelFolder, part: str, fmt: str, out: ModelFolderWriter) -> dict:
    """Write `part`'s weights in `fmt` into `out`; returns how many tensors went to each storage."""
    quantizable, key_map = _quantizable(folder, part)
    use_int8 = fmt == "int8" and part in ("unet", "text_encoder")
    tensors: dict[str, torch.Tensor] = {}
    counts = {"int8": 0, "fp16": 0, "fp32": 0, "other": 0}
    with folder.part(part).open_weights() as weights:
        for key in weights.keys():
            t = weights[key]
            name = key_map(key) if key_map else key
            if name is not None and name.endswith("position_ids"):
                continue
            if not t.is_floating_point():
                tensors[key] = t.clone()
                counts["other"] += 1
            elif use_int8 and name in quantizable:
                q, scale = quantize_int8(t)
                tensors[key], tensors[key + SCALE_SUFFIX] = q, scale
                counts["int8"] += 1
            elif fmt is None:
                tensors[key] = t
                counts[str(t.dtype).removeprefix("torch.").replace("float", "fp")
                       if t.dtype in (torch.float32, torch.float16) else "other"] += 1
            elif fmt == "fp32":
                tensors[key] = t.float()
                counts["fp32"] += 1
            else:
                tensors[key] = t.to(torch.float16)
                counts["fp16"] += 1
        config = None if folder.source == "folder" else folder.part(part).read_config()
        out.write_component(part, config, tensors, metadata={"format": "pt", "sdlite_weights": fmt or "stored"})
    del tensors
    return counts


def _is_weight_file(name: str) -> bool:
    return name.endswith((".safetensors", ".bin", ".json.index")) or "safetensors.index" in name


def convert_model(src: str | Path, dst: str | Path, fmt: str | None, *, config: str | Path | None = None,
                  prediction_type: str | None = None) -> dict:
    """Write `src` (a model folder, or a single-file checkpoint with its optional `config` folder) at `dst`
    as a diffusers folder, with `fmt` weight storage (None: as stored; "fp32", "fp16", "int8"). A folder's
    other files are copied as they are; a single file gets its inferred (or given) configs, the tokenizer
    (the config folder's, or the CLIP vocabulary sdlite ships), the scheduler config and a model_index.json.
    Returns {component: {storage: tensor count}}. Raises SdliteError for an unknown format or an existing
    `dst`, ModelFolderError / WeightsError for a bad `src`; nothing is left at `dst` when it fails."""
    if fmt not in FORMATS:
        raise SdliteError(f"--weights must be one of {', '.join(f for f in FORMATS if f)}, got {fmt!r}")
    model = open_model(src, config=config, prediction_type=prediction_type)
    check_vae_matches(model)
    check_weights_fit(model)  # a model that cannot load is refused here, not written as a folder
    if os.path.lexists(dst):
        raise SdliteError(f"{dst}: already exists")
    if model.source == "folder" and Path(dst).resolve().is_relative_to(model.root.resolve()):
        raise SdliteError(f"{dst}: is inside the model folder {src}; write the copy somewhere else")
    if model.source == "folder":
        return _convert_folder(model, src, dst, fmt)
    return _convert_single_file(model, src, dst, fmt)


def _convert_folder(folder: ModelFolder, src, dst, fmt: str | None) -> dict:
    report = {}
    with ModelFolderWriter(dst) as out:
        for item in folder.root.iterdir():
            if item.name in WEIGHT_FILES:
                for f in item.iterdir():
                    if f.is_file() and not _is_weight_file(f.name):
                        out.copy(f, f"{item.name}/{f.name}")
                report[item.name] = convert_component(folder, item.name, fmt, out)
            elif item.is_dir() or item.is_file():
                out.copy(item, item.name)
        out.write_json("sdlite_weights.json", {"weights": fmt or "stored", "source": str(src), "tensors": report})
    return report


def _convert_single_file(model, src, dst, fmt: str | None) -> dict:
    from ..tokenizer.writer import write_standard_tokenizer
    from .prediction import settle_prediction_type
    settle_prediction_type(model)
    report = {}
    with ModelFolderWriter(dst) as out:
        for name in WEIGHT_FILES:
            report[name] = convert_component(model, name, fmt, out)
        if model.tokenizer_dir is not None:
            out.copy(model.tokenizer_dir, "tokenizer")
        else:
            write_standard_tokenizer(out.root / "tokenizer", model.tokenizer_kind)
        out.write_json("scheduler/scheduler_config.json", model.scheduler_config())
        index = dict(SD_MODEL_INDEX)
        index["scheduler"] = ["diffusers", model.scheduler_config().get("_class_name", "PNDMScheduler")]
        out.write_json("model_index.json", index)
        out.write_json("sdlite_weights.json", {"weights": fmt or "stored", "source": str(src),
                                               "architecture": model.architecture,
                                               "prediction_type": model.prediction_type,
                                               "ignored": model.ignored, "tensors": report})
    return report
