"""img2img over the services: A1111 POST /sdapi/v1/img2img and OpenAI POST /v1/images/edits (multipart), on
the tiny random-weight model; variation seeds, eta and batches as A1111 numbers them."""

from __future__ import annotations

import base64
import io
import json

import numpy as np
import pytest

pytest.importorskip("starlette")
pytest.importorskip("multipart")  # python-multipart: Starlette's form parsing
requests = pytest.importorskip("requests")
webuiapi = pytest.importorskip("webuiapi")

from PIL import Image, ImageDraw  # noqa: E402

from sdlite.pipeline import GenerationRequest, Pipeline  # noqa: E402
from sdlite.serve.breaker import CircuitBreaker  # noqa: E402
from sdlite.serve.config import Limits  # noqa: E402
from sdlite.serve.execution import Executor, batch_request  # noqa: E402
from sdlite.serve.fields import Defaults  # noqa: E402
from sdlite.serve.http_server import HttpFrontEnd  # noqa: E402
from sdlite.serve.metrics import Metrics  # noqa: E402

S = 32


def png_bytes(image: Image.Image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, "PNG")
    return buf.getvalue()


def init_image():
    img = Image.new("RGB", (S, S), (30, 60, 200))
    ImageDraw.Draw(img).ellipse((8, 8, 24, 24), fill=(220, 30, 30))
    return img


def mask_image():
    m = Image.new("L", (S, S), 0)
    ImageDraw.Draw(m).rectangle((16, 0, 31, 15), fill=255)
    return m


def decode(b64: str) -> Image.Image:
    image = Image.open(io.BytesIO(base64.b64decode(b64)))
    image.load()
    return image


class Recording:
    """The real pipeline, recording the requests it runs."""

    def __init__(self, pipe):
        self.pipe, self.requests = pipe, []

    def __getattr__(self, name):
        return getattr(self.pipe, name)

    def run(self, request, **kw):
        self.requests.append(request)
        return self.pipe.run(request, **kw)


@pytest.fixture(scope="module")
def real_pipe(tiny_model):
    return Pipeline.load(tiny_model)


@pytest.fixture
def fe(real_pipe):
    pipe = Recording(real_pipe)
    ex = Executor(pipe, slots=1, queue_size=2, breaker=CircuitBreaker(3, 60.0), metrics=Metrics(),
                  default_deadline=60.0, max_deadline=60.0).start()
    front = HttpFrontEnd(ex, Limits(), Defaults(width=S, height=S, text_layers=2), ex.metrics, "tiny",
                         "127.0.0.1", 0)
    front.start()
    front.url, front.pipe = f"http://127.0.0.1:{front.port}", pipe
    yield front
    front.stop()
    ex.drain(0.0, stop_wait=5.0)


def a1111_img2img(fe, **extra):
    body = {"prompt": "a circle", "steps": 4, "width": S, "height": S, "seed": 7, "sampler_name": "Euler",
            "init_images": [base64.b64encode(png_bytes(init_image())).decode()], "denoising_strength": 0.5,
            **extra}
    return requests.post(fe.url + "/sdapi/v1/img2img", json=body, timeout=60)


def test_a1111_img2img_is_the_pipelines_img2img(fe, real_pipe):
    r = a1111_img2img(fe)
    assert r.status_code == 200, r.text
    got = r.json()
    info = json.loads(got["info"])
    assert info["denoising_strength"] == 0.5 and info["all_seeds"] == [7]
    assert got["parameters"]["init_images"] is None  # as A1111 without include_init_images
    want = real_pipe.run(GenerationRequest("a circle", steps=4, seed=7, width=S, height=S, sampler="euler",
                                           init_image=init_image(), denoising_strength=0.5))
    assert (np.asarray(decode(got["images"][0])) == np.asarray(want.image)).all()
    assert "Denoising strength: 0.5" in info["infotexts"][0]


def test_a1111_img2img_inpaints_with_a_mask(fe):
    mask = base64.b64encode(png_bytes(mask_image())).decode()
    r = a1111_img2img(fe, mask=mask, denoising_strength=1.0, mask_blur=4, inpainting_fill=1)
    assert r.status_code == 200, r.text
    assert fe.pipe.requests[-1].mask is not None


@pytest.mark.parametrize("patch, field", [
    ({"init_images": []}, "init_images"),
    ({"init_images": ["not base64!"]}, "init_images"),
    ({"init_images": [base64.b64encode(b"no image").decode()]}, "init_images"),
    ({"denoising_strength": 0}, "denoising_strength"),
    ({"resize_mode": 1}, "resize_mode"),
])
def test_a1111_img2img_bad_fields_are_422(fe, patch, field):
    r = a1111_img2img(fe, **patch)
    assert r.status_code == 422 and r.json()["field"] == field, r.text


def test_webuiapi_img2img_defaults_just_work(fe):
    client = webuiapi.WebUIApi(host="127.0.0.1", port=fe.port, steps=3)
    result = client.img2img(images=[init_image()], prompt="a circle", seed=3, width=S, height=S,
                            denoising_strength=0.6, batch_size=2)
    assert len(result.images) == 2 and result.info["all_seeds"] == [3, 4]
    assert [r.denoising_strength for r in fe.pipe.requests] == [0.6, 0.6]


def test_variation_seeds_and_batches_as_a1111(fe):
    body = {"prompt": "x", "steps": 3, "width": S, "height": S, "seed": 11, "subseed": 20,
            "subseed_strength": 0.3, "batch_size": 2, "n_iter": 1, "sampler_name": "Euler"}
    r = requests.post(fe.url + "/sdapi/v1/txt2img", json=body, timeout=60)
    assert r.status_code == 200, r.text
    info = json.loads(r.json()["info"])
    assert info["all_seeds"] == [11, 11] and info["all_subseeds"] == [20, 21] and info["subseed_strength"] == 0.3
    assert "Variation seed: 20, Variation seed strength: 0.3" in info["infotexts"][0]
    a, b = (np.asarray(decode(x)) for x in r.json()["images"])
    assert not (a == b).all()


def test_batch_request_numbering():
    req = GenerationRequest("x", seed=5, subseed=9)
    assert [batch_request(req, i).seed for i in range(3)] == [5, 6, 7]
    var = GenerationRequest("x", seed=5, subseed=9, subseed_strength=0.5)
    assert [(batch_request(var, i).seed, batch_request(var, i).subseed) for i in range(3)] == [(5, 9), (5, 10),
                                                                                                 (5, 11)]


def test_ddim_eta_is_honoured(fe):
    body = {"prompt": "x", "steps": 3, "width": S, "height": S, "seed": 1, "sampler_name": "DDIM"}
    r0 = requests.post(fe.url + "/sdapi/v1/txt2img", json={**body, "eta": 0.0}, timeout=60)
    r1 = requests.post(fe.url + "/sdapi/v1/txt2img", json={**body, "eta": 1.0}, timeout=60)
    assert r0.status_code == r1.status_code == 200, r1.text
    assert [r.eta for r in fe.pipe.requests] == [0.0, 1.0]
    assert r0.json()["images"][0] != r1.json()["images"][0]


def test_openai_edits_multipart(fe):
    files = {"image": ("in.png", png_bytes(init_image()), "image/png")}
    r = requests.post(fe.url + "/v1/images/edits", files=files,
                      data={"prompt": "a circle", "n": "2", "size": f"{S}x{S}", "steps": "3", "seed": "4"},
                      timeout=60)
    assert r.status_code == 200, r.text
    assert len(r.json()["data"]) == 2 and r.json()["size"] == f"{S}x{S}"
    req = fe.pipe.requests[-1]
    assert req.init_image is not None and req.mask is None and req.denoising_strength == 0.75


def test_openai_edits_transparent_mask_is_repainted(fe):
    rgba = Image.new("RGBA", (S, S), (0, 0, 0, 255))
    ImageDraw.Draw(rgba).rectangle((0, 0, 15, 31), fill=(0, 0, 0, 0))
    files = {"image": ("in.png", png_bytes(init_image()), "image/png"),
             "mask": ("mask.png", png_bytes(rgba), "image/png")}
    r = requests.post(fe.url + "/v1/images/edits", files=files, data={"prompt": "p", "steps": "3"}, timeout=60)
    assert r.status_code == 200, r.text
    mask = np.asarray(fe.pipe.requests[-1].mask)
    assert mask[:, :16].min() == 255 and mask[:, 16:].max() == 0


def test_openai_edits_needs_an_image(fe):
    r = requests.post(fe.url + "/v1/images/edits", files={"prompt": (None, "p")}, timeout=60)
    assert r.status_code == 400 and r.json()["error"]["param"] == "image", r.text
    r = requests.post(fe.url + "/v1/images/edits", json={"prompt": "p"}, timeout=60)
    assert r.status_code == 400, r.text
