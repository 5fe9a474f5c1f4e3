"""A1111's API around txt2img (`serve.a1111`), interrupt and skip (`Executor.interrupt` / `skip`) and the
service's credentials (`--api-auth`, `--api-token`).

In-process first: the HTTP front end on 127.0.0.1 over a scripted pipeline that pauses at a chosen step, so
progress, interrupt and skip land exactly where a test wants them. Then one real `sdlite serve` on the tiny
random model, with credentials, driven by the `webuiapi` client and by the requests Open WebUI and
SillyTavern send when they connect and generate.
"""

from __future__ import annotations

import base64
import io
import json
import threading
import time

import pytest

pytest.importorskip("grpc")
pytest.importorskip("prometheus_client")
pytest.importorskip("starlette")
requests = pytest.importorskip("requests")
webuiapi = pytest.importorskip("webuiapi")

import grpc  # noqa: E402
import torch  # noqa: E402
from grpc_health.v1 import health_pb2, health_pb2_grpc  # noqa: E402
from PIL import Image  # noqa: E402
from starlette.routing import Route  # noqa: E402

from sdlite.cli import build_parser  # noqa: E402
from sdlite.errors import Cancelled  # noqa: E402
from sdlite.pipeline import GenerationResult, StageTiming  # noqa: E402
from sdlite.request import format_parameters  # noqa: E402
from sdlite.serve import sdlite_pb2 as pb  # noqa: E402
from sdlite.serve import sdlite_pb2_grpc as pb_grpc  # noqa: E402
from sdlite.serve.a1111 import check_features, parse_infotext  # noqa: E402
from sdlite.serve.breaker import CircuitBreaker  # noqa: E402
from sdlite.serve.config import ApiAuth, Limits  # noqa: E402
from sdlite.serve.execution import Executor  # noqa: E402
from sdlite.serve.fields import Defaults  # noqa: E402
from sdlite.serve.grpc_server import GrpcFrontEnd  # noqa: E402
from sdlite.serve.http_server import HttpFrontEnd  # noqa: E402
from sdlite.serve.metrics import Metrics  # noqa: E402
from sdlite.serve.process import ServerProcess  # noqa: E402

# the keys of A1111's `Processed.js()` (the txt2img answer's `info`)
A1111_INFO_KEYS = {
    "prompt", "all_prompts", "negative_prompt", "all_negative_prompts", "seed", "all_seeds", "subseed",
    "all_subseeds", "subseed_strength", "width", "height", "sampler_name", "cfg_scale", "steps", "batch_size",
    "restore_faces", "face_restoration_model", "sd_model_name", "sd_model_hash", "sd_vae_name", "sd_vae_hash",
    "seed_resize_from_w", "seed_resize_from_h", "denoising_strength", "extra_generation_params",
    "index_of_first_image", "infotexts", "styles", "job_timestamp", "clip_skip",
    "is_using_inpainting_conditioning", "version",
}
STATE_KEYS = {"skipped", "interrupted", "job", "job_count", "job_timestamp", "job_no", "sampling_step",
              "sampling_steps"}
USER, PASSWORD, TOKEN = "alice", "s3cret:pass", "tok-123"


def basic(user: str, password: str) -> str:
    return "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()


def png_of(b64: str) -> Image.Image:
    image = Image.open(io.BytesIO(base64.b64decode(b64)))
    image.load()
    return image


def wait_for(predicate, timeout: float = 10.0, interval: float = 0.01):
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    raise AssertionError("timed out")


# --- in-process: the front end over a scripted pipeline -------------------------------------------------

class ScriptedPipe:
    """Steps of `step_s`; after `pause_after` steps in all (None: never) it stops at a gate until `go()`."""

    def __init__(self, step_s: float = 0.002):
        self.step_s = step_s
        self.gate = threading.Event()
        self.gate.set()
        self.paused = threading.Event()
        self.pause_after: int | None = None
        self.steps_run = 0
        self.runs = []

    def pause_at(self, steps: int) -> None:
        self.pause_after, self.steps_run = steps, 0
        self.paused.clear()

    def go(self) -> None:
        self.pause_after = None
        self.gate.set()

    def run(self, request, progress=None, cancel=None, on_latents=None):
        self.runs.append(request.seed)
        for i in range(request.steps):
            time.sleep(self.step_s)
            self.steps_run += 1
            if on_latents:
                on_latents(i + 1, request.steps, torch.full((1, 4, 8, 8), 0.1 * i))
            if progress:
                progress(i + 1, request.steps)
            if self.steps_run == self.pause_after:
                self.gate.clear()
                self.paused.set()
            self.gate.wait(10)
            if cancel and cancel():
                raise Cancelled("stop")
        return GenerationResult(Image.new("RGB", (8, 8), (200, 10, 10)), request,
                                format_parameters(request, "scripted"), [StageTiming("encode", 0.01)])


@pytest.fixture
def pipe():
    return ScriptedPipe()


@pytest.fixture
def executor(pipe):
    ex = Executor(pipe, slots=1, queue_size=2, breaker=CircuitBreaker(1, 60.0), metrics=Metrics(),
                  default_deadline=30.0, max_deadline=60.0).start()
    yield ex
    pipe.go()
    ex.drain(0.0, stop_wait=5.0)


@pytest.fixture
def fe(executor):
    front = HttpFrontEnd(executor, Limits(), Defaults(width=64, height=64, text_layers=2), executor.metrics,
                         "scripted", "127.0.0.1", 0)
    front.start()
    front.url = f"http://127.0.0.1:{front.port}"
    yield front
    front.stop()


def get(fe, path, **kw):
    return requests.get(fe.url + path, timeout=30, **kw)


def post(fe, path, body=None, **kw):
    return requests.post(fe.url + path, json=body, timeout=30, **kw)


def txt2img_async(url: str, body: dict, headers=None):
    """POST txt2img on a thread; returns (thread, box): box[0] is the response once it has come."""
    box = []
    t = threading.Thread(target=lambda: box.append(requests.post(url + "/sdapi/v1/txt2img", json=body,
                                                                   headers=headers, timeout=120)))
    t.start()
    return t, box


def test_connect_time_endpoints_answer_a1111_shapes(fe):
    options = get(fe, "/sdapi/v1/options").json()
    assert options["sd_model_checkpoint"] == "scripted" and options["sd_vae"] == "Automatic"
    assert options["samples_format"] == "png" and options["CLIP_stop_at_last_layers"] == 1
    assert "sd_checkpoint_hash" in options and "forge_preset" not in options  # (SillyTavern: not Forge)
    assert get(fe, "/sdapi/v1/sd-models").json() == [
        {"title": "scripted", "model_name": "scripted", "hash": None, "sha256": None, "filename": "scripted",
         "config": None}]
    assert get(fe, "/sdapi/v1/sd-vae").json() == []
    samplers = get(fe, "/sdapi/v1/samplers").json()
    assert {"Euler a", "DPM++ 2M", "DPM++ 2M Karras", "DDIM", "LCM"} <= {s["name"] for s in samplers}
    assert all(set(s) == {"name", "aliases", "options"} and isinstance(s["aliases"], list) for s in samplers)
    schedulers = get(fe, "/sdapi/v1/schedulers").json()
    assert [s["name"] for s in schedulers] == ["automatic", "karras", "exponential", "simple"]
    assert all(set(s) == {"name", "label", "aliases", "default_rho", "need_inner_model"} for s in schedulers)
    for name in ("upscalers", "latent-upscale-modes", "loras", "hypernetworks", "face-restorers",
                 "prompt-styles", "realesrgan-models"):
        assert get(fe, f"/sdapi/v1/{name}").json() == [], name
    assert get(fe, "/sdapi/v1/embeddings").json() == {"loaded": {}, "skipped": {}}
    assert get(fe, "/sdapi/v1/scripts").json() == {"txt2img": [], "img2img": []}
    flags = get(fe, "/sdapi/v1/cmd-flags").json()
    assert flags["api"] is True and flags["port"] == fe.port and flags["listen"] is False
    assert flags["api_auth"] is None
    memory = get(fe, "/sdapi/v1/memory").json()
    assert memory["ram"]["total"] >= memory["ram"]["used"] > 0 and "cuda" in memory
    r = get(fe, "/internal/ping")
    assert r.status_code == 200 and r.json() == {}


def test_options_same_model_is_a_no_op_others_are_refused_unknown_keys_ignored(fe, executor, pipe):
    options = get(fe, "/sdapi/v1/options").json()
    r = post(fe, "/sdapi/v1/options", options)  # Open WebUI posts back what it read
    assert r.status_code == 200 and r.json() is None
    r = post(fe, "/sdapi/v1/options", {"sd_model_checkpoint": "scripted [0123abcd]", "some_ui_option": 3})
    assert r.status_code == 200
    r = post(fe, "/sdapi/v1/options", {"sd_model_checkpoint": "other.safetensors"})
    assert r.status_code == 404 and "other.safetensors" in r.json()["detail"] and "scripted" in r.json()["detail"]
    for key, value in [("samples_format", "jpg"), ("eta_noise_seed_delta", 31337), ("sd_vae", "vae-ft-mse"),
                       ("CLIP_stop_at_last_layers", 3), ("CLIP_stop_at_last_layers", "2")]:
        r = post(fe, "/sdapi/v1/options", {key: value})
        assert r.status_code == 422 and r.json()["field"] == key, (key, r.text)
    # CLIP_stop_at_last_layers set through options is the default clip skip of later requests
    assert post(fe, "/sdapi/v1/options", {"CLIP_stop_at_last_layers": 2}).status_code == 200
    assert get(fe, "/sdapi/v1/options").json()["CLIP_stop_at_last_layers"] == 2
    r = post(fe, "/sdapi/v1/txt2img", {"prompt": "p", "steps": 2, "seed": 1})
    assert r.status_code == 200 and json.loads(r.json()["info"])["clip_skip"] == 2
    r = post(fe, "/sdapi/v1/txt2img", {"prompt": "p", "steps": 2, "seed": 1,
                                       "override_settings": {"CLIP_stop_at_last_layers": 1}})
    assert json.loads(r.json()["info"])["clip_skip"] == 1


def test_options_switch_through_the_servers_callable(fe):
    api = fe.app.state.api
    models = [{"title": "a [11111111]", "model_name": "a", "hash": "11111111", "sha256": None,
               "filename": "/m/a", "config": None},
              {"title": "b.safetensors [22222222]", "model_name": "b", "hash": "22222222", "sha256": None,
               "filename": "/m/b.safetensors", "config": None}]
    switched = []

    def switch(name):
        from sdlite.serve.models import ModelSwitchError
        if name not in ("a", "b.safetensors [22222222]"):
            raise ModelSwitchError("invalid_argument", f"no model {name!r}", not_found=True)
        switched.append(name)
        api.model_name = "b"

    api.list_models, api.switch_model, api.model_name = (lambda: models), switch, "a"
    assert get(fe, "/sdapi/v1/options").json()["sd_model_checkpoint"] == "a [11111111]"
    assert post(fe, "/sdapi/v1/options", {"sd_model_checkpoint": "a [11111111]"}).status_code == 200
    assert switched == []  # the current model: nothing to do
    assert post(fe, "/sdapi/v1/options", {"sd_model_checkpoint": "b.safetensors [22222222]"}).status_code == 200
    assert switched == ["b.safetensors [22222222]"]
    assert get(fe, "/sdapi/v1/options").json()["sd_model_checkpoint"] == "b.safetensors [22222222]"
    assert get(fe, "/sdapi/v1/sd-models").json() == models
    r = post(fe, "/sdapi/v1/options", {"sd_model_checkpoint": "zzz"})
    assert r.status_code == 404 and r.json()["field"] == "sd_model_checkpoint"


def test_webuiapi_default_payload_just_works_and_info_is_a1111s(fe, pipe):
    client = webuiapi.WebUIApi(host="127.0.0.1", port=fe.port, steps=3)
    result = client.txt2img(prompt="a red square", negative_prompt="blue", seed=5, batch_size=2)
    assert len(result.images) == 2 and result.images[0].format == "PNG"
    info = result.info  # (webuiapi parses the JSON text)
    assert A1111_INFO_KEYS <= set(info)
    assert (info["all_seeds"], info["seed"], info["sampler_name"], info["steps"]) == ([5, 6], 5, "Euler a", 3)
    assert (info["width"], info["height"], info["batch_size"], info["cfg_scale"]) == (512, 512, 2, 7.0)
    assert info["all_prompts"] == ["a red square"] * 2 and info["all_negative_prompts"] == ["blue"] * 2
    assert info["sd_model_name"] == "scripted" and info["clip_skip"] == 1 and info["interrupted"] is False
    assert len(info["job_timestamp"]) == 14 and info["infotexts"][1].startswith("a red square\nNegative")
    assert result.parameters["eta"] == 1.0 and result.parameters["sampler_index"] == "Euler a"
    assert pipe.runs == [5, 6]


@pytest.mark.parametrize("patch, field", [
    ({"enable_hr": True}, "enable_hr"),
    ({"restore_faces": True}, "restore_faces"),
    ({"tiling": True}, "tiling"),
    ({"seed_resize_from_w": 512}, "seed_resize_from_w"),
    ({"styles": ["cinematic"]}, "styles"),
    ({"script_name": "x/y/z plot"}, "script_name"),
    ({"alwayson_scripts": {"ControlNet": {"args": []}}}, "alwayson_scripts.ControlNet"),
    ({"s_churn": 0.2}, "s_churn"),
    ({"s_noise": 0.9}, "s_noise"),
    ({"eta": 0.5}, "eta"),                                   # Euler a runs with eta 1
    ({"override_settings": {"samples_format": "webp"}}, "override_settings.samples_format"),
    ({"override_settings": {"sd_model_checkpoint": "another"}}, "override_settings.sd_model_checkpoint"),
    ({"override_settings": {"sd_vae": "kl-f8-anime"}}, "override_settings.sd_vae"),
    ({"infotext": "a cat\nSteps: 4, Sampler: Euler, Seed: 1"}, "infotext"),
])
def test_features_sdlite_lacks_are_refused_naming_the_field(fe, pipe, patch, field):
    body = dict(WEBUIAPI_DEFAULTS, prompt="p", steps=2, width=64, height=64, **patch)
    r = post(fe, "/sdapi/v1/txt2img", body)
    assert r.status_code == 422, r.text
    assert r.json()["field"] == field and r.json()["detail"][0]["loc"] == ["body", field]
    assert pipe.runs == []


# what webuiapi.WebUIApi().txt2img() sends when only the prompt is given (webuiapi 0.9.17)
WEBUIAPI_DEFAULTS = {
    "enable_hr": False, "hr_scale": 2, "hr_upscaler": "Latent", "hr_second_pass_steps": 0, "hr_resize_x": 0,
    "hr_resize_y": 0, "hr_checkpoint_name": None, "hr_sampler_name": None, "hr_scheduler": None,
    "hr_prompt": "", "hr_negative_prompt": "", "denoising_strength": 0.7, "firstphase_width": 0,
    "firstphase_height": 0, "prompt": "", "styles": [], "seed": -1, "subseed": -1, "subseed_strength": 0.0,
    "seed_resize_from_h": 0, "seed_resize_from_w": 0, "batch_size": 1, "n_iter": 1, "steps": 20,
    "cfg_scale": 7.0, "width": 512, "height": 512, "restore_faces": False, "tiling": False,
    "do_not_save_samples": False, "do_not_save_grid": False, "negative_prompt": "", "eta": 1.0, "s_churn": 0,
    "s_tmax": 0, "s_tmin": 0, "s_noise": 1, "override_settings": {}, "override_settings_restore_afterwards": True,
    "sampler_name": "Euler a", "scheduler": "automatic", "sampler_index": "Euler a", "script_name": None,
    "script_args": [], "send_images": True, "save_images": False, "alwayson_scripts": {},
}


def test_check_features_accepts_the_defaults_clients_send():
    check_features(WEBUIAPI_DEFAULTS, "euler_a")
    check_features(dict(WEBUIAPI_DEFAULTS, sampler_name="DPM++ 2M"), "dpm++2m")  # eta unused there
    check_features({"s_tmax": None, "s_min_uncond": 0.0, "seed_resize_from_w": -1, "refiner_checkpoint": "None",
                    "eta": None, "save_images": True}, "ddim")


def test_progress_idle_then_following_the_running_job(fe, pipe):
    idle = get(fe, "/sdapi/v1/progress").json()
    assert idle["progress"] == 0 and idle["state"]["job_count"] == 0 and idle["current_image"] is None
    assert STATE_KEYS <= set(idle["state"])
    pipe.pause_at(7)  # image 2 of 3 (4 steps each), step 3
    t, box = txt2img_async(fe.url, {"prompt": "p", "steps": 4, "seed": 1, "batch_size": 3})
    assert pipe.paused.wait(10)
    p = get(fe, "/sdapi/v1/progress").json()
    assert p["state"]["job_count"] == 3 and p["state"]["job_no"] == 1
    assert p["state"]["sampling_step"] == 3 and p["state"]["sampling_steps"] == 4
    assert p["progress"] == pytest.approx(7 / 12) and p["eta_relative"] >= 0
    assert png_of(p["current_image"]).format == "PNG" and p["textinfo"].startswith("image 2 of 3")
    assert get(fe, "/sdapi/v1/progress?skip_current_image=true").json()["current_image"] is None
    assert get(fe, "/sdapi/v1/progress?skip_current_image=maybe").status_code == 422
    pipe.go()
    t.join(30)
    assert box[0].status_code == 200 and len(box[0].json()["images"]) == 3
    assert wait_for(lambda: get(fe, "/sdapi/v1/progress").json()["state"]["job_count"] == 0)


def test_interrupt_keeps_the_finished_images_and_drops_the_one_in_progress(fe, executor, pipe):
    pipe.pause_at(6)  # image 2 of 3, step 2
    t, box = txt2img_async(fe.url, {"prompt": "p", "steps": 4, "seed": 10, "batch_size": 3})
    assert pipe.paused.wait(10)
    assert post(fe, "/sdapi/v1/interrupt").json() == {}
    pipe.go()
    t.join(30)
    r = box[0]
    assert r.status_code == 200
    info = json.loads(r.json()["info"])
    assert len(r.json()["images"]) == 1 and info["all_seeds"] == [10] and info["interrupted"] is True
    assert pipe.runs == [10, 11] and pipe.steps_run == 6  # stopped at the step boundary, image 3 never begun
    assert executor.breaker.state == "closed"


def test_interrupt_before_any_image_answers_200_with_none_and_no_failure_counted(fe, executor, pipe):
    pipe.pause_at(2)
    t, box = txt2img_async(fe.url, {"prompt": "p", "steps": 4, "seed": 3})
    assert pipe.paused.wait(10)
    post(fe, "/sdapi/v1/interrupt")
    pipe.go()
    t.join(30)
    r = box[0]
    assert r.status_code == 200 and r.json()["images"] == []
    info = json.loads(r.json()["info"])
    assert info["interrupted"] is True and info["all_seeds"] == [] and info["seed"] == 3
    assert executor.breaker.state == "closed"  # (the breaker opens after 1 failure here)
    r = post(fe, "/sdapi/v1/txt2img", {"prompt": "p", "steps": 2, "seed": 3})
    assert r.status_code == 200 and len(r.json()["images"]) == 1  # the next job runs as usual
    # the OpenAI route has no empty success: an interrupted job with no image is CANCELLED (499)
    pipe.pause_at(1)
    t = threading.Thread(target=lambda: box.append(post(fe, "/v1/images/generations",
                                                        {"prompt": "p", "size": "64x64", "steps": 3})))
    t.start()
    assert pipe.paused.wait(10)
    post(fe, "/sdapi/v1/interrupt")
    pipe.go()
    t.join(30)
    assert box[-1].status_code == 499 and executor.breaker.state == "closed"


def test_skip_drops_the_current_image_and_goes_on(fe, pipe):
    pipe.pause_at(5)  # image 2 of 3, step 1
    t, box = txt2img_async(fe.url, {"prompt": "p", "steps": 4, "seed": 20, "batch_size": 3})
    assert pipe.paused.wait(10)
    assert post(fe, "/sdapi/v1/skip").status_code == 200
    pipe.go()
    t.join(30)
    info = json.loads(box[0].json()["info"])
    assert info["all_seeds"] == [20, 22] and len(box[0].json()["images"]) == 2 and info["interrupted"] is True
    assert "Seed: 22" in info["infotexts"][1]
    assert pipe.steps_run == 4 + 1 + 4


def test_interrupt_and_skip_are_no_ops_when_idle_and_spare_waiting_jobs(executor, pipe):
    assert executor.interrupt() == 0 and executor.skip() == 0
    from sdlite.pipeline import GenerationRequest
    req = GenerationRequest("p", steps=3, width=64, height=64, seed=1).validate()
    pipe.pause_at(1)
    running = executor.submit(req)
    assert pipe.paused.wait(10)
    waiting = executor.submit(req, 2)
    assert executor.interrupt() == 1
    pipe.go()
    assert running.wait(10) and waiting.wait(10)
    assert running.error is not None and running.error.code == "cancelled" and running.interrupted
    assert waiting.error is None and len(waiting.images) == 2 and not waiting.interrupted


def test_png_info_reads_back_what_txt2img_wrote(fe):
    r = post(fe, "/sdapi/v1/txt2img", {"prompt": "a lighthouse, at dusk", "negative_prompt": "fog",
                                       "steps": 3, "seed": 9, "width": 64, "height": 64,
                                       "sampler_name": "DPM++ 2M", "scheduler": "Karras"})
    image = r.json()["images"][0]
    for sent in (image, "data:image/png;base64," + image):
        info = post(fe, "/sdapi/v1/png-info", {"image": sent}).json()
        assert info["info"] == json.loads(r.json()["info"])["infotexts"][0]
        p = info["parameters"]
        assert (p["Prompt"], p["Negative prompt"], p["Steps"], p["Sampler"], p["Seed"]) == \
            ("a lighthouse, at dusk", "fog", "3", "DPM++ 2M Karras", "9")
        assert (p["Size-1"], p["Size-2"], p["Model"]) == ("64", "64", "scripted") and info["items"] == {}
    plain = io.BytesIO()
    Image.new("RGB", (4, 4)).save(plain, format="PNG")
    info = post(fe, "/sdapi/v1/png-info", {"image": base64.b64encode(plain.getvalue()).decode()}).json()
    assert info == {"info": "", "items": {}, "parameters": {}}
    for bad in ("", "not base64!", base64.b64encode(b"not an image").decode()):
        r = post(fe, "/sdapi/v1/png-info", {"image": bad})
        assert r.status_code == 422 and r.json()["field"] == "image"
    huge = io.BytesIO()  # a small file claiming 20000 x 20000 pixels is refused before decoding
    Image.new("1", (20000, 20000)).save(huge, format="PNG")
    r = post(fe, "/sdapi/v1/png-info", {"image": base64.b64encode(huge.getvalue()).decode()})
    assert r.status_code == 422 and "too large" in r.json()["detail"][0]["msg"]


def test_parse_infotext():
    text = 'a "quoted" cat\nsecond line\nNegative prompt: dog\nSteps: 4, Sampler: Euler a, Size: 64x32, ' \
           'Lora hashes: "a: 1, b: 2", Version: sdlite'
    p = parse_infotext(text)
    assert p["Prompt"] == 'a "quoted" cat\nsecond line' and p["Negative prompt"] == "dog"
    assert (p["Steps"], p["Sampler"], p["Size-1"], p["Size-2"]) == ("4", "Euler a", "64", "32")
    assert p["Lora hashes"] == "a: 1, b: 2" and p["Clip skip"] == "1"
    assert parse_infotext("just a prompt") == {"Prompt": "just a prompt", "Negative prompt": "",
                                               "Clip skip": "1"}


# --- credentials -----------------------------------------------------------------------------------------

def test_api_auth_parsing_and_checks():
    auth = ApiAuth.parse(f"{USER}:{PASSWORD},bob:pw", TOKEN)
    assert auth.users == ((USER, PASSWORD), ("bob", "pw")) and auth.tokens == (TOKEN,)
    assert PASSWORD not in repr(auth) and TOKEN not in repr(auth)
    assert auth.allows(basic(USER, PASSWORD)) and auth.allows(basic("bob", "pw"))
    assert auth.allows(f"Bearer {TOKEN}") and auth.allows(f"bearer  {TOKEN} ")
    for wrong in (None, "", basic(USER, "pw"), basic("bob", PASSWORD), basic("", ""), f"Bearer {TOKEN}x",
                  f"Basic {TOKEN}", "Basic !!!", "Digest x", TOKEN):
        assert not auth.allows(wrong), wrong
    assert not ApiAuth() and not ApiAuth.parse(None, None)
    assert not ApiAuth.parse(f"{USER}:{PASSWORD}").allows(f"Bearer {TOKEN}")  # no tokens: Bearer refused
    for users, token in [("", None), ("alice", None), ("alice:", None), (":pw", None), ("a:b,", None),
                         (None, ""), (None, "two words")]:
        with pytest.raises(ValueError):
            ApiAuth.parse(users, token)
    args = build_parser().parse_args(["serve", "--api-auth", "a:b", "--api-token", "t"])
    assert (args.api_auth, args.api_token) == ("a:b", "t")


def app_requests(app):
    """(method, path) for every route of the app, path parameters filled with dummies."""
    out = []
    for route in app.routes:
        if not isinstance(route, Route):
            continue
        path = route.path_format
        for name in route.param_convertors:
            path = path.replace("{" + name + "}", "x")
        out += [(method, path) for method in sorted(route.methods or ()) if method != "HEAD"]
    return out


def test_every_route_but_health_needs_credentials(fe):
    fe.app.state.api.auth = ApiAuth.parse(f"{USER}:{PASSWORD}", TOKEN)
    pairs = app_requests(fe.app)
    assert ("POST", "/sdapi/v1/txt2img") in pairs and ("GET", "/sdapi/v1/options") in pairs
    assert len(pairs) > 30
    for method, path in pairs:
        for headers in ({}, {"Authorization": basic(USER, "wrong")}, {"Authorization": "Bearer nope"},
                        {"Authorization": ""}):
            r = requests.request(method, fe.url + path, headers=headers, timeout=30,
                                 **({"json": {}} if method == "POST" else {}))
            if path in ("/healthz", "/internal/ping"):
                assert r.status_code == 200, (method, path)
                continue
            assert r.status_code == 401, (method, path, headers)
            challenges = r.raw.headers.getlist("WWW-Authenticate")
            assert challenges == ['Basic realm="sdlite", charset="UTF-8"', 'Bearer realm="sdlite"']
        for headers in ({"Authorization": basic(USER, PASSWORD)}, {"Authorization": f"Bearer {TOKEN}"}):
            r = requests.request(method, fe.url + path, headers=headers, timeout=30,
                                 **({"json": {"prompt": "p", "steps": 1}} if method == "POST" else {}))
            assert r.status_code != 401, (method, path)
    assert requests.get(fe.url + "/nope", timeout=30).status_code == 401  # unknown paths too: nothing leaks
    client = webuiapi.WebUIApi(host="127.0.0.1", port=fe.port, username=USER, password=PASSWORD, steps=2)
    assert client.get_sd_models()[0]["title"] == "scripted"
    assert len(client.txt2img(prompt="p", width=64, height=64).images) == 1


def test_grpc_needs_credentials_too(executor):
    auth = ApiAuth.parse(f"{USER}:{PASSWORD}", TOKEN)
    g = GrpcFrontEnd(executor, Limits(), Defaults(width=64, height=64, text_layers=2), executor.metrics,
                     "127.0.0.1", 0, auth=auth)
    g.start()
    try:
        with grpc.insecure_channel(f"127.0.0.1:{g.port}") as channel:
            stub = pb_grpc.TextToImageStub(channel)
            req = pb.GenerateRequest(prompt="p", steps=2, width=64, height=64, seed=1)
            for metadata in ((), (("authorization", "Bearer nope"),), (("authorization", basic(USER, "x")),)):
                with pytest.raises(grpc.RpcError) as exc:
                    stub.Generate(req, timeout=10, metadata=metadata)
                assert exc.value.code() == grpc.StatusCode.UNAUTHENTICATED
                with pytest.raises(grpc.RpcError) as exc:
                    list(stub.GenerateStream(req, timeout=10, metadata=metadata))
                assert exc.value.code() == grpc.StatusCode.UNAUTHENTICATED
            assert stub.Generate(req, timeout=10, metadata=(("authorization", f"Bearer {TOKEN}"),)).png
            assert stub.Generate(req, timeout=10, metadata=(("authorization", basic(USER, PASSWORD)),)).png
            health = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=10)
            assert health.status == health_pb2.HealthCheckResponse.SERVING  # health checks need none
    finally:
        g.stop()


# --- a real `sdlite serve` on the tiny model, with credentials ---------------------------------------------

@pytest.fixture(scope="module")
def server(tiny_model):
    with ServerProcess(tiny_model, "--threads", "1", "--max-steps", "1000", "--breaker-failures", "1",
                       "--api-auth", f"{USER}:{PASSWORD}", "--api-token", TOKEN) as s:
        yield s


def auth_headers(kind: str = "basic") -> dict:
    return {"authorization": basic(USER, PASSWORD) if kind == "basic" else f"Bearer {TOKEN}"}


def test_webuiapi_client_against_sdlite_serve(server):
    client = webuiapi.WebUIApi(host="127.0.0.1", port=server.http_port, username=USER, password=PASSWORD)
    models = client.get_sd_models()
    assert [m["model_name"] for m in models] == ["tiny"] and client.util_get_model_names() == [models[0]["title"]]
    assert client.util_get_current_model() == models[0]["title"]
    assert client.set_options({"sd_model_checkpoint": models[0]["title"]}) is None
    client.util_set_model("TINY")  # (webuiapi lower-cases the name and picks the closest title)
    assert "Euler a" in client.util_get_sampler_names() and "karras" in client.util_get_scheduler_names()
    result = client.txt2img(prompt="a red circle", seed=42, width=64, height=64, steps=3, batch_size=2)
    assert [im.size for im in result.images] == [(64, 64), (64, 64)]
    info = result.info
    assert A1111_INFO_KEYS <= set(info)
    assert (info["all_seeds"], info["sampler_name"], info["width"], info["height"]) == ([42, 43], "Euler a", 64, 64)
    assert info["sd_model_name"] == "tiny" and info["infotexts"][0] == result.images[0].info["parameters"]
    back = client.png_info(result.images[1])
    assert back.info == info["infotexts"][1]
    assert back.parameters["Seed"] == "43" and back.parameters["Sampler"] == "Euler a"
    progress = client.get_progress()
    assert progress["progress"] == 0 and progress["state"]["job_count"] == 0
    client.util_wait_for_ready(check_interval=0.1)
    with pytest.raises(RuntimeError, match="422"):
        client.txt2img(prompt="p", width=64, height=64, steps=2, enable_hr=True)


def test_progress_moves_and_interrupt_ends_a_long_job_early(server):
    url = server.http_url
    t0 = time.monotonic()
    t, box = txt2img_async(url, {"prompt": "a long job", "steps": 900, "width": 64, "height": 64, "seed": 2},
                           headers=auth_headers())

    def progress():
        return requests.get(url + "/sdapi/v1/progress", headers=auth_headers("bearer"), timeout=10).json()

    first = wait_for(lambda: (p := progress())["state"]["sampling_step"] >= 2 and p, timeout=60, interval=0.05)
    assert first["state"]["sampling_steps"] == 900 and first["state"]["job_count"] == 1
    assert png_of(first["current_image"]).size[0] > 0 and 0 < first["progress"] < 1
    later = wait_for(lambda: (p := progress())["state"]["sampling_step"] > first["state"]["sampling_step"] and p,
                     timeout=60, interval=0.05)
    assert later["progress"] > first["progress"]
    r = requests.post(url + "/sdapi/v1/interrupt", headers=auth_headers(), timeout=10)
    assert r.status_code == 200
    t.join(60)
    answer = box[0]
    assert answer.status_code == 200 and answer.json()["images"] == []
    assert json.loads(answer.json()["info"])["interrupted"] is True
    assert progress()["state"]["job_count"] == 0
    assert time.monotonic() - t0 < 60
    # the breaker (opens after 1 failure here) did not count it: the server still serves
    assert requests.get(url + "/healthz", timeout=10).json() == {"status": "SERVING"}


def test_open_webui_connect_and_generate(server):
    """Open WebUI's requests (backend/open_webui/routers/images.py): verify the URL with GET options, list
    sd-models as {id: title, name: model_name}, read the current model, set it only when it differs (posting
    the whole options object back), then txt2img with the fields it sets and read images and info."""
    url, h = server.http_url, auth_headers()
    assert requests.get(url + "/sdapi/v1/options", headers=h, timeout=10).status_code == 200
    models = [{"id": m["title"], "name": m["model_name"]}
              for m in requests.get(url + "/sdapi/v1/sd-models", headers=h, timeout=10).json()]
    options = requests.get(url + "/sdapi/v1/options", headers=h, timeout=10).json()
    assert options["sd_model_checkpoint"] in [m["id"] for m in models]
    options["sd_model_checkpoint"] = models[0]["id"]
    requests.post(url + "/sdapi/v1/options", json=options, headers=h, timeout=10).raise_for_status()
    data = {"prompt": "a lighthouse", "batch_size": 1, "width": 64, "height": 64, "steps": 2,
            "negative_prompt": "blurry", "cfg_scale": 7, "sampler_name": "DPM++ 2M", "scheduler": "Karras"}
    r = requests.post(url + "/sdapi/v1/txt2img", json=data, headers=h, timeout=60)
    r.raise_for_status()
    res = r.json()
    assert [png_of(b).size for b in res["images"]] == [(64, 64)]
    info = json.loads(res["info"])
    assert info["sampler_name"] == "DPM++ 2M Karras" and info["extra_generation_params"] == {"Schedule type": "Karras"}


def test_sillytavern_connect_and_generate(server):
    """SillyTavern's requests (src/endpoints/stable-diffusion.js): ping = GET options; upscalers and
    latent-upscale-modes; sd-vae (and Forge's sd-modules, allowed to fail); samplers, schedulers, sd-models
    (names), get-model; set-model = POST options then poll progress until idle; generate = GET options
    (Forge or not) then txt2img with its whole request body (its own `url` and `auth` keys included)."""
    url, h = server.http_url, auth_headers()
    assert requests.get(url + "/sdapi/v1/options", headers=h, timeout=10).ok
    upscalers = [x["name"] for x in requests.get(url + "/sdapi/v1/upscalers", headers=h, timeout=10).json()]
    latent = [x["name"] for x in requests.get(url + "/sdapi/v1/latent-upscale-modes", headers=h, timeout=10).json()]
    assert upscalers == latent == []
    assert requests.get(url + "/sdapi/v1/sd-vae", headers=h, timeout=10).json() == []
    assert requests.get(url + "/sdapi/v1/sd-modules", headers=h, timeout=10).status_code == 404
    samplers = [x["name"] for x in requests.get(url + "/sdapi/v1/samplers", headers=h, timeout=10).json()]
    schedulers = [x["name"] for x in requests.get(url + "/sdapi/v1/schedulers", headers=h, timeout=10).json()]
    models = [x["title"] for x in requests.get(url + "/sdapi/v1/sd-models", headers=h, timeout=10).json()]
    current = requests.get(url + "/sdapi/v1/options", headers=h, timeout=10).json()["sd_model_checkpoint"]
    assert "Euler a" in samplers and "automatic" in schedulers and current in models
    assert requests.post(url + "/sdapi/v1/options", json={"sd_model_checkpoint": current}, headers=h,
                         timeout=60).ok
    progress = requests.get(url + "/sdapi/v1/progress", headers=h, timeout=10).json()
    assert progress["progress"] == 0.0 and progress["state"]["job_count"] == 0
    options = requests.get(url + "/sdapi/v1/options", headers=h, timeout=10).json()
    assert "forge_preset" not in options
    body = {"url": url, "auth": f"{USER}:{PASSWORD}", "prompt": "a knight", "negative_prompt": "lowres",
            "sampler_name": "Euler a", "scheduler": "Automatic", "steps": 3, "cfg_scale": 7, "width": 64,
            "height": 64, "restore_faces": False, "enable_hr": False, "hr_upscaler": "Latent", "hr_scale": 2,
            "denoising_strength": 0.7, "hr_second_pass_steps": 0, "seed": -1, "n_iter": 1, "s_churn": 0.0,
            "s_min_uncond": 0.0, "s_noise": 1.0, "s_tmax": None, "s_tmin": 0.0, "clip_skip": 1,
            "override_settings": {"CLIP_stop_at_last_layers": 1, "sd_vae": "Automatic"},
            "override_settings_restore_afterwards": True, "save_images": True, "send_images": True,
            "do_not_save_grid": False, "do_not_save_samples": False}
    r = requests.post(url + "/sdapi/v1/txt2img", json=body, headers=h, timeout=60)
    assert r.ok, r.text
    data = r.json()
    assert png_of(data["images"][0]).size == (64, 64)
    assert json.loads(data["info"])["seed"] >= 0


def test_credentials_on_the_real_server(server):
    url = server.http_url
    for method, path in [("GET", "/sdapi/v1/options"), ("GET", "/sdapi/v1/sd-models"), ("POST", "/sdapi/v1/txt2img"),
                         ("GET", "/sdapi/v1/progress"), ("POST", "/sdapi/v1/interrupt"), ("GET", "/metrics"),
                         ("POST", "/v1/images/generations"), ("GET", "/"), ("GET", "/sdapi/v1/samplers")]:
        for headers in ({}, {"authorization": basic(USER, "wrong")}, {"authorization": "Bearer wrong"}):
            r = requests.request(method, url + path, headers=headers, timeout=10,
                                 **({"json": {}} if method == "POST" else {}))
            assert r.status_code == 401 and "WWW-Authenticate" in r.headers, (method, path)
    assert requests.get(url + "/healthz", timeout=10).status_code == 200
    assert requests.get(url + "/internal/ping", timeout=10).json() == {}
    assert requests.get(url + "/sdapi/v1/cmd-flags", headers=auth_headers("bearer"), timeout=10).json()["api_auth"] \
        == "***"
    with grpc.insecure_channel(server.grpc_target) as channel:
        stub = pb_grpc.TextToImageStub(channel)
        req = pb.GenerateRequest(prompt="p", steps=1, width=64, height=64, seed=1)
        with pytest.raises(grpc.RpcError) as exc:
            stub.Generate(req, timeout=30)
        assert exc.value.code() == grpc.StatusCode.UNAUTHENTICATED
        assert stub.Generate(req, timeout=60, metadata=(("authorization", f"Bearer {TOKEN}"),)).png


def test_options_switch_models_of_a_models_dir(tmp_path_factory):
    """POST /sdapi/v1/options through the server's model catalog (`--models-dir`), as webuiapi and
    SillyTavern switch: the answer comes once the new model serves, and txt2img's info names it."""
    from sdlite.testing.random_model import write_random_model
    models = tmp_path_factory.mktemp("a1111-models")
    write_random_model("tiny", models / "tiny", seed=0)
    write_random_model("tiny-bk", models / "tiny-bk", seed=1)
    with ServerProcess(models / "tiny", "--models-dir", str(models), "--threads", "1", "--grpc-port", "off",
                       "--no-warmup") as s:
        client = webuiapi.WebUIApi(host="127.0.0.1", port=s.http_port)
        titles = client.util_get_model_names()
        assert [t.split(" [")[0] for t in titles] == ["tiny", "tiny-bk"]
        assert client.util_get_current_model().startswith("tiny [")
        client.util_set_model("tiny-bk")
        assert client.util_get_current_model() == titles[1]
        info = client.txt2img(prompt="p", width=64, height=64, steps=2, seed=1).info
        assert info["sd_model_name"] == "tiny-bk" and info["sd_model_hash"] == titles[1].split("[")[1][:-1]
        r = requests.post(s.http_url + "/sdapi/v1/options", json={"sd_model_checkpoint": "nope"}, timeout=30)
        assert r.status_code == 404 and "tiny-bk" in r.json()["detail"]
