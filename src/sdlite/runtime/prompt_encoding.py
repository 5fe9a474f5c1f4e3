"""Prompts -> text embeddings: A1111's weighting, long prompts in 75-token chunks, textual inversion.

Two syntaxes (`GenerationRequest.prompt_syntax`):

``"a1111"`` (default), as AUTOMATIC1111's ``sd_hijack_clip`` encodes a prompt:

- the prompt is parsed by `sdlite.tokenizer.prompt_syntax` (``(word:1.3)``, ``[word]``, ``BREAK``; LoRA
  tags are taken out); each fragment is tokenized on its own;
- the tokens are laid out in chunks of ``max_length - 2`` (75) tokens. When a chunk is full and a comma
  is among its last 20 tokens, the tokens after that comma move to the next chunk; ``BREAK`` ends a chunk
  early. Each chunk is framed as ``BOS + tokens + EOS + padding`` (77 ids) and encoded on its own; the
  chunks' hidden states are concatenated along the sequence: (1, 77 * chunks, dim);
- weighting ("Original" emphasis): each chunk's hidden states z are multiplied token-wise by the weights
  (1.0 for BOS, EOS and padding), then scaled by ``mean(z) / mean(z * w)`` so the chunk's overall mean
  is what it was. A chunk whose weights are all 1.0 is left exactly as the text encoder gave it, so a
  prompt of at most 75 tokens with no special syntax gives exactly the ``"plain"`` result;
- the prompt and the negative prompt are padded with empty chunks (the encoding of ``""``) to the same
  number of chunks (`encode_prompts`), so classifier-free guidance can batch them.

``"plain"``: diffusers' ``StableDiffusionPipeline``: one chunk of 77, tokens past it dropped with a
``TokenTruncationWarning``, brackets and ``BREAK`` are literal text. Extra-network tags (``<lora:...>``) are
taken out in both syntaxes (the pipeline applies a prompt's LoRA tags in both).

Textual-inversion embeddings (`sdlite.weights.embeddings`) apply in both: where a prompt's tokens spell an
embedding's name (longest name first, as A1111's ``find_embedding_at_position``), its n vectors replace
those tokens in the token embeddings (taking n positions; in ``"a1111"`` an embedding that does not fit
in the rest of a chunk starts the next one). This gives what diffusers' ``load_textual_inversion`` gives
(it adds n tokens to the vocabulary and rows to the embedding table).
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field

import torch

from ..tokenizer.clip import ClipTokenizer, TokenTruncationWarning
from ..tokenizer.prompt_syntax import PROMPT_SYNTAXES, extract_extra_networks, parse_prompt
from ..weights.embeddings import Embedding, EmbeddingWarning

__all__ = ["PROMPT_SYNTAXES", "DEFAULT_SYNTAX", "PromptChunk", "EmbeddingTable", "tokenize_prompt",
           "encode_chunks", "encode_prompts", "pad_chunks", "COMMA_BACKTRACK"]

DEFAULT_SYNTAX = "a1111"
#: A1111's ``comma_padding_backtrack`` default: how far back from a chunk's end a comma may be to split there
COMMA_BACKTRACK = 20
COMMA = ",</w>"


@dataclass
class PromptChunk:
    """One text-encoder pass: ``max_length`` ids (BOS, tokens, EOS, padding), a weight per id, and the
    embedding vectors to put in at given offsets of the ids ([(offset, vectors (n, dim))])."""

    ids: list[int]
    weights: list[float]
    fixes: list[tuple[int, torch.Tensor]] = field(default_factory=list)

    @property
    def weighted(self) -> bool:
        return any(w != 1.0 for w in self.weights)


class EmbeddingTable:
    """The embeddings by the token ids of their names, for one tokenizer: `match(ids, i)` finds the longest
    name that starts at ``ids[i]``."""

    def __init__(self, tokenizer: ClipTokenizer, embeddings: dict[str, Embedding] | None):
        self.by_first: dict[int, list[tuple[tuple[int, ...], Embedding]]] = {}
        room = tokenizer.max_length - 2
        for emb in (embeddings or {}).values():
            ids = tuple(_raw_ids(tokenizer, emb.name))
            if emb.num_vectors > room:
                warnings.warn(f"embedding skipped: {emb.path}: {emb.num_vectors} vectors do not fit in a chunk of "
                              f"{room} tokens", EmbeddingWarning, stacklevel=2)
                continue
            if ids:
                entries = self.by_first.setdefault(ids[0], [])
                entries.append((ids, emb))
                entries.sort(key=lambda e: len(e[0]), reverse=True)

    def __bool__(self) -> bool:
        return bool(self.by_first)

    def match(self, ids: list[int], i: int) -> tuple[Embedding | None, int]:
        """(the embedding whose name's ids start at ``ids[i]``, how many ids the name takes) or (None, 0)."""
        for name_ids, emb in self.by_first.get(ids[i], ()):
            if tuple(ids[i:i + len(name_ids)]) == name_ids:
                return emb, len(name_ids)
        return None, 0


def tokenize_prompt(tokenizer: ClipTokenizer, text: str, syntax: str = DEFAULT_SYNTAX,
                    embeddings: EmbeddingTable | None = None) -> list[PromptChunk]:
    """`text` as the chunks the text encoder runs on (one for ``"plain"``; at least one for ``"a1111"``)."""
    if syntax == "plain":
        return [_plain_chunk(tokenizer, text, embeddings)]
    if syntax != "a1111":
        raise ValueError(f"prompt_syntax must be one of {', '.join(PROMPT_SYNTAXES)}, got {syntax!r}")
    return _ChunkWriter(tokenizer, embeddings).write(text)


def empty_chunk(tokenizer: ClipTokenizer) -> PromptChunk:
    """The chunk of ``""`` (BOS, EOS, padding): what a shorter prompt is padded with."""
    ids = _frame(tokenizer, [])
    return PromptChunk(ids, [1.0] * len(ids))


def pad_chunks(tokenizer: ClipTokenizer, *chunk_lists: list[PromptChunk]) -> list[list[PromptChunk]]:
    """The lists padded with empty chunks to the length of the longest."""
    most = max(len(c) for c in chunk_lists)
    return [c + [empty_chunk(tokenizer) for _ in range(most - len(c))] for c in chunk_lists]


def encode_chunks(text_encoder, chunks: list[PromptChunk], clip_skip: int = 0) -> torch.Tensor:
    """Run `text_encoder` (`sdlite.models.clip_text.CLIPTextModel`) on each chunk, put the embeddings'
    vectors in, weight it; returns (1, max_length * len(chunks), dim) in the encoder's dtype."""
    out = []
    for chunk in chunks:
        ids = torch.tensor([chunk.ids], dtype=torch.long)
        if chunk.fixes:
            embeds = text_encoder.token_embeddings(ids).clone()
            for offset, vectors in chunk.fixes:
                embeds[0, offset:offset + vectors.shape[0]] = vectors.to(embeds.dtype)
            z = text_encoder(ids, clip_skip=clip_skip, inputs_embeds=embeds)
        else:
            z = text_encoder(ids, clip_skip=clip_skip)
        if chunk.weighted:
            z = apply_weights(z, torch.tensor(chunk.weights, dtype=torch.float32))
        out.append(z)
    return out[0] if len(out) == 1 else torch.cat(out, dim=1)


def apply_weights(z: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """A1111's "Original" emphasis on one chunk's hidden states z (1, T, dim) with weights (T,): multiply
    token-wise, then restore the mean of z. Computed in float32, returned in z's dtype."""
    zf = z.float()
    original_mean = zf.mean()
    zf = zf * weights.reshape(1, -1, 1)
    zf = zf * (original_mean / zf.mean())
    return zf.to(z.dtype)


def encode_prompts(text_encoder, tokenizer: ClipTokenizer, texts: list[str], *, syntax: str = DEFAULT_SYNTAX,
                   clip_skip: int = 0, embeddings: EmbeddingTable | None = None) -> list[torch.Tensor]:
    """Each text's embeddings (1, 77 * k, dim), all with the same k (shorter ones padded with empty chunks)."""
    chunk_lists = pad_chunks(tokenizer, *[tokenize_prompt(tokenizer, t, syntax, embeddings) for t in texts])
    return [encode_chunks(text_encoder, chunks, clip_skip) for chunks in chunk_lists]


# ---------------------------------------------------------------------- the chunk layouts


def _raw_ids(tokenizer: ClipTokenizer, text: str) -> list[int]:
    """The ids of `text`, no BOS / EOS, no truncation (A1111 tokenizes with ``add_special_tokens=False``)."""
    return tokenizer._tokenizer.encode(text, add_special_tokens=False).ids


def _frame(tokenizer: ClipTokenizer, body: list, bos=None, eos=None, pad=None) -> list:
    """BOS + body + EOS, padded to max_length on the tokenizer's padding side (ids by default; pass the
    values for a parallel list, e.g. weights)."""
    bos = tokenizer.bos_id if bos is None else bos
    eos = tokenizer.eos_id if eos is None else eos
    pad = tokenizer.pad_id if pad is None else pad
    out = [bos, *body, eos]
    padding = [pad] * (tokenizer.max_length - len(out))
    return out + padding if tokenizer.padding_side == "right" else padding + out


def _offset(tokenizer: ClipTokenizer, n_body: int) -> int:
    """Where body position 0 lands in the framed ids."""
    left = tokenizer.padding_side == "left"
    return 1 + (tokenizer.max_length - n_body - 2 if left else 0)


def _plain_chunk(tokenizer: ClipTokenizer, text: str, table: EmbeddingTable | None) -> PromptChunk:
    text, _ = extract_extra_networks(text)  # LoRA tags apply in both syntaxes; they are never text to encode
    if not table:
        ids = tokenizer.encode(text)
        return PromptChunk(ids, [1.0] * len(ids))
    raw = _raw_ids(tokenizer, text)
    body: list[int] = []
    places: list[tuple[int, torch.Tensor]] = []
    i = 0
    while i < len(raw):
        emb, used = table.match(raw, i)
        if emb is None:
            body.append(raw[i])
            i += 1
            continue
        places.append((len(body), emb.vectors))
        body.extend([tokenizer.pad_id] * emb.num_vectors)  # placeholders, as diffusers' added tokens
        i += used
    room = tokenizer.max_length - 2
    if len(body) > room:
        warnings.warn(f"prompt is {len(body) + 2} tokens (embeddings' vectors counted) but CLIP takes "
                      f"{tokenizer.max_length}: the last {len(body) - room} were dropped", TokenTruncationWarning,
                      stacklevel=4)
        body = body[:room]
    ids = _frame(tokenizer, body)
    start = _offset(tokenizer, len(body))
    fixes = [(start + at, vec[: room - at]) for at, vec in places if at < room]
    return PromptChunk(ids, [1.0] * len(ids), fixes)


class _ChunkWriter:
    """A1111's ``tokenize_line``: fragments -> chunks of `room` tokens, split at BREAK, at a comma near a
    full chunk's end, and before an embedding that does not fit."""

    def __init__(self, tokenizer: ClipTokenizer, table: EmbeddingTable | None):
        self.tokenizer = tokenizer
        self.table = table or None
        self.room = tokenizer.max_length - 2
        self.comma = tokenizer._tokenizer.token_to_id(COMMA)
        self.chunks: list[PromptChunk] = []
        self._reset()

    def _reset(self) -> None:
        self.ids: list[int] = []
        self.weights: list[float] = []
        self.fixes: list[tuple[int, torch.Tensor]] = []
        self.last_comma = -1

    def write(self, text: str) -> list[PromptChunk]:
        parsed = parse_prompt(text)
        breaks = sorted(parsed.breaks)
        for index, (fragment, weight) in enumerate(parsed.fragments):
            for _ in range(breaks.count(index)):
                self._next_chunk()
            self._add(_raw_ids(self.tokenizer, fragment), weight)
        for _ in range(breaks.count(len(parsed.fragments))):
            self._next_chunk()
        if self.ids or not self.chunks:
            self._next_chunk()
        return self.chunks

    def _add(self, tokens: list[int], weight: float) -> None:
        i = 0
        while i < len(tokens):
            token = tokens[i]
            if token == self.comma:
                self.last_comma = len(self.ids)
            elif (len(self.ids) == self.room and self.last_comma != -1
                  and len(self.ids) - self.last_comma <= COMMA_BACKTRACK):
                self._split_after_comma()
            if len(self.ids) == self.room:
                self._next_chunk()
            emb, used = self.table.match(tokens, i) if self.table else (None, 0)
            if emb is None:
                self.ids.append(token)
                self.weights.append(weight)
                i += 1
                continue
            if len(self.ids) + emb.num_vectors > self.room:
                self._next_chunk()
            self.fixes.append((len(self.ids), emb.vectors))
            self.ids.extend([self.tokenizer.pad_id] * emb.num_vectors)
            self.weights.extend([weight] * emb.num_vectors)
            i += used

    def _split_after_comma(self) -> None:
        cut = self.last_comma + 1
        ids, weights = self.ids[cut:], self.weights[cut:]
        moved = [(at - cut, vec) for at, vec in self.fixes if at >= cut]
        self.ids, self.weights = self.ids[:cut], self.weights[:cut]
        self.fixes = [(at, vec) for at, vec in self.fixes if at < cut]
        self._next_chunk()
        self.ids, self.weights, self.fixes = ids, weights, moved

    def _next_chunk(self) -> None:
        tok = self.tokenizer
        ids = _frame(tok, self.ids)
        weights = _frame(tok, self.weights, 1.0, 1.0, 1.0)
        start = _offset(tok, len(self.ids))
        self.chunks.append(PromptChunk(ids, weights, [(start + at, vec) for at, vec in self.fixes]))
        self._reset()
