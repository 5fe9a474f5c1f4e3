"""TAESD (diffusers' AutoencoderTiny): the network against diffusers, `--vae` through the pipeline, the CLI
and the planner, and the errors a wrong VAE folder gives."""

import json
import shutil

import numpy as np
import pytest
import torch

from sdlite.cli import main
from sdlite.errors import ModelFolderError
from sdlite.models.config import config_from_dict
from sdlite.models.taesd import AutoencoderTiny, TAESDConfig
from sdlite.pipeline import Pipeline
from sdlite.runtime.planner import ModelSizes, make_plan
from sdlite.testing.architectures import TAESD
from sdlite.testing.random_model import write_random_vae
from sdlite.weights.model_folder import ModelFolder
from sdlite.weights.state_dict import load_into

diffusers = pytest.importorskip("diffusers")


@pytest.fixture(scope="module")
def tiny_taesd(tmp_path_factory):
    return write_random_vae("tiny-taesd", tmp_path_factory.mktemp("vae") / "tiny-taesd", seed=3)


def diffusers_taesd(cfg: dict, seed: int = 0):
    torch.manual_seed(seed)
    kwargs = {k: v for k, v in cfg.items() if not k.startswith("_")}
    return diffusers.AutoencoderTiny(**kwargs).eval()


def test_decoder_and_encoder_match_diffusers_at_sd_shapes():
    ref = diffusers_taesd(TAESD)
    ours = AutoencoderTiny(config_from_dict(TAESDConfig, TAESD), with_encoder=True).eval()
    report = load_into(ours, ref.state_dict(), source="diffusers")
    assert not report.missing and not report.unexpected
    g = torch.Generator().manual_seed(0)
    z = 2.5 * torch.randn(1, 4, 12, 16, generator=g)   # beyond +-3 too: the soft clamp must match
    image = torch.rand(1, 3, 64, 80, generator=g) * 2 - 1
    with torch.inference_mode():
        want, got = ref.decode(z).sample, ours.decode(z)
        assert got.shape == (1, 3, 96, 128)
        assert ((got - want).abs().max() / want.abs().max()).item() < 1e-5
        want, got = ref.encode(image).latents, ours.encode(image)
        assert got.shape == (1, 4, 8, 10)
        assert ((got - want).abs().max() / want.abs().max()).item() < 1e-5


def test_pipeline_with_taesd_matches_diffusers(tiny_model, tiny_taesd):
    """Same latents as with the model's own VAE (the VAE only decodes), and the image diffusers'
    StableDiffusionPipeline gives with `vae=AutoencoderTiny` on the same weights."""
    ours = Pipeline.load(tiny_model, vae=tiny_taesd)
    assert ours.vae_name == "tiny-taesd"
    kw = dict(steps=4, cfg_scale=6.0, seed=11, width=48, height=40)
    got = ours.generate("a red circle", **kw)
    own = Pipeline.load(tiny_model).generate("a red circle", **kw)
    assert torch.equal(got.latents, own.latents)
    assert "VAE: tiny-taesd" in got.parameters

    vae = diffusers.AutoencoderTiny.from_pretrained(tiny_taesd)
    ref = diffusers.StableDiffusionPipeline.from_pretrained(tiny_model, vae=vae, safety_checker=None,
                                                            requires_safety_checker=False)
    ref.scheduler = diffusers.DPMSolverMultistepScheduler.from_config(ref.scheduler.config)
    ref.set_progress_bar_config(disable=True)
    want = ref("a red circle", num_inference_steps=4, guidance_scale=6.0, width=48, height=40,
               generator=torch.Generator().manual_seed(11), output_type="np").images[0]
    want = (want * 255).round()
    ours_img = np.asarray(got.image).astype(np.float64)
    assert ours_img.shape == want.shape == (40, 48, 3)
    assert np.abs(ours_img - want).max() <= 1.0
    assert np.abs(ours_img - np.asarray(own.image, dtype=np.float64)).max() > 0  # a different decoder


def test_tiled_taesd_decode_differs_from_untiled_only_in_the_overlap(tiny_model, tiny_taesd):
    """The tiny TAESD sees 8 latent pixels around each output pixel (4 convs at latent size, 4 at the
    2x size). Two tiles [0, 24) and [16, 40) over 40 latent columns: outside their overlap [16, 24) each
    pixel comes from one tile that saw all of its neighbourhood, so it equals the untiled decode; inside,
    two approximations are blended."""
    pipe = Pipeline.load(tiny_model, vae=tiny_taesd)
    latents = torch.randn(1, 4, 16, 40, generator=torch.Generator().manual_seed(5))
    plan = pipe.plan_for(80, 32)
    whole = np.asarray(pipe.decode(latents, plan), dtype=np.float64)
    tiled_plan = type(plan)(**{**plan.to_dict(), "vae_tile": 24, "vae_overlap": 8})
    tiled = np.asarray(pipe.decode(latents, tiled_plan), dtype=np.float64)
    assert whole.shape == tiled.shape == (32, 80, 3)
    diff = np.abs(whole - tiled).max(axis=(0, 2))          # per image column
    assert diff[:32].max() <= 1 and diff[48:].max() <= 1   # image columns outside latent [16, 24)
    assert diff[32:48].max() > 1                            # the blend zone is not the untiled decode


def test_planner_counts_taesd_as_the_cheaper_decoder(tiny_model, tiny_taesd, tmp_path):
    sd_vae = tmp_path / "sd-taesd"
    write_random_vae("taesd", sd_vae)
    own = ModelSizes.of(ModelFolder.open(tiny_model))
    tiny = ModelSizes.of(ModelFolder.open(tiny_model, vae=tiny_taesd))
    assert (own.vae_kind, tiny.vae_kind) == ("kl", "taesd")
    assert tiny.vae.stored_bytes < own.vae.stored_bytes
    plan_own = make_plan(ModelFolder.open(tiny_model), None, 512, 512)
    plan_tiny = make_plan(ModelFolder.open(tiny_model, vae=tiny_taesd), None, 512, 512)
    assert plan_tiny.estimates["vae"] < plan_own.estimates["vae"]
    assert plan_tiny.estimates["unet"] == plan_own.estimates["unet"] - own.vae.stored_bytes \
        + tiny.vae.stored_bytes


def test_cli_generate_and_info_with_vae(tiny_model, tiny_taesd, tmp_path, capsys):
    out = tmp_path / "t.png"
    assert main(["generate", "a circle", "-m", str(tiny_model), "--vae", str(tiny_taesd), "-o", str(out),
                 "--steps", "2", "--seed", "1", "-W", "32", "-H", "24", "-q"]) == 0
    from PIL import Image
    with Image.open(out) as im:
        assert im.size == (32, 24)
        assert "VAE: tiny-taesd" in im.info["parameters"]
    capsys.readouterr()
    assert main(["info", str(tiny_model), "--vae", str(tiny_taesd)]) == 0
    text = capsys.readouterr().out
    assert "vae: TAESD (AutoencoderTiny) from" in text


def test_random_model_writes_a_taesd_folder(tmp_path, capsys):
    assert main(["random-model", "tiny-taesd", str(tmp_path / "v")]) == 0
    cfg = json.loads((tmp_path / "v" / "config.json").read_text())
    assert cfg["_class_name"] == "AutoencoderTiny"
    assert main(["random-model", "nope", str(tmp_path / "w")]) == 2
    assert "taesd" in capsys.readouterr().err
    assert not (tmp_path / "w").exists()


def bad_vae_cases(tmp_path, tiny_taesd):
    missing = tmp_path / "missing"
    no_config = tmp_path / "no-config"
    no_config.mkdir()
    wrong_class = tmp_path / "wrong-class"
    shutil.copytree(tiny_taesd, wrong_class)
    cfg = json.loads((wrong_class / "config.json").read_text())
    (wrong_class / "config.json").write_text(json.dumps(dict(cfg, _class_name="AutoencoderOobleck")))
    wrong_channels = tmp_path / "wrong-channels"
    write_random_vae("tiny-taesd", wrong_channels)
    cfg = json.loads((wrong_channels / "config.json").read_text())
    (wrong_channels / "config.json").write_text(json.dumps(dict(cfg, latent_channels=16)))
    truncated = tmp_path / "truncated"
    shutil.copytree(tiny_taesd, truncated)
    weights = truncated / "diffusion_pytorch_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-100])
    other_scale = tmp_path / "other-scale"  # SD-size TAESD (8x) on the tiny model (2x): another image size
    write_random_vae("taesd", other_scale)
    return [(missing, "no such folder"), (no_config, "no config.json"), (other_scale, "scales latents 8x"),
            (wrong_class, "'AutoencoderOobleck' is not supported"),
            (wrong_channels, "16-channel latents"), (truncated, "diffusion_pytorch_model.safetensors")]


def test_bad_vae_folders_are_one_line_errors_and_leave_no_file(tiny_model, tiny_taesd, tmp_path, capsys):
    for vae, message in bad_vae_cases(tmp_path, tiny_taesd):
        out = tmp_path / "out.png"
        code = main(["generate", "x", "-m", str(tiny_model), "--vae", str(vae), "-o", str(out),
                     "--steps", "1", "-q"])
        err = capsys.readouterr().err
        assert code == 2, (vae, err)
        assert message in err and err.count("\n") == 1, (vae, err)
        assert not out.exists()


def test_bad_vae_folder_from_the_library_raises_model_folder_error(tiny_model, tmp_path):
    with pytest.raises(ModelFolderError, match="no config.json"):
        (tmp_path / "empty").mkdir()
        Pipeline.load(tiny_model, vae=tmp_path / "empty")


def test_taesd_config_checks():
    with pytest.raises(ModelFolderError, match="act_fn"):
        AutoencoderTiny(config_from_dict(TAESDConfig, dict(TAESD, act_fn="silu")))
    with pytest.raises(ModelFolderError, match="must all be equal"):
        AutoencoderTiny(config_from_dict(TAESDConfig, dict(TAESD, decoder_block_out_channels=[64, 32, 64, 64])))


def test_serve_decodes_with_the_given_vae(tiny_model, tiny_taesd):
    grpc = pytest.importorskip("grpc")
    from sdlite.serve import sdlite_pb2 as pb
    from sdlite.serve import sdlite_pb2_grpc as pb_grpc
    from sdlite.serve.process import ServerProcess

    with ServerProcess(tiny_model, "--vae", str(tiny_taesd), "--threads", "1", "--grpc-port", "0",
                       "--http-port", "off", "--no-warmup") as server, \
            grpc.insecure_channel(server.grpc_target) as channel:
        r = pb_grpc.TextToImageStub(channel).Generate(
            pb.GenerateRequest(prompt="a red circle", steps=2, width=32, height=32, seed=1), timeout=60)
    assert "VAE: tiny-taesd" in r.parameters
