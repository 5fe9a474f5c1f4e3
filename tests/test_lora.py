"""LoRAs (kohya/A1111 with and without LoCon convs, diffusers/PEFT) against diffusers' load_lora_weights on the
tiny random model; scales, two at once, `:0`, mismatches, fp16/int8-stored models, detaching."""

import json

import numpy as np
import pytest
import torch
from PIL import Image

from sdlite.cli import main
from sdlite.errors import InvalidRequest, WeightsError
from sdlite.pipeline import Pipeline
from sdlite.request import GenerationRequest
from sdlite.runtime.convert import convert_model
from sdlite.runtime.lora import _shapes, attached_adapters
from sdlite.runtime.planner import Plan
from sdlite.testing.random_model import write_random_model
from sdlite.weights.lora import kohya_names, read_lora
from sdlite.weights.safetensors_mmap import save_safetensors
from sdlite.weights.sources import open_model

diffusers = pytest.importorskip("diffusers")
pytest.importorskip("peft")

PROMPT = "a small red circle at the top left"
KW = dict(steps=3, cfg_scale=7.5, seed=21, width=32, height=32, sampler="euler")
UNET_LINEAR = ("to_q", "to_k", "to_v", "to_out.0", "proj_in", "proj_out", "ff.net.0.proj", "ff.net.2")
UNET_CONV = ("conv1", "conv2", "conv_shortcut", "time_emb_proj", "downsamplers.0.conv", "upsamplers.0.conv")
TEXT = ("q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2")


def _modules(folder, network):
    return _shapes(open_model(folder), network)


def random_lora(folder, path, fmt="kohya", conv=False, rank=4, seed=0, dtype=torch.float32, ldm_names=False,
                alpha=None, text=True):
    """A random LoRA for the model at `folder` in kohya or PEFT layout: attention/ff layers (+ resnet convs)."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    for network in ("unet", "text_encoder") if text else ("unet",):
        targets = UNET_LINEAR + (UNET_CONV if conv else ()) if network == "unet" else TEXT
        shapes = _modules(folder, network)
        flat = {v: k for k, v in kohya_names(network, shapes).items()} if ldm_names else {}
        for name, shape in shapes.items():
            if not any(name.endswith("." + t) for t in targets):
                continue
            k = tuple(shape[2:])
            down = torch.randn((rank, shape[1]) + k, generator=g) * 0.3
            up = torch.randn((shape[0], rank) + ((1, 1) if k else ()), generator=g) * 0.3
            if fmt == "kohya":
                prefix = "lora_unet_" if network == "unet" else "lora_te_"
                key = prefix + (flat[name] if ldm_names else name.replace(".", "_"))
                out[f"{key}.lora_down.weight"], out[f"{key}.lora_up.weight"] = down.to(dtype), up.to(dtype)
                if alpha is not None:
                    out[f"{key}.alpha"] = torch.tensor(float(alpha))
            else:
                if alpha is not None:  # as diffusers >= 0.42 with transformers >= 5 saves them
                    name = name.removeprefix("text_model.")
                out[f"{network}.{name}.lora_A.weight"] = down.to(dtype)
                out[f"{network}.{name}.lora_B.weight"] = up.to(dtype)
    metadata = None
    if fmt == "peft" and alpha is not None:
        meta = {f"{n}.{k}": v for n in ("unet", "text_encoder")
                for k, v in (("r", rank), ("lora_alpha", alpha),
                             ("target_modules", sorted({k.split(".", 1)[1][:-len(".lora_A.weight")]
                                                        for k in out if k.startswith(n + ".") and "lora_A" in k})))}
        metadata = {"lora_adapter_metadata": json.dumps(meta)}
    save_safetensors(out, path, metadata=metadata)
    return path


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    return write_random_model("tiny", tmp_path_factory.mktemp("models") / "tiny", seed=3)


@pytest.fixture(scope="module")
def loras(model, tmp_path_factory):
    d = tmp_path_factory.mktemp("loras")
    return {
        "kohya": random_lora(model, d / "kohya.safetensors", alpha=2, seed=1),
        "locon": random_lora(model, d / "locon.safetensors", conv=True, alpha=8, rank=8, seed=2, dtype=torch.float16),
        "peft": random_lora(model, d / "peft.safetensors", fmt="peft", conv=True, seed=3),
        "peft_alpha": random_lora(model, d / "peft_alpha.safetensors", fmt="peft", alpha=2, seed=4),
    }


def reference(folder, loras, scheduler="EulerDiscreteScheduler", **kw):
    pipe = diffusers.StableDiffusionPipeline.from_pretrained(folder, safety_checker=None, requires_safety_checker=False)
    pipe.scheduler = getattr(diffusers, scheduler).from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    names = []
    for i, (path, _) in enumerate(loras):
        pipe.load_lora_weights(str(path), adapter_name=f"l{i}")
        names.append(f"l{i}")
    if names:
        pipe.set_adapters(names, adapter_weights=[s for _, s in loras])
    out = pipe(PROMPT, num_inference_steps=kw["steps"], guidance_scale=kw["cfg_scale"], width=kw["width"],
               height=kw["height"], generator=torch.Generator().manual_seed(kw["seed"]), output_type="latent").images
    img = pipe.vae.decode(out / pipe.vae.config.scaling_factor).sample
    img = ((img / 2 + 0.5).clamp(0, 1)[0].permute(1, 2, 0).detach().numpy() * 255).round()
    return out, img


def check_parity(ours, ref, kw=KW):
    latents, img = ref
    err = ((ours.latents - latents).abs().max() / latents.abs().max()).item()
    diff = np.abs(np.asarray(ours.image).astype(np.float64) - img).max()
    assert err < 1e-4 and diff <= 1.0, (err, diff)
    return err, diff


@pytest.mark.parametrize("method", ["side", "merge"])
@pytest.mark.parametrize("which,scale", [("kohya", 1.0), ("locon", 0.5), ("peft", 1.0), ("peft_alpha", 0.5)])
def test_one_lora_matches_diffusers(model, loras, which, scale, method):
    pipe = Pipeline.load(model, loras=[(loras[which], scale)], lora_method=method)
    got = pipe.generate(PROMPT, **KW)
    check_parity(got, reference(model, [(loras[which], scale)], **KW))
    plain = Pipeline.load(model).generate(PROMPT, **KW)
    assert (got.latents - plain.latents).abs().max() > 1e-2  # the LoRA did something


def test_two_loras_match_diffusers(model, loras):
    specs = [(loras["kohya"], 0.7), (loras["locon"], 1.0)]
    got = Pipeline.load(model, loras=specs).generate(PROMPT, **KW)
    check_parity(got, reference(model, specs, **KW))


def test_ldm_names_equal_diffusers_names(model, tmp_path):
    a = random_lora(model, tmp_path / "a.safetensors", conv=True, seed=5)
    b = random_lora(model, tmp_path / "b.safetensors", conv=True, seed=5, ldm_names=True)
    assert any("input_blocks" in k for k in read_lora(b).entries["unet"])
    got_a = Pipeline.load(model, loras=[(a, 1.0)]).generate(PROMPT, **KW)
    got_b = Pipeline.load(model, loras=[(b, 1.0)]).generate(PROMPT, **KW)
    assert torch.equal(got_a.latents, got_b.latents)


def test_scale_zero_is_no_lora(model, loras):
    plain = Pipeline.load(model).generate(PROMPT, **KW)
    pipe = Pipeline.load(model, loras=[(loras["kohya"], 0.0)])
    assert pipe.residency.loras == []
    got = pipe.generate(PROMPT, **KW)
    assert torch.equal(got.latents, plain.latents)
    assert "Lora" not in got.parameters


def test_lora_for_another_model_names_keys(model, tmp_path):
    other = write_random_model("tiny-std", tmp_path / "other", seed=0)  # 64-wide cross-attention: another model
    bad = random_lora(other, tmp_path / "other-lora.safetensors")
    with pytest.raises(WeightsError, match=r"other-lora.safetensors: .*do not fit.*lora_"):
        Pipeline.load(model, loras=[(bad, 1.0)])
    unknown = tmp_path / "odd.safetensors"
    save_safetensors({"lora_unet_nowhere_at_all.lora_down.weight": torch.zeros(2, 4),
                      "lora_unet_nowhere_at_all.lora_up.weight": torch.zeros(4, 2)}, unknown)
    with pytest.raises(WeightsError, match="lora_unet_nowhere_at_all.lora_down.weight"):
        Pipeline.load(model, loras=[(unknown, 1.0)])
    strange = tmp_path / "strange.safetensors"
    save_safetensors({"lora_unet_x.hada_w1_a": torch.zeros(2, 4)}, strange)
    with pytest.raises(WeightsError, match="unknown keys 'lora_unet_x.hada_w1_a'"):
        read_lora(strange)


@pytest.mark.parametrize("fmt", ["fp16", "int8"])
def test_stored_fp16_and_int8_models(model, loras, tmp_path, fmt):
    stored = tmp_path / fmt
    convert_model(model, stored, fmt)
    plain = Pipeline.load(stored).generate(PROMPT, **KW)
    for method in ("side", "merge"):
        got = Pipeline.load(stored, loras=[(loras["locon"], 1.0)], lora_method=method).generate(PROMPT, **KW)
        assert torch.isfinite(got.latents).all() and (got.latents - plain.latents).abs().max() > 1e-2
    ref = Pipeline.load(stored, loras=[(loras["locon"], 1.0)], lora_method="side").generate(PROMPT, **KW)
    assert ((got.latents - ref.latents).abs().max() / ref.latents.abs().max()) < 1e-4


def test_staged_release_detaches_and_plan_counts_lora_bytes(model, loras):
    pipe = Pipeline.load(model, plan=Plan(residency="staged"), loras=[(loras["locon"], 1.0)])
    pipe.generate(PROMPT, **KW)
    assert pipe.residency.loaded() == [] and pipe.residency._attached == {}
    unet = pipe.residency.acquire("unet")
    assert attached_adapters(unet.module) > 0
    pipe.residency.release("unet")
    assert attached_adapters(unet.module if unet.module is not None else torch.nn.Module()) == 0
    planned = Pipeline.load(model, loras=[(loras["locon"], 1.0)]).plan.estimates["unet"]
    assert planned > Pipeline.load(model).plan.estimates["unet"]


def test_request_loras_are_taken_off_after(model, loras):
    pipe = Pipeline.load(model, lora_dir=loras["kohya"].parent)
    plain = pipe.generate(PROMPT, **KW)
    req = GenerationRequest(PROMPT, loras=(("kohya", 1.0),), **{k: v for k, v in KW.items()})
    got = pipe.run(req)
    check_parity(got, reference(model, [(loras["kohya"], 1.0)], **KW))
    assert attached_adapters(pipe.unet.module) == 0 and attached_adapters(pipe.text_encoder.module) == 0
    again = pipe.generate(PROMPT, **KW)
    assert torch.equal(again.latents, plain.latents)
    assert got.parameters.splitlines()[0] == PROMPT + " <lora:kohya:1>"
    h = read_lora(loras["kohya"]).short_hash()
    assert f'Lora hashes: "kohya: {h}"' in got.parameters
    tagged = pipe.generate(PROMPT + " <lora:kohya:1>", **KW)  # A1111's prompt tag, looked up in the LoRA folder
    assert torch.equal(tagged.latents, got.latents)
    assert tagged.parameters.splitlines()[0] == PROMPT + " <lora:kohya:1>"
    assert attached_adapters(pipe.unet.module) == 0
    with pytest.raises(InvalidRequest, match="no LoRA file"):
        pipe.generate(PROMPT + f" <lora:{loras['kohya']}:1>", **KW)  # a tag names a file in the folder, not a path
    with pytest.raises(InvalidRequest, match="no LoRA file 'missing'"):
        pipe.run(GenerationRequest(PROMPT, loras=(("missing", 1.0),), **KW))
    with pytest.raises(InvalidRequest):
        GenerationRequest(PROMPT, loras=(("kohya", float("nan")),)).validate()


def test_cli_lora_flags(model, loras, tmp_path, capsys):
    out = tmp_path / "img.png"
    code = main(["generate", PROMPT, "-m", str(model), "-o", str(out), "--seed", "21", "--steps", "3",
                 "-W", "32", "-H", "32", "--sampler", "euler", "-q", "--lora-dir", str(loras["kohya"].parent),
                 "--lora", "kohya:0.5", "--lora", f"{loras['locon']}:0"])
    assert code == 0, capsys.readouterr().err
    with Image.open(out) as im:
        params, pixels = im.info["parameters"], np.asarray(im.convert("RGB")).astype(np.float64)
    assert params.splitlines()[0] == PROMPT + " <lora:kohya:0.5>" and "Lora hashes" in params
    _, img = reference(model, [(loras["kohya"], 0.5)], **KW)
    assert np.abs(pixels - img).max() <= 1.0


def test_lcm_lora_preset_matches_diffusers(model, tmp_path, capsys):
    """LCM-LoRA (kohya layout, alpha/rank as lcm-lora-sdv1-5 ships: convs included) with the lcm sampler,
    4 steps, guidance 1: the README's command."""
    lcm = random_lora(model, tmp_path / "lcm-lora.safetensors", conv=True, rank=8, alpha=4, seed=9, text=False,
                      dtype=torch.float16)
    out = tmp_path / "lcm.png"
    code = main(["generate", PROMPT, "-m", str(model), "-o", str(out), "--lora", str(lcm), "--sampler", "lcm",
                 "--steps", "4", "--cfg-scale", "1", "--seed", "21", "-W", "32", "-H", "32", "-q"])
    assert code == 0, capsys.readouterr().err
    kw = dict(KW, steps=4, cfg_scale=1.0)
    _, img = reference(model, [(lcm, 1.0)], scheduler="LCMScheduler", **kw)
    with Image.open(out) as im:
        assert np.abs(np.asarray(im.convert("RGB")).astype(np.float64) - img).max() <= 1.0


@pytest.mark.parametrize("method", ["side", "merge"])
def test_loras_apply_in_bf16(tiny_model, tmp_path, method):
    """Under bf16 the pairs are held in bf16 and applied as in fp32 (side path or merged per layer)."""
    lora = random_lora(tiny_model, tmp_path / "l.safetensors", fmt="kohya", conv=True, rank=4, alpha=4, seed=5)
    kw = dict(steps=3, seed=2, width=64, height=64)
    base = Pipeline.load(tiny_model, precision="bf16", plan=Plan(width=64, height=64))
    plain = np.asarray(base.generate("a red circle", **kw).image).astype(int)
    ref = Pipeline.load(tiny_model, precision="fp32", loras=[(lora, 1.0)], lora_method=method)
    pipe = Pipeline.load(tiny_model, precision="bf16", loras=[(lora, 1.0)], lora_method=method,
                         plan=Plan(width=64, height=64))
    with_lora = np.asarray(pipe.generate("a red circle", **kw).image).astype(int)
    want = np.asarray(ref.generate("a red circle", **kw).image).astype(int)
    assert np.abs(with_lora - plain).mean() > 3 * np.abs(with_lora - want).mean()  # the LoRA acts, as in fp32
    adapters = [m.lora for m in pipe.unet.module.modules() if getattr(m, "lora", None) is not None]
    assert adapters and all(a.down.dtype == torch.bfloat16 for a in adapters)
