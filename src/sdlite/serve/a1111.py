"""AUTOMATIC1111's API around txt2img: what clients call when they connect (Open WebUI, SillyTavern, the
`webuiapi` client, Krita plugins), while they wait, and to stop work. Registered by `http_app.create_app`.

    GET  /sdapi/v1/options            A1111's options object, holding the settings sdlite has at its values
    POST /sdapi/v1/options            set options: `sd_model_checkpoint` switches the model (or is a no-op
                                      for the current one); CLIP_stop_at_last_layers becomes the default clip
                                      skip; a setting sdlite cannot honour at another value (samples_format,
                                      eta_noise_seed_delta, sd_vae, ...) is refused 422 naming it; keys sdlite
                                      does not know are accepted and ignored. Answers null, as A1111 does
    GET  /sdapi/v1/sd-models          [{title, model_name, hash, sha256, filename, config}]
    GET  /sdapi/v1/sd-vae             [{model_name, filename}]: the --vae in use, else none
    GET  /sdapi/v1/schedulers         [{name, label, aliases, default_rho, need_inner_model}]: automatic,
                                      karras (DPM++ 2M only)
    GET  /sdapi/v1/upscalers, latent-upscale-modes, loras, hypernetworks, face-restorers, prompt-styles,
         realesrgan-models            [] (none of these exist in sdlite)
    GET  /sdapi/v1/embeddings         {"loaded": {}, "skipped": {}}
    GET  /sdapi/v1/scripts            {"txt2img": [], "img2img": []}
    GET  /sdapi/v1/cmd-flags          the server's flags that clients read (api, api_auth, listen, port...)
    GET  /sdapi/v1/memory             {"ram": {free, used, total}, "cuda": {"error": "unavailable"}}
    GET  /sdapi/v1/progress           the running job: progress 0..1, eta_relative, state, current_image
                                      (a PNG of the latents, `preview.preview_png`, unless
                                      ?skip_current_image=true), textinfo; idle: progress 0, job_count 0
    POST /sdapi/v1/interrupt          every running job stops at its next step with the images it has made
    POST /sdapi/v1/skip               every running job drops the image in progress and goes on
    POST /sdapi/v1/png-info           {"image": base64 or data: URL} -> {info, items, parameters}
    GET  /internal/ping               {} (answered without credentials, as A1111 does: it says only that
                                      the server is up, as /healthz does)

Interrupt and skip act on every running job, whoever submitted it and through whichever API, as A1111's
do; waiting jobs are not touched. What a txt2img request answers after an interrupt: see `http_app`.

`A1111Api.check_txt2img` is the txt2img side: the fields of A1111's request that name features sdlite
lacks are accepted at their defaults (what `webuiapi.txt2img()` and the other clients send) and refused 422,
naming the field, at any other value; nothing a client asks for is silently dropped.
"""

from __future__ import annotations

import base64
import io
import ipaddress
import json
import math
import os
import re
import time
from pathlib import Path

from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from ..errors import InvalidRequest
from ..samplers.registry import SCHEDULE_TYPES
from .execution import INVALID_ARGUMENT, ServeError
from .preview import preview_png
from .wire import HTTP_STATUS, decode_image, error_headers, json_response

# options whose value changes the image and that sdlite has at one value only: another value is refused
FIXED_OPTIONS = {
    "samples_format": "png", "return_grid": False, "eta_noise_seed_delta": 0, "eta_ancestral": 1.0,
    "eta_ddim": 0.0, "s_churn": 0.0, "s_min_uncond": 0.0, "s_noise": 1.0, "randn_source": "CPU",
    "token_merging_ratio": 0.0,
}
# options shown for clients that read them; setting them changes nothing (accepted and ignored)
SHOWN_OPTIONS = {
    "samples_save": False, "save_to_dirs": False, "enable_pnginfo": True, "s_tmin": 0.0, "s_tmax": 0.0,
    "live_previews_enable": True, "show_progress_every_n_steps": 1, "show_progress_type": "Approx cheap",
    "sd_checkpoints_limit": 1, "sd_checkpoint_cache": 0, "sd_vae_checkpoint_cache": 0,
}
# A1111's schedule types that sdlite runs (the registry's SCHEDULE_TYPES), in its /schedulers shape
SCHEDULERS = [{"name": t.name, "label": t.label, "aliases": list(t.aliases) or None,
               "default_rho": 7.0 if t.name == "karras" else -1.0, "need_inner_model": False}
              for t in SCHEDULE_TYPES.values()]
EMPTY_LISTS = ("upscalers", "latent-upscale-modes", "hypernetworks", "face-restorers",
               "prompt-styles", "realesrgan-models")
PIXEL_CAP = 4096 * 4096  # png-info: larger images are refused before their pixels are decoded
CLIP_OPTION = "CLIP_stop_at_last_layers"


# --- txt2img fields sdlite does not have -----------------------------------------------------------

def _number(body: dict, key: str, default: float) -> float:
    value = body.get(key)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise InvalidRequest(key, f"must be a number, got {value!r}")
    return float(value)


def _lacking(key: str, what: str) -> InvalidRequest:
    return InvalidRequest(key, f"{what} is not supported by sdlite")


# (field, is the value a request for the feature?, what the feature is)
_FEATURES = (
    ("enable_hr", bool, "hires fix (enable_hr)"),
    ("restore_faces", bool, "face restoration"),
    ("tiling", bool, "tiling"),
    ("script_name", bool, "scripts (script_name)"),
    ("styles", bool, "prompt styles (sdlite has none)"),
    ("alwayson_scripts", bool, "alwayson scripts (sdlite has none)"),
    ("infotext", bool, "infotext (send the fields themselves)"),
    ("firstpass_image", bool, "firstpass_image"),
    ("refiner_checkpoint", lambda v: bool(v) and v != "None", "a refiner (refiner_checkpoint)"),
)
# (field, the default, what a non-default value would ask for)
_NUMBERS = (
    ("s_churn", 0.0, "s_churn other than 0"),
    ("s_noise", 1.0, "s_noise other than 1"),
    ("s_min_uncond", 0.0, "s_min_uncond other than 0"),
)
# eta: A1111 uses it with ancestral samplers (default 1) and DDIM (default 0, honoured at any value); the
# others ignore it. sdlite's Euler a has eta 1 only. subseed / subseed_strength (variation seeds) are honoured.
_ETA = {"euler_a": 1.0}


def check_features(body: dict, sampler: str) -> None:
    """Refuse (InvalidRequest naming the field) a txt2img field that asks for a feature sdlite lacks;
    their defaults, and the fields that only matter with such a feature (hr_*, denoising_strength without
    enable_hr, s_tmin / s_tmax without s_churn), are accepted. `sampler` is the one the request runs."""
    for key, asks, what in _FEATURES:
        value = body.get(key)
        if value is not None and asks(value):
            if key == "alwayson_scripts" and isinstance(value, dict):
                key = f"alwayson_scripts.{next(iter(value))}"
            raise _lacking(key, what)
    for key, default, what in _NUMBERS:
        if _number(body, key, default) != default:
            raise _lacking(key, what)
    for key in ("seed_resize_from_w", "seed_resize_from_h"):
        if _number(body, key, -1) > 0:
            raise _lacking(key, "seed resize")
    eta = _number(body, "eta", _ETA.get(sampler, 0.0))
    if sampler in _ETA and eta != _ETA[sampler]:
        raise InvalidRequest("eta", f"sdlite's {sampler} sampler runs with eta {_ETA[sampler]:g} only, got {eta:g}")


def _same_setting(value, fixed) -> bool:
    if isinstance(fixed, bool) or isinstance(value, bool):
        return value is fixed
    if isinstance(fixed, (int, float)):
        return isinstance(value, (int, float)) and float(value) == float(fixed)
    return isinstance(value, str) and value.strip().lower() == str(fixed).lower()


# --- PNG info ------------------------------------------------------------------------------------------

_PARAM = re.compile(r'\s*([\w][\w \-/]*):\s*("(?:\\.|[^\\"])*"|[^,]*)(?:,|$)')


def parse_infotext(text: str) -> dict:
    """A1111's `parameters` text -> {"Prompt", "Negative prompt", "Steps", "Sampler", ..., "Size-1",
    "Size-2"} with string values, as A1111's png-info answers them. The last line holds the "Key: value"
    pairs when it has at least three of them; quoted values are unquoted."""
    if not text:
        return {}
    lines = text.strip().split("\n")
    pairs = _PARAM.findall(lines[-1])
    if len(pairs) < 3:
        pairs = []
    else:
        lines = lines[:-1]
    prompt, negative, in_negative = [], [], False
    for line in lines:
        if line.startswith("Negative prompt:"):
            in_negative, line = True, line[len("Negative prompt:"):].strip()
        (negative if in_negative else prompt).append(line)
    out = {"Prompt": "\n".join(prompt), "Negative prompt": "\n".join(negative)}
    for key, value in pairs:
        if len(value) > 1 and value[0] == '"' and value[-1] == '"':
            try:
                value = json.loads(value)
            except ValueError:
                pass
        size = re.fullmatch(r"(\d+)x(\d+)", value.strip()) if isinstance(value, str) else None
        if size:
            out[f"{key}-1"], out[f"{key}-2"] = size.group(1), size.group(2)
        else:
            out[key] = value
    out.setdefault("Clip skip", "1")
    return out


def png_info(data: bytes) -> dict:
    """{"info", "items", "parameters"} of an image's bytes, as A1111's png-info answers them; the pixels
    are never decoded past PIXEL_CAP (a small file can claim a huge size)."""
    from PIL import Image, UnidentifiedImageError

    from ..image_io import read_parameters
    try:
        with Image.open(io.BytesIO(data)) as image:
            w, h = image.size
            if w * h > PIXEL_CAP:
                raise InvalidRequest("image", f"{w}x{h} is too large to read")
            items = {k: v for k, v in image.info.items() if isinstance(k, str) and isinstance(v, str)
                     and k != "parameters"}
        info = read_parameters(io.BytesIO(data)) or ""
    except Image.DecompressionBombError:
        raise InvalidRequest("image", "too large to read") from None
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as exc:
        raise InvalidRequest("image", f"not a readable image: {exc}") from None
    return {"info": info, "items": items, "parameters": parse_infotext(info)}


# --- the routes ---------------------------------------------------------------------------------------

def _loopback(host: str | None) -> bool:
    try:
        return ipaddress.ip_address((host or "").strip("[]")).is_loopback
    except ValueError:
        return host == "localhost"


def _flag(value: str | None) -> bool:
    if value is None:
        return False
    if value.lower() in ("true", "1", "yes"):
        return True
    if value.lower() in ("false", "0", "no", ""):
        return False
    raise InvalidRequest("skip_current_image", f"must be true or false, got {value!r}")


def _has_body(request: Request) -> bool:
    """Whether a request we answer without reading it sent a body (then the connection is closed)."""
    return request.headers.get("content-length", "0").strip() != "0" or "transfer-encoding" in request.headers


def _job_timestamp(job) -> str:
    """A1111's job_timestamp (local time the job started, %Y%m%d%H%M%S)."""
    started = time.time() - (time.monotonic() - (job.started_at or time.monotonic()))
    return time.strftime("%Y%m%d%H%M%S", time.localtime(started))


class A1111Api:
    """The routes above, over an `http_app.HttpApi` (its executor, defaults, model name and the optional
    `list_models` / `switch_model` callables it carries, read at each request)."""

    def __init__(self, api):
        self.api = api
        self.clip_stop = 1  # CLIP_stop_at_last_layers set through POST /options: the default clip skip + 1

    # --- the model ---------------------------------------------------------------------------------

    def models(self) -> list[dict]:
        list_models = getattr(self.api, "list_models", None)
        if list_models is not None:
            return list_models()
        name = self.api.model_name
        return [{"title": name, "model_name": name, "hash": None, "sha256": None, "filename": name,
                 "config": None}]

    def current_model(self, models: list[dict] | None = None) -> dict:
        """The A1111 entry of the model loaded now."""
        from .models import current_entry
        models = self.models() if models is None else models
        entry = current_entry(models, self.api.executor.pipe)
        if entry is None:
            entry = next((m for m in models if self.api.model_name in (m.get("model_name"), m.get("title"))),
                         None)
        return entry or {"title": self.api.model_name, "model_name": self.api.model_name, "hash": None,
                         "sha256": None, "filename": self.api.model_name, "config": None}

    def is_current(self, name: str, entry: dict) -> bool:
        base = name[:name.rindex(" [")] if name.endswith("]") and " [" in name else name
        names = {entry.get(k) for k in ("title", "model_name", "hash", "sha256", "filename")} - {None}
        names |= {os.path.basename(entry.get("filename") or "")}
        return name in names or base in names

    def vae_name(self) -> str | None:
        return getattr(self.api.executor.pipe, "vae_name", None)

    def options(self) -> dict:
        model = self.current_model()
        return {"sd_model_checkpoint": model["title"], "sd_checkpoint_hash": model.get("sha256") or "",
                "sd_vae": self.vae_name() or "Automatic", "CLIP_stop_at_last_layers": self.clip_stop,
                **FIXED_OPTIONS, **SHOWN_OPTIONS}

    # --- checks shared by options and txt2img --------------------------------------------------------

    def check_setting(self, key: str, value, prefix: str = "") -> None:
        """Refuse (InvalidRequest named prefix + key) a setting sdlite cannot honour at `value`;
        sd_model_checkpoint is the caller's (it switches or is refused)."""
        name = prefix + key
        if key == "sd_vae":
            vae = self.vae_name()
            allowed = {"automatic", vae.lower() if vae else "none"}
            if value not in (None, "") and (not isinstance(value, str) or value.strip().lower() not in allowed):
                raise InvalidRequest(name, f"this server decodes with {vae or 'the model’s own VAE'} "
                                           f"('Automatic'); got {value!r}")
        elif key == CLIP_OPTION:
            layers = self.api.defaults.text_layers
            if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= layers:
                raise InvalidRequest(name, f"must be an integer from 1 to {layers}, got {value!r}")
        elif key in FIXED_OPTIONS and not _same_setting(value, FIXED_OPTIONS[key]):
            raise InvalidRequest(name, f"sdlite has {FIXED_OPTIONS[key]!r} only, got {value!r}")

    def check_txt2img(self, body: dict, fields: dict) -> None:
        """The A1111 parts of a txt2img body that `http_app.a1111_fields` leaves: features sdlite lacks,
        override_settings (a model other than the current one is refused: switch it with POST
        /sdapi/v1/options), and the clip skip set through /options as the default."""
        check_features(body, fields.get("sampler") or self.api.defaults.sampler)
        overrides = body.get("override_settings") or {}
        for key, value in overrides.items():
            if key == "sd_model_checkpoint":
                if value not in (None, "") and not (isinstance(value, str)
                                                   and self.is_current(value, self.current_model())):
                    raise InvalidRequest("override_settings.sd_model_checkpoint",
                                         f"{value!r} is not the loaded model ({self.current_model()['title']}); "
                                         "switch models with POST /sdapi/v1/options first")
            else:
                self.check_setting(key, value, "override_settings.")
        if "clip_skip" not in fields and self.clip_stop != 1:
            fields["clip_skip"] = self.clip_stop - 1

    # --- handlers ------------------------------------------------------------------------------------

    async def get_options(self, request: Request) -> Response:
        return json_response(200, await run_in_threadpool(self.options))

    async def set_options(self, request: Request) -> Response:
        try:
            body = await self.api.read_body(request)
            for key, value in body.items():
                if key != "sd_model_checkpoint":
                    self.check_setting(key, value)
            name = body.get("sd_model_checkpoint")
            if name is not None:
                await self._switch(name)
        except InvalidRequest as exc:
            return json_response(422, {"error": INVALID_ARGUMENT, "field": exc.field,
                                       "detail": [{"loc": ["body", exc.field], "msg": exc.message,
                                                   "type": "value_error"}]},
                                 close=getattr(exc, "close_connection", False))
        except ServeError as exc:
            status = 404 if getattr(exc, "not_found", False) else \
                {INVALID_ARGUMENT: 422}.get(exc.code, HTTP_STATUS.get(exc.code, 500))
            return json_response(status, {"error": exc.code, "field": "sd_model_checkpoint",
                                          "detail": exc.message}, error_headers(exc))
        if CLIP_OPTION in body:
            self.clip_stop = body[CLIP_OPTION]
        return json_response(200, None)

    async def _switch(self, name) -> None:
        if not isinstance(name, str) or not name.strip():
            raise InvalidRequest("sd_model_checkpoint", f"must be a model title or name, got {name!r}")
        models = await run_in_threadpool(self.models)
        if self.is_current(name.strip(), self.current_model(models)):
            return
        switch = getattr(self.api, "switch_model", None)
        if switch is None:
            titles = ", ".join(m["title"] for m in models)
            exc = ServeError(INVALID_ARGUMENT, f"no model {name!r} on this server (models: {titles})")
            exc.not_found = True
            raise exc
        await run_in_threadpool(switch, name.strip())

    async def sd_models(self, request: Request) -> Response:
        return json_response(200, await run_in_threadpool(self.models))

    async def sd_vae(self, request: Request) -> Response:
        vae = self.vae_name()
        return json_response(200, [{"model_name": vae, "filename": vae}] if vae else [])

    async def schedulers(self, request: Request) -> Response:
        return json_response(200, SCHEDULERS)

    async def empty_list(self, request: Request) -> Response:
        return json_response(200, [])

    async def embeddings(self, request: Request) -> Response:
        """The embeddings of --embeddings-dir, in A1111's shape (usable by name in prompts)."""
        table = getattr(self.api.executor.pipe, "embeddings", None) or {}
        loaded = {name: {"step": None, "sd_checkpoint": None, "sd_checkpoint_name": None,
                         "shape": int(e.vectors.shape[-1]), "vectors": int(e.vectors.shape[0])}
                  for name, e in sorted(table.items())}
        return json_response(200, {"loaded": loaded, "skipped": {}})

    async def loras(self, request: Request) -> Response:
        """The LoRAs of --lora-dir that <lora:NAME:SCALE> tags may name, in A1111's shape."""
        lora_set = getattr(self.api.executor.pipe, "lora_set", None)
        folder = getattr(lora_set, "lora_dir", None)
        files = sorted(Path(folder).glob("*.safetensors")) if folder and Path(folder).is_dir() else []
        return json_response(200, [{"name": f.stem, "alias": f.stem, "path": str(f), "metadata": {}}
                                   for f in files])

    async def scripts(self, request: Request) -> Response:
        return json_response(200, {"txt2img": [], "img2img": []})

    async def cmd_flags(self, request: Request) -> Response:
        host, port = (request.scope.get("server") or (None, None))[:2]
        auth = getattr(self.api, "auth", None)
        return json_response(200, {
            "api": True, "nowebui": False, "listen": not _loopback(host), "server_name": host, "port": port,
            "api_auth": "***" if auth is not None and auth.users else None,
            "api_token": "***" if auth is not None and auth.tokens else None,
            "api_log": False, "api_server_stop": False, "ckpt_dir": None, "vae_dir": None, "lora_dir": None,
            "embeddings_dir": None, "hypernetwork_dir": None, "use_cpu": ["all"], "no_half": True,
            "precision": "full", "lowvram": False, "medvram": False})

    async def memory(self, request: Request) -> Response:
        import psutil
        total, rss = psutil.virtual_memory().total, psutil.Process().memory_info().rss
        return json_response(200, {"ram": {"free": total - rss, "used": rss, "total": total},
                                   "cuda": {"error": "unavailable"}})

    async def ping(self, request: Request) -> Response:
        return json_response(200, {})

    async def interrupt(self, request: Request) -> Response:
        self.api.executor.interrupt()
        return json_response(200, {}, close=_has_body(request))

    async def skip(self, request: Request) -> Response:
        self.api.executor.skip()
        return json_response(200, {}, close=_has_body(request))

    async def png_info(self, request: Request) -> Response:
        try:
            body = await self.api.read_body(request)
            answer = await run_in_threadpool(png_info, decode_image(body.get("image")))
        except InvalidRequest as exc:
            return json_response(422, {"error": INVALID_ARGUMENT, "field": exc.field,
                                       "detail": [{"loc": ["body", exc.field], "msg": exc.message,
                                                   "type": "value_error"}]},
                                 close=getattr(exc, "close_connection", False))
        return json_response(200, answer)

    async def progress(self, request: Request) -> Response:
        try:
            skip_image = _flag(request.query_params.get("skip_current_image"))
        except InvalidRequest as exc:
            return json_response(422, {"error": INVALID_ARGUMENT, "field": exc.field,
                                       "detail": [{"loc": ["query", exc.field], "msg": exc.message,
                                                   "type": "value_error"}]})
        running, waiting = self.api.executor.jobs()
        live = sorted((j for j in running if not j.done and j.started_at is not None), key=lambda j: j.started_at)
        if not live:
            return json_response(200, {"progress": 0.0, "eta_relative": 0.0, "state": {
                "skipped": False, "interrupted": False, "stopping_generation": False, "job": "", "job_count": 0,
                "job_timestamp": "0", "job_no": 0, "sampling_step": 0, "sampling_steps": 0},
                "current_image": None, "textinfo": None, "current_task": None})
        job = live[0]
        steps, index, step = job.request.steps, job.image_index, job.step
        sampling_step = min(max(step - index * steps, 0), steps)
        progress = min(step / job.total, 1.0) if job.total else 0.0
        elapsed = time.monotonic() - job.started_at
        eta = elapsed / progress - elapsed if progress > 0 else 0.0
        latents = job.latents
        image = None
        if latents is not None and not skip_image:
            image = base64.b64encode(await run_in_threadpool(preview_png, latents)).decode("ascii")
        text = f"image {index + 1} of {job.n}, step {sampling_step} of {steps}"
        if waiting or len(live) > 1:
            text += f"; {len(live) - 1} more running, {len(waiting)} waiting"
        return json_response(200, {"progress": progress, "eta_relative": eta, "state": {
            "skipped": job.skip_index == index, "interrupted": job.interrupted, "stopping_generation": False,
            "job": "txt2img", "job_count": job.n, "job_timestamp": _job_timestamp(job), "job_no": index,
            "sampling_step": sampling_step, "sampling_steps": steps},
            "current_image": image, "textinfo": text, "current_task": job.id})

    def routes(self) -> list[Route]:
        v1 = "/sdapi/v1/"
        routes = [
            Route(v1 + "options", self.get_options, methods=["GET"]),
            Route(v1 + "options", self.set_options, methods=["POST"]),
            Route(v1 + "sd-models", self.sd_models, methods=["GET"]),
            Route(v1 + "sd-vae", self.sd_vae, methods=["GET"]),
            Route(v1 + "schedulers", self.schedulers, methods=["GET"]),
            Route(v1 + "embeddings", self.embeddings, methods=["GET"]),
            Route(v1 + "loras", self.loras, methods=["GET"]),
            Route(v1 + "scripts", self.scripts, methods=["GET"]),
            Route(v1 + "cmd-flags", self.cmd_flags, methods=["GET"]),
            Route(v1 + "memory", self.memory, methods=["GET"]),
            Route(v1 + "progress", self.progress, methods=["GET"]),
            Route(v1 + "interrupt", self.interrupt, methods=["POST"]),
            Route(v1 + "skip", self.skip, methods=["POST"]),
            Route(v1 + "png-info", self.png_info, methods=["POST"]),
            Route("/internal/ping", self.ping, methods=["GET"]),
        ]
        return routes + [Route(v1 + name, self.empty_list, methods=["GET"]) for name in EMPTY_LISTS]
