"""The web page at `/` and its job API (`serve.jobs`).

(a) In-process: the HTTP front end (uvicorn in a thread) over a scripted pipeline: the job routes, the
    server-sent event framing, reconnects, cancel, caps, retention, and refusals that match txt2img's.
(b) A real browser: headless Chromium driven by selenium against a real `sdlite serve` on the tiny random
    model: generate with live progress, download the PNG, cancel a long job, a bad size, an unreachable
    server. Skipped only when chromium / chromedriver are not installed (`.ci/run` installs them).
"""

from __future__ import annotations

import base64
import http.client
import io
import json
import os
import re
import shutil
import threading
import time
import urllib.request
from pathlib import Path

import pytest

pytest.importorskip("prometheus_client")
pytest.importorskip("starlette")

import torch  # noqa: E402
from PIL import Image  # noqa: E402

from sdlite.errors import Cancelled, PlanError  # noqa: E402
from sdlite.pipeline import GenerationResult, StageTiming  # noqa: E402
from sdlite.serve import jobs as jobs_module  # noqa: E402
from sdlite.serve.breaker import CircuitBreaker  # noqa: E402
from sdlite.serve.config import Limits  # noqa: E402
from sdlite.serve.execution import Executor  # noqa: E402
from sdlite.serve.fields import Defaults  # noqa: E402
from sdlite.serve.http_server import HttpFrontEnd  # noqa: E402
from sdlite.serve.metrics import Metrics  # noqa: E402

PAGE_DIR = Path(jobs_module.__file__).parent / "page"
JOB = {"prompt": "a red circle", "negative_prompt": "blurry", "steps": 4, "cfg_scale": 5, "seed": 7,
       "width": 64, "height": 64, "sampler_name": "Euler a"}


# --- (a) in-process --------------------------------------------------------------------------------------

class ScriptedPipe:
    """Each step waits for `gate` (set: free running) and `step_s`, hands latents to on_latents, counts."""

    def __init__(self, step_s: float = 0.005):
        self.max_side = 1024  # plan_for: larger sizes do not fit the memory budget
        self.gate = threading.Event()
        self.gate.set()
        self.step_s = step_s
        self.steps_run = 0

    def run(self, request, progress=None, cancel=None, on_latents=None):
        for i in range(request.steps):
            self.gate.wait(10)
            time.sleep(self.step_s)
            self.steps_run += 1
            if on_latents:
                on_latents(i + 1, request.steps, torch.full((1, 4, request.height // 8, request.width // 8),
                                                            i / request.steps))
            if progress:
                progress(i + 1, request.steps)
            if cancel and cancel():
                raise Cancelled("stop")
        image = Image.new("RGB", (request.width, request.height), (200, 30, 30))
        return GenerationResult(image, request, f"{request.prompt}\nSteps: {request.steps}, Seed: {request.seed}",
                                [StageTiming("encode", 0.01)])

    def plan_for(self, width, height):
        if max(width, height) > self.max_side:
            raise PlanError(f"{width}x{height} needs more memory than the budget")


@pytest.fixture
def pipe():
    return ScriptedPipe()


@pytest.fixture
def fe(pipe):
    executor = Executor(pipe, slots=1, queue_size=1, breaker=CircuitBreaker(0, 1.0), metrics=Metrics(),
                        default_deadline=30.0, max_deadline=60.0).start()
    front = HttpFrontEnd(executor, Limits(), Defaults(width=64, height=64, text_layers=2), executor.metrics,
                         "scripted", "127.0.0.1", 0)
    front.start()
    yield front
    pipe.gate.set()
    executor.drain(0.0, stop_wait=5.0)
    front.stop()


def call(fe, method: str, path: str, body=None, headers=None):
    conn = http.client.HTTPConnection("127.0.0.1", fe.port, timeout=10)
    try:
        data = None if body is None else json.dumps(body).encode()
        conn.request(method, path, body=data, headers=headers or {"Content-Type": "application/json"})
        r = conn.getresponse()
        raw = r.read()
        is_json = r.getheader("Content-Type", "").startswith("application/json")
        return r.status, {k.lower(): v for k, v in r.getheaders()}, json.loads(raw) if is_json else raw
    finally:
        conn.close()


class Stream:
    """An open event stream: `next()` -> (event, data) for the next event, ("comment", text) for a comment;
    None at the end of the stream."""

    def __init__(self, fe, path: str):
        self.conn = http.client.HTTPConnection("127.0.0.1", fe.port, timeout=10)
        self.conn.request("GET", path, headers={"Accept": "text/event-stream"})
        self.response = self.conn.getresponse()
        self.status = self.response.status
        self.retry = None

    def next(self):
        fields: dict = {}
        while True:
            line = self.response.readline()
            if not line:
                return None
            line = line.decode().rstrip("\n")
            if line == "":
                if "event" in fields:
                    return fields["event"], json.loads(fields["data"])
                continue
            if line.startswith(":"):
                return "comment", line[1:].strip()
            key, _, value = line.partition(": ")
            assert key in ("event", "data", "retry"), line
            if key == "retry":
                self.retry = int(value)
            fields[key] = value

    def until(self, kind: str):
        seen = []
        while True:
            item = self.next()
            assert item is not None, f"stream ended before {kind}: {seen}"
            seen.append(item)
            if item[0] == kind:
                return item[1], seen

    def close(self):
        self.conn.close()


def submit(fe, **fields) -> dict:
    status, headers, r = call(fe, "POST", "/v1/jobs", dict(JOB, **fields))
    assert status == 202, r
    assert r["events"] == f"/v1/jobs/{r['id']}/events" and headers["location"] == f"/v1/jobs/{r['id']}"
    return r


def wait_until(predicate, timeout: float = 10.0):
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if predicate():
            return
        time.sleep(0.01)
    raise AssertionError("timed out")


def png_parameters(data: bytes) -> str:
    image = Image.open(io.BytesIO(data))
    assert image.format == "PNG"
    return image.info["parameters"]


def test_the_page_is_small_offline_and_served_with_its_assets(fe):
    status, headers, html = call(fe, "GET", "/")
    assert status == 200 and headers["content-type"].startswith("text/html")
    assert "default-src 'self'" in headers["content-security-policy"]
    text = html.decode()
    assert '<meta name="viewport"' in text and 'src="/page/app.js"' in text and 'href="/page/style.css"' in text
    for name, ctype in (("app.js", "text/javascript"), ("style.css", "text/css")):
        status, headers, body = call(fe, "GET", f"/page/{name}")
        assert status == 200 and headers["content-type"].startswith(ctype)
        assert body == (PAGE_DIR / name).read_bytes()
    assert call(fe, "GET", "/page/secret.txt")[0] == 404
    assert call(fe, "GET", "/page/..%2Fjobs.py")[0] == 404
    files = sorted(PAGE_DIR.iterdir())
    assert [f.name for f in files] == ["app.js", "index.html", "style.css"]
    assert sum(f.stat().st_size for f in files) < 40_000  # small enough for a Pi on a slow link
    for f in files:  # nothing fetched from elsewhere: the page works offline
        assert not re.search(r"(https?:)?//[a-z0-9.-]+\.[a-z]{2,}", f.read_text()), f.name
    # every input has a label
    ids = set(re.findall(r'<(?:input|select|textarea)[^>]* id="([^"]+)"', text))
    labelled = set(re.findall(r'<label for="([^"]+)"', text))
    assert ids and ids <= labelled, ids - labelled


def test_config_gives_the_form_its_choices(fe):
    status, _, c = call(fe, "GET", "/v1/page/config")
    assert status == 200
    assert (c["model"], c["width"], c["height"], c["steps"], c["cfg_scale"]) == ("scripted", 64, 64, 20, 7.5)
    assert c["sizes"] == ["64x64", "64x96", "96x64"]
    assert c["sampler"] == "DPM++ 2M" and "Euler a" in c["samplers"]
    assert jobs_module.size_presets(512, 512, Limits()) == ["512x512", "512x768", "768x512"]
    assert jobs_module.size_presets(768, 768, Limits()) == ["768x768"]  # 1152 is past the 1024 cap


def test_a_job_streams_progress_with_previews_then_its_png(fe, pipe):
    pipe.step_s = 0.05
    job = submit(fe, steps=12)
    stream = Stream(fe, job["events"])
    assert stream.status == 200
    assert stream.response.getheader("Content-Type").startswith("text/event-stream")
    done, seen = stream.until("done")
    assert stream.retry == jobs_module.RETRY_MS
    assert stream.next() is None  # the stream ends after `done`
    stream.close()
    kinds = [k for k, _ in seen]
    assert set(kinds) <= {"queued", "progress", "done"} and kinds.count("progress") >= 2, kinds
    progress = [d for k, d in seen if k == "progress"]
    steps = [p["step"] for p in progress]
    assert steps == sorted(steps) and len(set(steps)) == len(steps) and steps[-1] <= 12
    assert len(progress) <= 12 * 0.05 / jobs_module.PROGRESS_INTERVAL + 2  # rate-limited, not one per step
    for p in progress:
        assert p["total"] == 12 and p["image_index"] == 0 and p["elapsed"] >= 0
        assert p["eta"] is None if p["step"] == 0 else p["eta"] >= 0
        if p["step"]:
            assert p["preview"].startswith("data:image/png;base64,")
            preview = Image.open(io.BytesIO(base64.b64decode(p["preview"].split(",", 1)[1])))
            assert preview.size == (8, 8)  # one pixel per latent
    [image] = done["images"]
    assert image["url"] == f"/v1/jobs/{job['id']}/images/0.png"
    assert (image["seed"], image["width"], image["height"]) == (7, 64, 64)
    status, headers, png = call(fe, "GET", image["url"])
    assert status == 200 and headers["content-type"] == "image/png"
    assert png_parameters(png) == image["parameters"] == "a red circle\nSteps: 12, Seed: 7"
    assert call(fe, "GET", f"/v1/jobs/{job['id']}/images/1.png")[0] == 404
    # a client that comes back gets the outcome at once
    again = Stream(fe, job["events"])
    assert again.until("done")[0] == done and again.next() is None
    again.close()
    _, _, metrics = call(fe, "GET", "/metrics")
    assert b'sdlite_requests_total{api="page",outcome="ok"} 1.0' in metrics


def test_refusals_match_txt2img(fe, pipe):
    for bad in ({"width": 100}, {"steps": 0}, {"sampler_name": "nope"}, {"cfg_scale": "x"},
                {"prompt": 5}, {"batch_size": 99}):
        body = dict(JOB, **bad)
        status, _, r = call(fe, "POST", "/v1/jobs", body)
        assert (status, r) == call(fe, "POST", "/sdapi/v1/txt2img", body)[::2], bad
        assert status == 422 and r["field"] in bad
    pipe.max_side = 64  # out of budget: 422 naming width, before the job is admitted
    body = dict(JOB, width=128)
    status, _, r = call(fe, "POST", "/v1/jobs", body)
    assert (status, r) == call(fe, "POST", "/sdapi/v1/txt2img", body)[::2]
    assert status == 422 and r["field"] == "width" and "budget" in r["detail"][0]["msg"]
    status, _, r = call(fe, "POST", "/v1/jobs", None, {"Content-Length": "0"})
    assert status == 422 and r["field"] == "body"
    status, _, r = call(fe, "POST", "/v1/jobs", JOB, {"Content-Type": "application/json",
                                                      "X-Request-Timeout": "-1"})
    assert status == 422 and r["field"] == "X-Request-Timeout"
    # queue full: 429 with Retry-After, as txt2img answers
    pipe.gate.clear()
    submit(fe), submit(fe)  # one running, one waiting: slots + queue
    status, headers, r = call(fe, "POST", "/v1/jobs", JOB)
    assert status == 429 and r["error"] == "resource_exhausted" and headers["retry-after"] == "1"
    # unknown jobs
    for method, path in (("GET", "/v1/jobs/nope/events"), ("GET", "/v1/jobs/nope/images/0.png"),
                         ("DELETE", "/v1/jobs/nope")):
        status, _, r = call(fe, method, path)
        assert status == 404 and r["error"] == "not_found", path


def test_disconnecting_does_not_cancel_and_delete_does(fe, pipe):
    pipe.gate.clear()
    job = submit(fe, steps=50)
    wait_until(lambda: fe.app.state.api.executor.jobs()[0])
    pipe.gate.set()  # a few steps, then the pipe waits at the gate
    wait_until(lambda: pipe.steps_run >= 3)
    pipe.gate.clear()
    stream = Stream(fe, job["events"])
    first, _ = stream.until("progress")
    stream.close()  # the client leaves
    time.sleep(0.3)
    [running], _ = fe.app.state.api.executor.jobs()
    assert running.id == job["id"] and not running.done
    pipe.gate.set()
    wait_until(lambda: pipe.steps_run >= 8)
    pipe.gate.clear()
    again = Stream(fe, job["events"])  # the current state first
    now, _ = again.until("progress")
    assert now["step"] >= 8 > first["step"] and now["preview"]
    status, _, r = call(fe, "DELETE", f"/v1/jobs/{job['id']}")
    assert status == 202 and r == {"id": job["id"], "state": "cancelled"}
    error, _ = again.until("error")
    assert error == {"status": 499, "code": "cancelled", "message": "cancelled by the client", "field": None}
    assert again.next() is None
    again.close()
    stopped_at = pipe.steps_run
    pipe.gate.set()
    wait_until(lambda: not any(fe.app.state.api.executor.jobs()))
    assert pipe.steps_run <= stopped_at + 1  # it stopped at its next step
    assert call(fe, "DELETE", f"/v1/jobs/{job['id']}")[2]["state"] == "cancelled"
    assert call(fe, "GET", f"/v1/jobs/{job['id']}/images/0.png")[0] == 404


def test_a_queued_job_reports_its_position_and_heartbeats(fe, pipe, monkeypatch):
    monkeypatch.setattr(jobs_module, "HEARTBEAT", 0.2)
    monkeypatch.setattr(jobs_module, "QUEUE_POLL", 0.05)
    pipe.gate.clear()
    first = submit(fe, steps=2)
    second = submit(fe, steps=2)
    stream = Stream(fe, second["events"])
    assert stream.next() == ("queued", {"position": 1})
    assert stream.next() == ("comment", "ping")
    status, _, r = call(fe, "GET", f"/v1/jobs/{second['id']}/images/0.png")
    assert status == 409 and r["error"] == "not_ready"
    call(fe, "DELETE", f"/v1/jobs/{first['id']}")  # the queue moves
    pipe.gate.set()
    done, seen = stream.until("done")
    assert ("queued", {"position": 0}) in seen or seen[0][0] == "progress", seen
    assert done["images"][0]["seed"] == 7
    stream.close()


def test_streams_are_capped_and_finished_jobs_expire(fe, pipe, monkeypatch):
    monkeypatch.setattr(jobs_module, "MAX_STREAMS", 1)
    pipe.gate.clear()
    job = submit(fe)
    stream = Stream(fe, job["events"])
    stream.next()
    status, headers, r = call(fe, "GET", job["events"])
    assert status == 503 and headers["retry-after"] == "1"
    stream.close()
    pipe.gate.set()
    wait_until(lambda: fe.app.state.api.page_jobs.streams == 0)
    monkeypatch.setattr(jobs_module, "KEEP_JOBS", 2)
    ids = [job["id"]]
    for _ in range(2):
        wait_until(lambda: not any(fe.app.state.api.executor.jobs()))
        ids.append(submit(fe)["id"])
    wait_until(lambda: not any(fe.app.state.api.executor.jobs()))
    wait_until(lambda: all(t.finished_at for t in fe.app.state.api.page_jobs.jobs.values()))
    assert call(fe, "GET", f"/v1/jobs/{ids[0]}/images/0.png")[0] == 404  # the oldest is gone
    assert call(fe, "GET", f"/v1/jobs/{ids[2]}/images/0.png")[0] == 200
    monkeypatch.setattr(jobs_module, "KEEP_SECONDS", 0.0)
    assert call(fe, "GET", f"/v1/jobs/{ids[2]}/images/0.png")[0] == 404


# --- (b) a real browser --------------------------------------------------------------------------------

def _browser() -> tuple[str, str] | None:
    chromium = next((p for p in map(shutil.which, ("chromium", "chromium-browser", "google-chrome")) if p), None)
    driver = shutil.which("chromedriver") or next(
        (p for p in ("/usr/bin/chromedriver", "/usr/lib/chromium/chromedriver") if os.path.exists(p)), None)
    return (chromium, driver) if chromium and driver else None


@pytest.fixture(scope="module")
def browser():
    found = _browser()
    if found is None:
        pytest.skip("chromium and chromedriver are not installed "
                    "(apt-get install chromium chromium-driver; .ci/run does)")
    webdriver = pytest.importorskip("selenium.webdriver", reason="selenium is not installed (the test extra)")
    from selenium.webdriver.chrome.service import Service
    os.environ.setdefault("SE_OFFLINE", "true")  # never let Selenium Manager look for a driver online
    options = webdriver.ChromeOptions()
    options.binary_location = found[0]
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                "--window-size=420,1400", "--disable-extensions", "--no-first-run"):
        options.add_argument(arg)
    driver = webdriver.Chrome(options=options, service=Service(executable_path=found[1]))
    driver.set_page_load_timeout(30)
    yield driver
    driver.quit()


@pytest.fixture(scope="module")
def live(tiny_model):
    from sdlite.serve.process import ServerProcess
    with ServerProcess(tiny_model, "--threads", "1", "--max-steps", "1000", "--queue-size", "1",
                       "--grpc-port", "0") as server:
        yield server


def _ui(driver):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import Select, WebDriverWait

    class UI:
        def el(self, id_):
            return driver.find_element(By.ID, id_)

        def text(self, id_):
            return self.el(id_).text

        def type(self, id_, value):
            self.el(id_).clear()
            self.el(id_).send_keys(str(value))

        def select(self, id_, value):
            Select(self.el(id_)).select_by_value(value)

        def wait(self, predicate, timeout=30.0, what="condition"):
            return WebDriverWait(driver, timeout, poll_frequency=0.02).until(lambda d: predicate(), what)

    return UI()


def _open(driver, live):
    driver.get(live.http_url + "/")
    ui = _ui(driver)
    ui.wait(lambda: driver.execute_script("return document.body.dataset.ready === '1'"), what="page ready")
    return ui


def test_browser_generates_with_live_progress_and_downloads_the_png(browser, live, tmp_path):
    ui = _open(browser, live)
    assert browser.title == "sdlite"
    sizes = [o.get_attribute("value") for o in ui.el("size").find_elements("tag name", "option")]
    assert sizes == ["16x16", "16x24", "24x16", "custom"]  # the tiny model's native size, then custom
    assert ui.el("model-field").get_attribute("hidden") is not None or len(
        ui.el("model").find_elements("tag name", "option")) > 1
    browser.save_screenshot(str(tmp_path / "1-page.png"))
    ui.type("prompt", "a red circle")
    ui.type("negative", "blurry")
    ui.type("steps", 120)
    ui.select("sampler", "Euler")
    ui.select("seed-mode", "fixed")
    ui.type("seed", 1234)
    ui.el("generate").click()
    texts, previews = [], 0
    end = time.monotonic() + 60
    while ui.el("download").get_attribute("hidden") is not None:
        assert time.monotonic() < end, f"no result; status {texts[-3:]} message {ui.text('message')!r}"
        status = ui.text("status")
        if status.startswith("Step") and (not texts or texts[-1] != status):
            texts.append(status)
            if len(texts) == 2:
                browser.save_screenshot(str(tmp_path / "2-progress.png"))
        previews += (ui.el("image").get_attribute("src") or "").startswith("data:image/png")
        time.sleep(0.02)
    browser.save_screenshot(str(tmp_path / "3-result.png"))
    assert ui.text("message") == ""
    steps = [int(re.match(r"Step (\d+) of 120", t).group(1)) for t in texts]
    assert len(steps) >= 2 and steps == sorted(steps) and steps[-1] > steps[0], texts  # the text moved
    assert any("left" in t for t in texts), texts  # an ETA
    assert previews, "no preview image was shown"
    assert ui.text("status").startswith("Done in")
    href = ui.el("download").get_attribute("href")
    assert ui.el("download").get_attribute("download") == "sdlite-1234.png"
    with urllib.request.urlopen(href, timeout=10) as r:
        assert r.headers["Content-Type"] == "image/png"
        parameters = png_parameters(r.read())
    assert parameters.startswith("a red circle\nNegative prompt: blurry\nSteps: 120, Sampler: Euler, ")
    assert "Seed: 1234" in parameters and ui.text("parameters") == parameters
    ui.wait(lambda: len(browser.find_elements("css selector", "#gallery button")) == 1, 10, "a thumbnail")
    thumb = browser.find_element("css selector", "#gallery img").get_attribute("src")
    assert thumb.startswith("data:image/jpeg")
    # reuse last seed, and the gallery keeps both images, newest first; a thumbnail shows its image
    ui.select("seed-mode", "last")
    assert ui.el("seed").get_attribute("value") == "1234"
    ui.type("steps", 2)
    ui.type("prompt", "a blue square")
    ui.el("generate").click()
    ui.wait(lambda: len(browser.find_elements("css selector", "#gallery button")) == 2, 30, "two thumbnails")
    assert "a blue square" in ui.text("parameters") and "Seed: 1234" in ui.text("parameters")
    browser.find_elements("css selector", "#gallery button")[1].click()
    assert ui.text("parameters") == parameters
    browser.save_screenshot(str(tmp_path / "4-gallery.png"))
    size = browser.get_window_size()
    browser.set_window_size(1200, 900)  # the wide layout: form and result side by side
    try:
        assert ui.el("result").location["x"] > ui.el("form").location["x"] + 200
        browser.save_screenshot(str(tmp_path / "8-desktop.png"))
    finally:
        browser.set_window_size(size["width"], size["height"])


def test_browser_cancel_stops_a_long_job(browser, live, tmp_path):
    ui = _open(browser, live)
    ui.type("prompt", "a long job")
    ui.type("steps", 900)
    ui.el("generate").click()
    ui.wait(lambda: re.match(r"Step [1-9]\d* of 900", ui.text("status")), 30, "progress")
    assert ui.el("cancel").is_enabled() and not ui.el("generate").is_enabled()
    ui.el("cancel").click()
    ui.wait(lambda: "Cancelled" in ui.text("message"), 10, "the cancel message")
    browser.save_screenshot(str(tmp_path / "5-cancelled.png"))
    assert re.match(r"Cancelled at step \d+ of 900\.", ui.text("message"))
    assert ui.el("generate").is_enabled() and not ui.el("cancel").is_enabled()

    def idle():
        with urllib.request.urlopen(live.http_url + "/metrics", timeout=10) as r:
            return "sdlite_running 0.0" in r.read().decode()
    ui.wait(idle, 10, "the server to stop the job")


def test_browser_shows_errors_as_a_message_line(browser, live, tmp_path):
    ui = _open(browser, live)
    ui.type("prompt", "a bad size")
    ui.select("size", "custom")
    ui.type("width", 100)
    ui.type("height", 64)
    ui.el("generate").click()
    ui.wait(lambda: ui.text("message"), 10, "a message")
    browser.save_screenshot(str(tmp_path / "6-bad-size.png"))
    assert ui.text("message") == "Invalid request: width: must be a multiple of 8, got 100"
    assert ui.el("generate").is_enabled()
    # the server out of reach: a message, the form still usable
    browser.execute_cdp_cmd("Network.enable", {})
    browser.execute_cdp_cmd("Network.emulateNetworkConditions", {"offline": True, "latency": 0,
                                                                 "downloadThroughput": -1,
                                                                 "uploadThroughput": -1})
    try:
        ui.select("size", "16x16")
        ui.el("generate").click()
        ui.wait(lambda: "reach the server" in ui.text("message"), 10, "the unreachable message")
        browser.save_screenshot(str(tmp_path / "7-unreachable.png"))
        assert ui.el("generate").is_enabled()
    finally:
        browser.execute_cdp_cmd("Network.emulateNetworkConditions", {"offline": False, "latency": 0,
                                                                     "downloadThroughput": -1,
                                                                     "uploadThroughput": -1})
