"""`sdlite serve --lora-dir --embeddings-dir`: A1111 clients name LoRAs in <lora:NAME:SCALE> prompt tags and
embeddings by name, per request; /sdapi/v1/loras and /embeddings list them."""

import base64
import io
import json
import urllib.error
import urllib.request

import numpy as np
import pytest
import torch

pytest.importorskip("starlette")

from PIL import Image  # noqa: E402
from safetensors.torch import save_file  # noqa: E402

from sdlite.serve.process import ServerProcess  # noqa: E402


@pytest.fixture(scope="module")
def server(tiny_model, tmp_path_factory):
    loras = tmp_path_factory.mktemp("loras")
    g = torch.Generator().manual_seed(0)
    # one kohya LoRA on the first attention's proj_in (a 1x1 conv in the tiny UNet: 32 -> 32), rank 4
    key = "lora_unet_down_blocks_0_attentions_0_proj_in"
    save_file({f"{key}.lora_down.weight": torch.randn(4, 32, 1, 1, generator=g),
               f"{key}.lora_up.weight": torch.randn(32, 4, 1, 1, generator=g),
               f"{key}.alpha": torch.tensor(4.0)}, str(loras / "mylora.safetensors"))
    embeddings = tmp_path_factory.mktemp("embeddings")
    save_file({"emb_params": torch.randn(2, 32, generator=g)}, str(embeddings / "myemb.safetensors"))
    with ServerProcess(tiny_model, "--threads", "1", "--grpc-port", "off", "--lora-dir", str(loras),
                       "--embeddings-dir", str(embeddings)) as s:
        yield s


def call(server, path, body=None):
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(f"http://127.0.0.1:{server.http_port}{path}", data=data,
                                 headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=60) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read() or b"{}")


def image(server, prompt):
    status, r = call(server, "/sdapi/v1/txt2img", {"prompt": prompt, "seed": 3, "steps": 2, "width": 32,
                                                   "height": 32, "sampler_name": "Euler"})
    assert status == 200, r
    return np.asarray(Image.open(io.BytesIO(base64.b64decode(r["images"][0]))))


def test_loras_and_embeddings_are_listed(server):
    status, loras = call(server, "/sdapi/v1/loras")
    assert status == 200 and [x["name"] for x in loras] == ["mylora"]
    status, emb = call(server, "/sdapi/v1/embeddings")
    assert status == 200 and emb["loaded"]["myemb"]["vectors"] == 2 and emb["loaded"]["myemb"]["shape"] == 32


def test_prompt_tags_apply_a_lora_per_request(server):
    plain = image(server, "a red circle")
    with_lora = image(server, "a red circle <lora:mylora:1>")
    assert not np.array_equal(plain, with_lora)
    assert np.array_equal(image(server, "a red circle <lora:mylora:0>"), plain)
    assert np.array_equal(image(server, "a red circle"), plain)  # taken off after the request
    assert not np.array_equal(image(server, "a red circle myemb"), image(server, "a red circle"))
    status, r = call(server, "/sdapi/v1/txt2img", {"prompt": "x <lora:nosuch:1>", "steps": 1, "width": 32,
                                                   "height": 32})
    assert status in (400, 422) and "nosuch" in json.dumps(r)
