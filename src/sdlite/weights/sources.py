"""What a user names as a model, opened: a diffusers folder (`ModelFolder`) or a single-file checkpoint
(`SingleFileModel`). Both answer the same questions (see `model_folder`), so every command, the service and
`Pipeline.load` take either through `open_model`."""

from __future__ import annotations

import os
from pathlib import Path

from ..errors import ModelFolderError
from .model_folder import ModelFolder
from .single_file import SingleFileModel


def open_model(path: str | Path, *, vae: str | Path | None = None, config: str | Path | None = None,
               prediction_type: str | None = None):
    """Open what a user names as a model: a diffusers folder (`ModelFolder`) or a single-file SD 1.x / 2.x
    checkpoint, `.safetensors` or `.ckpt` (`single_file.SingleFileModel`). `config`: a diffusers folder
    whose configs, tokenizer and scheduler a single file uses (diffusers' `from_single_file(config=...)`).
    An already opened model (anything with `part`) is returned as it is.
    Raises ModelFolderError / WeightsError (one line) for what cannot be opened."""
    if hasattr(path, "part"):
        return path
    p = Path(path)
    if os.path.lexists(p) and not p.exists():
        raise ModelFolderError(f"{p}: a dangling symbolic link or a link loop")
    if p.exists() and not p.is_dir():  # a file, or a FIFO / device the file readers refuse by name
        return SingleFileModel.open(p, vae=vae, config=config, prediction_type=prediction_type)
    if config is not None:
        raise ModelFolderError(f"{p}: --config applies to single-file checkpoints; a folder has its own configs")
    return ModelFolder.open(p, vae=vae, prediction_type=prediction_type)
