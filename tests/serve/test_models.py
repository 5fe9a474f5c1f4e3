"""Several models in one service (`sdlite serve --models-dir`): listing, switching, refusals, concurrency.

In-process: a `ModelCatalog` over a real models folder (two tiny random folders, one single-file
checkpoint, and files that must be skipped) with an `Executor` running real generations. One real
`sdlite serve --models-dir` process for the HTTP routes and the A1111 / PNG model name.
"""

from __future__ import annotations

import base64
import hashlib
import http.client
import io
import json
import logging
import threading
import time

import pytest

pytest.importorskip("prometheus_client")

import torch  # noqa: E402
from PIL import Image  # noqa: E402

from sdlite.errors import ModelFolderError, PlanError  # noqa: E402
from sdlite.pipeline import GenerationRequest  # noqa: E402
from sdlite.serve.breaker import CircuitBreaker  # noqa: E402
from sdlite.serve.execution import INTERNAL, INVALID_ARGUMENT, Executor  # noqa: E402
from sdlite.serve.fields import Defaults  # noqa: E402
from sdlite.serve.metrics import Metrics  # noqa: E402
from sdlite.serve.models import ModelCatalog, ModelSwitchError, model_hash  # noqa: E402
from sdlite.testing.random_model import write_random_model  # noqa: E402
from sdlite.testing.single_file import write_single_file  # noqa: E402
from sdlite.weights.safetensors_mmap import save_safetensors  # noqa: E402

MODELS = ["tiny", "tiny-bk", "tiny-std.safetensors"]


@pytest.fixture(scope="module")
def models_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("catalog")
    d = root / "models"
    d.mkdir()
    write_random_model("tiny", d / "tiny", seed=0)
    write_random_model("tiny-bk", d / "tiny-bk", seed=1)
    std = write_random_model("tiny-std", root / "tiny-std", seed=2)  # runs as a single file without --config
    write_single_file(std, d / "tiny-std.safetensors")
    write_single_file(std, d / "a-vae.safetensors", vae_only=True)
    save_safetensors({"lora_unet_down_blocks_0_attentions_0_proj_in.lora_down.weight": torch.zeros(4, 8),
                      "lora_unet_down_blocks_0_attentions_0_proj_in.lora_up.weight": torch.zeros(8, 4)},
                     d / "a-lora.safetensors")
    (d / "junk.safetensors").write_bytes(b"\x07" * 5000)
    (d / "junk.ckpt").write_bytes(b"PK\x03\x04 not really a zip")
    (d / "notes.txt").write_text("not a model")
    (d / "empty").mkdir()
    return d


def executor_for(catalog):
    pipe = catalog.load_first()
    return Executor(pipe, slots=1, queue_size=4, breaker=CircuitBreaker(0, 1.0), metrics=Metrics(),
                    default_deadline=120.0, max_deadline=120.0).start()


def req(prompt="p", steps=2, size=16, seed=3):
    return GenerationRequest(prompt, steps=steps, width=size, height=size, seed=seed).validate()


def model_of(job) -> str:
    """The "Model: " of the job's PNG parameters."""
    image = Image.open(io.BytesIO(job.outcome()[0].png))
    fields = dict(f.split(": ", 1) for f in image.info["parameters"].splitlines()[-1].split(", "))
    return fields["Model"]


def wait_until(pred, timeout=30.0, what="condition"):
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if pred():
            return
        time.sleep(0.01)
    raise AssertionError(f"timed out waiting for {what}")


# --- listing -------------------------------------------------------------------------------------------

def test_lists_folders_and_checkpoints_and_skips_the_rest(models_dir, caplog):
    with caplog.at_level(logging.DEBUG, logger="sdlite.serve"):
        catalog = ModelCatalog(models_dir)
    models = catalog.list()
    assert [m["filename"] for m in models] == [str(models_dir / n) for n in MODELS]
    assert [m["model_name"] for m in models] == ["tiny", "tiny-bk", "tiny-std"]
    unet = models_dir / "tiny" / "unet" / "diffusion_pytorch_model.safetensors"
    with open(unet, "rb") as f:  # A1111's model hash: sha256 of the 64 KiB at 1 MiB
        f.seek(1 << 20)
        expected = hashlib.sha256(f.read(1 << 16)).hexdigest()[:8]
    assert models[0] == {"title": f"tiny [{expected}]", "model_name": "tiny", "hash": expected,
                         "sha256": None, "filename": str(models_dir / "tiny"), "config": None}
    std = models[2]
    assert std["hash"] == model_hash(models_dir / "tiny-std.safetensors") and len(std["hash"]) == 8
    assert std["title"] == f"tiny-std.safetensors [{std['hash']}]"
    assert len({m["hash"] for m in models}) == 3
    warned = {r.getMessage().split(":")[1].strip(): r.getMessage() for r in caplog.records
              if r.levelno == logging.WARNING}
    assert set(warned) == {"skipping a-lora.safetensors", "skipping a-vae.safetensors",
                           "skipping junk.safetensors", "skipping junk.ckpt"}
    assert [r.levelno for r in caplog.records if "skipping empty:" in r.getMessage()] == [logging.INFO]
    assert "LoRA" in warned["skipping a-lora.safetensors"]
    assert "VAE" in warned["skipping a-vae.safetensors"]
    assert not [r for r in caplog.records if "notes.txt" in r.getMessage() and r.levelno > logging.DEBUG]
    assert catalog.current.name == "tiny"  # no -m: the first listed


def test_first_model_by_name_path_or_outside_path(models_dir, tiny_model):
    assert ModelCatalog(models_dir, "tiny-bk").current.name == "tiny-bk"
    assert ModelCatalog(models_dir, "tiny-std").current.name == "tiny-std.safetensors"
    assert ModelCatalog(models_dir, models_dir / "tiny-bk").current.name == "tiny-bk"
    outside = ModelCatalog(models_dir, tiny_model)  # a path outside the folder is listed first
    assert outside.current.path == tiny_model and outside.list()[0]["filename"] == str(tiny_model)
    assert len(outside.list()) == 4
    with pytest.raises(ModelFolderError, match="nope"):
        ModelCatalog(models_dir, "nope")
    with pytest.raises(ModelFolderError, match="no models"):
        ModelCatalog(models_dir / "empty")
    with pytest.raises(ModelFolderError, match="is a model folder"):
        ModelCatalog(models_dir / "tiny")
    single = ModelCatalog(None, tiny_model)  # without --models-dir: the one model
    assert [m["model_name"] for m in single.list()] == [tiny_model.name]


def test_find_takes_a1111_names(models_dir):
    catalog = ModelCatalog(models_dir)
    std = catalog.entries[2]
    for name in (std.title, "tiny-std.safetensors", "tiny-std", std.hash, "tiny-std.safetensors [0123456789]",
                 str(models_dir / "tiny-std.safetensors")):
        assert catalog.find(name) is std, name
    with pytest.raises(ModelSwitchError) as e:
        catalog.find("tiny-xl")
    assert e.value.not_found and e.value.code == INVALID_ARGUMENT and "tiny-xl" in e.value.message


# --- switching -------------------------------------------------------------------------------------------

def test_switch_then_generate_names_the_new_model_and_defaults_follow(models_dir):
    catalog = ModelCatalog(models_dir)
    ex = executor_for(catalog)
    defaults = Defaults.for_pipeline(ex.pipe)
    catalog.on_switch.append(defaults.follow)
    try:
        job = ex.submit(req("on tiny"))
        job.wait(60)
        assert model_of(job) == "tiny" and defaults.width == 16
        old = ex.pipe
        entry = catalog.switch(ex, "tiny-std")
        assert entry["model_name"] == "tiny-std" and catalog.current.name == "tiny-std.safetensors"
        assert ex.pipe is not old and ex.pipe.folder.name == "tiny-std"
        assert not old.residency.loaded()  # the old model was closed
        assert (defaults.width, defaults.height) == (128, 128)
        job = ex.submit(req("on the file", size=32))
        job.wait(60)
        assert model_of(job) == "tiny-std"
        assert catalog.switch(ex, "tiny-std.safetensors")["model_name"] == "tiny-std"  # already: no-op
    finally:
        ex.drain(1.0)


def test_switch_waits_for_the_running_job_and_queued_jobs_run_on_the_new_model(models_dir):
    catalog = ModelCatalog(models_dir)
    ex = executor_for(catalog)
    started, release = threading.Event(), threading.Event()

    def hold(event):  # the running job stops at its first step until released
        if event.kind == "progress":
            started.set()
            release.wait(30)

    try:
        running = ex.submit(req("old", steps=3), listener=hold)
        assert started.wait(30)
        result = {}
        switcher = threading.Thread(target=lambda: result.update(entry=catalog.switch(ex, "tiny-bk")))
        switcher.start()
        wait_until(lambda: ex._holds == 1, what="the switch to hold the slots")
        queued = ex.submit(req("new"))  # admitted while the switch waits
        time.sleep(0.2)
        assert switcher.is_alive() and ex.pipe.folder.name == "tiny" and not queued.done
        release.set()
        switcher.join(60)
        assert result["entry"]["model_name"] == "tiny-bk"
        assert running.wait(30) and model_of(running) == "tiny"  # finished on the old model
        assert queued.wait(60) and model_of(queued) == "tiny-bk"
    finally:
        release.set()
        ex.drain(1.0)


def test_a_switch_during_a_drain_is_refused_and_changes_nothing(models_dir):
    catalog = ModelCatalog(models_dir)
    ex = executor_for(catalog)
    started, release = threading.Event(), threading.Event()

    def hold(event):
        if event.kind == "progress":
            started.set()
            release.wait(30)

    running = ex.submit(req("old", steps=3), listener=hold)
    assert started.wait(30)
    errors = []

    def switch():
        try:
            catalog.switch(ex, "tiny-bk")
        except ModelSwitchError as exc:
            errors.append(exc)

    switcher = threading.Thread(target=switch)
    switcher.start()
    wait_until(lambda: ex._holds == 1, what="the switch to hold the slots")
    old = ex.pipe
    drainer = threading.Thread(target=ex.drain, args=(0.0,))
    drainer.start()
    wait_until(lambda: ex.draining, what="the drain")
    release.set()
    switcher.join(60)
    drainer.join(60)
    assert running.done and errors and errors[0].code == "unavailable"
    assert ex.pipe is old and old.residency.loaded() and catalog.current.name == "tiny"
    with pytest.raises(ModelSwitchError) as e:  # after the drain: refused at once
        catalog.switch(ex, "tiny-bk")
    assert e.value.code == "unavailable"


def budget_fitting_only(small, large) -> int:
    """A memory budget `small` (at 16x16) fits and `large` (at 128x128) does not."""
    from sdlite.runtime.planner import make_plan
    budget = make_plan(small, None, 16, 16).peak() + (2 << 20)  # (the planner's estimates are deterministic)
    make_plan(small, budget, 16, 16)
    with pytest.raises(PlanError):
        make_plan(large, budget, 128, 128)
    return budget


def test_a_model_that_does_not_fit_is_refused_and_the_old_one_serves(models_dir):
    budget = budget_fitting_only(models_dir / "tiny", models_dir / "tiny-std.safetensors")
    catalog = ModelCatalog(models_dir, "tiny", {"memory_budget": budget, "threads": 1})
    ex = executor_for(catalog)
    try:
        old = ex.pipe
        loaded = old.residency.loaded()
        with pytest.raises(ModelSwitchError) as e:
            catalog.switch(ex, "tiny-std")
        assert e.value.code == INVALID_ARGUMENT and e.value.field == "model"
        assert "does not fit" in e.value.message and "--memory-budget" in e.value.message
        assert ex.pipe is old and old.residency.loaded() == loaded  # refused before anything was touched
        assert catalog.current.name == "tiny"
        job = ex.submit(req("still tiny"))
        job.wait(60)
        assert model_of(job) == "tiny"
    finally:
        ex.drain(1.0)


def test_a_load_that_fails_after_the_old_model_closed_reloads_the_old_one(models_dir, monkeypatch):
    budget = budget_fitting_only(models_dir / "tiny", models_dir / "tiny-std.safetensors")
    catalog = ModelCatalog(models_dir, "tiny", {"memory_budget": budget, "threads": 1})
    ex = executor_for(catalog)
    monkeypatch.setattr(catalog, "check_fits", lambda entry: None)  # the plan fails inside Pipeline.load
    try:
        old = ex.pipe
        with pytest.raises(ModelSwitchError) as e:
            catalog.switch(ex, "tiny-std")
        assert e.value.code == INVALID_ARGUMENT and "does not fit" in e.value.message
        assert "still serves" in e.value.message
        assert ex.pipe is not old and ex.pipe.folder.name == "tiny" and catalog.current.name == "tiny"

        def broken(entry):
            if entry.name == "tiny-bk":
                raise OSError("disk gone")
            return type(catalog).load(catalog, entry)
        monkeypatch.setattr(catalog, "load", broken)
        with pytest.raises(ModelSwitchError) as e:
            catalog.switch(ex, "tiny-bk")
        assert e.value.code == INTERNAL and "disk gone" in e.value.message
        job = ex.submit(req("still tiny"))
        job.wait(60)
        assert model_of(job) == "tiny"
    finally:
        ex.drain(1.0)


def test_concurrent_switches_are_serialized(models_dir, monkeypatch):
    catalog = ModelCatalog(models_dir)
    ex = executor_for(catalog)
    events, lock = [], threading.Lock()
    real_load = catalog.load

    def load(entry):
        with lock:
            events.append(("start", entry.name, sum(1 for p in pipes if p.residency.loaded())))
        time.sleep(0.1)
        pipe = real_load(entry)
        pipes.append(pipe)
        with lock:
            events.append(("end", entry.name))
        return pipe

    pipes = [ex.pipe]
    monkeypatch.setattr(catalog, "load", load)
    errors = []

    def switch(name):
        try:
            catalog.switch(ex, name)
        except Exception as exc:  # pragma: no cover - reported below
            errors.append(exc)

    try:
        threads = [threading.Thread(target=switch, args=(n,)) for n in ("tiny-bk", "tiny-std", "tiny")]
        for t in threads:
            t.start()
        jobs = [ex.submit(req(f"during {i}")) for i in range(3)]
        for t in threads:
            t.join(120)
        assert not errors
        kinds = [e[0] for e in events]
        assert kinds == ["start", "end"] * 3  # one load at a time
        assert all(e[2] == 0 for e in events if e[0] == "start")  # the old model closed before each load
        assert ex.pipe.folder.name == catalog.current.model_name
        for job in jobs:
            assert job.wait(60) and job.error is None
    finally:
        ex.drain(1.0)


# --- the service ----------------------------------------------------------------------------------------

def call(port, method, path, body=None, timeout=120.0):
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        data = None if body is None else (body if isinstance(body, bytes) else json.dumps(body).encode())
        conn.request(method, path, body=data, headers={"Content-Type": "application/json"})
        r = conn.getresponse()
        raw = r.read()
        return r.status, json.loads(raw) if raw else None
    finally:
        conn.close()


def test_serve_models_dir_lists_and_switches_over_http(models_dir):
    pytest.importorskip("grpc")
    pytest.importorskip("starlette")
    pytest.importorskip("uvicorn")
    from sdlite.serve.process import ServerProcess

    with ServerProcess("tiny-bk", "--models-dir", str(models_dir), "--threads", "1", "--no-warmup") as s:
        assert "3 model(s) to switch between" in s.log()
        port = s.http_port
        status, answer = call(port, "GET", "/v1/models")
        assert status == 200 and [m["model_name"] for m in answer["models"]] == ["tiny", "tiny-bk", "tiny-std"]
        assert answer["current"] == answer["models"][1]["title"]

        status, answer = call(port, "POST", "/v1/models/current", {"model": "tiny"})
        assert status == 200, answer
        assert answer["current"] == answer["models"][0]["title"]
        body = {"prompt": "a red circle", "steps": 2, "seed": 4}
        status, r = call(port, "POST", "/sdapi/v1/txt2img", body)
        assert status == 200, r
        image = Image.open(io.BytesIO(base64.b64decode(r["images"][0])))
        assert "Model: tiny," in image.info["parameters"] and image.size == (16, 16)
        assert json.loads(r["info"])["sd_model_name"] == "tiny"

        std = answer["models"][2]["title"]
        status, answer = call(port, "POST", "/v1/models/current", {"model": std})
        assert status == 200 and answer["current"] == std
        status, r = call(port, "POST", "/sdapi/v1/txt2img", dict(body, steps=1))
        assert status == 200, r
        image = Image.open(io.BytesIO(base64.b64decode(r["images"][0])))
        assert "Model: tiny-std," in image.info["parameters"]
        assert image.size == (128, 128)  # the default size follows the model
        assert json.loads(r["info"])["sd_model_name"] == "tiny-std"

        status, answer = call(port, "POST", "/v1/models/current", {"model": "tiny-xl"})
        assert status == 404 and answer["error"] == INVALID_ARGUMENT and "tiny-xl" in answer["detail"]
        status, answer = call(port, "POST", "/v1/models/current", {"name": "tiny"})
        assert status == 400 and answer["field"] == "model"
        status, answer = call(port, "POST", "/v1/models/current", b"not json")
        assert status == 400 and answer["field"] == "body"
        assert "switching model" in s.log()
