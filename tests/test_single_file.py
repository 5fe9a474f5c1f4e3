"""Single-file checkpoints (original SD layout, .safetensors and .ckpt) as models: the same image as the
folder they were made from, diffusers' from_single_file within a level, the CLI, the errors."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from sdlite.errors import ModelFolderError, WeightsError
from sdlite.pipeline import Pipeline
from sdlite.testing.random_model import write_random_model
from sdlite.testing.single_file import write_single_file
from sdlite.weights.sources import open_model

GEN = dict(steps=3, cfg_scale=7.5, seed=77, width=64, height=64, sampler="euler")
PROMPT = "a red circle"


@pytest.fixture(scope="module")
def sd1(tmp_path_factory):
    return write_random_model("tiny", tmp_path_factory.mktemp("sf") / "tiny", seed=3)


@pytest.fixture(scope="module")
def sd2(tmp_path_factory):
    return write_random_model("tiny-sd2", tmp_path_factory.mktemp("sf") / "tiny-sd2", seed=4)


@pytest.fixture(scope="module")
def std(tmp_path_factory):
    """A tiny model by SD 1.x's conventions, with the CLIP tokenizer sdlite ships."""
    import shutil

    from sdlite.tokenizer.writer import write_standard_tokenizer
    folder = write_random_model("tiny-std", tmp_path_factory.mktemp("sf") / "std", seed=9)
    shutil.rmtree(folder / "tokenizer")
    write_standard_tokenizer(folder / "tokenizer", "sd1")
    return folder


@pytest.fixture(scope="module")
def files(sd1, sd2, tmp_path_factory):
    d = tmp_path_factory.mktemp("files")
    out = {
        "sd1.safetensors": write_single_file(sd1, d / "sd1.safetensors", ema=True),
        "sd1.ckpt": write_single_file(sd1, d / "sd1.ckpt", fmt="ckpt", ema=True),
        "sd1-fp16.safetensors": write_single_file(sd1, d / "sd1-fp16.safetensors", dtype=torch.float16),
        "sd2.safetensors": write_single_file(sd2, d / "sd2.safetensors", family="sd2"),
        "vae.safetensors": write_single_file(sd1, d / "vae.safetensors", vae_only=True),
    }
    return {k: Path(v) for k, v in out.items()}


def _image(model, **load):
    pipe = Pipeline.load(model, **load)
    try:
        result = pipe.generate(PROMPT, **GEN)
    finally:
        pipe.close()
    return np.asarray(result.image), result.latents


@pytest.mark.parametrize("name", ["sd1.safetensors", "sd1.ckpt"])
def test_same_image_as_the_folder(sd1, files, name):
    want, want_latents = _image(sd1)
    got, latents = _image(files[name], config=sd1)
    assert torch.equal(latents, want_latents)
    assert np.array_equal(got, want)


def test_fp16_file_same_image_as_fp16_folder(sd1, files, tmp_path):
    from sdlite.runtime.convert import convert_model
    convert_model(sd1, tmp_path / "fp16", "fp16")
    want, _ = _image(tmp_path / "fp16")
    got, _ = _image(files["sd1-fp16.safetensors"], config=sd1)
    assert np.array_equal(got, want)


def test_weights_are_views_of_the_file(sd1, files):
    """fp16 linear/conv weights stay in the mapped file (renamed, never copied)."""
    model = open_model(files["sd1-fp16.safetensors"], config=sd1)
    from sdlite.runtime.components import load_unet
    part = load_unet(model)
    try:
        big = [p for p in part.module.parameters() if p.ndim >= 2]
        assert big and all(part.weights.is_view(p) for p in big)
        assert part.weights.copied_tensors == 0
    finally:
        part.close()


def test_sd2_text_encoder_views_and_same_image(sd2, files):
    want, _ = _image(sd2)
    got, _ = _image(files["sd2.safetensors"], config=sd2)
    assert np.array_equal(got, want)
    model = open_model(files["sd2.safetensors"], config=sd2)
    assert model.family == "sd2"
    assert any("penultimate" in reason or "last layer" in reason for reason in model.ignored)


diffusers = pytest.importorskip("diffusers")


def _diffusers_single_file(path, config, **kw):
    pipe = diffusers.StableDiffusionPipeline.from_single_file(
        str(path), config=str(config), local_files_only=True, safety_checker=None,
        requires_safety_checker=False, **kw)
    pipe.scheduler = diffusers.EulerDiscreteScheduler.from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.mark.parametrize("name,folder", [("sd1.safetensors", "sd1"), ("sd2.safetensors", "sd2")])
def test_diffusers_from_single_file_within_a_level(request, files, name, folder):
    config = request.getfixturevalue(folder)
    ref = _diffusers_single_file(files[name], config)
    want = ref(PROMPT, num_inference_steps=GEN["steps"], guidance_scale=GEN["cfg_scale"], width=64, height=64,
               generator=torch.Generator().manual_seed(GEN["seed"]), output_type="np").images[0]
    got, _ = _image(files[name], config=config)
    assert np.abs(got.astype(np.float64) - np.round(want * 255)).max() <= 1.0


def test_sd2_v_prediction_matches_diffusers(sd2, files, tmp_path):
    """v-prediction on an SD 2.x-shaped model: the file with --prediction-type v against diffusers
    running the folder with a v_prediction scheduler."""
    folder = tmp_path / "v"
    import shutil
    shutil.copytree(sd2, folder)
    cfg_path = folder / "scheduler" / "scheduler_config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["prediction_type"] = "v_prediction"
    cfg_path.write_text(json.dumps(cfg))
    ref = diffusers.StableDiffusionPipeline.from_pretrained(folder, safety_checker=None,
                                                            requires_safety_checker=False)
    ref.scheduler = diffusers.EulerDiscreteScheduler.from_config(ref.scheduler.config)
    ref.set_progress_bar_config(disable=True)
    want = ref(PROMPT, num_inference_steps=GEN["steps"], guidance_scale=GEN["cfg_scale"], width=64, height=64,
               generator=torch.Generator().manual_seed(GEN["seed"]), output_type="latent").images
    eps, _ = _image(files["sd2.safetensors"], config=sd2)
    pipe = Pipeline.load(files["sd2.safetensors"], config=sd2, prediction_type="v")
    got = pipe.generate(PROMPT, **GEN)
    assert pipe.scheduler_config["prediction_type"] == "v_prediction"
    err = ((got.latents - want).abs().max() / want.abs().max()).item()
    assert err < 1e-4, err
    assert not np.array_equal(np.asarray(got.image), eps)  # the prediction type changed the result


def test_prediction_type_sources(sd2, files, tmp_path):
    """Override, sidecar .yaml, and (with neither) the A1111-style check, which records how it decided."""
    import shutil
    f = tmp_path / "model.safetensors"
    shutil.copy(files["sd2.safetensors"], f)
    model = open_model(f)
    assert model.needs_prediction_check
    from sdlite.runtime.prediction import settle_prediction_type
    settle_prediction_type(model)
    assert model.prediction_type in ("epsilon", "v_prediction")
    assert model.prediction_note.startswith("detected: mean(out - x) = ")
    f.with_suffix(".yaml").write_text('model:\n  params:\n    parameterization: "v"\n    linear_start: 0.00085\n')
    model = open_model(f)
    assert model.prediction_type == "v_prediction" and not model.needs_prediction_check
    assert model.scheduler_config()["prediction_type"] == "v_prediction"
    assert model.part("unet").read_config()["sample_size"] == 96  # the 768-pixel v models
    model = open_model(f, prediction_type="epsilon")
    assert model.prediction_type == "epsilon" and "--prediction-type" in model.prediction_note
    f.with_suffix(".yaml").write_text("model:\n  params:\n    linear_start: 0.00085\n")
    assert open_model(f).prediction_type == "epsilon"


def test_single_file_vae(std, tmp_path):
    """--vae FILE (original layout, as fine-tuned VAEs are distributed; its config by SD's conventions)
    decodes as the same VAE's folder, for a folder model and for a single-file model."""
    vae_file = write_single_file(std, tmp_path / "vae.safetensors", vae_only=True)
    model_file = write_single_file(std, tmp_path / "std.safetensors")
    want, _ = _image(std, vae=std / "vae")
    got, _ = _image(std, vae=vae_file)
    assert np.array_equal(got, want)
    got2, _ = _image(model_file, vae=vae_file)
    assert np.array_equal(got2, want)


def run_cli(*args, cwd=None):
    return subprocess.run([sys.executable, "-m", "sdlite", *map(str, args)], capture_output=True, text=True,
                          timeout=300, cwd=cwd)


def test_cli_generate_info_convert(sd1, files, tmp_path):
    out = tmp_path / "a.png"
    p = run_cli("generate", PROMPT, "-m", files["sd1.ckpt"], "--config", sd1, "-o", out, "--steps", 2,
                "--seed", 5, "-W", 64, "-H", 64, "-q")
    assert p.returncode == 0, p.stderr
    assert out.is_file()
    p = run_cli("info", files["sd1.safetensors"], "--config", sd1)
    assert p.returncode == 0, p.stderr
    assert "SD 1.x single file" in p.stdout and "prediction type: epsilon" in p.stdout
    assert "EMA" in p.stdout  # what was ignored is named
    dst = tmp_path / "converted"
    p = run_cli("convert", files["sd1.safetensors"], dst, "--config", sd1)
    assert p.returncode == 0, p.stderr
    want, _ = _image(sd1)
    got, _ = _image(dst)
    assert np.array_equal(got, want)


def _write_evil_ckpt(path: Path, marker: Path) -> None:
    code = (
        "import os, pickle, sys, torch\n"
        "class Evil:\n"
        "    def __reduce__(self):\n"
        f"        return (os.system, ('touch {marker}',))\n"
        f"torch.save({{'state_dict': {{'a': torch.zeros(2)}}, 'x': Evil()}}, {str(path)!r})\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_cli_refuses_a_ckpt_with_code(tmp_path):
    marker = tmp_path / "pwned"
    evil = tmp_path / "evil.ckpt"
    _write_evil_ckpt(evil, marker)
    out = tmp_path / "o.png"
    for args in (("generate", "x", "-m", evil, "-o", out), ("info", evil), ("convert", evil, tmp_path / "dst")):
        p = run_cli(*args)
        assert p.returncode == 2, (args, p.stdout, p.stderr)
        lines = p.stderr.strip().splitlines()
        assert len(lines) == 1 and "posix.system" in lines[0] and "refused" in lines[0], p.stderr
    assert not marker.exists()
    assert not out.exists() and not (tmp_path / "dst").exists()


def test_errors_are_one_line(files, tmp_path):
    cut = tmp_path / "cut.safetensors"
    data = files["sd1.safetensors"].read_bytes()
    cut.write_bytes(data[: len(data) // 2])
    from safetensors.torch import save_file
    sdxl = tmp_path / "sdxl.safetensors"
    save_file({"conditioner.embedders.0.transformer.text_model.embeddings.token_embedding.weight": torch.zeros(4, 2),
               "model.diffusion_model.label_emb.0.0.weight": torch.zeros(2, 2)}, str(sdxl))
    cases = {cut: "", sdxl: "SDXL", files["vae.safetensors"]: "VAE"}
    for path, needle in cases.items():
        p = run_cli("info", path)
        assert p.returncode == 2, p.stderr
        lines = p.stderr.strip().splitlines()
        assert len(lines) == 1 and needle in lines[0], p.stderr
        with pytest.raises((WeightsError, ModelFolderError)):
            open_model(path)


def test_config_folder_errors(files, tmp_path):
    with pytest.raises(ModelFolderError, match="--config"):
        open_model(files["sd1.safetensors"], config=tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelFolderError, match="holds no"):
        open_model(files["sd1.safetensors"], config=tmp_path / "empty")


def test_folder_refuses_config(sd1):
    with pytest.raises(ModelFolderError, match="single-file"):
        open_model(sd1, config=sd1)


def test_standard_configs_without_config_folder(std, tmp_path):
    """No --config: configs inferred, SD 1.x conventions, the shipped tokenizer; the same image as a folder
    built to those conventions (architecture 'tiny-std': 8 heads, text heads of 64, the full CLIP vocab)."""
    f = write_single_file(std, tmp_path / "std.ckpt", fmt="ckpt", ema=True)
    model = open_model(f)
    assert model.tokenizer_dir is None and model.tokenizer_kind == "sd1"
    assert model.prediction_type == "epsilon" and model.architecture == "SD 1.x"
    want, _ = _image(std)
    got, _ = _image(f)
    assert np.array_equal(got, want)


def test_recommended_settings_lcm_and_turbo(sd2, files, tmp_path, capsys):
    """With no steps / cfg / sampler given, an LCM model runs as LCM's card says and SD-Turbo as its card
    says; a plain model keeps the usual defaults. The CLI does the same."""
    import shutil
    lcm = write_random_model("tiny-lcm", tmp_path / "lcm", seed=1)
    pipe = Pipeline.load(lcm)
    result = pipe.generate(PROMPT, width=64, height=64, seed=1)
    assert (result.request.steps, result.request.cfg_scale, result.request.sampler) == (4, 8.0, "lcm")
    turbo = tmp_path / "sd_turbo.safetensors"
    shutil.copy(files["sd2.safetensors"], turbo)
    model = open_model(turbo, config=sd2)
    assert model.is_turbo and model.architecture == "SD-Turbo (SD 2.1)"
    pipe = Pipeline.load(model)
    assert pipe.recommended == {"steps": 1, "cfg_scale": 0.0, "sampler": "euler_a"}
    result = pipe.generate(PROMPT, width=64, height=64, seed=1)
    assert (result.request.steps, result.request.sampler) == (1, "euler_a")
    assert Pipeline.load(sd2).recommended == {"steps": 20, "cfg_scale": 7.5, "sampler": "dpm++2m"}
    out = tmp_path / "lcm.png"
    p = run_cli("generate", PROMPT, "-m", lcm, "-o", out, "-W", 64, "-H", 64, "-q")
    assert p.returncode == 0, p.stderr
    assert "4 steps, lcm" in p.stdout


def test_vae_file_takes_the_models_vae_config(sd1, files):
    """A VAE file whose shapes match the model's own VAE gets that VAE's config (here 8 norm groups, which
    its weights cannot tell), so the same weights decode to the same image."""
    want, _ = _image(sd1)
    got, _ = _image(sd1, vae=files["vae.safetensors"])
    assert np.array_equal(got, want)
    got2, _ = _image(files["sd1.safetensors"], config=sd1, vae=files["vae.safetensors"])
    assert np.array_equal(got2, want)


def test_sidecar_yaml_rules(files, tmp_path):
    import shutil
    import warnings
    f = tmp_path / "m.safetensors"
    shutil.copy(files["sd2.safetensors"], f)
    f.with_suffix(".yaml").write_text("model:\n  params: [unclosed\n")  # an LDM-looking config, no key: eps
    assert open_model(f).prediction_type == "epsilon"
    f.with_suffix(".yaml").write_bytes(os.urandom(2000).replace(b":", b"."))  # not a config: not used
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model = open_model(f)
    assert model.needs_prediction_check and any("not used" in str(w.message) for w in caught)
    f.with_suffix(".yaml").write_text('model:\n  params:\n    parameterization: "x0"\n')
    with pytest.raises(ModelFolderError, match="'x0'"):
        open_model(f)
    sd1 = tmp_path / "one.safetensors"  # v on an SD 1.x file: v, at SD 1.x's size
    shutil.copy(files["sd1.safetensors"], sd1)
    sd1.with_suffix(".yaml").write_text('model:\n  params:\n    parameterization: "v"\n')
    model = open_model(sd1)
    assert model.prediction_type == "v_prediction" and model.part("unet").read_config()["sample_size"] == 64


def test_mismatched_config_and_broken_files_are_refused_by_info_and_convert(sd1, sd2, files, tmp_path):
    """info and convert check every tensor against its config (no data read): a model that cannot load is
    never reported fine or written as a folder."""
    p = run_cli("convert", files["sd1.safetensors"], tmp_path / "x", "--config", sd2)
    assert p.returncode == 2 and "--config must describe this file" in p.stderr and not (tmp_path / "x").exists()
    from safetensors.torch import load_file, save_file
    sd = load_file(str(files["sd1.safetensors"]))
    sd.pop("model.diffusion_model.out.2.bias")
    sd["model.diffusion_model.input_blocks.0.0.weight"] = torch.zeros(32, 4, 5, 5)
    broken = tmp_path / "broken.safetensors"
    save_file(sd, str(broken))
    for args in (("info", broken, "--config", sd1), ("convert", broken, tmp_path / "y", "--config", sd1)):
        p = run_cli(*args)
        lines = p.stderr.strip().splitlines()
        assert p.returncode == 2 and len(lines) == 1, p.stderr
        assert "conv_out.bias" in lines[0] and "'model.diffusion_model.input_blocks.0.0.weight'" in lines[0]
        assert len(lines[0]) < 1000
    assert not (tmp_path / "y").exists()


def test_cli_edges(sd1, files, tmp_path):
    """A name that is not UTF-8, info -m, a FIFO, a link loop, `info | head`, the converted folder's mode,
    a converted Turbo file staying Turbo."""
    import shutil
    import stat
    odd = Path(os.fsdecode(bytes(tmp_path) + b"/bad\xff.safetensors"))
    shutil.copy(files["sd1.safetensors"], odd)
    out = tmp_path / "odd.png"
    p = run_cli("generate", PROMPT, "-m", odd, "--config", sd1, "-W", 64, "-H", 64, "--steps", 1, "-o", out, "-q")
    assert p.returncode == 0, p.stderr
    from sdlite.image_io import read_parameters
    assert "Model: bad\ufffd" in read_parameters(out)
    assert run_cli("info", "-m", files["sd1.safetensors"], "--config", sd1).returncode == 0
    fifo = tmp_path / "pipe.safetensors"
    os.mkfifo(fifo)
    p = run_cli("info", fifo)
    assert p.returncode == 2 and "regular file" in p.stderr, p.stderr
    (tmp_path / "loop.safetensors").symlink_to(tmp_path / "loop.safetensors")
    p = run_cli("info", tmp_path / "loop.safetensors")
    assert p.returncode == 2 and "link loop" in p.stderr
    piped = subprocess.run(f"{sys.executable} -m sdlite info {files['sd1.safetensors']} --config {sd1} | head -1",
                           shell=True, capture_output=True, text=True, timeout=120)
    assert piped.stdout.startswith("model:") and piped.stderr == ""
    p = run_cli("convert", files["sd1.safetensors"], tmp_path / "conv", "--config", sd1)
    assert p.returncode == 0, p.stderr
    assert stat.S_IMODE(os.stat(tmp_path / "conv").st_mode) & 0o055 == 0o055  # as mkdir makes it (umask 022)


def test_converted_turbo_stays_turbo(sd2, files, tmp_path):
    import shutil

    from sdlite.runtime.convert import convert_model
    turbo = tmp_path / "my_merge_turbo.safetensors"
    shutil.copy(files["sd2.safetensors"], turbo)
    convert_model(turbo, tmp_path / "converted", None, config=sd2)
    assert Pipeline.load(tmp_path / "converted").recommended == {"steps": 1, "cfg_scale": 0.0, "sampler": "euler_a"}
