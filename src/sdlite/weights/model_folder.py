"""A diffusers Stable Diffusion model folder: model_index.json and one subfolder per component.

Every model sdlite opens (this folder, or a single-file checkpoint: `weights.single_file`) is read through
the same few questions, so the runtime never asks which kind it has:

- `part(name)`: a `Part` for "unet", "vae", "text_encoder": its config (`read_config`, `config_path` for
  messages), its weights as a mapping by module name (`open_weights`), the files they live in and their size;
- `scheduler_config()`, `tokenizer_dir` (or `tokenizer_kind` when the model carries no tokenizer);
- `name`, `replacement("vae")` (a VAE given instead of the model's own).
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType

import torch

from ..errors import ModelFolderError
from ..fileio import atomic_folder, read_json, write_json
from .parts import FolderPart, vae_file_part
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


PREDICTION_TYPES = ("epsilon", "v_prediction")
# a tokenizer folder holds vocab.json + merges.txt (transformers' slow files) or tokenizer.json (the fast one)
TOKENIZER_FILES = ("vocab.json", "tokenizer.json")


def check_prediction_type(value: str | None) -> str | None:
    """None, "epsilon" or "v_prediction" ("v" is accepted for the latter); ModelFolderError otherwise."""
    if value is None:
        return None
    value = {"v": "v_prediction", "eps": "epsilon"}.get(value, value)
    if value not in PREDICTION_TYPES:
        raise ModelFolderError(f"prediction type must be one of epsilon, v_prediction (or v), got {value!r}")
    return value


def check_vae_path(vae: str | Path) -> Path:
    """A --vae argument: a VAE folder with config.json, or a single-file VAE. ModelFolderError if neither."""
    vae = Path(vae)
    if vae.is_file():
        return vae
    if not vae.is_dir():
        raise ModelFolderError(f"{vae}: no such folder or file; --vae takes a VAE folder (config.json and "
                               "weights) or a VAE file (.safetensors, .ckpt)")
    if not (vae / "config.json").exists():
        raise ModelFolderError(f"{vae}: not a VAE folder (no config.json)")
    return vae


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
    prediction_type: str | None = None  # overrides the scheduler config's when set

    @classmethod
    def open(cls, path: str | Path, *, vae: str | Path | None = None,
             prediction_type: str | None = None) -> "ModelFolder":
        """`vae`: a VAE folder (config.json + weights, e.g. a TAESD / AutoencoderTiny) or a single-file VAE
        (`.safetensors` / `.ckpt` in the original layout) used instead of the model's own `vae/`.
        `prediction_type`: "epsilon" or "v_prediction" instead of what the scheduler config says.
        For a model given as one file, use `open_model`."""
        root = Path(path)
        if not root.exists():
            raise ModelFolderError(f"{root}: no such model folder or file")
        if root.is_file():
            raise ModelFolderError(f"{root}: is a file; open single-file checkpoints with open_model()")
        index_path = root / "model_index.json"
        if not index_path.exists():  # present but not a regular file: read_json says so
            raise ModelFolderError(f"{root}: not a diffusers model folder (no model_index.json)")
        replaced = () if vae is None else (("vae", check_vae_path(vae)),)
        folder = cls(root, read_json(index_path), replaced, check_prediction_type(prediction_type))
        for part in REQUIRED:
            if part == "vae" and replaced and replaced[0][1].is_file():
                continue
            names = TOKENIZER_FILES if part == "tokenizer" else (CONFIG_FILE[part],)
            # present but not a regular file: refused when read
            if not any((folder.component(part) / n).exists() for n in names):
                also = " (or tokenizer/tokenizer.json)" if part == "tokenizer" else ""
                raise ModelFolderError(f"{root}: missing {part}/{CONFIG_FILE[part]}{also}")
        return folder

    def component(self, name: str) -> Path:
        """The folder of component `name` (root/<name>, or the folder given instead by --vae)."""
        replaced = self.replacement(name)
        if replaced is not None and replaced.is_dir():
            return replaced
        return self.root / name

    def replacement(self, name: str) -> Path | None:
        """The folder or file given instead of root/<name> (e.g. --vae), or None."""
        for part, path in self.replaced:
            if part == name:
                return path
        return None

    def part(self, name: str):
        """Component `name` ("unet", "vae", "text_encoder") as a `Part`: a `FolderPart`, or a VAE file's
        part when --vae named a single file."""
        replaced = self.replacement(name)
        if replaced is not None and replaced.is_file():
            own = self.root / "vae" / "config.json"
            return vae_file_part(replaced, like=(read_json(own), own) if own.is_file() else None)
        return FolderPart(self.component(name))

    def scheduler_config(self) -> dict:
        """The folder's scheduler config, with `prediction_type` overridden when the folder was opened so."""
        data = read_json(self.scheduler_config_path)
        if self.prediction_type is not None and isinstance(data, dict):
            data = {**data, "prediction_type": self.prediction_type}
        return data

    @property
    def scheduler_config_path(self) -> Path:
        return self.root / "scheduler" / "scheduler_config.json"

    @property
    def tokenizer_dir(self) -> Path | None:
        return self.root / "tokenizer"

    tokenizer_kind = None  # a folder brings its own tokenizer

    @property
    def is_turbo(self) -> bool:
        """SD-Turbo is SD 2.1 in shape: its folder's name says so (stabilityai/sd-turbo), or the note
        `sdlite convert` leaves when it converts a Turbo file."""
        if "turbo" in self.name.lower():
            return True
        note = self.root / "sdlite_weights.json"
        try:
            return note.is_file() and "Turbo" in str(read_json(note).get("architecture", ""))
        except ModelFolderError:
            return False
    source = "folder"
    prediction_note = ""

    @property
    def own_vae(self):
        """The model's own VAE part (even when --vae replaces it), or None when it has none."""
        d = self.root / "vae"
        return FolderPart(d) if (d / "config.json").is_file() else None

    @property
    def name(self) -> str:
        return self.root.resolve().name

    def bytes_on_disk(self, name: str) -> int:
        if name in ("unet", "vae", "text_encoder"):
            return self.part(name).bytes_on_disk()
        return FolderPart(self.component(name)).bytes_on_disk()


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
