"""A single-file Stable Diffusion 1.x / 2.x checkpoint opened as a model, with no conversion step.

What people download is one file in the original (CompVis / Stability) layout: `v1-5-pruned-emaonly`,
a community merge, an SD 2.1 or SD-Turbo file, as `.safetensors` or as a `.ckpt` pickle. `SingleFileModel`
answers the same questions a `ModelFolder` does (`part`, `scheduler_config`, `tokenizer_dir` /
`tokenizer_kind`), so every command and the runtime take either:

- weights: the file is mapped once per stage (`open_checkpoint`: the mmap safetensors reader, or torch's
  restricted unpickler with mmap for `.ckpt`), and each network's tensors are the file's tensors under
  diffusers' module names (`ldm_layout`): renamed by a table, never copied; OpenCLIP's fused q/k/v are
  split by taking views, the VAE attention's 1x1 convolutions viewed as linear weights.
- configs: inferred from the key set and shapes (`ldm_layout.read_layout`: block widths, depths, which
  blocks attend, SD 1.x vs 2.x from the text width), with the standard SD 1.5 / 2.1 conventions for what
  weights cannot tell (head counts), or taken from `config=DIR`, a diffusers folder that may hold no
  weights (diffusers' `from_single_file(config=...)`).
- tokenizer: the config folder's, else the CLIP BPE vocabulary sdlite ships (pad `<|endoftext|>` for SD
  1.x, `!` for SD 2.x).
- prediction type: `prediction_type=` (the `--prediction-type` flag), else the config folder's scheduler,
  else a sidecar `FILE.yaml` (A1111's convention: `parameterization: "v"` means v-prediction), else
  epsilon for SD 1.x and SD-Turbo; for other SD 2.x files it is left open (`needs_prediction_check`) and the
  runtime decides it by one UNet evaluation (`runtime.prediction`), as A1111 does.
"""

from __future__ import annotations

import copy
import re
import warnings
from pathlib import Path

from ..errors import ModelFolderError, WeightsError
from ..fileio import read_json
from .ldm_layout import Layout, read_layout
from .model_folder import TOKENIZER_FILES, check_prediction_type, check_vae_path
from .parts import FilePart, FolderPart, read_shapes, same_value, vae_file_part
from .standard_configs import LCM_SCHEDULER, SD15_SCHEDULER, SD21_SCHEDULER, SD_TURBO_SCHEDULER

PARTS = ("unet", "vae", "text_encoder")
FAMILY_NAMES = {"sd1": "SD 1.x", "sd2": "SD 2.x"}
MAX_SIDECAR_BYTES = 1 << 20


def read_sidecar_parameterization(path: Path) -> str | None:
    """A1111's sidecar: `<checkpoint stem>.yaml` beside the file (the original LDM inference config).
    Returns "v_prediction" for `parameterization: "v"`, "epsilon" for `"eps"` or for an LDM config that
    names none (the LDM default), None when there is no sidecar or it is not an LDM config (then a warning
    says it was not used). Only that one key is read (no YAML library needed). ModelFolderError for an
    unreadable sidecar or a parameterization sdlite does not run (e.g. "x0")."""
    yaml = path.with_suffix(".yaml")
    if not yaml.is_file():
        return None
    try:
        with open(yaml, "rb") as f:
            text = f.read(MAX_SIDECAR_BYTES).decode("utf-8", "replace")
    except OSError as exc:
        raise ModelFolderError(f"{yaml}: unreadable sidecar config ({exc.strerror or exc})") from None
    m = re.search(r"^\s*parameterization\s*:\s*[\"']?([A-Za-z0-9_]+)[\"']?\s*(#.*)?$", text, re.MULTILINE)
    if m is not None:
        value = {"v": "v_prediction", "eps": "epsilon", "epsilon": "epsilon"}.get(m.group(1))
        if value is None:
            raise ModelFolderError(f"{yaml}: parameterization {m.group(1)!r} is not one sdlite runs (v or eps); "
                                   "fix the sidecar or pass --prediction-type")
        return value
    if re.search(r"^\s*(target|params)\s*:", text, re.MULTILINE):
        return "epsilon"  # an LDM config that names no parameterization: the LDM default
    warnings.warn(f"{yaml}: not an LDM config (no target:/params:/parameterization:); not used", stacklevel=2)
    return None


class SingleFileModel:
    """A single-file SD 1.x / 2.x checkpoint with the questions a `ModelFolder` answers. Open it with
    `SingleFileModel.open` (or `model_folder.open_model`)."""

    def __init__(self, path: Path, layout: Layout, config_dir: Path | None, vae: Path | None,
                 metadata: dict):
        self.path, self.root = path, path
        self.layout = layout
        self.config_dir = config_dir
        self.replaced = () if vae is None else (("vae", vae),)
        self.metadata = metadata
        self.prediction_type: str | None = None
        self.prediction_note = ""
        self.index = {}

    source = "single file"

    @classmethod
    def open(cls, path: str | Path, *, vae: str | Path | None = None, config: str | Path | None = None,
             prediction_type: str | None = None) -> "SingleFileModel":
        """Read the file's key set (not its tensors), recognise the architecture and settle what can be
        settled without running the network. Raises WeightsError for a layout that is not SD 1.x / 2.x
        (naming what it is: SDXL, SD3, Flux, an inpainting UNet, a LoRA, a VAE...), ModelFolderError for
        a bad `config` folder or `vae`."""
        path = Path(path)
        config_dir = None if config is None else _check_config_dir(Path(config))
        shapes, metadata = read_shapes(path)
        try:
            layout = read_layout(shapes)
        except WeightsError as exc:  # say which file: with --vae or --config, there are several
            raise type(exc)(f"{path}: {exc}") from None
        model = cls(path, layout, config_dir, None if vae is None else check_vae_path(vae), metadata)
        if config_dir is not None:
            model._check_config_fits()
        model._settle_prediction_type(check_prediction_type(prediction_type))
        return model

    # --- what a ModelFolder answers -----------------------------------------------------------------

    @property
    def name(self) -> str:
        return self.path.stem

    @property
    def family(self) -> str:
        return self.layout.family

    @property
    def architecture(self) -> str:
        """"SD 1.x", "SD 2.x", "SD-Turbo (SD 2.1)", with "LCM-distilled" when the UNet takes a guidance
        embedding."""
        name = FAMILY_NAMES[self.family]
        if self.is_turbo:
            name = "SD-Turbo (SD 2.1)"
        if self.layout.unet_config.get("time_cond_proj_dim"):
            name = f"LCM-distilled {name}"
        return name

    @property
    def is_turbo(self) -> bool:
        """SD-Turbo is SD 2.1 in shape; only the file's name or metadata tell it apart."""
        arch = str(self.metadata.get("modelspec.architecture", ""))
        return self.family == "sd2" and ("turbo" in self.path.name.lower() or "turbo" in arch.lower())

    def replacement(self, name: str) -> Path | None:
        for part, p in self.replaced:
            if part == name:
                return p
        return None

    def component(self, name: str) -> Path:
        return self.path

    def part(self, name: str):
        if name not in PARTS:
            raise KeyError(name)
        replaced = self.replacement(name)
        if replaced is None:
            return self._own_part(name)
        if not replaced.is_file():
            return FolderPart(replaced)
        own = self._own_part("vae")
        return vae_file_part(replaced, like=(own.config, own.config_path))

    @property
    def own_vae(self):
        return self._own_part("vae")

    def _own_part(self, name: str) -> FilePart:
        mapping = getattr(self.layout, name)
        config = copy.deepcopy(getattr(self.layout, f"{name}_config"))
        config_from = None
        given = self.config_dir / name / "config.json" if self.config_dir else None
        if given is not None and given.is_file():
            config, config_from = read_json(given), given
        elif name == "unet" and self.prediction_type == "v_prediction" and self.family == "sd2" \
                and not self.is_turbo:
            config["sample_size"] = 96  # the SD 2.x v models are the 768-pixel ones (SD 1.x v finetunes: 512)
        return FilePart(self.path, name, mapping, config, config_from)

    @property
    def scheduler_config_path(self) -> Path:
        given = self.config_dir / "scheduler" / "scheduler_config.json" if self.config_dir else None
        if given is not None and given.is_file():
            return given
        return Path(f"{self.path} (standard {self.architecture} scheduler)")

    def scheduler_config(self) -> dict:
        """The config folder's scheduler, else the standard one of this architecture (SD 1.5's PNDM, SD 2.1's,
        SD-Turbo's trailing Euler, LCM's), with the prediction type settled for this file."""
        path = self.scheduler_config_path
        if path.is_file():
            data = read_json(path)
        elif self.layout.unet_config.get("time_cond_proj_dim"):
            data = copy.deepcopy(LCM_SCHEDULER)
        elif self.is_turbo:
            data = copy.deepcopy(SD_TURBO_SCHEDULER)
        else:
            data = copy.deepcopy(SD21_SCHEDULER if self.family == "sd2" else SD15_SCHEDULER)
        if self.prediction_type is not None and isinstance(data, dict):
            data["prediction_type"] = self.prediction_type
        return data

    @property
    def tokenizer_dir(self) -> Path | None:
        d = self.config_dir / "tokenizer" if self.config_dir else None
        return d if d is not None and any((d / n).is_file() for n in TOKENIZER_FILES) else None

    @property
    def tokenizer_kind(self) -> str:
        """The shipped CLIP tokenizer to use when there is no tokenizer folder: "sd1" or "sd2"."""
        return self.family

    def bytes_on_disk(self, name: str) -> int:
        if name in PARTS:
            return self.part(name).bytes_on_disk()
        return 0

    @property
    def ignored(self) -> dict[str, int]:
        """What the file holds that no network uses, by reason (EMA copies, schedule buffers, a pickle's
        non-tensor entries, ...)."""
        out = dict(self.layout.ignored)
        skipped = int(self.metadata.get("skipped", 0) or 0) if str(self.metadata.get("skipped", "0")).isdigit() else 0
        if skipped:
            out["non-tensor entries of the pickle (global_step, callbacks, optimizer states, ...)"] = skipped
        return out

    def _check_config_fits(self) -> None:
        """A --config folder whose networks have other shapes than the file's (an SD 2.x folder for an SD 1.x
        file, another model's configs) would fail at load with a list of mismatched tensors; say it plainly."""
        checks = (("unet", ("cross_attention_dim", "block_out_channels", "in_channels", "use_linear_projection")),
                  ("text_encoder", ("hidden_size", "num_hidden_layers", "hidden_act")),
                  ("vae", ("block_out_channels", "latent_channels")))
        for name, fields in checks:
            given = self.config_dir / name / "config.json"
            if not given.is_file():
                continue
            theirs, ours = read_json(given), getattr(self.layout, f"{name}_config")
            for key in fields:
                a, b = theirs.get(key), ours.get(key)
                if key in ours and key in theirs and not same_value(a, b):
                    raise ModelFolderError(
                        f"{given}: {key} is {a!r}, but {self.path.name} ({FAMILY_NAMES[self.family]}) has "
                        f"{b!r}: --config must describe this file's networks")

    # --- the prediction type -------------------------------------------------------------------------

    @property
    def needs_prediction_check(self) -> bool:
        """True for an SD 2.x file whose prediction type nothing has said: the runtime runs the check."""
        return self.prediction_type is None

    def set_prediction_type(self, value: str, note: str) -> None:
        self.prediction_type = check_prediction_type(value)
        self.prediction_note = note

    def _settle_prediction_type(self, override: str | None) -> None:
        given = self.config_dir / "scheduler" / "scheduler_config.json" if self.config_dir else None
        sidecar = read_sidecar_parameterization(self.path)
        if override is not None:
            self.set_prediction_type(override, "set by --prediction-type")
        elif given is not None and given.is_file():
            value = read_json(given).get("prediction_type", "epsilon")
            self.set_prediction_type(value if isinstance(value, str) else "epsilon", f"from {given}")
        elif sidecar is not None:
            self.set_prediction_type(sidecar, f"from {self.path.with_suffix('.yaml')}")
        elif self.family == "sd1":
            self.set_prediction_type("epsilon", "SD 1.x")
        elif self.is_turbo:
            self.set_prediction_type("epsilon", "SD-Turbo")
        elif self.layout.unet_config.get("time_cond_proj_dim"):
            self.set_prediction_type("epsilon", "LCM")

    def describe(self) -> str:
        return f"{self.path} ({self.architecture} single file)"


def _check_config_dir(d: Path) -> Path:
    if not d.is_dir():
        what = "is a file" if d.exists() else "no such folder"
        raise ModelFolderError(f"{d}: {what}; --config takes a diffusers model folder (its configs, "
                               "tokenizer and scheduler; weights are not needed)")
    if not any((d / n / "config.json").is_file() for n in PARTS) and not (d / "scheduler").is_dir() \
            and not (d / "tokenizer").is_dir():
        raise ModelFolderError(f"{d}: holds no unet/, vae/, text_encoder/, scheduler/ or tokenizer/ to take "
                               "configs from")
    return d


__all__ = ["SingleFileModel", "read_sidecar_parameterization"]
