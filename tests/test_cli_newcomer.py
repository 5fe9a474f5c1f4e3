"""What a newcomer with A1111 / sd.cpp habits tries first (issue "The first hour with sdlite")."""

import socket
import subprocess
import sys

import pytest

from sdlite.cli import main
from sdlite.image_io import read_parameters

FAST = ["--steps", "2", "-W", "32", "-H", "32", "-q"]


def run(argv, capsys):
    code = main(argv)
    out, err = capsys.readouterr()
    return code, out, err


@pytest.mark.parametrize("suffix,fmt", [(".png", "PNG"), (".jpg", "JPEG"), (".JPEG", "JPEG"), (".webp", "WEBP")])
def test_output_formats_carry_the_parameters(tiny_model, tmp_path, capsys, suffix, fmt):
    from PIL import Image
    out = tmp_path / f"img{suffix}"
    code, stdout, err = run(["generate", "a red circle", "-m", str(tiny_model), "-o", str(out), "--seed", "3",
                             "--sampler", "Euler a", *FAST], capsys)
    assert code == 0, err
    with Image.open(out) as im:
        assert im.format == fmt and im.size == (32, 32)
    params = read_parameters(out)
    assert params.splitlines()[0] == "a red circle" and "Sampler: Euler a" in params and "Seed: 3" in params


def test_unknown_output_format_is_refused_before_loading(tiny_model, tmp_path, capsys):
    code, _, err = run(["generate", "x", "-m", str(tiny_model), "-o", str(tmp_path / "x.gif"), *FAST], capsys)
    assert code == 2 and "output must be a .png, .jpg or .webp file" in err and len(err.splitlines()) == 1
    assert list(tmp_path.iterdir()) == []


def test_seed_minus_one_is_random(tiny_model, tmp_path, capsys):
    seeds = set()
    for i in range(2):
        code, stdout, err = run(["generate", "x", "-m", str(tiny_model), "-o", str(tmp_path / f"{i}.png"),
                                 "--seed", "-1", *FAST], capsys)
        assert code == 0, err
        seeds.add(int(stdout.split("(seed ")[1].split(",")[0]))
    assert len(seeds) == 2 and all(s >= 0 for s in seeds)
    code, _, err = run(["generate", "x", "-m", str(tiny_model), "--seed", "-2", *FAST], capsys)
    assert code == 2 and "--seed" in err


def test_help_shows_defaults_and_the_shipped_model(capsys):
    for argv, needles in [
        (["generate", "--help"], ["(default: 20;", "(default: 7.5;", "(default: dpm++2m;", "-1: random",
                                  "Clip skip", "sdlite-shapes", "64x64"]),
        (["serve", "--help"], ["(default: 150)", "(default: 300.0)", "(default: 1024)", "(default: 7860)"]),
        (["convert", "--help"], ["the folder to write", "int8"]),
    ]:
        with pytest.raises(SystemExit) as exc:
            main(argv)
        assert exc.value.code == 0
        text = " ".join(capsys.readouterr().out.split())
        for needle in needles:
            assert needle in text, (argv, needle)


def test_long_prompt_warning_is_one_plain_line(tiny_model, tmp_path, capsys):
    prompt = " ".join(["circle"] * 120)
    code, _, err = run(["generate", prompt, "-m", str(tiny_model), "-o", str(tmp_path / "x.png"), "--prompt-syntax",
                        "plain", *FAST], capsys)  # (plain: cut at 77 tokens with a warning; a1111 chunks)
    assert code == 0
    lines = [line for line in err.splitlines() if "warning" in line.lower()]
    assert lines and all(line.startswith("sdlite: warning: ") for line in lines), err
    assert "UserWarning" not in err and ".py:" not in err


def test_pipeline_load_without_a_path_opens_the_shipped_model():
    from sdlite import Pipeline
    pipe = Pipeline.load()
    assert pipe.folder.name == "sdlite-shapes" and pipe.native_size == 64


def test_serve_without_the_extra_is_one_line():
    code = ("import sys; sys.modules['grpc'] = None; sys.modules['prometheus_client'] = None; "
            "sys.modules['uvicorn'] = None; "
            "from sdlite.cli import main; sys.exit(main(['serve']))")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 2
    assert r.stderr.startswith("sdlite: error: serve needs the serve extra") and len(r.stderr.splitlines()) == 1
    assert "prometheus_client" in r.stderr and "grpc" in r.stderr and "uvicorn" in r.stderr
    assert "Traceback" not in r.stderr


def test_loadtest_where_nothing_succeeds_exits_non_zero(capsys):
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    code, out, err = run(["loadtest", f"http://127.0.0.1:{port}", "-n", "2", "--timeout", "5"], capsys)
    assert code == 1 and "no request succeeded" in err


def test_shipped_model_says_when_a_request_leaves_its_domain(tmp_path, capsys):
    code, _, err = run(["generate", "a lighthouse at dusk", "-W", "32", "-H", "32", "--steps", "1", "-q",
                        "-o", str(tmp_path / "a.png")], capsys)
    assert code == 0
    notes = [line for line in err.splitlines() if line.startswith("sdlite: note: ")]
    assert len(notes) == 2 and "64x64" in notes[0] and "'lighthouse'" in notes[1] and "'dusk'" in notes[1]
    code, _, err = run(["generate", "a red circle on a blue background", "--steps", "1", "-q",
                        "-o", str(tmp_path / "b.png")], capsys)
    assert code == 0 and "note" not in err


def test_vae_that_scales_otherwise_is_refused(tiny_model, tmp_path, capsys):
    from sdlite.testing import write_random_vae
    write_random_vae("taesd", tmp_path / "taesd")  # 8x per side; the tiny model's own VAE is 2x
    code, _, err = run(["generate", "x", "-m", str(tiny_model), "--vae", str(tmp_path / "taesd"),
                        "-o", str(tmp_path / "o.png"), *FAST], capsys)
    assert code == 2 and "scales latents 8x" in err and not (tmp_path / "o.png").exists()
