"""Writing a CLIP-format tokenizer folder (vocab.json, merges.txt, special_tokens_map.json, tokenizer_config.json).

Two writers:

- `write_standard_tokenizer`: the real SD 1.x / 2.x tokenizer (49408 ids), from OpenAI CLIP's vocabulary that
  sdlite ships (`sdlite.tokenizer.standard`), e.g. for a model folder made from a single-file checkpoint;
- `write_clip_tokenizer`: a small vocabulary learned on a corpus, for tests and the random-model generator
  (tiny text encoders), written in exactly the layout of openai's CLIP tokenizer as a diffusers model
  folder holds it:

- vocab.json: the 256 byte-level characters (in GPT-2's ``bytes_to_unicode`` order), the same 256 with
  ``</w>`` appended, one entry per merge (the merged string, in merge order), then ``<|startoftext|>`` and
  ``<|endoftext|>`` as the last two ids;
- merges.txt: ``#version: 0.2`` and then one ``left right`` pair per line, highest priority first.

The learner is a plain BPE learner over CLIP's own pre-tokenization (the same normalizer and split regex that
:class:`sdlite.tokenizer.ClipTokenizer` and transformers' ``CLIPTokenizer`` use), so every word of the corpus
tokenizes into few pieces. It is deterministic: ties between equally frequent pairs go to the smallest pair.
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Iterable
from pathlib import Path

from ..fileio import write_json
from .clip import clip_normalizer, clip_pre_tokenizer
from .standard import BOS_TOKEN, END_OF_WORD, EOS_TOKEN, byte_level_alphabet, standard_token_files, standard_vocab

MIN_VOCAB_SIZE = 2 * 256 + 2  # the byte-level alphabet, with and without </w>, and the two special tokens

# A few hundred common words and short captions: enough for prompts of the kind the tiny model is tested with
# ("a red apple on a table") to tokenize into whole words. Words outside it still tokenize, byte by byte.
DEFAULT_CORPUS: tuple[str, ...] = (
    "a photo of a cat",
    "a photo of a dog sitting on the grass",
    "a red apple on a wooden table",
    "a green apple and a yellow banana",
    "a lighthouse at dusk by the sea",
    "a mountain landscape with snow and trees",
    "a small house in the forest at night",
    "a city street in the rain with cars",
    "a portrait of an old man with a beard",
    "a young woman smiling, studio lighting",
    "a bowl of fruit, still life painting",
    "an oil painting of a ship on the ocean",
    "a watercolor of flowers in a blue vase",
    "a black and white photograph of a bridge",
    "a sunset over the lake, high quality",
    "a bird flying in the sky above the clouds",
    "a horse running in a field of wheat",
    "a castle on a hill, fantasy art",
    "a robot walking in a desert, digital art",
    "a cup of coffee on a desk next to a laptop",
    "a white circle on a black background",
    "a red square on a white background",
    "a blue triangle and a green circle",
    "two cats sleeping on a sofa",
    "three dogs playing with a ball in the park",
    "a child reading a book under a tree",
    "a car parked in front of a building",
    "a train crossing a bridge over a river",
    "a plate of pasta with tomato sauce",
    "a slice of pizza and a glass of water",
    "a beach with palm trees and white sand",
    "the moon and the stars over the mountains",
    "a close up of a rose with water drops",
    "a boat on a calm river in the morning",
    "an astronaut riding a horse on mars",
    "a cozy kitchen with a window and plants",
    "a dark room lit by a single candle",
    "a snowy village at christmas, warm lights",
    "a futuristic city at night, neon lights, cyberpunk",
    "a cute fox in the autumn forest",
    "a drawing of a tree, pencil sketch",
    "a colorful abstract painting",
    "a bright orange and purple sky",
    "a big brown bear near a waterfall",
    "a small gray mouse eating cheese",
    "a fish swimming in clear blue water",
    "a man and a woman walking on the beach",
    "a group of people standing in a line",
    "a chair and a table in an empty room",
    "a pink flower in a garden, detailed, 4k",
    "a highly detailed render, octane, trending on artstation",
    "best quality, masterpiece, sharp focus, realistic",
    "low quality, blurry, ugly, bad anatomy, watermark, text",
    "it's a beautiful day, isn't it? they're here and we've won, i'm sure you'll see what i'd do",
    # single words: colours, shapes, objects, animals, places, styles, numbers
    "red orange yellow green blue purple violet pink brown black white gray grey gold silver",
    "circle square triangle star heart line dot stripe pattern shape",
    "apple banana orange lemon cherry grape strawberry bread cake cookie egg milk tea coffee",
    "cat dog bird fish horse cow sheep pig lion tiger bear wolf fox rabbit mouse owl eagle duck",
    "tree flower grass leaf rock stone mountain hill river lake sea ocean sky cloud sun moon star",
    "house home building tower bridge road street city town village castle church door window wall",
    "car bus train boat ship plane bicycle truck rocket",
    "man woman boy girl child baby person people face eyes hair hand",
    "photo photograph painting drawing sketch illustration render art artwork poster logo icon",
    "style realistic photorealistic cinematic dramatic soft light lighting shadow color colors",
    "big small large tiny tall short long old new young happy sad beautiful cute scary",
    "morning evening night day dusk dawn winter summer spring autumn fall rain snow fog storm",
    "one two three four five six seven eight nine ten 1 2 3 4 5 6 7 8 9 0 2024 512 768",
    "in on at of with and the a an by over under near above below behind between from to into",
    "is are was were be been has have had do does did can could will would should may might",
    "very more most less much many few some any all each every other another such no not only",
    "standing sitting running walking flying swimming sleeping eating drinking playing reading",
    "wooden metal glass plastic paper stone golden silver dark bright light warm cold wet dry",
    "landscape portrait scene view background foreground center left right top bottom side",
    "high quality detailed intricate sharp focus 8k hdr masterpiece best trending artstation",
)


def _learn_bpe(word_counts: dict[str, int], num_merges: int, taken: set[str]) -> list[tuple[str, str]]:
    """Learn up to ``num_merges`` BPE merges from ``word_counts`` (byte-level words -> count).

    Words are split into characters with ``</w>`` on the last one. Each step merges the most frequent adjacent
    pair (ties: the smallest pair). A pair whose merged string is already a token (``taken``) is never chosen,
    so that merges and vocab entries stay one to one as in CLIP's files.
    """
    words = sorted(word_counts)
    freqs = [word_counts[w] for w in words]
    symbols: list[list[str]] = [list(w[:-1]) + [w[-1] + END_OF_WORD] for w in words]

    pair_counts: Counter[tuple[str, str]] = Counter()
    where: dict[tuple[str, str], set[int]] = {}
    for i, syms in enumerate(symbols):
        for pair in zip(syms, syms[1:]):
            pair_counts[pair] += freqs[i]
            where.setdefault(pair, set()).add(i)

    merges: list[tuple[str, str]] = []
    banned: set[tuple[str, str]] = set()
    while len(merges) < num_merges:
        best = _most_frequent(pair_counts, banned)
        if best is None:
            break
        merged = best[0] + best[1]
        if merged in taken:
            banned.add(best)
            continue
        merges.append(best)
        taken.add(merged)
        for i in sorted(where.pop(best, ())):
            syms = symbols[i]
            for pair in zip(syms, syms[1:]):
                pair_counts[pair] -= freqs[i]
            out = _merge_pair(syms, best, merged)
            symbols[i] = out
            for pair in zip(out, out[1:]):
                pair_counts[pair] += freqs[i]
                where.setdefault(pair, set()).add(i)
        pair_counts.pop(best, None)
    return merges


def _most_frequent(pair_counts: Counter[tuple[str, str]], banned: set[tuple[str, str]]) -> tuple[str, str] | None:
    """The most frequent pair not banned (ties: the smallest pair), or None when no pair is left."""
    best, best_key = None, None
    for pair, count in pair_counts.items():
        if count <= 0 or pair in banned:
            continue
        key = (-count, pair)
        if best_key is None or key < best_key:
            best, best_key = pair, key
    return best


def _merge_pair(syms: list[str], pair: tuple[str, str], merged: str) -> list[str]:
    """`syms` with every adjacent occurrence of `pair` (left to right, not overlapping) replaced by `merged`."""
    out: list[str] = []
    j = 0
    while j < len(syms):
        if j + 1 < len(syms) and syms[j] == pair[0] and syms[j + 1] == pair[1]:
            out.append(merged)
            j += 2
        else:
            out.append(syms[j])
            j += 1
    return out


def _corpus_words(corpus: Iterable[str]) -> dict[str, int]:
    normalizer = clip_normalizer()
    pre_tokenizer = clip_pre_tokenizer()
    counts: Counter[str] = Counter()
    for text in corpus:
        if not isinstance(text, str):
            raise TypeError(f"corpus items must be str, got {type(text).__name__}")
        for piece, _ in pre_tokenizer.pre_tokenize_str(normalizer.normalize_str(text)):
            if piece not in (BOS_TOKEN, EOS_TOKEN):
                counts[piece] += 1
    return dict(counts)


def _added_token(content: str) -> dict:
    return {"content": content, "lstrip": False, "normalized": True, "rstrip": False, "single_word": False}


def write_clip_tokenizer(
    folder: str | Path,
    corpus: Iterable[str] | None = None,
    vocab_size: int = 1000,
    *,
    pad_token: str = EOS_TOKEN,
    model_max_length: int = 77,
) -> int:
    """Learn a CLIP-format BPE vocabulary on ``corpus`` and write a tokenizer folder; return its vocab size.

    ``vocab_size`` counts every id, the 514 fixed ones included (so it must be at least 514). The returned
    size is ``len(vocab.json)``: smaller than asked when the corpus runs out of pairs to merge. It is what a
    text encoder built for this tokenizer needs as its ``vocab_size``.

    ``pad_token`` is ``<|endoftext|>`` as in SD 1.x; SD 2.x pads with ``"!"``. A pad token that is not in the
    vocabulary becomes an added token with the next id, as transformers does, and is not counted here.
    The same arguments always give byte-identical files.
    """
    if vocab_size < MIN_VOCAB_SIZE:
        raise ValueError(
            f"vocab_size must be at least {MIN_VOCAB_SIZE} (bytes, bytes + </w>, 2 special), got {vocab_size}"
        )
    if model_max_length < 2:
        raise ValueError(f"model_max_length must be at least 2, got {model_max_length}")
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)

    alphabet = byte_level_alphabet()
    base = alphabet + [c + END_OF_WORD for c in alphabet]
    words = _corpus_words(DEFAULT_CORPUS if corpus is None else corpus)
    merges = _learn_bpe(words, vocab_size - MIN_VOCAB_SIZE, taken=set(base) | {BOS_TOKEN, EOS_TOKEN})

    tokens = base + [a + b for a, b in merges] + [BOS_TOKEN, EOS_TOKEN]
    vocab = {tok: i for i, tok in enumerate(tokens)}
    assert len(vocab) == len(tokens), "duplicate token in the learned vocabulary"

    _write_vocab_and_merges(folder, vocab, merges)

    bos, eos = _added_token(BOS_TOKEN), _added_token(EOS_TOKEN)
    special_tokens_map = {"bos_token": bos, "eos_token": eos, "pad_token": pad_token, "unk_token": eos}
    write_json(folder / "special_tokens_map.json", special_tokens_map)

    def typed(tok: dict) -> dict:
        return {"__type": "AddedToken", **tok}

    added_tokens_decoder = {
        str(vocab[BOS_TOKEN]): {**bos, "special": True},
        str(vocab[EOS_TOKEN]): {**eos, "special": True},
    }
    if pad_token in vocab and pad_token not in (BOS_TOKEN, EOS_TOKEN):
        added_tokens_decoder[str(vocab[pad_token])] = {
            "content": pad_token, "lstrip": False, "normalized": False, "rstrip": False, "single_word": False,
            "special": True,
        }
    tokenizer_config = {
        "add_prefix_space": False,
        "added_tokens_decoder": dict(sorted(added_tokens_decoder.items(), key=lambda kv: int(kv[0]))),
        "bos_token": typed(bos),
        "clean_up_tokenization_spaces": True,
        "do_lower_case": True,
        "eos_token": typed(eos),
        "errors": "replace",
        "model_max_length": model_max_length,
        "pad_token": pad_token,
        "tokenizer_class": "CLIPTokenizer",
        "unk_token": typed(eos),
    }
    write_json(folder / "tokenizer_config.json", tokenizer_config)
    return len(vocab)


def _write_vocab_and_merges(folder: Path, vocab: dict[str, int], merges: list[tuple[str, str]]) -> None:
    """vocab.json (one line, tokens in id order, not ASCII-escaped) and merges.txt (``#version: 0.2``, then one
    ``left right`` per line), as transformers' slow tokenizers write them."""
    (folder / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False) + "\n", encoding="utf-8")
    (folder / "merges.txt").write_text(
        "#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges), encoding="utf-8"
    )


def write_standard_tokenizer(folder: str | Path, kind: str) -> int:
    """Write the standard CLIP tokenizer of SD 1.x (``kind="sd1"``) or SD 2.x (``"sd2"``) as a diffusers
    ``tokenizer/`` folder: vocab.json, merges.txt, tokenizer_config.json and special_tokens_map.json, as the
    published SD folders have them (see `sdlite.tokenizer.standard`). Return the vocabulary size (49408).

    ``ClipTokenizer.from_folder(folder)`` and transformers' ``CLIPTokenizer.from_pretrained(folder)`` read
    it and give the ids of ``ClipTokenizer.standard(kind)``. Every write gives byte-identical files.
    ValueError for another kind (before anything is written)."""
    tokenizer_config, special_tokens_map = standard_token_files(kind)
    vocab, merges = standard_vocab()
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    _write_vocab_and_merges(folder, vocab, merges)
    write_json(folder / "special_tokens_map.json", special_tokens_map)
    write_json(folder / "tokenizer_config.json", tokenizer_config)
    return len(vocab)
