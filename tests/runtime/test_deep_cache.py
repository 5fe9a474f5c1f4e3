"""DeepCache (runtime.deep_cache): off is exactly no cache, a cached call is the network with the previous
deep feature, every sampler and guidance layout runs with it, the request / CLI / service carry it, and a
cached call runs a small part of the network."""

import base64
import contextlib
import io
import math

import pytest
import torch
from PIL import Image

from sdlite import samplers
from sdlite.errors import InvalidRequest
from sdlite.models.config import config_from_dict
from sdlite.models.layers import ResnetBlock2D, Transformer2DModel
from sdlite.models.unet import UNet2DConditionModel, UNetConfig
from sdlite.pipeline import GenerationRequest, Pipeline
from sdlite.request import format_parameters
from sdlite.runtime.deep_cache import DeepCacheUNet, deep_cache_unet
from sdlite.runtime.planner import Plan
from sdlite.testing.architectures import ARCHITECTURES, _merged
from sdlite.testing.random_model import write_random_model

KW = dict(prompt="a red circle", negative_prompt="blue", seed=7, width=24, height=16, cfg_scale=7.5)
# the UNet shapes sdlite builds: SD 1.x-like, SD 2.x-like, BK-SDM (no mid block, one resnet per block),
# LCM (timestep_cond), a 9-channel inpainting UNet, two stages, a first block without attention
UNETS = {
    "tiny": ARCHITECTURES["tiny"]["unet"],
    "tiny-sd2": ARCHITECTURES["tiny-sd2"]["unet"],
    "tiny-bk": ARCHITECTURES["tiny-bk"]["unet"],
    "tiny-lcm": ARCHITECTURES["tiny-lcm"]["unet"],
    "nine-channel": _merged(ARCHITECTURES["tiny"]["unet"], in_channels=9),
    "two-stages": _merged(ARCHITECTURES["tiny"]["unet"], down_block_types=["CrossAttnDownBlock2D", "DownBlock2D"],
                          up_block_types=["UpBlock2D", "CrossAttnUpBlock2D"], block_out_channels=[32, 64]),
    "plain-first-block": _merged(ARCHITECTURES["tiny"]["unet"], down_block_types=["DownBlock2D"] * 3,
                                 up_block_types=["UpBlock2D"] * 3, layers_per_block=3),
}


def build_unet(name: str, seed: int = 0) -> UNet2DConditionModel:
    torch.manual_seed(seed)
    return UNet2DConditionModel(config_from_dict(UNetConfig, UNETS[name])).eval()


def inputs(unet, seed: int, batch: int = 2):
    g = torch.Generator().manual_seed(seed)
    cfg = unet.config
    x = torch.randn(batch, cfg.in_channels, 10, 6, generator=g)
    ctx = torch.randn(batch, 5, cfg.cross_attention_dim, generator=g)
    cond = torch.randn(batch, cfg.time_cond_proj_dim, generator=g) if cfg.time_cond_proj_dim else None
    return x, torch.tensor(100.0 + seed), ctx, cond


@contextlib.contextmanager
def counting(unet):
    """{"evaluations": conv_out runs, "full": runs of the deepest down block, "layers": [names run]}."""
    counts = {"evaluations": 0, "full": 0, "layers": []}
    handles = [unet.conv_out.register_forward_hook(lambda *a: counts.__setitem__("evaluations",
                                                                                 counts["evaluations"] + 1)),
               unet.down_blocks[-1].register_forward_hook(lambda *a: counts.__setitem__("full", counts["full"] + 1))]
    for name, m in unet.named_modules():
        if isinstance(m, (ResnetBlock2D, Transformer2DModel)):
            handles.append(m.register_forward_hook(lambda *a, name=name: counts["layers"].append(name)))
    try:
        yield counts
    finally:
        for h in handles:
            h.remove()


def rel(a, b):
    return ((a - b).abs().max() / b.abs().max()).item()


@pytest.fixture(scope="module")
def pipe(tiny_model):
    return Pipeline.load(tiny_model, dtype=torch.float32)


@pytest.fixture(scope="module")
def split_pipe(tiny_model):
    return Pipeline.load(tiny_model, plan=Plan(cfg="split"), dtype=torch.float32)


# --- (1) off is exactly no cache -------------------------------------------------------------------------

def test_off_is_bit_identical_to_no_cache(pipe):
    unet = pipe.unet.module
    assert deep_cache_unet(unet, 0) is unet and deep_cache_unet(unet, 1) is unet
    assert isinstance(deep_cache_unet(unet, 2), DeepCacheUNet)
    ref = pipe.run(GenerationRequest(**KW, steps=4))
    for n in (0, 1):
        got = pipe.run(GenerationRequest(**KW, steps=4, deep_cache=n))
        assert torch.equal(got.latents, ref.latents)
        assert "DeepCache" not in got.parameters


@pytest.mark.parametrize("name", UNETS)
def test_plain_forward_and_forward_with_feature_agree_bitwise(name):
    unet = build_unet(name)
    x, t, ctx, cond = inputs(unet, 1)
    with torch.inference_mode():
        plain = unet(x, t, ctx, cond)
        out, feature = unet.forward_with_feature(x, t, ctx, cond)
    assert torch.equal(plain, out)
    assert feature.shape[0] == 2 and feature.shape[2:] == x.shape[2:]


# --- (2) a cached call is the network with the cached deep feature ---------------------------------------

@pytest.mark.parametrize("name", UNETS)
def test_cached_call_with_the_same_inputs_equals_the_full_call(name):
    unet = build_unet(name)
    x, t, ctx, cond = inputs(unet, 1)
    wrapped = DeepCacheUNet(unet, 2)
    with torch.inference_mode():
        full = unet(x, t, ctx, cond)
        first, second = wrapped(x, t, ctx, cond), wrapped(x, t, ctx, cond)
    assert wrapped.calls == 2 and wrapped.full_calls == 1
    assert torch.equal(first, full) and torch.equal(second, full)


@pytest.mark.parametrize("name", UNETS)
def test_cached_call_is_the_full_network_with_the_previous_deep_feature(name):
    """Reference computed without forward_shallow: the whole UNet runs on the new inputs, and a pre-hook
    swaps the deep half of the input of the last up block's second-to-last resnet (its [x, skip] concat)
    for the deep feature the previous full call left there."""
    unet = build_unet(name)
    a, b = inputs(unet, 1), inputs(unet, 2)
    resnet = unet.up_blocks[-1].resnets[-2]
    kept = {}

    def keep(module, args):
        kept["x"] = args[0].clone()

    with torch.inference_mode():
        handle = resnet.register_forward_pre_hook(keep)
        unet(*a)
        handle.remove()
        channels = kept["x"].shape[1] - unet.conv_in.out_channels  # the skip there: first down layer's output
        previous = kept["x"][:, :channels]

        def swap(module, args):
            return (torch.cat([previous, args[0][:, channels:]], dim=1), *args[1:])
        handle = resnet.register_forward_pre_hook(swap)
        want = unet(*b)
        handle.remove()

        wrapped = DeepCacheUNet(unet, 2)
        wrapped(*a)
        got = wrapped(*b)
        fresh = unet(*b)
    assert torch.equal(wrapped.feature, previous)
    assert torch.allclose(got, want, rtol=0, atol=1e-6), (got - want).abs().max()
    assert not torch.allclose(got, fresh, atol=1e-4)  # the feature did come from the other call


def test_n_counts_calls_and_a_new_size_runs_in_full():
    unet = build_unet("tiny")
    x, t, ctx, cond = inputs(unet, 1)
    wrapped = DeepCacheUNet(unet, 3)
    with torch.inference_mode(), counting(unet) as counts:
        for _ in range(7):
            wrapped(x, t, ctx)
        assert counts["full"] == wrapped.full_calls == 3 and counts["evaluations"] == wrapped.calls == 7
        wrapped(x[:1], t, ctx[:1])  # call 8 would be shallow, but the batch changed: full again
        wrapped(x[:, :, :8], t, ctx)  # call 9: another size
    assert wrapped.full_calls == 5
    assert wrapped.feature_bytes() == 2 * 32 * 8 * 6 * 4
    with pytest.raises(ValueError, match="cached feature"):
        unet.forward_shallow(x[:1], t, ctx[:1], wrapped.feature)
    for bad in (1, 0, -3, 2.0, True):
        with pytest.raises(ValueError):
            DeepCacheUNet(unet, bad)


# --- (3) every sampler, through the pipeline -------------------------------------------------------------

@pytest.mark.parametrize("sampler", list(samplers.SAMPLER_SPECS))
def test_every_sampler_runs_with_deep_cache(pipe, sampler):
    unet = pipe.unet.module
    with torch.inference_mode(), counting(unet) as plain:
        pipe.run(GenerationRequest(**KW, steps=4, sampler=sampler))
    with torch.inference_mode(), counting(unet) as cached:
        result = pipe.run(GenerationRequest(**KW, steps=4, sampler=sampler, deep_cache=3))
    assert torch.isfinite(result.latents).all()
    evaluations = plain["evaluations"]  # batched guidance: one UNet evaluation per model call
    assert evaluations >= 4 and cached["evaluations"] == evaluations
    assert plain["full"] == evaluations
    assert cached["full"] == math.ceil(evaluations / 3)  # calls 0, 3, 6, ... (2nd-order: 2 per step)
    assert "DeepCache: 3" in result.parameters


def nine_channel_copy(folder, dest):
    """The tiny folder with its UNet's conv_in widened to 9 input channels (an inpainting UNet)."""
    import json
    import shutil

    from safetensors.torch import load_file, save_file
    shutil.copytree(folder, dest)
    cfg_path = dest / "unet" / "config.json"
    cfg_path.write_text(json.dumps({**json.loads(cfg_path.read_text()), "in_channels": 9}))
    weights = next((dest / "unet").glob("*.safetensors"))
    sd = load_file(weights)
    w = sd["conv_in.weight"]
    sd["conv_in.weight"] = torch.randn((w.shape[0], 9, *w.shape[2:]), generator=torch.Generator().manual_seed(9)) / 9
    save_file(sd, weights)
    return dest


def test_img2img_and_nine_channel_inpainting_run_with_deep_cache(pipe, tiny_model, tmp_path_factory):
    init = Image.new("RGB", (24, 16), (200, 40, 40))
    mask = Image.new("L", (24, 16), 0)
    mask.paste(255, (0, 0, 12, 8))
    with counting(pipe.unet.module) as counts:
        got = pipe.run(GenerationRequest(**KW, steps=6, sampler="euler", init_image=init, denoising_strength=0.5,
                                         deep_cache=2))
    assert torch.isfinite(got.latents).all() and counts["evaluations"] == 3 and counts["full"] == 2
    # a 9-channel UNet: the mask and masked latents go in with the sample, the shallow path takes them too
    folder = nine_channel_copy(tiny_model, tmp_path_factory.mktemp("models") / "nine")
    nine = Pipeline.load(folder, dtype=torch.float32)
    with counting(nine.unet.module) as counts:
        got = nine.run(GenerationRequest(**KW, steps=4, sampler="ddim", init_image=init, mask=mask,
                                         denoising_strength=1.0, deep_cache=2))
    assert torch.isfinite(got.latents).all() and counts["evaluations"] == 4 and counts["full"] == 2


def test_lcm_runs_one_wrapper(tmp_path_factory):
    folder = write_random_model("tiny-lcm", tmp_path_factory.mktemp("models") / "lcm", seed=3)
    lcm = Pipeline.load(folder, dtype=torch.float32)
    with counting(lcm.unet.module) as counts:
        got = lcm.run(GenerationRequest("a red circle", steps=4, cfg_scale=8.0, seed=1, width=16, height=16,
                                        sampler="lcm", deep_cache=2))
    assert torch.isfinite(got.latents).all()
    assert counts["evaluations"] == 4 and counts["full"] == 2


# --- (4) guidance: split passes each cache their own feature, batched caches both halves ----------------

def test_split_and_batched_guidance_agree(pipe, split_pipe):
    assert pipe.plan.cfg == "batch" and split_pipe.plan.cfg == "split"
    req = dict(**KW, steps=5, sampler="euler", deep_cache=3)
    with counting(pipe.unet.module) as batched:
        a = pipe.run(GenerationRequest(**req))
    with counting(split_pipe.unet.module) as split:
        b = split_pipe.run(GenerationRequest(**req))
    assert batched["evaluations"] == 5 and batched["full"] == 2  # steps 0 and 3, both halves at once
    assert split["evaluations"] == 10 and split["full"] == 4  # the same steps, once per pass
    assert rel(b.latents, a.latents) <= 1e-5
    c = pipe.run(GenerationRequest(**{**req, "deep_cache": 0}))
    assert rel(c.latents, a.latents) > 1e-5  # the cache did change the result


def test_without_guidance_one_wrapper(pipe):
    with counting(pipe.unet.module) as counts:
        got = pipe.run(GenerationRequest(**{**KW, "cfg_scale": 1.0}, steps=5, sampler="euler", deep_cache=2))
    assert torch.isfinite(got.latents).all() and counts["evaluations"] == 5 and counts["full"] == 3


# --- (5) the request, the CLI, the service ---------------------------------------------------------------

@pytest.mark.parametrize("value", [-1, 101, 2.5, True, "3", None])
def test_bad_deep_cache_is_refused_naming_the_field(value):
    with pytest.raises(InvalidRequest) as exc:
        GenerationRequest("x", deep_cache=value).validate()
    assert exc.value.field == "deep_cache"


def test_deep_cache_in_the_parameters_only_when_on():
    for n, shown in ((0, False), (1, False), (2, True), (100, True)):
        req = GenerationRequest("x", seed=1, deep_cache=n).validate()
        assert ("DeepCache: " in format_parameters(req, "m")) == shown
    assert "DeepCache: 3" in format_parameters(GenerationRequest("x", seed=1, deep_cache=3).validate(), "m")


def test_cli_deep_cache_flag(tiny_model, tmp_path, capsys):
    from sdlite.cli import main
    out = tmp_path / "dc.png"
    code = main(["generate", "a red circle", "-m", str(tiny_model), "-o", str(out), "--seed", "5", "--steps", "4",
                 "-W", "16", "-H", "16", "-q", "--deep-cache", "3"])
    assert code == 0, capsys.readouterr().err
    with Image.open(out) as im:
        assert "DeepCache: 3" in im.info["parameters"]
    for bad, needle in (("-1", "--deep-cache"), ("x", "--deep-cache"), ("101", "deep_cache")):
        code = main(["generate", "x", "-m", str(tiny_model), "-o", str(tmp_path / "bad.png"), "--deep-cache", bad])
        err = capsys.readouterr().err
        assert code == 2 and needle in err and err.count("\n") == 1
    assert not (tmp_path / "bad.png").exists()


def test_service_fields_carry_deep_cache():
    pytest.importorskip("starlette")
    from sdlite.serve.config import Limits
    from sdlite.serve.fields import Defaults, build_request
    from sdlite.serve.wire import a1111_fields
    req, _ = build_request(a1111_fields({"prompt": "p", "deep_cache": 3.0}), Limits(), Defaults())
    assert req.deep_cache == 3
    assert build_request(a1111_fields({"prompt": "p"}), Limits(), Defaults())[0].deep_cache == 0
    for bad in ("3", 2.5, -1, 101, True):
        with pytest.raises(InvalidRequest) as exc:
            build_request(a1111_fields({"prompt": "p", "deep_cache": bad}), Limits(), Defaults())
        assert exc.value.field == "deep_cache"


class RecordingPipe:
    """What the service's executor calls: records each request, returns an 8x8 image at once."""

    def __init__(self):
        self.requests = []

    def run(self, request, progress=None, cancel=None, on_latents=None):
        from sdlite.pipeline import GenerationResult
        self.requests.append(request)
        return GenerationResult(Image.new("RGB", (8, 8)), request, format_parameters(request, "recording"), [])


def png_b64(image: Image.Image) -> str:
    buf = io.BytesIO()
    image.save(buf, "PNG")
    return base64.b64encode(buf.getvalue()).decode()


def test_http_txt2img_img2img_and_jobs_take_deep_cache():
    for module in ("grpc", "prometheus_client", "starlette"):
        pytest.importorskip(module)
    requests = pytest.importorskip("requests")
    from sdlite.serve.breaker import CircuitBreaker
    from sdlite.serve.config import Limits
    from sdlite.serve.execution import Executor
    from sdlite.serve.fields import Defaults
    from sdlite.serve.http_server import HttpFrontEnd
    from sdlite.serve.metrics import Metrics
    rec = RecordingPipe()
    ex = Executor(rec, slots=1, queue_size=2, breaker=CircuitBreaker(3, 60.0), metrics=Metrics(),
                  default_deadline=30.0, max_deadline=60.0).start()
    fe = HttpFrontEnd(ex, Limits(), Defaults(width=64, height=64, text_layers=2), ex.metrics, "recording",
                      "127.0.0.1", 0)
    fe.start()
    url = f"http://127.0.0.1:{fe.port}"
    try:
        r = requests.post(url + "/sdapi/v1/txt2img", json={"prompt": "p", "steps": 2, "deep_cache": 3}, timeout=30)
        assert r.status_code == 200, r.text
        assert rec.requests[-1].deep_cache == 3 and "DeepCache: 3" in r.json()["info"]
        body = {"prompt": "p", "steps": 2, "deep_cache": 2, "init_images": [png_b64(Image.new("RGB", (64, 64)))]}
        r = requests.post(url + "/sdapi/v1/img2img", json=body, timeout=30)
        assert r.status_code == 200, r.text
        assert rec.requests[-1].deep_cache == 2 and rec.requests[-1].init_image is not None
        r = requests.post(url + "/v1/jobs", json={"prompt": "p", "steps": 2, "deep_cache": 4}, timeout=30)
        assert r.status_code == 202, r.text
        for path in ("/sdapi/v1/txt2img", "/v1/jobs"):
            r = requests.post(url + path, json={"prompt": "p", "deep_cache": 101}, timeout=30)
            assert r.status_code == 422 and "deep_cache" in r.text
        ex.drain(10.0, stop_wait=5.0)
        assert rec.requests[-1].deep_cache == 4
    finally:
        fe.stop()
        ex.drain(0.0, stop_wait=5.0)


# --- (6) a cached call runs a small part of the network --------------------------------------------------

def test_cached_call_runs_three_layers_of_the_tiny_unet():
    unet = build_unet("tiny")
    x, t, ctx, _ = inputs(unet, 1)
    wrapped = DeepCacheUNet(unet, 2)
    with torch.inference_mode(), counting(unet) as full:
        wrapped(x, t, ctx)
    with torch.inference_mode(), counting(unet) as cached:
        wrapped(x, t, ctx)
    resnets = [n for n in full["layers"] if ".resnets." in n]
    assert len(resnets) == 6 + 2 + 9  # down 3 x 2, mid 2, up 3 x 3
    assert cached["layers"] == ["down_blocks.0.resnets.0", "down_blocks.0.attentions.0",
                                "up_blocks.2.resnets.1", "up_blocks.2.attentions.1",
                                "up_blocks.2.resnets.2", "up_blocks.2.attentions.2"]
    assert full["full"] == 1 and cached["full"] == 0


def test_sd15_shallow_path_is_the_papers_branch_and_a_fifth_of_the_work():
    """SD 1.5's shapes on the meta device (no memory, no weights): the layers DeepCache's branch 0 keeps, and
    the FLOPs of a cached call against a full one at 512x512."""
    from torch.utils.flop_counter import FlopCounterMode
    with torch.device("meta"):
        unet = UNet2DConditionModel(config_from_dict(UNetConfig, ARCHITECTURES["sd15"]["unet"]))
        x, ctx, t = torch.randn(1, 4, 64, 64), torch.randn(1, 77, 768), torch.tensor(500.0)
        with counting(unet) as full, FlopCounterMode(display=False) as full_flops:
            _, feature = unet.forward_with_feature(x, t, ctx)
        with counting(unet) as cached, FlopCounterMode(display=False) as cached_flops:
            unet.forward_shallow(x, t, ctx, feature)
    assert tuple(feature.shape) == (1, 320, 64, 64)
    assert len(full["layers"]) == 22 + 16
    assert cached["layers"] == ["down_blocks.0.resnets.0", "down_blocks.0.attentions.0",
                                "up_blocks.3.resnets.1", "up_blocks.3.attentions.1",
                                "up_blocks.3.resnets.2", "up_blocks.3.attentions.2"]
    ratio = cached_flops.get_total_flops() / full_flops.get_total_flops()
    assert 0.15 < ratio < 0.3, ratio
