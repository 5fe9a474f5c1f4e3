"""The standard SD 1.x / 2.x CLIP tokenizer shipped with sdlite: the vocabulary's derivation, known ids, parity
with transformers' CLIPTokenizer, and the tokenizer folder written from it."""

from __future__ import annotations

import hashlib
import json
import warnings
from importlib import resources

import pytest

from sdlite.tokenizer import ClipTokenizer, max_token_id, standard_vocab, write_standard_tokenizer
from sdlite.tokenizer.clip import TokenTruncationWarning
from sdlite.tokenizer.standard import (
    BOS_TOKEN,
    EOS_TOKEN,
    NUM_MERGES,
    STANDARD_VOCAB_SIZE,
    VOCAB_FILE,
    VOCAB_SHA256,
    byte_level_alphabet,
)

transformers = pytest.importorskip("transformers")

CAT = [49406, 320, 1125, 539, 320, 2368, 49407]
PROMPTS = [
    "a photo of a cat",
    "A PHOTO Of A Cat On A TABLE, Highly Detailed",
    "hello, world!!! (masterpiece:1.2) [blue] {red} -- a/b \\ c @#$%^&*",
    "it's 2024: 12.5% of 3,000 cats, 1st place; don't I'LL we'Ve",
    "  lots   of\t\twhite\n\nspace \r\n everywhere  ",
    "café résumé naïve façade, an emoji 🎉🚀👍🏽",
    "日本語 中文字 Ελληνικά Кириллица 한국어",
    "e\u0301 decomposed, \u00a0nbsp, zero\u200bwidth, \x00\x07 control",
    "<|endoftext|> in the middle <|startoftext|>x<|ENDOFTEXT|>",
    "wow! a cat!! a!b !!! !",
    "!",
    "",
    ", ".join(["an astronaut riding a horse on mars, trending on artstation"] * 8),  # truncated
    " ".join(["cat"] * 75),  # exactly 77 with start and end
]


def _ids(tok, prompts):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", TokenTruncationWarning)
        return tok(prompts).tolist()


def _reference_ids(ref, prompts):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return ref(prompts, padding="max_length", max_length=77, truncation=True).input_ids


def _reference(kind: str):
    """transformers' CLIPTokenizer from the same vocabulary, with the special tokens of the published folders."""
    vocab, merges = standard_vocab()

    def tok(content):
        return transformers.AddedToken(content, normalized=True, special=True)

    pad = EOS_TOKEN if kind == "sd1" else "!"
    return transformers.CLIPTokenizer(
        vocab=dict(vocab), merges=list(merges), bos_token=tok(BOS_TOKEN), eos_token=tok(EOS_TOKEN),
        unk_token=tok(EOS_TOKEN), pad_token=pad, model_max_length=77,
    )


@pytest.fixture(scope="module")
def written(tmp_path_factory):
    """{kind: a folder written by write_standard_tokenizer}."""
    root = tmp_path_factory.mktemp("standard")
    folders = {}
    for kind in ("sd1", "sd2"):
        assert write_standard_tokenizer(root / kind, kind) == STANDARD_VOCAB_SIZE
        folders[kind] = root / kind
    return folders


def test_shipped_file_is_openai_clips():
    data = resources.files("sdlite.tokenizer").joinpath("data", VOCAB_FILE).read_bytes()
    assert hashlib.sha256(data).hexdigest() == VOCAB_SHA256
    readme = resources.files("sdlite.tokenizer").joinpath("data", "README.md").read_text(encoding="utf-8")
    assert VOCAB_SHA256 in readme and "MIT" in readme and "OpenAI" in readme


def test_derived_vocabulary():
    vocab, merges = standard_vocab()
    assert standard_vocab()[0] is vocab  # read once per process
    assert len(vocab) == STANDARD_VOCAB_SIZE == 49408 and len(merges) == NUM_MERGES == 48894
    assert sorted(vocab.values()) == list(range(49408))
    tokens = sorted(vocab, key=vocab.get)
    alphabet = byte_level_alphabet()
    assert tokens[:256] == alphabet and tokens[256:512] == [c + "</w>" for c in alphabet]
    assert tokens[:3] == ["!", '"', "#"] and vocab["!</w>"] == 256
    assert merges[:2] == [("i", "n"), ("t", "h")] and vocab["in"] == 512 and vocab["th"] == 513
    assert merges[-1] == ("jeky", "ll</w>") and vocab["jekyll</w>"] == 49405
    assert (vocab[BOS_TOKEN], vocab[EOS_TOKEN]) == (49406, 49407)
    assert {"a</w>": 320, "photo</w>": 1125, "of</w>": 539, "cat</w>": 2368}.items() <= vocab.items()


@pytest.mark.parametrize("kind, pad", [("sd1", 49407), ("sd2", 0)])
def test_known_ids(kind, pad):
    tok = ClipTokenizer.standard(kind)
    assert tok.encode("a photo of a cat") == CAT + [pad] * 70
    assert tok.encode("A  Photo of a CAT") == CAT + [pad] * 70
    assert (tok.bos_id, tok.eos_id, tok.pad_id, tok.max_length, tok.vocab_size) == (49406, 49407, pad, 77, 49408)
    assert tok.tokenize("a photo of a cat") == ["a</w>", "photo</w>", "of</w>", "a</w>", "cat</w>"]


def test_unknown_kind(tmp_path):
    for kind in ("sd3", "SD1", "", None):
        with pytest.raises(ValueError, match="sd1, sd2"):
            ClipTokenizer.standard(kind)
        with pytest.raises(ValueError):
            write_standard_tokenizer(tmp_path / "x", kind)
    assert not (tmp_path / "x").exists()


@pytest.mark.parametrize("kind", ["sd1", "sd2"])
def test_ids_match_transformers(kind):
    ref = _reference(kind)
    tok = ClipTokenizer.standard(kind)
    assert (tok.bos_id, tok.eos_id, tok.pad_id, len(tok)) == (
        ref.bos_token_id, ref.eos_token_id, ref.pad_token_id, len(ref)
    )
    expected = _reference_ids(ref, PROMPTS)
    for prompt, ours, theirs in zip(PROMPTS, _ids(tok, PROMPTS), expected):
        assert ours == theirs, prompt
    assert expected[-2][-1] == 49407 and expected[-2][-2] != tok.pad_id  # the long prompt was truncated
    assert expected[-1] == [49406] + [2368] * 75 + [49407]


@pytest.mark.parametrize("kind", ["sd1", "sd2"])
def test_written_folder(written, kind):
    folder = written[kind]
    vocab, merges = standard_vocab()
    assert json.loads((folder / "vocab.json").read_text(encoding="utf-8")) == vocab
    lines = (folder / "merges.txt").read_text(encoding="utf-8").split("\n")
    assert lines[0] == "#version: 0.2" and lines[-1] == "" and len(lines) == NUM_MERGES + 2
    assert lines[1] == "i n" and lines[-2] == "jeky ll</w>"
    config = json.loads((folder / "tokenizer_config.json").read_text())
    special = json.loads((folder / "special_tokens_map.json").read_text())
    pad = EOS_TOKEN if kind == "sd1" else "!"
    assert config["tokenizer_class"] == "CLIPTokenizer" and config["model_max_length"] == 77
    assert config["pad_token"] == special["pad_token"] == pad
    assert special["bos_token"]["content"] == BOS_TOKEN and special["eos_token"]["content"] == EOS_TOKEN

    ours = ClipTokenizer.from_folder(folder)
    ref = transformers.CLIPTokenizer.from_pretrained(folder)
    assert ref.pad_token == ours.pad_token == pad and ref.model_max_length == 77
    expected = _ids(ClipTokenizer.standard(kind), PROMPTS)
    assert _ids(ours, PROMPTS) == expected
    assert _reference_ids(ref, PROMPTS) == expected
    assert max_token_id(folder) == 49407


def test_writing_is_deterministic(written, tmp_path):
    for kind, folder in written.items():
        again = tmp_path / kind
        write_standard_tokenizer(again, kind)
        names = sorted(p.name for p in folder.iterdir())
        assert names == sorted(p.name for p in again.iterdir()) == [
            "merges.txt", "special_tokens_map.json", "tokenizer_config.json", "vocab.json"
        ]
        for name in names:
            assert (folder / name).read_bytes() == (again / name).read_bytes(), name
    assert (written["sd1"] / "vocab.json").read_bytes() == (written["sd2"] / "vocab.json").read_bytes()
