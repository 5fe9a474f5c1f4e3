"""The standard CLIP vocabulary of Stable Diffusion 1.x / 2.x, shipped with sdlite, for single-file checkpoints.

A single-file checkpoint (.safetensors / .ckpt) holds the text encoder's weights but no tokenizer. Every SD 1.x
and 2.x text encoder (OpenAI's CLIP ViT-L/14 in 1.x, OpenCLIP ViT-H/14 in 2.x) uses the same byte-level BPE
vocabulary: OpenAI CLIP's ``bpe_simple_vocab_16e6.txt.gz`` (MIT licence), which sdlite ships as
``sdlite/tokenizer/data/bpe_simple_vocab_16e6.txt.gz`` (see the README.md beside it for its origin and
checksum). The ``vocab.json`` / ``merges.txt`` of the SD tokenizer folders are derived from it, and so is
:func:`standard_vocab`:

- merges: lines 1 .. 48894 of the text (line 0 is a version header; 49152 - 256 - 2 = 48894 merges);
- vocab: the 256 byte-level characters (GPT-2's byte -> character table, :func:`byte_level_alphabet`), the
  same 256 each with ``</w>``, each merge's two parts joined, in merge order, then ``<|startoftext|>`` (49406)
  and ``<|endoftext|>`` (49407): 49408 ids.

The two kinds differ only in their special-token files (:func:`standard_token_files`), as the published
diffusers folders have them:

- ``"sd1"``: openai/clip-vit-large-patch14's tokenizer, in SD 1.x folders: pads with ``<|endoftext|>`` (49407);
- ``"sd2"``: stabilityai/stable-diffusion-2(-1)'s tokenizer: pads with ``"!"`` (id 0).

``ClipTokenizer.standard(kind)`` builds the tokenizer; ``write_standard_tokenizer(dir, kind)`` writes the
folder.
"""

from __future__ import annotations

import gzip
import threading
from importlib import resources

# CLIP's special tokens and end-of-word mark, as its vocabulary spells them
BOS_TOKEN = "<|startoftext|>"
EOS_TOKEN = "<|endoftext|>"
END_OF_WORD = "</w>"


def byte_level_alphabet() -> list[str]:
    """GPT-2's byte -> printable character table, in its order (printable bytes first): CLIP's first 256 ids."""
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    chars = list(keep)
    extra = 0
    for b in range(256):
        if b not in keep:
            keep.append(b)
            chars.append(256 + extra)
            extra += 1
    return [chr(c) for c in chars]


VOCAB_FILE = "bpe_simple_vocab_16e6.txt.gz"
#: sha256 of the shipped file (also in data/README.md); checked by the tests, not at run time.
VOCAB_SHA256 = "924691ac288e54409236115652ad4aa250f48203de50a9e4722a6ecd48d6804a"
NUM_MERGES = 49152 - 256 - 2
STANDARD_VOCAB_SIZE = 2 * 256 + NUM_MERGES + 2  # 49408
KINDS = ("sd1", "sd2")
_PAD = {"sd1": EOS_TOKEN, "sd2": "!"}

_lock = threading.Lock()
_cache: tuple[dict[str, int], list[tuple[str, str]]] | None = None


def _read_merges(num_merges: int = NUM_MERGES) -> list[tuple[str, str]]:
    """The first ``num_merges`` merges of the shipped file (its line 0, a version header, skipped)."""
    merges = []
    with resources.files(__package__).joinpath("data", VOCAB_FILE).open("rb") as raw:
        with gzip.open(raw, "rt", encoding="utf-8", newline="\n") as text:
            next(text)  # '"bpe_simple_vocab_16e6.txt#version: 0.2'
            for line in text:
                if len(merges) == num_merges:
                    break
                left, right = line.rstrip("\n").split(" ")
                merges.append((left, right))
    if len(merges) != num_merges:
        raise RuntimeError(f"{VOCAB_FILE}: has {len(merges)} merges, expected at least {num_merges}")
    return merges


def derive_vocab(merges: list[tuple[str, str]]) -> dict[str, int]:
    """CLIP's token -> id table for ``merges``: bytes, bytes + ``</w>``, one id per merge, then start and end."""
    alphabet = byte_level_alphabet()
    tokens = [*alphabet, *(c + END_OF_WORD for c in alphabet), *(a + b for a, b in merges), BOS_TOKEN, EOS_TOKEN]
    vocab = {token: i for i, token in enumerate(tokens)}
    if len(vocab) != len(tokens):
        raise RuntimeError("the CLIP vocabulary has a duplicate token")
    return vocab


def standard_vocab() -> tuple[dict[str, int], list[tuple[str, str]]]:
    """(vocab, merges) of the standard CLIP tokenizer: 49408 ids, 48894 merges. Read once per process; the
    same objects are returned every time, so do not change them (``ClipTokenizer`` copies what it keeps)."""
    global _cache
    with _lock:
        if _cache is None:
            merges = _read_merges()
            _cache = (derive_vocab(merges), merges)
        return _cache


def check_kind(kind) -> str:
    if kind not in KINDS:
        raise ValueError(f"unknown standard tokenizer kind {kind!r}: expected one of {', '.join(KINDS)}")
    return kind


def standard_token_files(kind: str) -> tuple[dict, dict]:
    """(tokenizer_config.json, special_tokens_map.json) of an SD 1.x (``"sd1"``) or SD 2.x (``"sd2"``)
    tokenizer folder, as the published diffusers folders have them (the older transformers layout, without
    ``added_tokens_decoder``: start / end / unk tokens are matched after normalization, so a prompt's
    ``<|ENDOFTEXT|>`` is the end token too). SD 2.x's pad token ``"!"`` is named in both files, so that a
    reader of either one alone pads the same way. New dicts on every call."""
    check_kind(kind)

    def token(content: str) -> dict:
        return {"content": content, "lstrip": False, "normalized": True, "rstrip": False, "single_word": False}

    special_tokens_map = {
        "bos_token": token(BOS_TOKEN), "eos_token": token(EOS_TOKEN), "pad_token": _PAD[kind],
        "unk_token": token(EOS_TOKEN),
    }
    tokenizer_config = {
        "add_prefix_space": False,
        "bos_token": {"__type": "AddedToken", **token(BOS_TOKEN)},
        "do_lower_case": True,
        "eos_token": {"__type": "AddedToken", **token(EOS_TOKEN)},
        "errors": "replace",
        "model_max_length": 77,
        "pad_token": _PAD[kind],
        "tokenizer_class": "CLIPTokenizer",
        "unk_token": {"__type": "AddedToken", **token(EOS_TOKEN)},
    }
    return tokenizer_config, special_tokens_map
