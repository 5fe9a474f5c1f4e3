"""Service pieces that need no server: breaker, field validation, wire mappings, load test helpers."""

import math

import pytest

pytest.importorskip("grpc")
pytest.importorskip("prometheus_client")

from sdlite.errors import InvalidRequest  # noqa: E402
from sdlite.serve.breaker import CLOSED, HALF_OPEN, OPEN, CircuitBreaker  # noqa: E402
from sdlite.serve.config import Limits  # noqa: E402
from sdlite.serve.fields import Defaults, build_request  # noqa: E402
from sdlite.serve.http_server import a1111_fields, openai_fields  # noqa: E402
from sdlite.serve.loadtest import LoadtestError, Report, parse_target  # noqa: E402


class Clock:
    def __init__(self):
        self.t = 0.0

    def __call__(self):
        return self.t


def test_breaker_opens_after_n_consecutive_failures_and_half_opens_after_cooldown():
    clock = Clock()
    b = CircuitBreaker(3, 10.0, clock=clock)
    for _ in range(2):
        assert b.allow()
        b.record(False)
    b.record(True)  # a success resets the count
    for _ in range(2):
        b.record(False)
    assert b.state == CLOSED
    b.record(None)  # neutral outcomes change nothing
    b.record(False)
    assert b.state == OPEN and not b.allow()
    assert b.retry_after() == pytest.approx(10.0)
    clock.t = 10.0
    assert b.state == HALF_OPEN
    assert b.allow()          # the one trial
    assert not b.allow()      # nothing else while it runs
    b.record(False)           # trial failed: open again for a full cool-down
    assert b.state == OPEN
    clock.t = 19.0
    assert not b.allow()
    clock.t = 20.0
    assert b.allow()
    b.record(None)            # trial cancelled by its client: the trial slot is free again
    assert b.allow()
    b.record(True)
    assert b.state == CLOSED and b.allow() and b.allow()


def test_breaker_disabled_with_zero_threshold():
    b = CircuitBreaker(0, 1.0)
    for _ in range(10):
        b.record(False)
    assert b.allow() and b.state == CLOSED


LIMITS = Limits(max_width=256, max_height=128, max_steps=50, max_images=3, max_prompt_chars=20)
DEFAULTS = Defaults(width=64, height=64, text_layers=2)


def test_build_request_fills_defaults_and_keeps_values():
    req, n = build_request({"prompt": "a cat"}, LIMITS, DEFAULTS)
    assert (req.width, req.height, req.steps, req.cfg_scale, req.sampler, n) == \
        (64, 64, 20, 7.5, "dpm++2m", 1)
    assert 0 <= req.seed < 2**32
    req, n = build_request({"prompt": "x", "steps": 3.0, "seed": 2**64 - 1, "sampler": "euler_a", "n": 3,
                            "width": 256, "height": 8, "clip_skip": 1, "cfg_scale": 0}, LIMITS, DEFAULTS)
    assert (req.steps, req.seed, req.sampler, n, req.width, req.height, req.clip_skip) == \
        (3, 2**64 - 1, "euler_a", 3, 256, 8, 1)


@pytest.mark.parametrize("field,value", [
    ("prompt", 5), ("prompt", "x" * 21), ("negative_prompt", ["a"]), ("steps", 0), ("steps", 51),
    ("steps", 2.5), ("steps", True), ("steps", "20"), ("cfg_scale", -1), ("cfg_scale", math.nan),
    ("cfg_scale", math.inf), ("cfg_scale", "7"), ("cfg_scale", 101), ("width", 60), ("width", 0),
    ("width", 264), ("height", 136), ("height", -8), ("sampler", "plms"), ("sampler", 3), ("seed", -2),
    ("seed", 2**64), ("seed", 1.5), ("clip_skip", 2), ("clip_skip", -1), ("n", 0), ("n", 4),
])
def test_build_request_names_the_bad_field(field, value):
    with pytest.raises(InvalidRequest) as exc:
        build_request({"prompt": "ok", field: value}, LIMITS, DEFAULTS)
    assert exc.value.field == field


def test_one_sampler_vocabulary_and_seed_minus_one_in_every_front_end():
    # gRPC and OpenAI fields go through build_request: A1111 labels and aliases work there too
    for text, name in [("Euler a", "euler_a"), ("DPM++ 2M Karras", "dpm++2m_karras"), ("k_lcm", "lcm"),
                       ("ddim", "ddim")]:
        assert build_request({"prompt": "x", "sampler": text}, LIMITS, DEFAULTS)[0].sampler == name
    assert openai_fields({"prompt": "x", "sampler": "Euler a"})["sampler"] == "Euler a"  # resolved by the contract
    req, _ = build_request({"prompt": "x", "seed": -1}, LIMITS, DEFAULTS)
    assert 0 <= req.seed < 2**32


def test_a1111_mapping():
    f = a1111_fields({"prompt": "p", "sampler_name": "Euler a", "seed": -1, "batch_size": 2, "n_iter": 2,
                      "override_settings": {"CLIP_stop_at_last_layers": 2}, "enable_hr": False})
    assert f["sampler"] == "euler_a" and "seed" not in f and f["n"] == 4 and f["clip_skip"] == 1
    assert a1111_fields({"sampler_name": "DPM++ 2M", "scheduler": "Karras"})["sampler"] == "dpm++2m_karras"
    assert a1111_fields({"sampler_index": "DDIM"})["sampler"] == "ddim"
    assert a1111_fields({"seed": 7})["seed"] == 7
    assert a1111_fields({"sampler_name": "Euler", "scheduler": "Karras"})["sampler"] == "euler_karras"
    assert a1111_fields({"sampler_name": "Heun", "scheduler": "Exponential"})["sampler"] == "heun_exponential"
    for body, field in [({"sampler_name": "DPM++ SDE"}, "sampler_name"),
                        ({"scheduler": "sgm_uniform"}, "scheduler"),
                        ({"sampler_name": "DDIM", "scheduler": "Karras"}, "scheduler"),
                        ({"batch_size": 0}, "batch_size"), ({"n_iter": "2"}, "n_iter"),
                        ({"override_settings": []}, "override_settings"),
                        ({"override_settings": {"CLIP_stop_at_last_layers": 0}},
                         "override_settings.CLIP_stop_at_last_layers")]:
        with pytest.raises(InvalidRequest) as exc:
            a1111_fields(body)
        assert exc.value.field == field


def test_openai_mapping():
    f = openai_fields({"prompt": "p", "size": "128x64", "n": 2, "response_format": "b64_json",
                       "model": "sd", "quality": "hd", "steps": 4, "seed": 3})
    assert (f["width"], f["height"], f["n"], f["steps"], f["seed"]) == (128, 64, 2, 4, 3)
    assert "width" not in openai_fields({"prompt": "p", "size": "auto"})
    for body, field in [({}, "prompt"), ({"prompt": ""}, "prompt"), ({"prompt": "p", "size": "big"}, "size"),
                        ({"prompt": "p", "size": 512}, "size"), ({"prompt": "p", "response_format": "url"},
                                                                 "response_format"),
                        ({"prompt": "p", "output_format": "webp"}, "output_format"),
                        ({"prompt": "p", "stream": True}, "stream"), ({"prompt": "p", "model": 1}, "model")]:
        with pytest.raises(InvalidRequest) as exc:
            openai_fields(body)
        assert exc.value.field == field


def test_loadtest_refuses_non_loopback_targets_and_parses_urls():
    assert parse_target("grpc://127.0.0.1:5000").api == "grpc"
    t = parse_target("http://localhost:8080", "openai")
    assert (t.scheme, t.port, t.api) == ("http", 8080, "openai")
    assert parse_target("http://[::1]:80").api == "a1111"
    for bad in ("grpc://10.1.2.3:50051", "http://192.168.0.1:80", "http://8.8.8.8:80", "ftp://127.0.0.1:1",
                "grpc://127.0.0.1", "http://127.0.0.1:99999"):
        with pytest.raises(LoadtestError):
            parse_target(bad)
    with pytest.raises(LoadtestError):
        parse_target("grpc://127.0.0.1:1", "openai")


def test_report_percentiles():
    r = Report("x", 1, 2.0)
    assert r.percentile(50) is None
    r.ok_latencies = [float(i) for i in range(1, 101)]
    r.statuses["OK"] = 100
    assert r.percentile(50) == pytest.approx(50.5)
    assert r.percentile(99) == pytest.approx(99.01)
    d = r.as_dict()
    assert d["throughput_ok_per_s"] == 50.0 and d["statuses"] == {"OK": 100}


def test_committed_grpc_code_matches_the_proto(tmp_path):
    """sdlite_pb2*.py are generated by gen_proto.sh from sdlite.proto; regenerate and compare."""
    pytest.importorskip("grpc_tools")
    import shutil
    import subprocess
    import sys
    from pathlib import Path

    import sdlite.serve as serve
    src = Path(serve.__file__).parent
    work = tmp_path / "src" / "sdlite" / "serve"
    work.mkdir(parents=True)
    for name in ("sdlite.proto", "gen_proto.sh"):
        shutil.copy(src / name, work / name)
    subprocess.run(["sh", str(work / "gen_proto.sh"), sys.executable], check=True, capture_output=True)
    for name in ("sdlite_pb2.py", "sdlite_pb2.pyi", "sdlite_pb2_grpc.py"):
        assert (work / name).read_text() == (src / name).read_text(), f"{name} is stale: run gen_proto.sh"
