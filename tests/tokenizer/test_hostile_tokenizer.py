"""Hostile tokenizer folders: one ModelFolderError naming the file, never a traceback, a hang or an
unbounded read (issue "Hardening", faults 1, 2, 4, 7); `max_token_id` agrees with the built tokenizer."""

from __future__ import annotations

import json
import os
import shutil
import threading

import pytest

from sdlite.errors import ModelFolderError
from sdlite.tokenizer import clip
from sdlite.tokenizer.clip import ClipTokenizer, max_token_id
from sdlite.tokenizer.writer import write_clip_tokenizer


@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tok") / "tokenizer"
    write_clip_tokenizer(folder)
    return folder


@pytest.fixture
def folder(tmp_path, tok_dir):
    return shutil.copytree(tok_dir, tmp_path / "tokenizer")


def refused(folder, name: str, match: str = "") -> str:
    """Both readers (the tokenizer, and the cheap limits check) refuse, naming the file; neither blocks."""
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
        assert not t.is_alive(), f"{read.__name__} blocked on {name}"
        err = box.get("error")
        assert isinstance(err, ModelFolderError), repr(err)
        msg = str(err)
        assert name in msg and "\n" not in msg and match in msg, msg
        messages.append(msg)
    return messages[0]


@pytest.mark.parametrize("name", ["merges.txt", "vocab.json", "tokenizer_config.json",
                                  "special_tokens_map.json"])
@pytest.mark.parametrize("kind", ["fifo", "dev_zero", "dir"])
def test_file_that_is_not_regular(folder, name, kind):
    path = folder / name
    path.unlink()
    if kind == "fifo":
        os.mkfifo(path)
    elif kind == "dev_zero":
        os.symlink("/dev/zero", path)
    else:
        path.mkdir()
    refused(folder, name, "not a regular file")


@pytest.mark.parametrize("name", ["vocab.json", "tokenizer_config.json", "special_tokens_map.json"])
def test_nesting_too_deep(folder, name):
    (folder / name).write_text("[" * 100_000 + "]" * 100_000)
    refused(folder, name, "nested too deeply")


def test_integer_of_5000_digits_in_vocab(folder):
    vocab = (folder / "vocab.json").read_text()
    (folder / "vocab.json").write_text(vocab.rstrip().rstrip("}") + ', "zzz": ' + "9" * 5000 + "}")
    refused(folder, "vocab.json", "5000 digits")


@pytest.mark.parametrize("index", [2**31, 2**40, 2**64])
def test_token_id_past_32_bits(folder, index):
    vocab = json.loads((folder / "vocab.json").read_text())
    vocab["zzz"] = index
    (folder / "vocab.json").write_text(json.dumps(vocab))
    refused(folder, "vocab.json", "expected an integer from 0 to")


def test_lone_surrogate_token(folder):
    vocab = (folder / "vocab.json").read_text()
    (folder / "vocab.json").write_text(vocab.rstrip().rstrip("}") + ', "\\ud800": 123456}')
    refused(folder, "vocab.json", "surrogate")


def test_lone_surrogate_special_token(folder):
    (folder / "special_tokens_map.json").write_text('{"pad_token": "\\udc00"}')
    cfg = json.loads((folder / "tokenizer_config.json").read_text())
    cfg.pop("added_tokens_decoder")
    (folder / "tokenizer_config.json").write_text(json.dumps(cfg))
    refused(folder, "special_tokens_map.json", "surrogate")


def test_size_limits(folder, monkeypatch):
    monkeypatch.setattr(clip, "MAX_TOKENIZER_BYTES", 2000)
    msg = refused(folder, "vocab.json", "-byte limit")
    assert "2000" in msg
    with open(folder / "merges.txt", "a", encoding="utf-8") as f:  # version lines are skipped: still valid
        f.write("#version: 0.2\n" * 2000)
    assert os.path.getsize(folder / "merges.txt") > os.path.getsize(folder / "vocab.json")
    monkeypatch.setattr(clip, "MAX_TOKENIZER_BYTES", os.path.getsize(folder / "vocab.json"))
    with pytest.raises(ModelFolderError, match=r"merges\.txt.*-byte limit"):
        ClipTokenizer.from_folder(folder)
    with pytest.raises(ModelFolderError, match=r"merges\.txt.*-byte limit"):
        max_token_id(folder)


def test_symlinked_files_are_fine(folder, tmp_path):
    real = tmp_path / "real"
    real.mkdir()
    for name in ("vocab.json", "merges.txt"):
        shutil.move(folder / name, real / name)
        os.symlink(real / name, folder / name)
    assert ClipTokenizer.from_folder(folder).encode("a cat")[0] == ClipTokenizer.from_folder(folder).bos_id


@pytest.mark.parametrize("pad", [None, "<pad>", "!"])
def test_max_token_id_matches_the_tokenizer(tmp_path, pad):
    folder = tmp_path / "tok"
    write_clip_tokenizer(folder, vocab_size=700, **({"pad_token": pad} if pad else {}))
    tok = ClipTokenizer.from_folder(folder)
    top = max(tok._tokenizer.get_vocab(with_added_tokens=True).values())
    assert max_token_id(folder) == top
    if pad == "<pad>":  # an added token beyond vocab.json
        assert top == len(json.loads((folder / "vocab.json").read_text()))
