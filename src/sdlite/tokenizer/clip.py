"""CLIP's byte-level BPE tokenizer, read from a diffusers model's ``tokenizer/`` folder or built from the
standard vocabulary that sdlite ships (for single-file checkpoints, which hold no tokenizer).

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

Folder formats read (`ClipTokenizer.from_folder`), as transformers 5 reads them:

- the vocabulary and merges: ``tokenizer.json`` (the ``tokenizers`` library's file, the only one a folder
  re-saved by transformers 5 holds: its BPE ``model.vocab`` and ``model.merges``, merges as ``"a b"`` strings
  or ``[a, b]`` pairs) when the folder has one, else ``vocab.json`` + ``merges.txt`` (the older files of the
  published SD folders). transformers 5 loads ``tokenizer.json`` first when both are there, and so does
  sdlite. Of ``tokenizer.json`` only the vocabulary, the merges, ``added_tokens`` and the padding /
  truncation directions are used: its normalizer, pre-tokenizer and post-processor are CLIP's own, rebuilt
  here as transformers' ``CLIPTokenizer`` rebuilds them;
- the special tokens and lengths: ``tokenizer_config.json`` (``model_max_length``, the named tokens,
  ``added_tokens_decoder``, ``padding_side`` / ``truncation_side``) and, when it has no
  ``added_tokens_decoder``, ``special_tokens_map.json`` and ``tokenizer.json``'s ``added_tokens``.

Every file goes through `sdlite.fileio` (regular files only, size limits); a missing or malformed one is a
one-line `ModelFolderError` naming it. The standard vocabulary (`ClipTokenizer.standard`) comes from OpenAI
CLIP's ``bpe_simple_vocab_16e6.txt.gz``, shipped in ``sdlite/tokenizer/data`` (see `sdlite.tokenizer.standard`).
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
from .standard import BOS_TOKEN, END_OF_WORD, EOS_TOKEN, standard_token_files, standard_vocab

DEFAULT_MAX_LENGTH = 77
# transformers writes int(1e30) as model_max_length when a tokenizer has none; treat such values as "none".
_UNSET_MAX_LENGTH = 10**6
# token ids are 32-bit in the tokenizers library; no real vocabulary comes near this
MAX_TOKEN_ID = 2**31 - 1
_MERGES = "the tokenizer merges (merges.txt)"
_TOKENIZER_JSON = "the tokenizer (tokenizer.json)"
#: The files a tokenizer folder is read from: tokenizer.json, or else vocab.json + merges.txt.
TOKENIZER_JSON, VOCAB_JSON, MERGES_TXT = "tokenizer.json", "vocab.json", "merges.txt"

CLIP_SPLIT_PATTERN = (
    r"""<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+"""
)


class TokenTruncationWarning(UserWarning):
    """A prompt was longer than the tokenizer's max_length and its end was dropped."""


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
        """Load a tokenizer folder: ``tokenizer.json`` when there is one (as transformers 5 does), else
        ``vocab.json`` + ``merges.txt``; with ``tokenizer_config.json`` / ``special_tokens_map.json`` beside
        them (see the module docstring). Raises ModelFolderError (one line, naming the file) for a missing,
        oversized or malformed file."""
        folder = Path(tokenizer_dir)
        vocab, merges, settings = _read_folder(folder)
        if merges is None:
            merges = _read_merges(folder / MERGES_TXT, vocab)
        try:
            return cls(vocab, merges, **settings)
        except Exception as e:  # the tokenizers library's own refusals (it raises plain Exception)
            raise ModelFolderError(f"{folder}: the tokenizer files do not make a tokenizer: {_one_line(e)}") from None

    @classmethod
    def standard(cls, kind: str) -> "ClipTokenizer":
        """The standard CLIP tokenizer of SD 1.x (``kind="sd1"``: pads with ``<|endoftext|>``) or SD 2.x
        (``"sd2"``: pads with ``"!"``, id 0), from the vocabulary shipped with sdlite, for checkpoints that
        hold no tokenizer. The same ids as transformers' ``CLIPTokenizer`` reading the published tokenizer
        folders, and as `from_folder` reading one written by ``write_standard_tokenizer``. ValueError for
        another kind."""

        config, special_map = standard_token_files(kind)
        vocab, merges = standard_vocab()
        return cls(vocab, merges, **_settings(config, special_map, None))

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


def _special_tokens(
    config: dict, special_map: dict, json_added: list[SpecialToken] | None = None
) -> tuple[list[SpecialToken], dict[str, SpecialToken]]:
    """(added tokens in id order, {bos/eos/unk/pad_token: token}). As transformers 5: when
    tokenizer_config.json has added_tokens_decoder, special_tokens_map.json and tokenizer.json's added_tokens
    (``json_added``) are ignored and a named token whose text is in added_tokens_decoder takes that entry's
    flags; otherwise special_tokens_map.json's values override tokenizer_config.json's, and tokenizer.json's
    added_tokens stand in for added_tokens_decoder. ValueError for malformed entries."""
    decoder = config.get("added_tokens_decoder")
    if decoder is not None and not isinstance(decoder, dict):
        raise ValueError("tokenizer_config.json: added_tokens_decoder must be an object")
    added = []
    for index in sorted(decoder or {}, key=_decoder_index):
        where = f"tokenizer_config.json: added_tokens_decoder[{index}]"
        added.append(SpecialToken.parse(decoder[index], where))
    if decoder is None and json_added is not None:
        added = list(json_added)
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


def _decoder_index(index: str) -> int:
    try:
        return int(index)
    except ValueError:
        raise ValueError(f"tokenizer_config.json: added_tokens_decoder key {index[:30]!r} is not an id") from None


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


def _read_folder(folder: Path) -> tuple[dict[str, int], list[tuple[str, str]] | None, dict]:
    """(vocab, merges, the other keyword arguments of `ClipTokenizer`) read from a tokenizer folder: from
    tokenizer.json when it exists, else vocab.json, with merges None (merges.txt, left for the caller)."""
    if not folder.is_dir():
        raise ModelFolderError(f"tokenizer folder not found: {folder}")
    config = _read_optional_json(folder / "tokenizer_config.json")
    special_map = _read_optional_json(folder / "special_tokens_map.json")
    json_path = folder / TOKENIZER_JSON
    if json_path.exists():  # present but not a regular file: refused, naming it, when read
        source = _read_tokenizer_json(json_path)
    else:
        source = _VocabSource(folder / VOCAB_JSON, _read_vocab(folder / VOCAB_JSON))
    try:
        settings = _settings(config, special_map, source)
    except ValueError as e:
        raise ModelFolderError(f"{folder}: {e}") from None
    # An added token whose content is in the vocab keeps its vocab id; those must exist for bos/eos.
    for key in ("bos_token", "eos_token"):
        if settings[key].content not in source.vocab:
            raise ModelFolderError(f"{source.path}: has no entry for the {key} {settings[key].content!r}")
    return source.vocab, source.merges, settings


@dataclass
class _VocabSource:
    """The vocabulary as one file gives it: vocab.json (merges in merges.txt, not read here: None) or
    tokenizer.json (merges, added tokens and padding / truncation directions too)."""

    path: Path
    vocab: dict[str, int]
    merges: list[tuple[str, str]] | None = None
    added: list[SpecialToken] | None = None
    sides: dict[str, str] | None = None


def _settings(config: dict, special_map: dict, source: _VocabSource | None) -> dict:
    """The keyword arguments of `ClipTokenizer` but vocab and merges, from the two config files' contents and
    what tokenizer.json adds (``source``). ValueError for malformed values."""
    added, roles = _special_tokens(config, special_map, source.added if source else None)
    sides = {}
    for key in ("padding_side", "truncation_side"):
        sides[key] = config.get(key, ((source and source.sides) or {}).get(key, "right"))
        if sides[key] not in ("left", "right"):
            raise ValueError(f"tokenizer_config.json: {key} must be 'left' or 'right', got {sides[key]!r}")
    return dict(max_length=_max_length(config), bos_token=roles["bos_token"], eos_token=roles["eos_token"],
                unk_token=roles["unk_token"], pad_token=roles["pad_token"], added_tokens=added, **sides)


def tokenizer_files_present(tokenizer_dir: str | Path) -> bool:
    """True when `tokenizer_dir` has the file a tokenizer is read from: ``tokenizer.json`` (a folder re-saved
    by transformers 5 holds only that one) or ``vocab.json`` (the published SD folders; ``merges.txt`` beside
    it is checked when read). Like a model folder's other checks, a path that exists but is not a regular
    file counts: reading it refuses it, naming it. Cheap: reads nothing."""
    folder = Path(tokenizer_dir)
    return (folder / TOKENIZER_JSON).exists() or (folder / VOCAB_JSON).exists()


def max_token_id(tokenizer_dir: str | Path) -> int:
    """The largest token id the tokenizer in `tokenizer_dir` can emit (a text encoder must take ids below
    its vocab_size). Reads the vocabulary (vocab.json, or tokenizer.json, merges included) and the token
    configs; of merges.txt (merges only combine vocab entries) only checks that it is a regular file within
    the size limit, without parsing it, so it is cheap. Raises ModelFolderError as `ClipTokenizer.from_folder`
    does."""
    folder = Path(tokenizer_dir)
    vocab, merges, settings = _read_folder(folder)
    if merges is None:
        _check_merges_file(folder / MERGES_TXT)
    roles = [settings[k] for k in ("bos_token", "eos_token", "unk_token", "pad_token")]
    specials = _specials(settings["added_tokens"], roles)
    try:  # the ids the tokenizers library gives added tokens that are not in the vocabulary
        tok = Tokenizer(BPE(vocab=dict(vocab), merges=[], unk_token=roles[2].content))
        tok.add_special_tokens([s.added_token() for s in specials])
        ids = [tok.token_to_id(s.content) for s in specials]
    except Exception as e:
        raise ModelFolderError(f"{folder}: the tokenizer files do not make a tokenizer: {_one_line(e)}") from None
    return max([*vocab.values(), *(i for i in ids if i is not None)])


def _check_merges_file(path: Path) -> None:
    with open_regular_file(path, _MERGES) as f:
        size = os.fstat(f.fileno()).st_size
    if size > MAX_TOKENIZER_BYTES:
        raise ModelFolderError(f"{path}: {_MERGES} is {size} bytes, more than the {MAX_TOKENIZER_BYTES}-byte "
                               "limit for this kind of file")


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
    try:
        return _check_vocab(vocab)
    except ValueError as e:
        raise ModelFolderError(f"{path}: {e}") from None


def _check_vocab(vocab, what: str = "") -> dict[str, int]:
    """`vocab` if it is a non-empty object of token -> distinct id in 0 .. MAX_TOKEN_ID, else ValueError."""
    if not isinstance(vocab, dict) or not vocab:
        raise ValueError(f"{what}expected a non-empty JSON object of token -> id")
    ids = set()
    for token, index in vocab.items():
        if not isinstance(index, int) or isinstance(index, bool) or not 0 <= index <= MAX_TOKEN_ID:
            raise ValueError(
                f"{what}token {token[:60]!r} has id {index!r}, expected an integer from 0 to {MAX_TOKEN_ID}")
        ids.add(index)
    if len(ids) != len(vocab):
        raise ValueError(f"{what}two tokens share an id")
    return vocab


def _check_merge(left: str, right: str, vocab: dict[str, int], where: str, vocab_name: str) -> None:
    for token in (left, right, left + right):
        if token not in vocab:
            raise ValueError(f"{where} uses {token[:60]!r}, which is not in {vocab_name}")


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
        try:
            _check_merge(parts[0], parts[1], vocab, f"line {lineno} ({line[:60]!r})", VOCAB_JSON)
        except ValueError as e:
            raise ModelFolderError(f"{path}: {e}") from None
        merges.append((parts[0], parts[1]))
    return merges


# ---------------------------------------------------------------------- tokenizer.json


def _read_tokenizer_json(path: Path) -> _VocabSource:
    """tokenizer.json's BPE vocabulary, merges, added tokens and padding / truncation directions, as
    transformers' ``CLIPTokenizer`` takes them from it. ModelFolderError naming the file when malformed."""
    data = read_json(path, _TOKENIZER_JSON, limit=MAX_TOKENIZER_BYTES)
    try:
        model = data.get("model")
        if not isinstance(model, dict):
            raise ValueError("has no 'model' object")
        kind = model.get("type", "BPE")
        if kind != "BPE":
            raise ValueError(f"model type is {str(kind)[:40]!r}, not 'BPE' (a CLIP tokenizer is byte-level BPE)")
        vocab = _check_vocab(model.get("vocab"), "model.vocab: ")
        merges = _json_merges(model.get("merges"), vocab)
        added = _json_added_tokens(data.get("added_tokens", []))
        sides = {"padding_side": _json_direction(data, "padding"),
                 "truncation_side": _json_direction(data, "truncation")}
    except ValueError as e:
        raise ModelFolderError(f"{path}: {e}") from None
    return _VocabSource(path, vocab, merges, added, {k: v for k, v in sides.items() if v is not None})


def _json_merges(merges, vocab: dict[str, int]) -> list[tuple[str, str]]:
    """model.merges: a list of ``"left right"`` strings (older files) or of ``[left, right]`` pairs."""
    if not isinstance(merges, list):
        raise ValueError("model.merges must be a list of merges")
    out = []
    for i, merge in enumerate(merges):
        pair = merge.split(" ") if isinstance(merge, str) else merge
        if not (isinstance(pair, list) and len(pair) == 2 and all(isinstance(p, str) and p for p in pair)):
            raise ValueError(f"model.merges[{i}] is not a merge 'left right' or [left, right]: {str(merge)[:60]!r}")
        _check_merge(pair[0], pair[1], vocab, f"model.merges[{i}]", "model.vocab")
        out.append((pair[0], pair[1]))
    return out


def _json_added_tokens(entries) -> list[SpecialToken]:
    """added_tokens: objects with an id and a content (and matching flags), in id order; when two share an id
    the last one counts, as in transformers."""
    if not isinstance(entries, list):
        raise ValueError("added_tokens must be a list")
    by_id: dict[int, SpecialToken] = {}
    for i, entry in enumerate(entries):
        where = f"added_tokens[{i}]"
        index = entry.get("id") if isinstance(entry, dict) else None
        if not isinstance(index, int) or isinstance(index, bool) or not 0 <= index <= MAX_TOKEN_ID:
            raise ValueError(f"{where}: expected an object with an integer 'id' from 0 to {MAX_TOKEN_ID}")
        if not isinstance(entry.get("special", False), bool):
            raise ValueError(f"{where}: 'special' must be true/false")
        by_id[index] = SpecialToken.parse(entry, where)
    return [by_id[i] for i in sorted(by_id)]


def _json_direction(data: dict, key: str) -> str | None:
    """'left' / 'right' from tokenizer.json's padding or truncation settings (transformers takes them as the
    default padding_side / truncation_side), or None when it has none."""
    settings = data.get(key)
    if settings is None:
        return None
    direction = settings.get("direction") if isinstance(settings, dict) else None
    if not isinstance(direction, str) or direction.lower() not in ("left", "right"):
        raise ValueError(f"{key} must be null or an object with a direction 'Left' or 'Right'")
    return direction.lower()
