"""Compute precision: CPU detection, the per-stage dtypes, lazy vs converted weights, the VAE's fp32 fallback,
LoRAs, the planner's accounting and the front ends' --precision."""

import json
import os
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

from sdlite.errors import PrecisionFallbackWarning
from sdlite.pipeline import Pipeline
from sdlite.runtime import precision as precision_mod
from sdlite.runtime.cpu_features import parse_cpuinfo, read_cpu_features
from sdlite.runtime.lazy_weights import WORKSPACE, LazyLinear
from sdlite.runtime.planner import ModelSizes, Plan, make_plan
from sdlite.runtime.precision import Precision, resolve_precision
from sdlite.weights.sources import open_model

BOARDS = Path(__file__).parent.parent / "fixtures" / "boards"
AMX_FLAGS = "fpu sse sse2 avx avx2 avx512f avx512_vnni avx512_bf16 amx_bf16 amx_tile amx_int8"


def test_pi4_pi5_and_x86_cpuinfo():
    pi4 = read_cpu_features(BOARDS / "pi4", machine="aarch64")
    assert (pi4.model, pi4.logical_cpus, pi4.bf16, pi4.fp16, pi4.int8_dot) == ("Cortex-A72", 4, False, False, False)
    assert pi4.summary() == ["NEON"]
    pi5 = read_cpu_features(BOARDS / "pi5", machine="aarch64")
    assert (pi5.model, pi5.bf16, pi5.fp16, pi5.int8_dot) == ("Cortex-A76", False, True, True)
    x86 = read_cpu_features(BOARDS / "x86-avx2", machine="x86_64")
    assert (x86.vector_isa(), x86.bf16, x86.logical_cpus) == ("AVX2", False, 2)
    assert "i5-8250U" in x86.model
    amx = parse_cpuinfo(f"processor : 0\nflags : {AMX_FLAGS}\n", "x86_64")
    assert amx.bf16 and amx.int8_dot and amx.vector_isa() == "AMX"
    graviton3 = parse_cpuinfo("processor : 0\nFeatures : fp asimd sve bf16 i8mm asimddp\nCPU part : 0xd40\n", "aarch64")
    assert graviton3.bf16 and graviton3.model == "Neoverse-V1" and graviton3.vector_isa() == "SVE"
    # a 32-bit OS on the same board: no 64-bit features claimed
    assert read_cpu_features(BOARDS / "pi5", machine="armv7l").is_32bit_arm
    assert not read_cpu_features(BOARDS / "pi5", machine="armv7l").fp16
    # nothing readable: no features, no error
    assert read_cpu_features(BOARDS / "nowhere", machine="x86_64").flags == frozenset()


def test_auto_follows_the_cpu(monkeypatch):
    monkeypatch.setattr(precision_mod, "onednn_bf16", lambda: (True, ""))
    amx = parse_cpuinfo(f"flags : {AMX_FLAGS}\n", "x86_64")
    p = resolve_precision("auto", amx)
    assert (p.name, p.requested, p.unet, p.vae, p.text_encoder) == (
        "bf16", "auto", torch.bfloat16, torch.bfloat16, torch.float32)
    assert "AMX-BF16" in p.reason
    for board in ("pi4", "pi5"):
        p = resolve_precision("auto", read_cpu_features(BOARDS / board, machine="aarch64"))
        assert p.name == "fp32" and "no bf16" in p.reason
    # the CPU has it but torch's oneDNN does not use it: fp32
    monkeypatch.setattr(precision_mod, "onednn_bf16", lambda: (False, "torch's oneDNN does not use it"))
    assert resolve_precision("auto", amx).name == "fp32"


def test_names_dtypes_and_the_environment(monkeypatch):
    fp16 = resolve_precision("fp16")
    assert (fp16.unet, fp16.vae, fp16.text_encoder) == (torch.float16, torch.float32, torch.float32)
    assert resolve_precision(torch.bfloat16).name == "bf16"
    assert resolve_precision(" BF16 ").name == "bf16"
    assert resolve_precision(fp16) is fp16
    assert fp16.element_bytes("unet") == 2 and fp16.element_bytes("vae") == 4
    monkeypatch.setenv("SDLITE_PRECISION", "bf16")
    assert resolve_precision(None).name == "bf16"
    monkeypatch.setenv("SDLITE_PRECISION", "int4")
    with pytest.raises(ValueError, match=r"precision must be one of auto, fp32, bf16, fp16, int8, got 'int4' \(from \$SDLITE"):
        resolve_precision(None)
    with pytest.raises(ValueError, match="float32, bfloat16, float16"):
        resolve_precision(torch.float64)
    with pytest.raises(ValueError, match="no stage"):
        fp16.dtype_of("decoder")


def test_workspace_serves_every_dtype():
    a = WORKSPACE.take(torch.Size([4, 8]), torch.float32)
    b = WORKSPACE.take(torch.Size([4, 8]), torch.bfloat16)
    assert a.dtype == torch.float32 and b.dtype == torch.bfloat16 and b.shape == (4, 8)
    assert b.data_ptr() == a.data_ptr()  # one buffer, as big as the largest layer in bytes


def _unet_out(pipe):
    unet = pipe.unet.module
    g = torch.Generator().manual_seed(0)
    cfg = pipe.unet_config
    x = torch.randn(1, cfg.in_channels, 8, 8, generator=g).to(pipe.dtype)
    ctx = torch.randn(1, 77, cfg.cross_attention_dim, generator=g).to(pipe.dtype)
    with torch.inference_mode():
        return unet(x, torch.tensor(500.0), ctx).float()


@pytest.mark.parametrize("name", ["bf16", "fp16"])
def test_stages_compute_in_their_dtype_and_stay_close_to_fp32(tiny_model, name):
    ref = Pipeline.load(tiny_model, precision="fp32")
    pipe = Pipeline.load(tiny_model, precision=name)
    assert pipe.precision.name == name and pipe.plan.precision == name
    assert pipe.unet.dtype == pipe.dtype == precision_mod.DTYPES[name]
    assert pipe.text_encoder.dtype == torch.float32
    assert pipe.vae.dtype == (torch.bfloat16 if name == "bf16" else torch.float32)
    # fp32 weights on disk, 16-bit compute: converted once at load (no budget: the fastest plan)
    assert pipe.plan.convert_16 and pipe.unet.weights_mode == "materialize"
    assert all(p.dtype == pipe.dtype for p in pipe.unet.module.parameters())
    convs = [m for m in pipe.unet.module.modules() if isinstance(m, torch.nn.Conv2d) and m.kernel_size != (1, 1)]
    assert convs and all(m.weight.is_contiguous(memory_format=torch.channels_last) for m in convs)  # NHWC
    assert not ref.unet.module.conv_in.weight.is_contiguous(memory_format=torch.channels_last)
    a, b = _unet_out(ref), _unet_out(pipe)
    rel = float((a - b).norm() / a.norm())
    assert 0 < rel < (2e-2 if name == "bf16" else 3e-3)  # bf16 keeps 8 bits of mantissa, fp16 11
    kw = dict(steps=4, seed=3, width=64, height=64)
    img_ref = np.asarray(ref.generate("a red circle", **kw).image).astype(int)
    result = pipe.generate("a red circle", **kw)
    img = np.asarray(result.image).astype(int)
    assert np.abs(img - img_ref).mean() < 4
    assert result.profile["meta"]["precision"]["unet"] == precision_mod.NAMES[pipe.dtype].replace(
        "bf16", "bfloat16").replace("fp16", "float16")


def test_lazy_conversion_equals_conversion_at_load(tiny_model):
    """Per-layer conversion (what a tight budget gets) computes exactly what converting at load does."""
    lazy = Pipeline.load(tiny_model, precision="bf16", plan=Plan(width=64, height=64))
    assert not lazy.plan.convert_16 and lazy.unet.weights_mode == "lazy"
    assert any(isinstance(m, LazyLinear) and m.weight.dtype == torch.float32 for m in lazy.unet.module.modules())
    converted = Pipeline.load(tiny_model, precision="bf16", plan=Plan(width=64, height=64, convert_16=True))
    assert torch.equal(_unet_out(lazy), _unet_out(converted))


def test_int8_storage_dequantizes_into_bf16(tiny_model, tmp_path):
    from sdlite.runtime.convert import convert_model
    int8 = tmp_path / "int8"
    convert_model(open_model(tiny_model), int8, "int8")
    ref = Pipeline.load(int8, precision="fp32")
    pipe = Pipeline.load(int8, precision="bf16", plan=Plan(width=64, height=64))
    layer = next(m for m in pipe.unet.module.modules() if isinstance(m, LazyLinear))
    assert layer.weight.dtype == torch.int8 and layer.compute_dtype == torch.bfloat16
    a, b = _unet_out(ref), _unet_out(pipe)
    assert float((a - b).norm() / a.norm()) < 2e-2


def test_vae_falls_back_to_fp32_when_bf16_pixels_are_not_finite(tiny_model, monkeypatch):
    pipe = Pipeline.load(tiny_model, precision="bf16")
    vae = pipe.vae.module
    real = type(vae).decode

    def overflow_in_bf16(self, z):
        out = real(self, z)
        return out * float("nan") if z.dtype == torch.bfloat16 else out
    monkeypatch.setattr(type(vae), "decode", overflow_in_bf16)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        result = pipe.generate("a red circle", steps=2, seed=1, width=64, height=64)
    assert any(issubclass(w.category, PrecisionFallbackWarning) for w in caught)
    assert np.asarray(result.image).std() > 0
    assert pipe.residency.dtype_of("vae") == torch.float32 and pipe.vae.dtype == torch.float32
    assert pipe.residency.dtype_of("unet") == torch.bfloat16  # only the VAE changed


def test_planner_counts_in_the_compute_dtype(tiny_model):
    from sdlite.runtime.planner import stage_needs
    folder = open_model(tiny_model)
    fp32 = make_plan(folder, None, 512, 512, precision="fp32")
    bf16 = make_plan(folder, None, 512, 512, precision="bf16")
    assert fp32.precision == "fp32" and not fp32.convert_16
    assert bf16.precision == "bf16" and bf16.convert_16 and "precision=bf16" in bf16.describe()
    assert bf16.estimates["unet"] < fp32.estimates["unet"]  # half the activations
    sizes = ModelSizes.of(folder)
    sizes.compute = {"text_encoder": "float32", "unet": "bfloat16", "vae": "bfloat16"}
    plan = Plan(residency="staged")
    converted = stage_needs(sizes, Plan(residency="staged", convert_16=True), "unet", 512, 512)
    lazy = stage_needs(sizes, plan, "unet", 512, 512)
    # converted at load: the bf16 copy in anonymous memory, no file pages; lazy: the file, and a workspace
    assert converted[1] == 0 and lazy[1] == sizes.unet.stored_bytes
    assert converted[0] - lazy[0] > 0.4 * sizes.unet.fp32_bytes


def test_a_budget_too_small_for_the_converted_copy_keeps_weights_lazy(tiny_model, tmp_path):
    from sdlite.runtime.convert import convert_model
    from sdlite.runtime.planner import estimate
    convert_model(open_model(tiny_model), tmp_path / "int8", "int8")
    folder = open_model(tmp_path / "int8")
    free = make_plan(folder, None, 64, 64, precision="bf16")
    assert free.convert_16  # int8 on disk, bf16 copies in memory: twice the bytes
    sizes = ModelSizes.of(folder)
    sizes.compute = {"text_encoder": "float32", "unet": "bfloat16", "vae": "bfloat16"}
    lazy_peak = max(estimate(sizes, Plan(width=64, height=64), 64, 64)[0].values())
    assert lazy_peak < free.peak()
    tight = make_plan(folder, free.peak() - 1, 64, 64, precision="bf16")
    assert (tight.convert_16, tight.residency) == (False, "all") and tight.peak() <= free.peak() - 1


def _sdlite(*args, env=None, **kw):
    return subprocess.run([sys.executable, "-m", "sdlite", *args], capture_output=True, text=True,
                          env={**os.environ, **(env or {})}, timeout=300, **kw)


def test_cli_precision(tiny_model, tmp_path):
    out = tmp_path / "a.png"
    r = _sdlite("generate", "a red circle", "-m", str(tiny_model), "-o", str(out), "--steps", "2", "-W", "64",
                "-H", "64", "--precision", "bf16", "-v", "-q", "--profile", str(tmp_path / "t.json"))
    assert r.returncode == 0, r.stderr
    assert "precision: bf16 (text_encoder fp32, unet bf16, vae bf16)" in r.stderr
    assert "precision=bf16" in r.stderr and out.exists()
    trace = json.loads((tmp_path / "t.json").read_text())
    assert trace["traceEvents"][0]["args"]["precision"]["unet"] == "bfloat16"
    r = _sdlite("info", str(tiny_model), "--precision", "fp16", "--memory-budget", "2G")
    assert r.returncode == 0, r.stderr
    assert "precision: fp16 (text_encoder fp32, unet fp16, vae fp32" in r.stdout and "precision=fp16" in r.stdout
    r = _sdlite("generate", "x", "-m", str(tiny_model), "--precision", "int4")
    assert r.returncode == 2 and "invalid choice: 'int4'" in r.stderr
    r = _sdlite("info", str(tiny_model), env={"SDLITE_PRECISION": "int4"})
    assert r.returncode != 0 and r.stderr.count("\n") <= 2 and "SDLITE_PRECISION" in r.stderr


def test_cli_auto_says_what_it_chose(tiny_model):
    env = {k: v for k, v in os.environ.items() if k != "SDLITE_PRECISION"}
    r = subprocess.run([sys.executable, "-m", "sdlite", "info", str(tiny_model), "--memory-budget", "2G"],
                       capture_output=True, text=True, env=env, timeout=300)
    assert r.returncode == 0, r.stderr
    want = resolve_precision("auto")
    assert isinstance(want, Precision)
    assert f"precision: {want.name} (auto: " in r.stdout and want.reason in r.stdout


def test_converted_networks_let_go_of_their_files(tiny_model):
    pipe = Pipeline.load(tiny_model, precision="bf16")
    assert all(f.closed for f in pipe.unet.weights.files)  # converted at load: unmapped
    assert not any(f.closed for f in pipe.text_encoder.weights.files)  # fp32 from fp32: read in place


def test_int8_precision_converts_the_unet_transformer_linears(tiny_model):
    from sdlite.runtime.int8_compute import int8_layers, packed_bytes
    ref = Pipeline.load(tiny_model, precision="fp32")
    pipe = Pipeline.load(tiny_model, precision="int8")
    assert pipe.precision.int8_linear and pipe.dtype == torch.float32 and pipe.plan.precision == "int8"
    assert "Linear layers int8" in pipe.precision.describe()
    n = int8_layers(pipe.unet.module)
    assert n > 0 and int8_layers(pipe.text_encoder.module) == 0 and packed_bytes(pipe.unet.module) > 0
    a, b = _unet_out(ref), _unet_out(pipe)
    assert 0 < float((a - b).norm() / a.norm()) < 0.1
    # the planner counts the packed copies: more than fp32's plan by about the transformer Linear weights
    folder = open_model(tiny_model)
    sizes = ModelSizes.of(folder)
    fp32 = make_plan(folder, None, 64, 64, precision="fp32")
    int8 = make_plan(folder, None, 64, 64, precision="int8")
    extra = int8.estimates["unet"] - fp32.estimates["unet"]
    assert sizes.unet.transformer_linear_params <= extra <= 3 * sizes.unet.transformer_linear_params
