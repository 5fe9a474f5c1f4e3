"""The `sdlite` command: happy paths and every bad input (one line on stderr, exit 2, no output file)."""

import json
import shutil
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from sdlite.cli import main

FAST = ["--steps", "2", "-W", "32", "-H", "32", "-q"]


def run(argv, capsys):
    code = main(argv)
    out, err = capsys.readouterr()
    return code, out, err


def test_generate_writes_png_with_parameters(tiny_model, tmp_path, capsys):
    out = tmp_path / "img.png"
    code, stdout, err = run(["generate", "a red circle", "-m", str(tiny_model), "-o", str(out),
                             "--seed", "5", "--sampler", "euler_a", "--negative-prompt", "blue",
                             *FAST], capsys)
    assert code == 0, err
    assert str(out) in stdout
    with Image.open(out) as im:
        assert im.size == (32, 32)
        params = im.info["parameters"]
    lines = params.splitlines()
    assert lines[0] == "a red circle"
    assert lines[1] == "Negative prompt: blue"
    assert "Steps: 2" in lines[2] and "Sampler: Euler a" in lines[2] and "Seed: 5" in lines[2]
    assert "Size: 32x32" in lines[2] and "CFG scale: 7.5" in lines[2]


def test_same_seed_same_image_other_seed_differs(tiny_model, tmp_path, capsys):
    paths = []
    for i, seed in enumerate(["1", "1", "2"]):
        p = tmp_path / f"{i}.png"
        assert run(["generate", "x", "-m", str(tiny_model), "-o", str(p), "--seed", seed, *FAST],
                   capsys)[0] == 0
        paths.append(np.asarray(Image.open(p)))
    assert np.array_equal(paths[0], paths[1])
    assert not np.array_equal(paths[0], paths[2])


def test_default_size_is_the_models_native_size(tiny_model, tmp_path, capsys):
    out = tmp_path / "n.png"
    assert run(["generate", "x", "-m", str(tiny_model), "-o", str(out), "--steps", "1", "-q"],
               capsys)[0] == 0
    assert Image.open(out).size == (16, 16)  # unet sample_size 8 x VAE factor 2 (two VAE blocks)


def test_info_lists_components(tiny_model, capsys):
    code, out, _ = run(["info", str(tiny_model)], capsys)
    assert code == 0
    for part in ("text_encoder", "unet", "vae", "tokenizer", "M params", "on disk"):
        assert part in out


def broken_copy(src, dst, edit):
    shutil.copytree(src, dst)
    edit(dst)
    return dst


def truncate_unet(d):
    f = d / "unet" / "diffusion_pytorch_model.safetensors"
    data = f.read_bytes()
    f.write_bytes(data[: len(data) // 2])


def drop_unet_weights(d):
    (d / "unet" / "diffusion_pytorch_model.safetensors").unlink()


def corrupt_index(d):
    (d / "model_index.json").write_text("{not json")


def corrupt_unet_config(d):
    (d / "unet" / "config.json").write_text(json.dumps({"block_out_channels": [32, 64],
                                                        "down_block_types": ["X", "Y"],
                                                        "up_block_types": ["A", "B"]}))


def wrong_shapes(d):
    cfg = json.loads((d / "unet" / "config.json").read_text())
    cfg["block_out_channels"] = [32, 64, 128]
    (d / "unet" / "config.json").write_text(json.dumps(cfg))


def no_tokenizer(d):
    shutil.rmtree(d / "tokenizer")


@pytest.mark.parametrize("edit,needle", [
    (truncate_unet, "truncated"),
    (drop_unet_weights, "unet"),
    (corrupt_index, "model_index.json"),
    (corrupt_unet_config, "not supported"),
    (wrong_shapes, "shape"),
    (no_tokenizer, "tokenizer"),
])
def test_bad_model_folder(tiny_model, tmp_path, capsys, edit, needle):
    model = broken_copy(tiny_model, tmp_path / "m", edit)
    out = tmp_path / "o.png"
    code, _, err = run(["generate", "x", "-m", str(model), "-o", str(out), *FAST], capsys)
    assert code == 2
    assert err.startswith("sdlite: error: ") and err.count("\n") == 1, err
    assert needle in err
    assert not out.exists()
    assert [p.name for p in tmp_path.iterdir()] == ["m"]  # no temp file left either


@pytest.mark.parametrize("args,needle", [
    (["-W", "65"], "width"),
    (["-H", "12"], "height"),
    (["--steps", "-3"], "--steps"),
    (["--steps", "0"], "--steps"),
    (["--sampler", "plms"], "--sampler"),
    (["--cfg-scale", "nan"], "--cfg-scale"),
    (["--seed", "-2"], "--seed"),  # -1 is random, as in A1111
    (["-W", "abc"], "--width"),
])
def test_bad_arguments(tiny_model, tmp_path, capsys, args, needle):
    out = tmp_path / "o.png"
    code, _, err = run(["generate", "x", "-m", str(tiny_model), "-o", str(out), "-q", *args], capsys)
    assert code == 2
    assert err.startswith("sdlite: error: ") and err.count("\n") == 1, err
    assert needle in err
    assert not out.exists()


@pytest.mark.parametrize("model,output,needle", [
    ("{tmp}/missing", "{tmp}/o.png", "no such model folder"),
    ("{model}", "{tmp}/nodir/o.png", "does not exist"),
    ("{model}", "{tmp}/o.gif", ".png, .jpg or .webp"),  # .jpg/.webp are written since A1111 users ask
    ("{file}", "{tmp}/o.png", "corrupt safetensors header"),  # a file is read as a single-file checkpoint
    ("{tmp}/x.onnx", "{tmp}/o.png", ".safetensors"),  # a suffix no reader takes: the ones read are named
])
def test_bad_paths(tiny_model, tmp_path, capsys, model, output, needle):
    f = tmp_path / "file.safetensors"
    f.write_bytes(b"12345678")
    (tmp_path / "x.onnx").write_bytes(b"12345678")
    fmt = dict(tmp=tmp_path, model=tiny_model, file=f)
    code, _, err = run(["generate", "x", "-m", model.format(**fmt), "-o", output.format(**fmt), *FAST],
                       capsys)
    assert code == 2 and needle in err and err.count("\n") == 1, err


def test_entry_point_exit_code(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "sdlite", "generate", "x", "-m", str(tmp_path / "no")],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.strip().startswith("sdlite: error:")


def test_random_model_refuses_unknown_arch_and_existing_folder(tiny_model, tmp_path, capsys):
    code, _, err = run(["random-model", "sd99", str(tmp_path / "x")], capsys)
    assert code == 2 and "unknown architecture" in err
    code, _, err = run(["random-model", "tiny", str(tiny_model)], capsys)
    assert code == 2 and "already exists" in err


def test_steps_the_schedule_cannot_place_are_one_line_exit_2(tiny_model, tmp_path, capsys):
    out = tmp_path / "s.png"
    code = main(["generate", "x", "-m", str(tiny_model), "--steps", "1000", "--sampler", "ddim", "-o", str(out),
                 "-q"])
    err = capsys.readouterr().err
    assert code == 2 and "steps: 1000 steps do not fit" in err and err.count("\n") == 1
    assert not out.exists()
