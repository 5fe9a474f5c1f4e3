"""`sdlite convert SRC DST --weights fp16|int8`: a model folder with smaller weight storage.

- fp16: every floating-point tensor stored as float16.
- int8: the weights of Linear, Conv2d and Embedding layers of the UNet and text encoder stored as
  int8 with one fp32 scale per output channel (`<name>.weight_scale`); everything else fp16. The VAE
  is stored fp16 (it is small and its errors show directly in the pixels).
The loader reads the result through mmap and dequantizes one layer at a time (`lazy_weights`).
The destination is written to a temporary sibling and renamed into place when complete.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path

import torch

from ..errors import SdliteError
from ..weights.model_folder import ModelFolder
from ..weights.safetensors_mmap import save_safetensors
from ..weights.state_dict import load_component_weights
from .components import (_build, decoder_only_key, text_config, text_encoder_key, unet_config,
                         vae_config)
from .lazy_weights import SCALE_SUFFIX, quantize_int8, quantizable_weights

FORMATS = ("fp32", "fp16", "int8")
WEIGHT_FILES = {"unet": "diffusion_pytorch_model.safetensors", "vae": "diffusion_pytorch_model.safetensors",
                "text_encoder": "model.safetensors"}


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


def convert_component(folder: ModelFolder, part: str, fmt: str, dst: Path) -> dict:
    quantizable, key_map = _quantizable(folder, part)
    use_int8 = fmt == "int8" and part in ("unet", "text_encoder")
    out: dict[str, torch.Tensor] = {}
    counts = {"int8": 0, "fp16": 0, "fp32": 0, "other": 0}
    with load_component_weights(folder.component(part)) as weights:
        for key in weights.keys():
            t = weights[key]
            name = key_map(key) if key_map else key
            if name is not None and name.endswith("position_ids"):
                continue
            if not t.is_floating_point():
                out[key] = t.clone()
                counts["other"] += 1
            elif use_int8 and name in quantizable:
                q, scale = quantize_int8(t)
                out[key], out[key + SCALE_SUFFIX] = q, scale
                counts["int8"] += 1
            elif fmt == "fp32":
                out[key] = t.float()
                counts["fp32"] += 1
            else:
                out[key] = t.to(torch.float16)
                counts["fp16"] += 1
        meta = {"format": "pt", "sdlite_weights": fmt}
        save_safetensors(out, dst / WEIGHT_FILES[part], metadata=meta)
    del out
    return counts


def convert_model(src: str | Path, dst: str | Path, fmt: str) -> dict:
    if fmt not in FORMATS:
        raise SdliteError(f"--weights must be one of {', '.join(FORMATS)}, got {fmt!r}")
    folder = ModelFolder.open(src)
    dst = Path(dst)
    if dst.exists():
        raise SdliteError(f"{dst}: already exists")
    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dst.name}.", dir=dst.parent))
    report = {}
    try:
        for item in folder.root.iterdir():
            if item.name in WEIGHT_FILES:
                (tmp / item.name).mkdir()
                for f in item.iterdir():
                    if f.is_file() and not f.name.endswith((".safetensors", ".bin", ".json.index")) \
                            and "safetensors.index" not in f.name:
                        shutil.copy2(f, tmp / item.name / f.name)
                report[item.name] = convert_component(folder, item.name, fmt, tmp / item.name)
            elif item.is_dir():
                shutil.copytree(item, tmp / item.name)
            elif item.is_file():
                shutil.copy2(item, tmp / item.name)
        (tmp / "sdlite_weights.json").write_text(json.dumps({"weights": fmt, "source": str(src),
                                                             "tensors": report}, indent=2) + "\n")
        tmp.rename(dst)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return report
