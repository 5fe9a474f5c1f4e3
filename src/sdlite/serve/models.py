"""Several models in one service (`sdlite serve --models-dir DIR`), one of them in memory at a time.

    catalog = ModelCatalog(models_dir, first, load_kwargs)
    pipe = catalog.load_first()                 # the model -m names, else the first listed
    catalog.list()                              # A1111 /sdapi/v1/sd-models entries
    catalog.switch(executor, "tiny-bk")         # load another model in place of the current one

What is listed: each diffusers folder of DIR (a folder with model_index.json) and each single-file SD 1.x /
2.x checkpoint (`*.safetensors`, `*.ckpt`), recognised from its key names and shapes alone (the safetensors
header; a zip `.ckpt`'s pickle, its tensors mapped, never read), so a listing costs no weight reads. Files
of another kind (a LoRA, a VAE, SDXL, a file that is not a checkpoint...) are skipped with one log line
saying what they are. -m may name a listed model (its name, file name or title) or a path; a path outside
DIR is listed first. `--vae` and `--prediction-type` apply to every model, `--config` to the single files.

Names, as AUTOMATIC1111 has them: `model_name` is the folder name or the file name without its suffix (what
PNG parameters say as "Model: "), `title` is "NAME [HASH]" where NAME is the folder or file name. HASH is
A1111's model hash (`sd_models.model_hash`, its "Model hash" before 1.0, still one of the names its
`sd_model_checkpoint` option takes): the first 8 hex digits of the SHA-256 of the 64 KiB at offset 1 MiB
of the file (of the UNet's weight file for a folder), read in one 64 KiB read. A1111's newer hash, the
SHA-256 of the whole file, is not computed (minutes for a multi-GB file on a small board): `sha256` is None.
A switch takes a title, a name, a model_name, a hash, or "NAME [anything]".

Switching (`switch`): one switch at a time (a second one waits for the first). The new model's memory plan
is checked first, from its configs and weight sizes only: a model that cannot fit the budget is refused
with the planner's reason and nothing is disturbed. Then the executor holds new jobs back (they are still
admitted and queue), waits for the running ones to finish on the old model, closes the old pipeline (its
networks dropped, files unmapped) and loads the new one with the same budget (`Pipeline.load` plans it);
queued jobs then run on the new model. A load that fails after the old model was closed loads the old one
again, so the service keeps serving, and the switch is refused with the reason.
"""

from __future__ import annotations

import hashlib
import logging
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from ..errors import ModelFolderError, PlanError, SdliteError, WeightsError
from .execution import INTERNAL, INVALID_ARGUMENT, UNAVAILABLE, ServeError

log = logging.getLogger("sdlite.serve")

CHECKPOINT_SUFFIXES = (".safetensors", ".ckpt")
HASH_OFFSET, HASH_BYTES = 0x100000, 0x10000  # A1111's model_hash: 64 KiB at 1 MiB
ZIP_MAGIC = b"PK\x03\x04"


class ModelSwitchError(ServeError):
    """A switch refused: `code` INVALID_ARGUMENT (no such model: `not_found` True; or it does not fit the
    memory budget), INTERNAL (it could not be loaded; the previous model serves again) or UNAVAILABLE
    (the service is draining). `field` is "model"."""

    def __init__(self, code: str, message: str, not_found: bool = False):
        super().__init__(code, message, field="model")
        self.not_found = not_found


def model_hash(path: Path) -> str | None:
    """A1111's (legacy) model hash of a file: sha256 of the 64 KiB at offset 1 MiB, first 8 hex digits
    (a file shorter than that hashes what is there, possibly nothing). None when unreadable."""
    try:
        with open(path, "rb") as f:
            f.seek(HASH_OFFSET)
            return hashlib.sha256(f.read(HASH_BYTES)).hexdigest()[:8]
    except OSError:
        return None


def _folder_weights(folder: Path) -> Path | None:
    """The file a folder's hash is taken of: its UNet's weights."""
    unet = folder / "unet"
    files = sorted(p for p in unet.glob("*") if p.suffix in (".safetensors", ".bin") and p.is_file()) \
        if unet.is_dir() else []
    return files[0] if files else None


@dataclass(frozen=True)
class ModelEntry:
    name: str    # the folder name, or the file name with its suffix
    path: Path
    kind: str    # "folder" or "file"
    hash: str | None = None

    @classmethod
    def of(cls, path: Path) -> "ModelEntry":
        kind = "file" if path.is_file() else "folder"
        weights = path if kind == "file" else _folder_weights(path)
        return cls(path.name, path, kind, None if weights is None else model_hash(weights))

    @property
    def model_name(self) -> str:
        return Path(self.name).stem if self.kind == "file" else self.name

    @property
    def title(self) -> str:
        return self.name if self.hash is None else f"{self.name} [{self.hash}]"

    def names(self) -> tuple[str, ...]:
        """What a client may call it, most specific first."""
        return tuple(n for n in (self.title, self.name, self.model_name, str(self.path)) if n)

    def a1111(self) -> dict:
        """As A1111's /sdapi/v1/sd-models lists a checkpoint."""
        return {"title": self.title, "model_name": self.model_name, "hash": self.hash, "sha256": None,
                "filename": str(self.path), "config": None}


def skip_reason(path: Path) -> str | None:
    """Why `path` (a file or folder of the models folder) is not a model sdlite can serve, or None when it
    is one. Reads a folder's file names, a safetensors header or a zip `.ckpt`'s pickle: no tensor data."""
    from ..weights.ldm_layout import read_layout
    from ..weights.pickle_checkpoint import open_checkpoint

    if path.is_dir():
        return None if (path / "model_index.json").is_file() else "a folder without model_index.json"
    if path.suffix.lower() not in CHECKPOINT_SUFFIXES:
        return "not a model (a diffusers folder, .safetensors or .ckpt)"
    if path.suffix.lower() == ".ckpt":
        try:
            with open(path, "rb") as f:
                if f.read(len(ZIP_MAGIC)) != ZIP_MAGIC:
                    return None  # an old non-zip pickle cannot be mapped: checked when it is loaded
        except OSError as exc:
            return f"unreadable ({exc.strerror or exc})"
    try:
        with open_checkpoint(path) as f:
            shapes = {k: tuple(f.shape_of(k)) for k in f.keys()}
        read_layout(shapes)
    except (WeightsError, ModelFolderError) as exc:
        return str(exc)
    return None


def scan_models(models_dir: Path) -> list[ModelEntry]:
    """The models of `models_dir`, sorted by name; what is skipped is logged, once, with the reason."""
    try:
        children = sorted(models_dir.iterdir(), key=lambda p: p.name)
    except OSError as exc:
        raise ModelFolderError(f"{models_dir}: cannot list the models folder ({exc.strerror or exc})") from None
    entries = []
    for path in children:
        if path.name.startswith("."):
            continue
        reason = skip_reason(path)
        if reason is None:
            entries.append(ModelEntry.of(path))
        elif path.suffix.lower() in CHECKPOINT_SUFFIXES:
            log.warning("models folder: skipping %s: %s", path.name, reason)
        else:  # (a folder of LoRAs or VAEs, a sidecar .yaml, notes...)
            log.log(logging.INFO if path.is_dir() else logging.DEBUG, "models folder: skipping %s: %s",
                    path.name, reason)
    return entries


class ModelCatalog:
    """The models a service may switch between, and which one is loaded (`current`)."""

    def __init__(self, models_dir: str | Path | None, first: str | Path | None = None,
                 load_kwargs: dict | None = None):
        self.models_dir = None if models_dir is None else Path(models_dir)
        self.load_kwargs = dict(load_kwargs or {})
        self.entries: list[ModelEntry] = []
        if self.models_dir is not None:
            if not self.models_dir.is_dir():
                raise ModelFolderError(f"{self.models_dir}: --models-dir must be a folder")
            if (self.models_dir / "model_index.json").is_file():
                raise ModelFolderError(f"{self.models_dir}: is a model folder; --models-dir takes the folder "
                                       "that holds the models (pass one model with -m)")
            self.entries = scan_models(self.models_dir)
        self.current = self._first(first)
        self.on_switch: list[Callable] = []  # called with the new pipeline after each switch
        self._lock = threading.Lock()

    def _first(self, first: str | Path | None) -> ModelEntry:
        if first is None:
            if not self.entries:
                raise ModelFolderError(f"{self.models_dir}: no models here (diffusers folders with "
                                       "model_index.json, SD 1.x / 2.x .safetensors or .ckpt files)")
            return self.entries[0]
        path = Path(first)
        if self.models_dir is None or path.exists():  # (a path that is not there: Pipeline.load says so)
            for entry in self.entries:
                if entry.path.resolve() == path.resolve():
                    return entry
            entry = ModelEntry.of(path)
            self.entries.insert(0, entry)
            return entry
        entry = self._match(str(first))
        if entry is None:
            where = f"in {self.models_dir}" if self.models_dir is not None else "(no --models-dir)"
            raise ModelFolderError(f"{first}: no such model folder or file, nor a model {where}")
        return entry

    # --- what clients see --------------------------------------------------------------------------

    def list(self) -> list[dict]:
        """Every model, as A1111's /sdapi/v1/sd-models lists them."""
        return [entry.a1111() for entry in self.entries]

    def _match(self, name: str) -> ModelEntry | None:
        for i in range(4):  # title, then name, model_name, path: the most specific match wins
            for entry in self.entries:
                if entry.names()[i:i + 1] == (name,):
                    return entry
        hashed = [e for e in self.entries if e.hash is not None and e.hash == name]
        if len(hashed) == 1:
            return hashed[0]
        if name.endswith("]") and " [" in name:  # "NAME [hash]" with another hash (A1111 accepts it too)
            return self._match(name[:name.rindex(" [")])
        return None

    def find(self, name: str) -> ModelEntry:
        """The model `name` names (a title, name, model_name or hash); ModelSwitchError when none."""
        entry = self._match(name.strip()) if isinstance(name, str) and name.strip() else None
        if entry is None:
            known = ", ".join(e.title for e in self.entries)
            raise ModelSwitchError(INVALID_ARGUMENT, f"no model {name!r} (models: {known})", not_found=True)
        return entry

    # --- loading -----------------------------------------------------------------------------------

    def _kwargs(self, entry: ModelEntry) -> dict:
        kwargs = dict(self.load_kwargs)
        if entry.kind == "folder" and self.models_dir is not None:
            kwargs.pop("config", None)  # --config is for the single files among the models
        return kwargs

    def load(self, entry: ModelEntry):
        from ..pipeline import Pipeline
        return Pipeline.load(entry.path, **self._kwargs(entry))

    def load_first(self):
        """The pipeline of `current` (the model -m named, else the first listed)."""
        return self.load(self.current)

    def check_fits(self, entry: ModelEntry) -> None:
        """Open `entry` and plan it for the budget at its native size, without loading a network: raises
        PlanError / WeightsError / ModelFolderError as `Pipeline.load` would before loading."""
        from ..runtime.components import native_size
        from ..runtime.planner import make_plan
        from ..weights.sources import open_model
        kwargs = self._kwargs(entry)
        folder = open_model(entry.path, vae=kwargs.get("vae"), config=kwargs.get("config"),
                            prediction_type=kwargs.get("prediction_type"))
        budget = kwargs.get("memory_budget")
        if isinstance(budget, str):
            from ..units import parse_bytes
            budget = parse_bytes(budget)
        if budget is not None:
            native = native_size(folder)
            make_plan(folder, budget, native, native, precision=kwargs.get("precision"),
                      kv_store=kwargs.get("kv_store"), kv_tokens=kwargs.get("kv_tokens") or "all")

    # --- switching ---------------------------------------------------------------------------------

    def switch(self, executor, name: str) -> dict:
        """Make `name` the loaded model (see the module docstring); returns its A1111 entry. Raises
        ModelSwitchError: unknown name, a model that does not fit or cannot be loaded (the previous model
        then serves, reloaded if it had been closed), or a draining service."""
        entry = self.find(name)
        with self._lock:
            if entry == self.current:
                return entry.a1111()
            if executor.draining:
                raise ModelSwitchError(UNAVAILABLE, "server is shutting down")
            try:
                self.check_fits(entry)
            except (PlanError, WeightsError, ModelFolderError) as exc:
                log.warning("model switch to %s refused: %s", entry.title, exc)
                raise ModelSwitchError(_code(exc), f"{entry.title}: {exc}") from None
            previous = self.current
            log.info("switching model: %s -> %s", previous.title, entry.title)
            try:
                pipe = executor.swap_pipeline(lambda: self.load(entry),
                                              restore=lambda: self._restore(previous, executor))
            except ServeError as exc:  # the service stopped while the switch waited
                raise ModelSwitchError(exc.code, exc.message) from None
            except Exception as exc:
                reason = str(exc) if isinstance(exc, SdliteError) else f"{type(exc).__name__}: {exc}"
                log.warning("model switch to %s failed, %s serves again: %s", entry.title, previous.title,
                            reason)
                raise ModelSwitchError(_code(exc), f"{entry.title}: {reason} ({previous.title} still "
                                                   "serves)") from None
            self.current = entry
            for callback in self.on_switch:
                callback(pipe)
            log.info("model %s loaded", entry.title)
            return entry.a1111()

    def _restore(self, previous: ModelEntry, executor):
        """The previous model loaded again after a failed switch; when that fails too, its closed pipeline
        (which loads its networks when next used)."""
        try:
            return self.load(previous)
        except Exception:
            log.exception("reloading %s after a failed switch failed", previous.title)
            return executor.pipe


def _code(exc: BaseException) -> str:
    return INVALID_ARGUMENT if isinstance(exc, PlanError) else INTERNAL


def current_entry(models: list[dict], pipe) -> dict | None:
    """Which of `models` (A1111 entries) `pipe` was loaded from, or None."""
    root = getattr(getattr(pipe, "folder", None), "root", None)
    if root is None:
        return None
    root = Path(root).resolve()
    for model in models:
        if Path(model["filename"]).resolve() == root:
            return model
    return None
