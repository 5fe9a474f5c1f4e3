"""The bottom floor: byte sizes (`sdlite.units`) and model-folder files (`sdlite.fileio`)."""

import pytest

from sdlite.errors import ModelFolderError
from sdlite.fileio import atomic_folder, read_json, write_json
from sdlite.units import GiB, MiB, format_bytes, parse_bytes


def test_parse_bytes():
    assert parse_bytes("1.5G") == int(1.5 * 1024**3)
    assert parse_bytes("768M") == 768 * MiB
    assert parse_bytes("512MiB") == 512 * MiB
    assert parse_bytes("1073741824") == GiB
    assert parse_bytes("2GB") == 2 * 1024**3
    for bad in ("", "abc", "-1G", "0", "nanM"):
        with pytest.raises(ValueError):
            parse_bytes(bad)



def test_format_bytes():
    assert format_bytes(768 * MiB) == "768 MiB"
    assert format_bytes(int(1.5 * GiB)) == "1.50 GiB"
    assert format_bytes(512, precise=True) == "512 B"
    assert format_bytes(3 * 1024 + 200, precise=True) == "3.2 KiB"
    assert format_bytes(3 * GiB, precise=True) == "3.0 GiB"


def test_read_json_names_the_file_for_every_failure(tmp_path):
    good = tmp_path / "good.json"
    write_json(good, {"a": [1, 2]})
    assert read_json(good) == {"a": [1, 2]}
    cases = {
        "missing.json": (None, "no such file"),
        "bad.json": (b"{not json", "not valid JSON"),
        "latin1.json": (b'{"a": "\xe9"}', "not valid JSON"),
        "list.json": (b"[1, 2]", "expected a JSON object"),
    }
    for name, (data, message) in cases.items():
        path = tmp_path / name
        if data is not None:
            path.write_bytes(data)
        with pytest.raises(ModelFolderError, match=message) as exc:
            read_json(path)
        assert str(path) in str(exc.value) and "\n" not in str(exc.value)
    assert read_json(tmp_path / "list.json", want_object=False) == [1, 2]
    with pytest.raises(ModelFolderError, match="the vocabulary is missing"):
        read_json(tmp_path / "missing.json", "the vocabulary")
    (tmp_path / "dir.json").mkdir()
    with pytest.raises(ModelFolderError, match="not a regular file"):
        read_json(tmp_path / "dir.json")


def test_atomic_folder_appears_whole_or_not_at_all(tmp_path):
    dst = tmp_path / "out"
    with atomic_folder(dst) as tmp:
        (tmp / "a.txt").write_text("x")
        assert not dst.exists()
    assert (dst / "a.txt").read_text() == "x"
    with pytest.raises(FileExistsError):
        with atomic_folder(dst):
            pass
    failed = tmp_path / "failed"
    with pytest.raises(KeyboardInterrupt):
        with atomic_folder(failed) as tmp:
            (tmp / "half.bin").write_bytes(b"1")
            raise KeyboardInterrupt
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # nothing half-written left
    with atomic_folder(dst, replace=True) as tmp:
        (tmp / "b.txt").write_text("y")
    assert sorted(p.name for p in dst.iterdir()) == ["b.txt"]
