"""Textual-inversion embeddings (Gal et al. 2022, arXiv:2208.01618) from an A1111 ``embeddings/`` folder.

An embedding is ``n`` learned token-embedding vectors (``n`` x the text encoder's width: 768 for SD 1.x,
1024 for SD 2.x) used by name: where the name's tokens appear in a prompt, the ``n`` vectors take their
place (see `sdlite.runtime.prompt_encoding`). The name is the file's stem, as in A1111.

File formats read, as A1111 and diffusers' ``load_textual_inversion`` read them:

- ``.pt`` / ``.bin`` (A1111): a dict with ``string_to_param`` = {``"*"``: tensor (n, dim)} (plus
  ``string_to_token``, ``name``, ``step``, ...: not used); read with torch's restricted unpickler
  (``weights_only=True``: no code from the file runs);
- a dict holding exactly one tensor, in a ``.pt`` / ``.bin`` or a ``.safetensors`` file: ``emb_params``
  (A1111 / kohya safetensors) or diffusers' ``{token: tensor}`` (``learned_embeds.bin``); a 1-d tensor is
  one vector.

`load_embeddings` reads a folder (and its subfolders, in name order); a file that cannot be read, or whose
width does not fit the text encoder, is skipped with one `EmbeddingWarning` line naming it (A1111 skips
both too). Files of other suffixes (A1111's embeddings inside PNG / WebP images among them) are left alone.
"""

from __future__ import annotations

import os
import pickle
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch

from ..errors import ModelFolderError, WeightsError
from ..fileio import open_regular_file
from .safetensors_mmap import open_safetensors

__all__ = ["Embedding", "EmbeddingWarning", "EMBEDDING_SUFFIXES", "MAX_EMBEDDING_BYTES", "MAX_VECTORS",
           "load_embeddings", "read_embedding"]

EMBEDDING_SUFFIXES = (".pt", ".bin", ".safetensors")
#: an embedding is a few KiB to a few hundred; anything larger is not one (a checkpoint put in the wrong place)
MAX_EMBEDDING_BYTES = 64 * 1024 * 1024
#: more vectors than a CLIP chunk holds could never be placed (A1111 would loop on them)
MAX_VECTORS = 75


class EmbeddingWarning(UserWarning):
    """An embedding file was skipped (unreadable, or made for a text encoder of another width)."""


@dataclass(frozen=True)
class Embedding:
    """One embedding: its name (the file's stem), its vectors (n, dim) float32, the file it came from."""

    name: str
    vectors: torch.Tensor
    path: Path

    @property
    def num_vectors(self) -> int:
        return int(self.vectors.shape[0])

    @property
    def dim(self) -> int:
        return int(self.vectors.shape[1])


def read_embedding(path: str | os.PathLike) -> Embedding:
    """Read one embedding file (see the module docstring). Raises WeightsError, one line naming the file,
    for a file that is not an embedding."""
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix not in EMBEDDING_SUFFIXES:
        raise WeightsError(f"{path}: not an embedding file (sdlite reads {', '.join(EMBEDDING_SUFFIXES)})")
    with open_regular_file(path, "embedding", error=WeightsError) as f:
        size = os.fstat(f.fileno()).st_size
        if size == 0:
            raise WeightsError(f"{path}: the embedding file is empty")
        if size > MAX_EMBEDDING_BYTES:
            raise WeightsError(f"{path}: {size} bytes is too large for an embedding "
                               f"(at most {MAX_EMBEDDING_BYTES >> 20} MiB)")
        head = f.read(8)
        f.seek(0)
        if suffix == ".safetensors" and not head.startswith(b"PK"):
            data = _read_safetensors(path)
        else:
            data = _read_pickle(path, f)
    vectors = _vectors(path, data)
    return Embedding(path.stem, vectors, path)


def load_embeddings(folder: str | os.PathLike, dim: int | None = None) -> dict[str, Embedding]:
    """{name: Embedding} of every embedding file under `folder` (subfolders included, in name order).
    With `dim`, an embedding of another width is skipped; every skipped file gets one `EmbeddingWarning`
    naming it. A name seen twice keeps its first file (with a warning). Raises ModelFolderError when
    `folder` is not a folder."""
    root = Path(folder)
    if not root.is_dir():
        raise ModelFolderError(f"{root}: the embeddings folder {'is not a folder' if root.exists() else 'is missing'}")
    found: dict[str, Embedding] = {}
    for path in sorted(root.rglob("*")):
        if path.suffix.lower() not in EMBEDDING_SUFFIXES or path.name.startswith(".") or not path.is_file():
            continue
        try:
            emb = read_embedding(path)
        except WeightsError as e:
            _skip(f"embedding skipped: {e}")
            continue
        if dim is not None and emb.dim != dim:
            _skip(f"embedding skipped: {path}: its vectors are {emb.dim} wide, the text encoder's are {dim} "
                  f"(made for {_family(emb.dim)}?)")
        elif emb.name in found:
            _skip(f"embedding skipped: {path}: the name {emb.name!r} is taken by {found[emb.name].path}")
        else:
            found[emb.name] = emb
    return found


def _skip(message: str) -> None:
    warnings.warn(message, EmbeddingWarning, stacklevel=3)


def _family(dim: int) -> str:
    return {768: "SD 1.x", 1024: "SD 2.x", 1280: "SDXL"}.get(dim, "another model")


def _read_safetensors(path: Path) -> dict:
    with open_safetensors(path) as st:
        return {name: st[name].clone() for name in st.keys()}


def _read_pickle(path: Path, f) -> object:
    try:
        return torch.load(f, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise WeightsError(f"{path}: refused (it is not a plain embedding file): {first[:200]}") from None
    except Exception as e:  # torch raises RuntimeError, EOFError, zipfile errors... for a damaged file
        raise WeightsError(f"{path}: cannot read the embedding: {type(e).__name__}: {str(e)[:200]}") from None


def _vectors(path: Path, data: object) -> torch.Tensor:
    """The (n, dim) float32 vectors of a loaded file, by A1111's rules."""
    if not isinstance(data, dict):
        raise WeightsError(f"{path}: not an embedding (it holds a {type(data).__name__}, not a dict)")
    if "string_to_param" in data:
        params = data["string_to_param"]
        if not isinstance(params, dict) or len(params) != 1:
            raise WeightsError(f"{path}: string_to_param must hold exactly one tensor")
        tensor = next(iter(params.values()))
    elif "clip_l" in data and "clip_g" in data:
        raise WeightsError(f"{path}: an SDXL embedding (clip_l + clip_g); sdlite runs SD 1.x / 2.x")
    else:
        tensors = [v for v in data.values() if isinstance(v, torch.Tensor)]
        if len(data) != 1 or len(tensors) != 1:
            keys = ", ".join(repr(k) for k in list(data)[:5])
            raise WeightsError(f"{path}: not an embedding: expected string_to_param or a single tensor, "
                               f"found {len(data)} entries ({keys})")
        tensor = tensors[0]
    if not isinstance(tensor, torch.Tensor) or not tensor.is_floating_point() or tensor.layout != torch.strided:
        raise WeightsError(f"{path}: the embedding's vectors are not a dense floating-point tensor")
    vectors = tensor.detach().to(torch.float32)
    if vectors.dim() == 1:
        vectors = vectors.unsqueeze(0)
    if vectors.dim() != 2 or not 1 <= vectors.shape[0] <= MAX_VECTORS or vectors.shape[1] < 1:
        raise WeightsError(f"{path}: the embedding has shape {tuple(tensor.shape)}; expected (vectors, width) "
                           f"with 1 to {MAX_VECTORS} vectors")
    if not bool(torch.isfinite(vectors).all()):
        raise WeightsError(f"{path}: the embedding holds NaN or infinite values")
    return vectors.contiguous().clone()
