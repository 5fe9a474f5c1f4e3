"""Files the CLI writes: filesystem errors are one line and exit 2, nothing half-written is left, nothing
is replaced that the user did not ask to replace (issue "Hardening", faults 9-11)."""

import errno

from sdlite.cli import main

FAST = ["--steps", "1", "-W", "32", "-H", "32", "-q"]


def run(argv, capsys):
    code = main(argv)
    return code, capsys.readouterr().err


def one_line_error(code, err, needle):
    assert code == 2 and err.startswith("sdlite: error: ") and len(err.splitlines()) == 1, err
    assert needle in err and "Traceback" not in err, err


def test_convert_refuses_what_exists_or_lies_inside_the_source(tiny_model, tmp_path, capsys):
    dangling = tmp_path / "dangling"
    dangling.symlink_to(tmp_path / "nowhere")
    one_line_error(*run(["convert", str(tiny_model), str(dangling), "--weights", "fp16"], capsys), "already exists")
    empty = tmp_path / "empty"
    empty.mkdir()
    one_line_error(*run(["convert", str(tiny_model), str(empty), "--weights", "fp16"], capsys), "already exists")
    inside = tiny_model / "converted"
    one_line_error(*run(["convert", str(tiny_model), str(inside), "--weights", "fp16"], capsys), "inside the model")
    assert not inside.exists()


def test_convert_filesystem_errors_are_one_line(tiny_model, tmp_path, capsys, monkeypatch):
    afile = tmp_path / "file.txt"
    afile.write_text("x")
    one_line_error(*run(["convert", str(tiny_model), str(afile / "out"), "--weights", "fp16"], capsys), "file.txt")
    import sdlite.weights.model_folder as model_folder

    def disk_full(*a, **k):
        raise OSError(errno.ENOSPC, "No space left on device", str(tmp_path / "out"))
    monkeypatch.setattr(model_folder, "save_safetensors", disk_full)
    one_line_error(*run(["convert", str(tiny_model), str(tmp_path / "out"), "--weights", "int8"], capsys),
                   "No space left on device")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file.txt"]  # no temporary folder left


def test_a_folder_created_meanwhile_is_never_replaced(tiny_model, tmp_path, capsys, monkeypatch):
    import sdlite.runtime.convert as convert
    dst = tmp_path / "out"
    real = convert.convert_component

    def slow(*a, **k):
        dst.mkdir(exist_ok=True)  # someone else creates the destination while we write
        (dst / "theirs.txt").write_text("keep")
        return real(*a, **k)
    monkeypatch.setattr(convert, "convert_component", slow)
    one_line_error(*run(["convert", str(tiny_model), str(dst), "--weights", "fp16"], capsys), "meanwhile")
    assert [p.name for p in dst.iterdir()] == ["theirs.txt"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_stale_temporary_folders_of_killed_runs_are_swept(tiny_model, tmp_path, capsys):
    stale = tmp_path / ".out.sdlite-999999999-abc"  # a pid that is not running
    stale.mkdir()
    (stale / "half.safetensors").write_bytes(b"x" * 100)
    code, err = run(["convert", str(tiny_model), str(tmp_path / "out"), "--weights", "fp16"], capsys)
    assert code == 0, err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_generate_disk_full_and_read_only_output(tiny_model, tmp_path, capsys, monkeypatch):
    out = tmp_path / "img.png"
    out.write_bytes(b"old")
    out.chmod(0o444)
    one_line_error(*run(["generate", "x", "-m", str(tiny_model), "-o", str(out), *FAST], capsys), "read-only")
    assert out.read_bytes() == b"old"
    import sdlite.image_io as image_io

    def disk_full(*a, **k):
        raise OSError(errno.ENOSPC, "No space left on device")
    monkeypatch.setattr(image_io.Image.Image, "save", disk_full)
    fresh = tmp_path / "new.png"
    one_line_error(*run(["generate", "x", "-m", str(tiny_model), "-o", str(fresh), *FAST], capsys),
                   "No space left on device")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["img.png"]
