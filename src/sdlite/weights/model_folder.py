"""A diffusers Stable Diffusion model folder: model_index.json and one subfolder per component."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from ..errors import ModelFolderError

REQUIRED = ("unet", "vae", "text_encoder", "tokenizer", "scheduler")
CONFIG_FILE = {
    "unet": "config.json",
    "vae": "config.json",
    "text_encoder": "config.json",
    "scheduler": "scheduler_config.json",
    "tokenizer": "vocab.json",
}
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".ckpt", ".pt", ".pth")


def read_json(path: str | Path) -> dict:
    """A JSON object from a model folder file; ModelFolderError naming the file otherwise."""
    path = Path(path)
    if not path.is_file():
        raise ModelFolderError(f"{path}: no such file")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ModelFolderError(f"{path}: not valid JSON ({exc})") from None
    if not isinstance(data, dict):
        raise ModelFolderError(f"{path}: expected a JSON object")
    return data


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
        if not index_path.is_file():
            raise ModelFolderError(f"{root}: not a diffusers model folder (no model_index.json)")
        replaced = ()
        if vae is not None:
            vae = Path(vae)
            if not vae.is_dir():
                what = "is a file" if vae.exists() else "no such folder"
                raise ModelFolderError(f"{vae}: {what}; --vae takes a VAE folder (config.json and weights)")
            if not (vae / "config.json").is_file():
                raise ModelFolderError(f"{vae}: not a VAE folder (no config.json)")
            replaced = (("vae", vae),)
        folder = cls(root, read_json(index_path), replaced)
        for part in REQUIRED:
            cfg = folder.component(part) / CONFIG_FILE[part]
            if not cfg.is_file():
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

    def has(self, name: str) -> bool:
        return self.component(name).is_dir()

    @property
    def name(self) -> str:
        return self.root.resolve().name

    def weight_files(self, name: str) -> list[Path]:
        d = self.component(name)
        if not d.is_dir():
            return []
        return sorted(p for p in d.iterdir() if p.is_file() and p.name.endswith(WEIGHT_SUFFIXES))

    def bytes_on_disk(self, name: str) -> int:
        d = self.component(name)
        if not d.is_dir():
            return 0
        return sum(p.stat().st_size for p in d.rglob("*") if p.is_file())
