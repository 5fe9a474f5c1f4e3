"""CLIP's byte-level BPE tokenizer, read from a diffusers model's ``tokenizer/`` folder.

Built on the ``tokenizers`` library with the same pieces transformers' ``CLIPTokenizer`` (5.x, which is the
former ``CLIPTokenizerFast``) puts together, so ids are equal to what ``StableDiffusionPipeline`` feeds its
text encoder::

    tokenizer(prompt, padding="max_length", max_length=77, truncation=True, return_tensors="pt").input_ids

- normalize: NFC, every run of whitespace -> one space, lower case;
- split with CLIP's regex (special-token strings, English contractions, runs of letters, single digits,
  runs of other non-space characters), then map each piece's UTF-8 bytes to GPT-2's byte-level characters;
- BPE with ``</w>`` on the last symbol of every piece;
- ``<|startoftext|>`` + at most ``max_length - 2`` ids + ``<|endoftext|>``, padded to ``max_length`` with
  the pad token (``<|endoftext|>`` in SD 1.x, ``"!"`` in SD 2.x).

Special-token strings typed into a prompt (``<|endoftext|>``, and ``"!"`` where it is SD 2.x's pad token)
become their special ids, as in transformers.
"""

from __future__ import annotations

import os
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch
from tokenizers import AddedToken, Regex, Tokenizer, decoders, normalizers, pre_tokenizers
from tokenizers.models import BPE

from ..errors import ModelFolderError
from ..fileio import MAX_TOKENIZER_BYTES, open_regular_file, read_bytes, read_json

BOS_TOKEN = "<|startoftext|>"
EOS_TOKEN = "<|endoftext|>"
END_OF_WORD = "</w>"
DEFAULT_MAX_LENGTH = 77
# transformers writes int(1e30) as model_max_length when a tokenizer has none; treat such values as "none".
_UNSET_MAX_LENGTH = 10**6
# token ids are 32-bit in the tokenizers library; no real vocabulary comes near this
MAX_TOKEN_ID = 2**31 - 1
_MERGES = "the tokenizer merges (merges.txt)"

CLIP_SPLIT_PATTERN = (
    r"""<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+"""
)


class TokenTruncationWarning(UserWarning):
    """A prompt was longer than the tokenizer's max_length and its end was dropped."""


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


def clip_normalizer() -> normalizers.Normalizer:
    return normalizers.Sequence([normalizers.NFC(), normalizers.Replace(Regex(r"\s+"), " "), normalizers.Lowercase()])


def clip_pre_tokenizer() -> pre_tokenizers.PreTokenizer:
    return pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(CLIP_SPLIT_PATTERN), behavior="removed", invert=True),
            pre_tokenizers.ByteLevel(add_prefix_space=False),
        ]
    )


@dataclass(frozen=True)
class SpecialToken:
    """A special token's text and how it is matched in raw text (the fields of tokenizers' ``AddedToken``)."""

    content: str
    lstrip: bool = False
    rstrip: bool = False
    single_word: bool = False
    normalized: bool = False

    @classmethod
    def parse(cls, value, where: str) -> "SpecialToken":
        if isinstance(value, str):
            return cls(value)
        if isinstance(value, dict) and isinstance(value.get("content"), str):
            flags = {k: value[k] for k in ("lstrip", "rstrip", "single_word", "normalized") if k in value}
            if not all(isinstance(v, bool) for v in flags.values()):
                raise ValueError(f"{where}: token flags must be true/false")
            return cls(value["content"], **flags)
        raise ValueError(f"{where}: a token must be a string or an object with a string 'content'")

    def added_token(self) -> AddedToken:
        return AddedToken(
            self.content, single_word=self.single_word, lstrip=self.lstrip, rstrip=self.rstrip,
            normalized=self.normalized, special=True,
        )


class ClipTokenizer:
    """CLIP BPE tokenizer: ``encode(text) -> list[int]``, ``tokenizer(texts) -> LongTensor [B, max_length]``."""

    def __init__(
        self,
        vocab: dict[str, int],
        merges: list[tuple[str, str]],
        *,
        max_length: int = DEFAULT_MAX_LENGTH,
        bos_token: str | SpecialToken = BOS_TOKEN,
        eos_token: str | SpecialToken = EOS_TOKEN,
        unk_token: str | SpecialToken = EOS_TOKEN,
        pad_token: str | SpecialToken = EOS_TOKEN,
        added_tokens: list[SpecialToken] = (),
        padding_side: str = "right",
        truncation_side: str = "right",
    ):
        if max_length < 2:
            raise ValueError(f"max_length must be at least 2 (start and end tokens), got {max_length}")
        if padding_side not in ("left", "right") or truncation_side not in ("left", "right"):
            raise ValueError("padding_side and truncation_side must be 'left' or 'right'")
        self.padding_side, self.truncation_side = padding_side, truncation_side
        roles = {}
        for role, tok in (("bos", bos_token), ("eos", eos_token), ("unk", unk_token), ("pad", pad_token)):
            roles[role] = tok if isinstance(tok, SpecialToken) else SpecialToken(tok)
        self.max_length = int(max_length)
        self.vocab_size = len(vocab)  # vocab.json's size, as transformers' ``vocab_size``; ``len()`` adds added tokens

        tok = Tokenizer(
            BPE(
                vocab=dict(vocab), merges=list(merges), dropout=None, continuing_subword_prefix="",
                end_of_word_suffix=END_OF_WORD, fuse_unk=False, unk_token=roles["unk"].content,
            )
        )
        tok.normalizer = clip_normalizer()
        tok.pre_tokenizer = clip_pre_tokenizer()
        tok.decoder = decoders.ByteLevel()
        # As transformers adds them: added_tokens_decoder's entries, then bos, eos, unk, pad. A token keeps its
        # vocab id (or takes the next free id, in first-seen order); when the same text comes twice, the last
        # one's matching flags win.
        tok.add_special_tokens([s.added_token() for s in _specials(added_tokens, roles.values())])
        self._tokenizer = tok

        self.bos_token, self.eos_token = roles["bos"].content, roles["eos"].content
        self.unk_token, self.pad_token = roles["unk"].content, roles["pad"].content
        self.bos_id = tok.token_to_id(self.bos_token)
        self.eos_id = tok.token_to_id(self.eos_token)
        self.pad_id = tok.token_to_id(self.pad_token)
        self.unk_id = tok.token_to_id(self.unk_token)

    # ------------------------------------------------------------------ loading

    @classmethod
    def from_folder(cls, tokenizer_dir: str | Path) -> "ClipTokenizer":
        """Load ``vocab.json`` + ``merges.txt`` (+ ``tokenizer_config.json`` / ``special_tokens_map.json``).
        Raises ModelFolderError (one line, naming the file) for a missing, oversized or malformed file."""
        folder = Path(tokenizer_dir)
        vocab, settings = _read_settings(folder)
        merges = _read_merges(folder / "merges.txt", vocab)
        try:
            return cls(vocab, merges, **settings)
        except Exception as e:  # the tokenizers library's own refusals (it raises plain Exception)
            raise ModelFolderError(f"{folder}: the tokenizer files do not make a tokenizer: {_one_line(e)}") from None

    # ------------------------------------------------------------------ encoding

    def tokenize(self, text: str) -> list[str]:
        """The BPE pieces of ``text`` (no start/end tokens, no truncation), e.g. ``['a</w>', 'cat</w>']``."""
        return self._tokenizer.encode(_check_text(text), add_special_tokens=False).tokens

    def num_tokens(self, text: str) -> int:
        """How many ids ``text`` takes, start and end tokens included, before truncation."""
        return len(self._tokenizer.encode(_check_text(text), add_special_tokens=False).ids) + 2

    def encode(self, text: str) -> list[int]:
        """``max_length`` ids: start, the text's ids (truncated with a warning), end, then padding."""
        ids = self._tokenizer.encode(_check_text(text), add_special_tokens=False).ids
        room = self.max_length - 2
        if len(ids) > room:
            if self.truncation_side == "right":
                ids, dropped = ids[:room], ids[room:]
            else:
                ids, dropped = ids[len(ids) - room :], ids[: len(ids) - room]
            where = "last" if self.truncation_side == "right" else "first"
            warnings.warn(
                f"prompt is {len(ids) + len(dropped) + 2} tokens but CLIP takes {self.max_length}: the {where} "
                f"{len(dropped)} tokens were dropped: {self.decode(dropped)!r}",
                TokenTruncationWarning,
                stacklevel=2,
            )
        out = [self.bos_id, *ids, self.eos_id]
        pad = [self.pad_id] * (self.max_length - len(out))
        return out + pad if self.padding_side == "right" else pad + out

    def __call__(self, texts: str | list[str]) -> torch.Tensor:
        """Encode a prompt or a batch of prompts to a ``torch.long`` tensor of shape ``[B, max_length]``."""
        if isinstance(texts, str):
            texts = [texts]
        return torch.tensor([self.encode(t) for t in texts], dtype=torch.long).reshape(len(texts), self.max_length)

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        """Text of ``ids`` (lower-cased, whitespace as the tokenizer saw it), for messages and debugging."""
        text = self._tokenizer.decode(list(ids), skip_special_tokens=skip_special_tokens)
        return text.replace(END_OF_WORD, " ").strip()

    def __len__(self) -> int:
        """Number of ids, added tokens included (e.g. a pad token that is not in vocab.json), like transformers."""
        return self._tokenizer.get_vocab_size(with_added_tokens=True)

    def __repr__(self) -> str:
        return f"ClipTokenizer(vocab_size={self.vocab_size}, max_length={self.max_length}, pad={self.pad_token!r})"


# ---------------------------------------------------------------------- file reading


def _special_tokens(config: dict, special_map: dict) -> tuple[list[SpecialToken], dict[str, SpecialToken]]:
    """(added tokens in id order, {bos/eos/unk/pad_token: token}). As transformers 5: when
    tokenizer_config.json has added_tokens_decoder, special_tokens_map.json is ignored and a named token whose
    text is in added_tokens_decoder takes that entry's flags; otherwise special_tokens_map.json's values
    override tokenizer_config.json's. ValueError for malformed entries."""
    decoder = config.get("added_tokens_decoder")
    if decoder is not None and not isinstance(decoder, dict):
        raise ValueError("tokenizer_config.json: added_tokens_decoder must be an object")
    added = []
    for index in sorted(decoder or {}, key=int):
        where = f"tokenizer_config.json: added_tokens_decoder[{index}]"
        added.append(SpecialToken.parse(decoder[index], where))
    by_content = {t.content: t for t in added}
    roles = {}
    defaults = {"bos_token": BOS_TOKEN, "eos_token": EOS_TOKEN, "unk_token": EOS_TOKEN, "pad_token": EOS_TOKEN}
    for key, default in defaults.items():
        value, where = config.get(key), "tokenizer_config.json"
        if decoder is None and special_map.get(key) is not None:
            value, where = special_map[key], "special_tokens_map.json"
        token = SpecialToken.parse(default if value is None else value, f"{where}: {key}")
        roles[key] = by_content.get(token.content, token)
    return added, roles


def _specials(added_tokens, roles) -> list[SpecialToken]:
    """The special tokens as transformers adds them: added_tokens_decoder's entries, then bos, eos, unk, pad;
    when the same text comes twice, the last one's matching flags win (first-seen order kept)."""
    specials: dict[str, SpecialToken] = {}
    for special in [*added_tokens, *roles]:
        specials[special.content] = special
    return list(specials.values())


def _one_line(e: BaseException) -> str:
    text = " ".join(str(e).split())
    return text[:200] + ("..." if len(text) > 200 else "")


def _read_settings(folder: Path) -> tuple[dict[str, int], dict]:
    """(vocab.json, the keyword arguments of `ClipTokenizer` but the merges) read from a tokenizer folder."""
    if not folder.is_dir():
        raise ModelFolderError(f"tokenizer folder not found: {folder}")
    vocab = _read_vocab(folder / "vocab.json")
    config = _read_optional_json(folder / "tokenizer_config.json")
    special_map = _read_optional_json(folder / "special_tokens_map.json")
    try:
        added, roles = _special_tokens(config, special_map)
        sides = {}
        for key in ("padding_side", "truncation_side"):
            sides[key] = config.get(key, "right")
            if sides[key] not in ("left", "right"):
                raise ValueError(f"tokenizer_config.json: {key} must be 'left' or 'right', got {sides[key]!r}")
        max_length = _max_length(config)
    except ValueError as e:
        raise ModelFolderError(f"{folder}: {e}") from None
    # An added token whose content is in the vocab keeps its vocab id; those must exist for bos/eos.
    for key in ("bos_token", "eos_token"):
        if roles[key].content not in vocab:
            raise ModelFolderError(f"{folder / 'vocab.json'}: has no entry for the {key} {roles[key].content!r}")
    return vocab, dict(max_length=max_length, bos_token=roles["bos_token"], eos_token=roles["eos_token"],
                       unk_token=roles["unk_token"], pad_token=roles["pad_token"], added_tokens=added, **sides)


def max_token_id(tokenizer_dir: str | Path) -> int:
    """The largest token id the tokenizer in `tokenizer_dir` can emit (a text encoder must take ids below
    its vocab_size). Reads vocab.json and the token configs; of merges.txt (merges only combine vocab
    entries) only checks that it is a regular file within the size limit, without parsing it, so it is
    cheap. Raises ModelFolderError as `ClipTokenizer.from_folder` does."""
    folder = Path(tokenizer_dir)
    vocab, settings = _read_settings(folder)
    merges = folder / "merges.txt"
    with open_regular_file(merges, _MERGES) as f:
        size = os.fstat(f.fileno()).st_size
    if size > MAX_TOKENIZER_BYTES:
        raise ModelFolderError(f"{merges}: {_MERGES} is {size} bytes, more than the {MAX_TOKENIZER_BYTES}-byte "
                               "limit for this kind of file")
    roles = [settings[k] for k in ("bos_token", "eos_token", "unk_token", "pad_token")]
    roles = [r if isinstance(r, SpecialToken) else SpecialToken(r) for r in roles]
    specials = _specials(settings["added_tokens"], roles)
    try:  # the ids the tokenizers library gives added tokens that are not in vocab.json
        tok = Tokenizer(BPE(vocab=dict(vocab), merges=[], unk_token=roles[2].content))
        tok.add_special_tokens([s.added_token() for s in specials])
        ids = [tok.token_to_id(s.content) for s in specials]
    except Exception as e:
        raise ModelFolderError(f"{folder}: the tokenizer files do not make a tokenizer: {_one_line(e)}") from None
    return max([*vocab.values(), *(i for i in ids if i is not None)])


def _max_length(config: dict) -> int:
    """tokenizer_config.json's model_max_length (77 when unset, or set to transformers' 'very large')."""
    max_length = config.get("model_max_length", DEFAULT_MAX_LENGTH)
    if isinstance(max_length, float) and max_length.is_integer():
        max_length = int(max_length)
    if not isinstance(max_length, int) or isinstance(max_length, bool) or max_length < 2:
        raise ValueError(f"tokenizer_config.json: model_max_length must be an integer >= 2, got {max_length!r}")
    return DEFAULT_MAX_LENGTH if max_length >= _UNSET_MAX_LENGTH else max_length


def _check_text(text) -> str:
    if not isinstance(text, str):
        raise TypeError(f"prompt must be str, got {type(text).__name__}")
    return text


def _read_optional_json(path: Path) -> dict:
    if not path.exists():
        return {}
    return read_json(path, path.name)


def _read_vocab(path: Path) -> dict[str, int]:
    vocab = read_json(path, "the tokenizer vocabulary (vocab.json)", want_object=False, limit=MAX_TOKENIZER_BYTES)
    if not isinstance(vocab, dict) or not vocab:
        raise ModelFolderError(f"{path}: expected a non-empty JSON object of token -> id")
    ids = set()
    for token, index in vocab.items():
        if not isinstance(index, int) or isinstance(index, bool) or not 0 <= index <= MAX_TOKEN_ID:
            raise ModelFolderError(
                f"{path}: token {token[:60]!r} has id {index!r}, expected an integer from 0 to {MAX_TOKEN_ID}")
        ids.add(index)
    if len(ids) != len(vocab):
        raise ModelFolderError(f"{path}: two tokens share an id")
    return vocab


def _read_merges(path: Path, vocab: dict[str, int]) -> list[tuple[str, str]]:
    """Parse merges.txt as the ``tokenizers`` library does: skip ``#version`` lines, then ``left right`` per line."""
    raw = read_bytes(path, _MERGES, limit=MAX_TOKENIZER_BYTES)
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ModelFolderError(f"{path}: cannot read the tokenizer merges: not UTF-8 ({e.reason} at byte {e.start})"
                               ) from None
    lines = text.split("\n")
    if lines and lines[-1] == "":
        lines.pop()
    merges = []
    for lineno, line in enumerate(lines, 1):
        line = line.removesuffix("\r")
        if line.startswith("#version"):
            continue
        parts = line.split(" ")
        if len(parts) != 2 or not parts[0] or not parts[1]:
            raise ModelFolderError(f"{path}: line {lineno} is not a merge 'left right': {line[:60]!r}")
        left, right = parts
        for token in (left, right, left + right):
            if token not in vocab:
                raise ModelFolderError(
                    f"{path}: line {lineno} ({line[:60]!r}) uses {token!r}, which is not in vocab.json"
                )
        merges.append((left, right))
    return merges
