"""ClipTokenizer against transformers' CLIPTokenizer on tokenizer folders written by write_clip_tokenizer."""

from __future__ import annotations

import json
import random
import shutil
import warnings

import pytest
import torch

from sdlite.errors import ModelFolderError
from sdlite.tokenizer.clip import ClipTokenizer, TokenTruncationWarning
from sdlite.tokenizer.standard import BOS_TOKEN, EOS_TOKEN, byte_level_alphabet
from sdlite.tokenizer.writer import MIN_VOCAB_SIZE, write_clip_tokenizer

transformers = pytest.importorskip("transformers")

PROMPTS = [
    "a photo of a cat",
    "A PHOTO Of A Cat On A TABLE",
    "hello, world!!! (masterpiece:1.2) [blue] {red} -- a/b \\ c @#$%^&*",
    "it's 2024: 12.5% of 3,000 cats, 1st place",
    "  lots   of\t\twhite\n\nspace \r\n everywhere  ",
    "café résumé naïve façade, an emoji 🎉🚀",
    "日本語 中文字 Ελληνικά Кириллица",
    "e\u0301 (decomposed accent), \u00a0nbsp, zero\u200bwidth, \x00\x07 control chars",
    "xylophone quizzical zephyr juxtaposition",
    "don't I'LL we'Ve you're she'd he's can't",
    "<|endoftext|> in the middle <|startoftext|>x<|ENDOFTEXT|>",
    "!",
    "a!b!!c",
    "",
    "   ",
]
LONG_PROMPT = ", ".join(["a very detailed photo of a red apple on a wooden table"] * 10)


def _reference_classes():
    classes = [transformers.CLIPTokenizer]
    fast = getattr(transformers, "CLIPTokenizerFast", None)
    if fast is not None and fast not in classes:  # transformers 5 makes it an alias of CLIPTokenizer
        classes.append(fast)
    return classes


def _reference_ids(ref, prompts):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        out = ref(prompts, padding="max_length", max_length=77, truncation=True, return_tensors="pt")
    return out.input_ids


def _encode(tok: ClipTokenizer, prompts):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", TokenTruncationWarning)
        return tok(prompts)


def _edit_json(path, edit):
    data = json.loads(path.read_text(encoding="utf-8"))
    edit(data)
    path.write_text(json.dumps(data), encoding="utf-8")


@pytest.fixture(scope="module")
def sd1_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("sd1") / "tokenizer"
    assert write_clip_tokenizer(folder) == 1000
    return folder


@pytest.fixture(scope="module")
def sd2_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("sd2") / "tokenizer"
    write_clip_tokenizer(folder, vocab_size=800, pad_token="!")
    return folder


@pytest.fixture
def copy_of(tmp_path, sd1_dir):
    def make(name="tok"):
        return shutil.copytree(sd1_dir, tmp_path / name)

    return make


# ---------------------------------------------------------------------------------------------- the files


def test_written_folder_has_clip_layout(sd1_dir):
    vocab = json.loads((sd1_dir / "vocab.json").read_text(encoding="utf-8"))
    lines = (sd1_dir / "merges.txt").read_text(encoding="utf-8").splitlines()
    assert lines[0] == "#version: 0.2"
    merges = [tuple(line.split(" ")) for line in lines[1:]]
    tokens = sorted(vocab, key=vocab.get)
    assert sorted(vocab.values()) == list(range(len(vocab))) and len(vocab) == 1000
    alphabet = byte_level_alphabet()
    assert len(set(alphabet)) == 256
    assert tokens[:256] == alphabet and tokens[256:512] == [c + "</w>" for c in alphabet]
    assert tokens[512:-2] == [a + b for a, b in merges] and len(merges) == 1000 - MIN_VOCAB_SIZE
    assert tokens[-2:] == [BOS_TOKEN, EOS_TOKEN]
    from tokenizers import pre_tokenizers

    assert set(alphabet) == set(pre_tokenizers.ByteLevel.alphabet())
    config = json.loads((sd1_dir / "tokenizer_config.json").read_text())
    assert config["model_max_length"] == 77 and config["tokenizer_class"] == "CLIPTokenizer"
    special = json.loads((sd1_dir / "special_tokens_map.json").read_text())
    assert special["pad_token"] == EOS_TOKEN and special["bos_token"]["content"] == BOS_TOKEN


def test_writing_is_deterministic_and_sized(tmp_path):
    names = ("vocab.json", "merges.txt", "special_tokens_map.json", "tokenizer_config.json")
    corpus = ["a lighthouse at dusk", "the lighthouse keeper", "dusk over the sea"] * 3
    assert write_clip_tokenizer(tmp_path / "a", corpus, vocab_size=530) == 530
    assert write_clip_tokenizer(tmp_path / "b", iter(corpus), vocab_size=530) == 530
    for name in names:
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()
    # a tiny corpus runs out of pairs: fewer ids than asked, and the returned size is the real one
    n = write_clip_tokenizer(tmp_path / "c", ["ab ab"], vocab_size=5000)
    assert n == len(json.loads((tmp_path / "c" / "vocab.json").read_text(encoding="utf-8"))) == MIN_VOCAB_SIZE + 1
    with pytest.raises(ValueError):
        write_clip_tokenizer(tmp_path / "d", vocab_size=MIN_VOCAB_SIZE - 1)


def test_corpus_words_become_single_tokens(tmp_path):
    write_clip_tokenizer(tmp_path, ["a lighthouse at dusk"] * 5 + ["lighthouse"], vocab_size=600)
    tok = ClipTokenizer.from_folder(tmp_path)
    assert tok.tokenize("Lighthouse DUSK") == ["lighthouse</w>", "dusk</w>"]
    assert len(tok.tokenize("zebra")) == 5  # unseen word: byte by byte
    assert tok.decode(tok.encode("A  Lighthouse at   dusk!")) == "a lighthouse at dusk !"


# ---------------------------------------------------------------------------------------------- parity


@pytest.mark.parametrize("ref_cls", _reference_classes(), ids=lambda c: c.__name__)
def test_ids_match_transformers_sd1(sd1_dir, ref_cls):
    ref = ref_cls.from_pretrained(sd1_dir)
    tok = ClipTokenizer.from_folder(sd1_dir)
    assert (tok.max_length, tok.bos_id, tok.eos_id, tok.pad_id) == (
        ref.model_max_length, ref.bos_token_id, ref.eos_token_id, ref.pad_token_id
    )
    assert tok.pad_id == tok.eos_id == 999 and tok.bos_id == 998
    prompts = PROMPTS + [LONG_PROMPT]
    ours = _encode(tok, prompts)
    assert ours.dtype == torch.long and ours.shape == (len(prompts), 77)
    expected = _reference_ids(ref, prompts)
    for i, prompt in enumerate(prompts):
        assert ours[i].tolist() == expected[i].tolist(), prompt
    assert [tok.encode(p) for p in PROMPTS] == expected[: len(PROMPTS)].tolist()  # none of these is truncated


def test_ids_match_transformers_sd2_pad(sd2_dir):
    ref = transformers.CLIPTokenizer.from_pretrained(sd2_dir)
    tok = ClipTokenizer.from_folder(sd2_dir)
    assert tok.pad_token == "!" and tok.pad_id == ref.pad_token_id == 0
    assert tok.eos_id == ref.eos_token_id == 799
    prompts = PROMPTS + ["wow! a cat!!", LONG_PROMPT]
    assert _encode(tok, prompts).tolist() == _reference_ids(ref, prompts).tolist()


@pytest.mark.parametrize(
    "variant", ["legacy_config", "plain_string_tokens", "no_config_files", "pad_not_in_vocab", "left_sides"]
)
def test_ids_match_transformers_config_variants(copy_of, variant):
    folder = copy_of()
    config = folder / "tokenizer_config.json"
    if variant == "legacy_config":  # SD 1.5 as first published: no added_tokens_decoder
        _edit_json(config, lambda c: c.pop("added_tokens_decoder"))
    elif variant == "plain_string_tokens":
        def edit(c):
            c.pop("added_tokens_decoder")
            for key in ("bos_token", "eos_token", "unk_token"):
                c[key] = c[key]["content"]

        _edit_json(config, edit)
        (folder / "special_tokens_map.json").unlink()
    elif variant == "no_config_files":
        config.unlink()
        (folder / "special_tokens_map.json").unlink()
    elif variant == "pad_not_in_vocab":
        _edit_json(config, lambda c: c.update(pad_token="<pad>"))
    elif variant == "left_sides":
        _edit_json(config, lambda c: c.update(padding_side="left", truncation_side="left"))
    ref = transformers.CLIPTokenizer.from_pretrained(folder)
    tok = ClipTokenizer.from_folder(folder)
    assert tok.max_length == 77
    assert (tok.bos_id, tok.eos_id, tok.pad_id, len(tok)) == (
        ref.bos_token_id, ref.eos_token_id, ref.pad_token_id, len(ref)
    )
    prompts = PROMPTS + [LONG_PROMPT]
    assert _encode(tok, prompts).tolist() == _reference_ids(ref, prompts).tolist()


def test_random_text_matches_transformers(sd1_dir):
    alphabet = (
        "abcdefghijklmnopqrstuvwxyz ABCXYZ 0123456789 .,;:!?'\"()[]{}<>|/\\-_+=*&^%$#@~` \t\n"
        "éèüßøñçÉÅ日本語中文한국어Ωλж ٣٤ 🎉🚀👍🏽\u0301\u200b\u00a0\u3000\x00\x1f"
    )
    rng = random.Random(1234)
    words = ["'s", "'t", "'re", "'ll", "<|endoftext|>", "<|startoftext|>", "cat", "photo"]
    prompts = []
    for _ in range(150):
        parts = [
            rng.choice(words) if rng.random() < 0.15 else "".join(rng.choices(alphabet, k=rng.randint(1, 8)))
            for _ in range(rng.randint(0, 12))
        ]
        prompts.append(rng.choice(["", " ", "  "]).join(parts))
    ref = transformers.CLIPTokenizer.from_pretrained(sd1_dir)
    tok = ClipTokenizer.from_folder(sd1_dir)
    ours, expected = _encode(tok, prompts).tolist(), _reference_ids(ref, prompts).tolist()
    for prompt, a, b in zip(prompts, ours, expected):
        assert a == b, repr(prompt)


# ---------------------------------------------------------------------------------------------- truncation


def test_truncation_keeps_end_token_and_warns(sd1_dir):
    tok = ClipTokenizer.from_folder(sd1_dir)
    n = tok.num_tokens(LONG_PROMPT)
    assert n > 77
    with pytest.warns(TokenTruncationWarning, match=rf"the last {n - 77} tokens were dropped"):
        ids = tok.encode(LONG_PROMPT)
    assert len(ids) == 77 and ids[0] == tok.bos_id and ids[-1] == tok.eos_id
    assert tok.pad_id not in ids[1:-1]

    exactly = " ".join(["cat"] * 75)  # 75 words + start + end = 77: fits, no warning
    assert tok.num_tokens(exactly) == 77
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert tok.encode(exactly)[-1] == tok.eos_id
    with pytest.warns(TokenTruncationWarning, match=r"the last 1 tokens were dropped: 'cat'"):
        tok.encode(exactly + " cat")


def test_empty_prompt_and_batch_shapes(sd1_dir):
    tok = ClipTokenizer.from_folder(sd1_dir)
    assert tok.encode("") == [tok.bos_id, tok.eos_id] + [tok.pad_id] * 75
    assert tok("a cat").shape == (1, 77)
    assert tok([]).shape == (0, 77)
    with pytest.raises(TypeError):
        tok.encode(None)


# ---------------------------------------------------------------------------------------------- errors


def test_missing_folder_and_vocab(tmp_path, copy_of):
    with pytest.raises(ModelFolderError, match="not found"):
        ClipTokenizer.from_folder(tmp_path / "nope")
    folder = copy_of()
    (folder / "vocab.json").unlink()
    with pytest.raises(ModelFolderError, match=r"vocab\.json"):
        ClipTokenizer.from_folder(folder)


@pytest.mark.parametrize(
    "name, content, message",
    [
        ("vocab.json", '{"a": 0, "b": ', r"vocab\.json"),
        ("vocab.json", "[1, 2, 3]", r"vocab\.json"),
        ("vocab.json", '{"a": "zero"}', r"vocab\.json"),
        ("merges.txt", None, r"merges\.txt.*missing"),
        ("merges.txt", "#version: 0.2\ni n\nthis line has three\n", r"merges\.txt: line 3"),
        ("merges.txt", "#version: 0.2\n\u0444 \u044f\n", r"merges\.txt: line 2 .*not in vocab\.json"),
        ("merges.txt", b"#version: 0.2\n\xff\xfe\n", r"merges\.txt"),
        ("tokenizer_config.json", "{not json", r"tokenizer_config\.json"),
        ("tokenizer_config.json", '{"model_max_length": "long"}', r"model_max_length"),
        ("special_tokens_map.json", '{"pad_token": 5}', r"special_tokens_map\.json"),
    ],
)
def test_corrupt_files(copy_of, name, content, message):
    folder = copy_of()
    path = folder / name
    if content is None:
        path.unlink()
    elif isinstance(content, bytes):
        path.write_bytes(content)
    else:
        path.write_text(content, encoding="utf-8")
    if name == "special_tokens_map.json":  # only read when tokenizer_config.json has no added_tokens_decoder
        _edit_json(folder / "tokenizer_config.json", lambda c: c.pop("added_tokens_decoder"))
    with pytest.raises(ModelFolderError, match=message):
        ClipTokenizer.from_folder(folder)


def test_vocab_without_end_token(copy_of):
    folder = copy_of()
    _edit_json(folder / "vocab.json", lambda v: v.pop(EOS_TOKEN))
    with pytest.raises(ModelFolderError, match=r"<\|endoftext\|>"):
        ClipTokenizer.from_folder(folder)
