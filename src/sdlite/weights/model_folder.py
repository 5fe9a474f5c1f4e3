"""A diffusers Stable Diffusion model folder: model_index.json and one subfolder per component."""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType

import torch

from ..errors import ModelFolderError
from ..fileio import atomic_folder, read_json, write_json
from .safetensors_mmap import save_safetensors

REQUIRED = ("unet", "vae", "text_encoder", "tokenizer", "scheduler")
CONFIG_FILE = {
    "unet": "config.json",
    "vae": "config.json",
    "text_encoder": "config.json",
    "scheduler": "scheduler_config.json",
    "tokenizer": "vocab.json",
}
# the file each network's weights are written to, as diffusers names them
WEIGHT_FILES = {"text_encoder": "model.safetensors", "unet": "diffusion_pytorch_model.safetensors",
                "vae": "diffusion_pytorch_model.safetensors"}
# model_index.json of a Stable Diffusion 1.x/2.x folder, as diffusers writes it (no safety checker)
SD_MODEL_INDEX = {
    "_class_name": "StableDiffusionPipeline",
    "_diffusers_version": "0.30.0",
    "feature_extractor": [None, None],
    "requires_safety_checker": False,
    "safety_checker": [None, None],
    "scheduler": ["diffusers", "PNDMScheduler"],
    "text_encoder": ["transformers", "CLIPTextModel"],
    "tokenizer": ["transformers", "CLIPTokenizer"],
    "unet": ["diffusers", "UNet2DConditionModel"],
    "vae": ["diffusers", "AutoencoderKL"],
}


def shipped_model() -> Path | None:
    """The model this package ships (sdlite-shapes, trained in this repo: 64x64 flat shapes, a few dozen
    words), or None when the package was installed without its assets."""
    here = Path(__file__).resolve().parent.parent / "assets" / "sdlite-shapes"
    return here if (here / "model_index.json").is_file() else None


@dataclass(frozen=True)
class ModelFolder:
    root: Path
    index: dict
    # components taken from another folder than root/<name>, e.g. (("vae", Path("taesd")),)
    replaced: tuple[tuple[str, Path], ...] = ()

    @classmethod
    def open(cls, path: str | Path, *, vae: str | Path | None = None) -> "ModelFolder":
        """`vae`: a VAE folder (config.json + weights, e.g. a TAESD / AutoencoderTiny) used instead of
        the model's own `vae/`."""
        root = Path(path)
        if not root.exists():
            raise ModelFolderError(f"{root}: no such model folder")
        if root.is_file():
            raise ModelFolderError(
                f"{root}: is a file; single-file checkpoints are not supported yet, give a diffusers "
                "model folder (with model_index.json)")
        index_path = root / "model_index.json"
        if not index_path.exists():  # present but not a regular file: read_json says so
            raise ModelFolderError(f"{root}: not a diffusers model folder (no model_index.json)")
        replaced = ()
        if vae is not None:
            vae = Path(vae)
            if not vae.is_dir():
                what = "is a file" if vae.exists() else "no such folder"
                raise ModelFolderError(f"{vae}: {what}; --vae takes a VAE folder (config.json and weights)")
            if not (vae / "config.json").exists():
                raise ModelFolderError(f"{vae}: not a VAE folder (no config.json)")
            replaced = (("vae", vae),)
        folder = cls(root, read_json(index_path), replaced)
        for part in REQUIRED:
            cfg = folder.component(part) / CONFIG_FILE[part]
            if not cfg.exists():  # present but not a regular file: refused when read
                raise ModelFolderError(f"{root}: missing {part}/{CONFIG_FILE[part]}")
        return folder

    def component(self, name: str) -> Path:
        return self.replacement(name) or self.root / name

    def replacement(self, name: str) -> Path | None:
        """The folder given instead of root/<name> (e.g. --vae), or None."""
        for part, path in self.replaced:
            if part == name:
                return path
        return None

    @property
    def name(self) -> str:
        return self.root.resolve().name

    def bytes_on_disk(self, name: str) -> int:
        d = self.component(name)
        if not d.is_dir():
            return 0
        return sum(p.stat().st_size for p in d.rglob("*") if p.is_file())


class ModelFolderWriter:
    """The one way sdlite writes a model folder (random models, `sdlite convert`, the training export).

        with ModelFolderWriter(dst) as out:
            out.write_component("unet", config, tensors)        # unet/config.json + its safetensors
            out.write_json("model_index.json", SD_MODEL_INDEX)

    Everything is written into a temporary sibling of `dst`, renamed to `dst` when the block completes
    and removed when it raises, so a failed or interrupted write leaves nothing behind. `root` is the
    folder being filled (for writers that add files themselves, e.g. the tokenizer). Raises
    `FileExistsError` when `dst` exists (unless `replace`)."""

    def __init__(self, dst: str | Path, *, replace: bool = False):
        self.dst = Path(dst)
        self._ctx = atomic_folder(self.dst, replace=replace)
        self.root = Path()

    def __enter__(self) -> "ModelFolderWriter":
        self.root = self._ctx.__enter__()
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> bool | None:
        return self._ctx.__exit__(exc_type, exc, tb)

    def write_json(self, relpath: str, data) -> None:
        write_json(self.root / relpath, data)

    def write_component(self, name: str, config: dict | None, tensors: dict[str, torch.Tensor],
                        metadata: dict[str, str] | None = None, folder: str | None = None) -> Path:
        """`<folder or name>/config.json` (unless `config` is None) and the network's weights as one
        safetensors file named as diffusers names it (`WEIGHT_FILES`); `metadata` defaults to
        `{"format": "pt"}`. Returns the weights file's path."""
        sub = self.root / (folder or name)
        if config is not None:
            write_json(sub / "config.json", config)
        sub.mkdir(parents=True, exist_ok=True)
        path = sub / WEIGHT_FILES.get(name, "diffusion_pytorch_model.safetensors")
        save_safetensors(tensors, path, metadata=metadata or {"format": "pt"})
        return path

    def copy(self, src: str | Path, relpath: str) -> None:
        """Copy a file or a whole folder into the model folder at `relpath`."""
        src, dst = Path(src), self.root / relpath
        dst.parent.mkdir(parents=True, exist_ok=True)
        if src.is_dir():
            shutil.copytree(src, dst)
        else:
            shutil.copy2(src, dst)
