"""Tokenizer folders as transformers 5 saves them (tokenizer.json + tokenizer_config.json, no vocab.json /
merges.txt): ids equal transformers' own reading, for SD 1.x and SD 2.x pad conventions; which file wins when
both are there; and hostile tokenizer.json files (one ModelFolderError naming it)."""

from __future__ import annotations

import json
import os
import shutil
import threading
import warnings

import pytest

from sdlite.errors import ModelFolderError
from sdlite.tokenizer import ClipTokenizer, clip, max_token_id, tokenizer_files_present, write_standard_tokenizer
from sdlite.tokenizer.clip import TokenTruncationWarning
from sdlite.tokenizer.writer import write_clip_tokenizer

transformers = pytest.importorskip("transformers")

PROMPTS = [
    "a photo of a cat",
    "A PHOTO Of A Cat, Highly Detailed; it's 2024 & 12.5% don't",
    "café résumé naïve, emoji 🎉🚀, 日本語 Кириллица",
    "<|endoftext|> in the middle <|startoftext|>x<|ENDOFTEXT|>",
    "wow! a cat!! a!b !!! !",
    "",
    ", ".join(["an astronaut riding a horse on mars, trending on artstation"] * 8),
]


def _resave(src, dst):
    """`src` loaded and saved again by transformers 5, then stripped to what it saves alone: tokenizer.json."""
    transformers.CLIPTokenizer.from_pretrained(src).save_pretrained(dst)
    for name in ("vocab.json", "merges.txt", "special_tokens_map.json"):
        (dst / name).unlink(missing_ok=True)
    assert (dst / "tokenizer.json").is_file()
    return dst


def _edit_json(path, edit):
    data = json.loads(path.read_text(encoding="utf-8"))
    edit(data)
    path.write_text(json.dumps(data), encoding="utf-8")


def _check_parity(folder, prompts=PROMPTS):
    """ClipTokenizer.from_folder(folder) and transformers' CLIPTokenizer.from_pretrained(folder): same ids."""
    ref = transformers.CLIPTokenizer.from_pretrained(folder)
    tok = ClipTokenizer.from_folder(folder)
    max_length = ref.model_max_length if ref.model_max_length < 10**6 else 77  # "unset": sdlite takes CLIP's 77
    assert (tok.bos_id, tok.eos_id, tok.pad_id, len(tok), tok.max_length) == (
        ref.bos_token_id, ref.eos_token_id, ref.pad_token_id, len(ref), max_length
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        expected = ref(prompts, padding="max_length", max_length=tok.max_length, truncation=True).input_ids
        ours = tok(prompts).tolist()
    for prompt, a, b in zip(prompts, ours, expected):
        assert a == b, prompt
    return tok, ours


@pytest.fixture(scope="module")
def resaved(tmp_path_factory):
    """{kind: the standard SD tokenizer folder, re-saved by transformers 5 (tokenizer.json only)}."""
    root = tmp_path_factory.mktemp("resaved")
    out = {}
    for kind in ("sd1", "sd2"):
        write_standard_tokenizer(root / f"{kind}_src", kind)
        out[kind] = _resave(root / f"{kind}_src", root / kind)
    return out


@pytest.fixture(scope="module")
def small_json_dir(tmp_path_factory):
    """A small vocabulary (600 ids), re-saved by transformers: a tokenizer.json quick to rewrite."""
    root = tmp_path_factory.mktemp("small")
    write_clip_tokenizer(root / "src", vocab_size=600)
    return _resave(root / "src", root / "tokenizer")


@pytest.fixture
def small(tmp_path, small_json_dir):
    return shutil.copytree(small_json_dir, tmp_path / "tokenizer")


# ---------------------------------------------------------------------------------------------- parity


@pytest.mark.parametrize("kind, pad", [("sd1", 49407), ("sd2", 0)])
def test_resaved_folder_matches_transformers(resaved, kind, pad):
    folder = resaved[kind]
    assert sorted(p.name for p in folder.iterdir()) == ["tokenizer.json", "tokenizer_config.json"]
    tok, ours = _check_parity(folder)
    assert tok.pad_id == pad and tok.vocab_size == 49408
    assert ours[0][:8] == [49406, 320, 1125, 539, 320, 2368, 49407, pad]
    # the same ids as the folder it was saved from, but for a special token's text typed in upper case:
    # transformers saves <|endoftext|> as matched before normalization for SD 1.x (the pad token's flags)
    standard = ClipTokenizer.standard(kind)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", TokenTruncationWarning)
        assert [standard.encode(p) for p in PROMPTS if "ENDOFTEXT" not in p] == [
            ids for p, ids in zip(PROMPTS, ours) if "ENDOFTEXT" not in p
        ]
    assert max_token_id(folder) == 49407
    assert tokenizer_files_present(folder)


@pytest.mark.parametrize("kind", ["sd1", "sd2"])
def test_merges_as_strings(resaved, tmp_path, kind):
    """Older tokenizer.json files hold merges as "left right" strings instead of [left, right] pairs."""
    folder = shutil.copytree(resaved[kind], tmp_path / "tok")
    _edit_json(folder / "tokenizer.json", lambda d: d["model"].update(merges=[" ".join(m) for m in d["model"]["merges"]]))
    _check_parity(folder)


def test_tokenizer_json_wins_over_vocab_json(small, tmp_path):
    """transformers 5 takes vocab and merges from tokenizer.json when a folder also has vocab.json/merges.txt."""
    other = tmp_path / "other"
    size = write_clip_tokenizer(other, ["zebra zebra zebra quokka"] * 3, vocab_size=530)
    for name in ("vocab.json", "merges.txt"):
        shutil.copy(other / name, small / name)
    tok, _ = _check_parity(small)
    assert tok.vocab_size == 600 and size < 600 and tok.tokenize("zebra") != ["zebra</w>"]
    assert max_token_id(small) == 599
    (small / "tokenizer.json").unlink()  # now vocab.json + merges.txt
    tok = ClipTokenizer.from_folder(small)
    assert tok.vocab_size == size and max_token_id(small) == size - 1 and tok.tokenize("zebra") == ["zebra</w>"]


def _normalized_added_tokens(folder):
    """tokenizer.json's added tokens give the named tokens their flags (no added_tokens_decoder in the config)."""
    def edit(d):
        for t in d["added_tokens"]:
            t["normalized"] = True

    _edit_json(folder / "tokenizer.json", edit)


def _pad_not_in_vocab(folder):
    """An added token past the vocabulary, named as the pad token."""
    _edit_json(folder / "tokenizer.json", lambda d: d["added_tokens"].append(
        {"id": 600, "content": "<pad>", "single_word": False, "lstrip": False, "rstrip": False,
         "normalized": False, "special": True}))
    _edit_json(folder / "tokenizer_config.json", lambda c: c.update(pad_token="<pad>"))


def _decoder_in_config(folder):
    """added_tokens_decoder in tokenizer_config.json wins over tokenizer.json's added tokens."""
    _edit_json(folder / "tokenizer_config.json", lambda c: c.update(added_tokens_decoder={
        "599": {"content": "<|endoftext|>", "lstrip": False, "normalized": True, "rstrip": False,
                "single_word": False, "special": True}}))


def _left_directions(folder):
    """tokenizer.json's padding / truncation directions are the defaults of padding_side / truncation_side."""
    _edit_json(folder / "tokenizer.json", lambda d: d.update(
        padding={"strategy": {"Fixed": 12}, "direction": "Left", "pad_to_multiple_of": None, "pad_id": 599,
                 "pad_type_id": 0, "pad_token": "<|endoftext|>"},
        truncation={"direction": "Left", "max_length": 10, "strategy": "LongestFirst", "stride": 0}))


VARIANTS = {
    "normalized_added_tokens": _normalized_added_tokens,
    "pad_not_in_vocab": _pad_not_in_vocab,
    "decoder_in_config": _decoder_in_config,
    "left_directions": _left_directions,
    # special_tokens_map.json is read when the config has no added_tokens_decoder
    "special_tokens_map": lambda f: (f / "special_tokens_map.json").write_text(json.dumps({"pad_token": "!"})),
    "no_config": lambda f: (f / "tokenizer_config.json").unlink(),
    "no_model_type": lambda f: _edit_json(f / "tokenizer.json", lambda d: d["model"].pop("type")),
}


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_config_variants(small, variant):
    VARIANTS[variant](small)
    tok, _ = _check_parity(small)
    assert (tok.padding_side, tok.truncation_side) == (("left",) * 2 if variant == "left_directions" else ("right",) * 2)
    assert tok.pad_id == {"pad_not_in_vocab": 600, "special_tokens_map": 0}.get(variant, 599)
    assert max_token_id(small) == (600 if variant == "pad_not_in_vocab" else 599)


def test_files_present(tmp_path, small):
    assert tokenizer_files_present(small)
    assert not tokenizer_files_present(tmp_path / "nope")
    empty = tmp_path / "empty"
    empty.mkdir()
    assert not tokenizer_files_present(empty)
    (empty / "vocab.json").write_text("{}")
    assert tokenizer_files_present(empty)


# ---------------------------------------------------------------------------------------------- hostile


def refused(folder, match: str = "") -> str:
    """Both readers refuse in one line naming tokenizer.json; neither blocks."""
    messages = []
    for read in (ClipTokenizer.from_folder, max_token_id):
        box = {}

        def target():
            try:
                read(folder)
            except BaseException as exc:  # noqa: BLE001 - checked below
                box["error"] = exc

        t = threading.Thread(target=target, daemon=True)
        t.start()
        t.join(20)
        assert not t.is_alive(), f"{read.__name__} blocked"
        err = box.get("error")
        assert isinstance(err, ModelFolderError), repr(err)
        msg = str(err)
        assert "tokenizer.json" in msg and "\n" not in msg and match in msg, msg
        messages.append(msg)
    return messages[0]


def _set(*keys, value):
    def edit(d):
        for key in keys[:-1]:
            d = d[key]
        d[keys[-1]] = value

    return edit


HOSTILE = {
    "not_object": (lambda d: d.clear() or d.update(x=1), "'model' object"),
    "model_missing": (lambda d: d.pop("model"), "'model' object"),
    "model_list": (_set("model", value=[1, 2]), "'model' object"),
    "wordpiece": (_set("model", "type", value="WordPiece"), "not 'BPE'"),
    "vocab_list": (_set("model", "vocab", value=["a", "b"]), "model.vocab"),
    "vocab_empty": (_set("model", "vocab", value={}), "model.vocab"),
    "vocab_string_id": (lambda d: d["model"]["vocab"].update(zzz="7"), "model.vocab: token 'zzz'"),
    "vocab_id_negative": (lambda d: d["model"]["vocab"].update(zzz=-1), "expected an integer from 0 to"),
    "vocab_id_32_bits": (lambda d: d["model"]["vocab"].update(zzz=2**31), "expected an integer from 0 to"),
    "vocab_id_bool": (lambda d: d["model"]["vocab"].update(zzz=True), "expected an integer from 0 to"),
    "vocab_shared_id": (lambda d: d["model"]["vocab"].update(zzz=5), "share an id"),
    "merges_missing": (lambda d: d["model"].pop("merges"), "model.merges"),
    "merges_object": (_set("model", "merges", value={"a": "b"}), "model.merges"),
    "merge_three_parts": (lambda d: d["model"]["merges"].insert(3, "a b c"), "model.merges[3]"),
    "merge_pair_of_ints": (lambda d: d["model"]["merges"].insert(0, [1, 2]), "model.merges[0]"),
    "merge_one_string": (lambda d: d["model"]["merges"].insert(0, ["ab"]), "model.merges[0]"),
    "merge_not_in_vocab": (lambda d: d["model"]["merges"].append(["\u0444", "\u044f"]), "not in model.vocab"),
    "added_not_list": (_set("added_tokens", value={"0": "x"}), "added_tokens must be a list"),
    "added_no_id": (lambda d: d["added_tokens"][0].pop("id"), "added_tokens[0]"),
    "added_id_out_of_range": (lambda d: d["added_tokens"][0].update(id=2**40), "added_tokens[0]"),
    "added_id_string": (lambda d: d["added_tokens"][0].update(id="599"), "added_tokens[0]"),
    "added_flag_string": (lambda d: d["added_tokens"][0].update(lstrip="no"), "added_tokens[0]"),
    "added_special_string": (lambda d: d["added_tokens"][0].update(special="yes"), "added_tokens[0]"),
    "added_no_content": (lambda d: d["added_tokens"][0].pop("content"), "added_tokens[0]"),
    "padding_bad": (_set("padding", value={"direction": "Up"}), "padding"),
    "truncation_bad": (_set("truncation", value=[1]), "truncation"),
    "no_end_token": (lambda d: d["model"]["vocab"].pop("<|endoftext|>"), "eos_token"),
}


@pytest.mark.parametrize("case", sorted(HOSTILE))
def test_malformed_tokenizer_json(small, case):
    edit, match = HOSTILE[case]
    _edit_json(small / "tokenizer.json", edit)
    refused(small, match)


@pytest.mark.parametrize("content", ["", "{not json", "[1, 2]", "[" * 100_000 + "]" * 100_000, '{"model": 1e999999}'])
def test_not_json(small, content):
    (small / "tokenizer.json").write_text(content)
    refused(small)


@pytest.mark.parametrize("kind", ["fifo", "dev_zero", "dir"])
def test_not_a_regular_file(small, kind):
    path = small / "tokenizer.json"
    path.unlink()
    if kind == "fifo":
        os.mkfifo(path)
    elif kind == "dev_zero":
        os.symlink("/dev/zero", path)
    else:
        path.mkdir()
    assert tokenizer_files_present(small)
    refused(small, "not a regular file")


def test_size_limit(small, monkeypatch):
    monkeypatch.setattr(clip, "MAX_TOKENIZER_BYTES", os.path.getsize(small / "tokenizer.json") - 1)
    refused(small, "-byte limit")
