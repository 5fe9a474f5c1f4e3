"""The service's wire formats, shared by every HTTP route module: A1111 / OpenAI bodies -> sdlite's request
fields, JSON answers and their status codes, body parsing limits, the client's deadline header, base64 images.
No routes here (`http_app`, `a1111`, `jobs`, `model_routes` hold them), so those modules all import this one
and none imports another's internals."""

from __future__ import annotations

import base64
import binascii
import json
import re

from starlette.responses import Response

from ..errors import InvalidRequest
from ..fileio import parse_json_text
from ..samplers import resolve_sampler
from ..samplers.registry import schedule_variant
from .execution import (
    CANCELLED,
    DEADLINE_EXCEEDED,
    INTERNAL,
    RESOURCE_EXHAUSTED,
    UNAVAILABLE,
    ServeError,
)
from .fields import decode_image_field

HTTP_STATUS = {RESOURCE_EXHAUSTED: 429, UNAVAILABLE: 503, DEADLINE_EXCEEDED: 504, CANCELLED: 499,
               INTERNAL: 500}
BODY_TIMEOUT = 30.0   # seconds for a request body to arrive once its head has
MAX_JSON_DEPTH = 64   # nesting of arrays/objects in a body (the APIs need 3)


# --- wire formats -> sdlite fields -------------------------------------------------------------------

def _int_field(body: dict, name: str, default: int) -> int:
    value = body.get(name, default)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value != int(value):
        raise InvalidRequest(name, f"must be an integer, got {value!r}")
    if value < 1:
        raise InvalidRequest(name, f"must be at least 1, got {value!r}")
    return int(value)


def a1111_fields(body: dict) -> dict:
    """A1111 txt2img body -> sdlite fields. Unknown A1111 fields (hires fix, face restore, scripts...)
    are accepted and ignored, as by A1111 itself for features a build lacks. sdlite's own `deep_cache`
    (an integer N, DeepCache: see GenerationRequest) may be sent as an extra field."""
    fields = {k: body.get(k) for k in ("prompt", "negative_prompt", "steps", "cfg_scale", "width",
                                       "height")}
    seed = body.get("seed", -1)
    if seed is not None and seed != -1:
        fields["seed"] = seed
    sampler = body.get("sampler_name") or body.get("sampler_index")
    if sampler is not None:
        try:  # a label ("Euler a"), a name or an A1111 alias
            fields["sampler"] = resolve_sampler(sampler)
        except InvalidRequest as exc:
            raise InvalidRequest("sampler_name", exc.message) from None
    scheduler = body.get("scheduler")
    if scheduler is not None:  # A1111 1.9+'s schedule type (Automatic, Karras, Exponential, Simple)
        try:
            fields["sampler"] = schedule_variant(fields.get("sampler", "dpm++2m"), scheduler)
        except InvalidRequest as exc:
            raise InvalidRequest("scheduler", exc.message) from None
    overrides = body.get("override_settings")
    overrides = {} if overrides is None else overrides
    if not isinstance(overrides, dict):
        raise InvalidRequest("override_settings", "must be an object")
    stop_at = overrides.get("CLIP_stop_at_last_layers")
    if stop_at is not None:
        if isinstance(stop_at, bool) or not isinstance(stop_at, int) or stop_at < 1:
            raise InvalidRequest("override_settings.CLIP_stop_at_last_layers",
                                 f"must be an integer >= 1, got {stop_at!r}")
        fields["clip_skip"] = stop_at - 1
    fields["n"] = _int_field(body, "batch_size", 1) * _int_field(body, "n_iter", 1)
    for key in ("subseed_strength", "eta", "deep_cache"):  # variation seeds, eta (as A1111 applies them), DeepCache N
        if body.get(key) is not None:
            fields[key] = body[key]
    subseed = body.get("subseed", -1)
    if subseed is not None and subseed != -1:
        fields["subseed"] = subseed
    return fields


def a1111_image_fields(body: dict) -> dict:
    """The img2img part of an A1111 body: init_images[0] (base64 or a data: URL), mask (white = repaint;
    inpainting_mask_invert 1 swaps), denoising_strength (default 0.75), resize_mode 0 ("Just resize")
    only. mask_blur, inpainting_fill and inpaint_full_res are accepted and not applied (see README)."""
    images = body.get("init_images")
    if not isinstance(images, list) or len(images) != 1:
        raise InvalidRequest("init_images", "one base64-encoded image is required")
    if body.get("resize_mode") not in (None, 0):
        raise InvalidRequest("resize_mode", "only 0 ('Just resize') is supported")
    fields = {"init_image": decode_image_field("init_images", _b64(decode_image, "init_images", images[0]), "RGB"),
              "denoising_strength": body.get("denoising_strength")}
    if body.get("mask"):
        mask = decode_image_field("mask", _b64(decode_image, "mask", body["mask"]), "L")
        if body.get("inpainting_mask_invert") in (1, True):
            mask = mask.point(lambda v: 255 - v)
        fields["mask"] = mask
    return fields


def _b64(decode, name: str, value) -> bytes:
    try:
        return decode(value)
    except InvalidRequest as exc:
        raise InvalidRequest(name, exc.message) from None


A1111_FIELD_NAMES = {"sampler": "sampler_name", "n": "batch_size",
                     "clip_skip": "override_settings.CLIP_stop_at_last_layers"}

SIZE_RE = re.compile(r"^\s*(\d{1,5})\s*x\s*(\d{1,5})\s*$")
OPENAI_EXTENSIONS = ("negative_prompt", "steps", "cfg_scale", "seed", "sampler")


def openai_fields(body: dict) -> dict:
    """OpenAI images.generate body -> sdlite fields; sdlite's own knobs (negative_prompt, steps,
    cfg_scale, seed, sampler) may be sent as extra fields (the client's `extra_body`)."""
    prompt = body.get("prompt")
    if not isinstance(prompt, str) or not prompt:
        raise InvalidRequest("prompt", "a non-empty string is required")
    model = body.get("model")
    if model is not None and not isinstance(model, str):
        raise InvalidRequest("model", "must be a string")
    fmt = body.get("response_format")
    if fmt not in (None, "b64_json"):
        raise InvalidRequest("response_format", f"only 'b64_json' is supported (images are returned inline), "
                             f"got {fmt!r}")
    out = body.get("output_format")
    if out not in (None, "png"):
        raise InvalidRequest("output_format", f"only 'png' is supported, got {out!r}")
    if body.get("stream"):
        raise InvalidRequest("stream", "streaming is not supported over HTTP; use gRPC GenerateStream")
    fields = {"prompt": prompt, "n": body.get("n")}
    size = body.get("size")
    if size not in (None, "auto"):
        m = SIZE_RE.match(size) if isinstance(size, str) else None
        if not m:
            raise InvalidRequest("size", f"must be 'WIDTHxHEIGHT' (e.g. '512x512') or 'auto', got {size!r}")
        fields["width"], fields["height"] = int(m.group(1)), int(m.group(2))
    for key in OPENAI_EXTENSIONS:
        if body.get(key) is not None:
            fields[key] = body[key]
    return fields


OPENAI_FIELD_NAMES = {"width": "size", "height": "size", "init_image": "image", "denoising_strength": "strength"}


def openai_edit_fields(form: dict) -> dict:
    """OpenAI images.edit form -> sdlite fields: `image` (a file; the size defaults to the image's, rounded
    down to multiples of 8), `prompt`, `n`, `size`, `mask` (a file: fully transparent pixels are repainted,
    as OpenAI's masks say; a mask without alpha: white = repaint); sdlite's `strength` (denoising strength,
    default 0.75 without a mask, 1 with one) and the OPENAI_EXTENSIONS as extra form fields."""
    image = form.get("image")
    if not isinstance(image, bytes):
        raise InvalidRequest("image", "an image file is required")
    numbers = {}
    for key in ("n", "steps", "seed", "cfg_scale", "strength"):
        value = form.get(key)
        if isinstance(value, str) and value.strip():
            try:
                numbers[key] = float(value) if key in ("cfg_scale", "strength") else int(value)
            except ValueError:
                raise InvalidRequest(key, f"must be a number, got {value!r}") from None
    body = {k: v for k, v in form.items() if isinstance(v, str) and k not in numbers}
    body.update({k: v for k, v in numbers.items() if k != "strength"})
    fields = openai_fields(body)
    fields["init_image"] = decode_image_field("image", image, "RGB")
    if "width" not in fields:
        w, h = fields["init_image"].size
        fields["width"], fields["height"] = max(8, w // 8 * 8), max(8, h // 8 * 8)
    mask = form.get("mask")
    if isinstance(mask, bytes):
        m = decode_image_field("mask", mask, "RGBA")
        alpha = m.getchannel("A")
        has_alpha = alpha.getextrema()[0] < 255
        fields["mask"] = alpha.point(lambda v: 255 if v == 0 else 0) if has_alpha else m.convert("L")
    fields["denoising_strength"] = numbers.get("strength", 1.0 if "mask" in fields else 0.75)
    return fields


# --- plumbing --------------------------------------------------------------------------------------

class JSONResponse(Response):
    """JSON as `json.dumps` writes it, headers named as written (`Retry-After`, `Allow`): the bodies and
    headers are those of earlier releases, for clients that match header names exactly (ASGI servers pass
    the names through as given, though the spec asks for lower case)."""
    media_type = "application/json"

    def render(self, content) -> bytes:
        return json.dumps(content).encode()

    def init_headers(self, headers=None) -> None:
        self.raw_headers = [(b"Content-Type", b"application/json"),
                            (b"Content-Length", str(len(self.body)).encode())]
        self.raw_headers += [(k.encode("latin-1"), v.encode("latin-1")) for k, v in (headers or {}).items()]


def json_response(status: int, obj, headers: dict | None = None, close: bool = False) -> JSONResponse:
    headers = dict(headers or {})
    if close:  # the rest of the request is not read: the connection cannot carry another one
        headers["Connection"] = "close"
    return JSONResponse(obj, status, headers)


def body_error(message: str, close: bool = False) -> InvalidRequest:
    exc = InvalidRequest("body", message)
    exc.close_connection = close
    return exc


def too_deep(obj, limit: int = MAX_JSON_DEPTH) -> bool:
    """Whether arrays/objects nest deeper than `limit` (iterative: no recursion on hostile input)."""
    stack = [(obj, 1)]
    while stack:
        item, depth = stack.pop()
        children = item.values() if isinstance(item, dict) else item
        for child in children:
            if isinstance(child, (dict, list)):
                if depth >= limit:
                    return True
                stack.append((child, depth + 1))
    return False


def parse_json_object(raw: bytes) -> dict:
    """A request body -> the JSON object it holds, or InvalidRequest('body', ...)."""
    try:  # the parser model files use: integer literals bounded, so no int-string-limit error either
        body = parse_json_text(raw.decode("utf-8"))
    except RecursionError:
        raise body_error("not valid JSON: nested too deeply") from None
    except (ValueError, UnicodeDecodeError) as exc:  # ValueError includes an integer too long
        raise body_error(f"not valid JSON: {exc}") from None
    if not isinstance(body, dict):
        raise body_error("must be a JSON object")
    if raw.count(b"[") + raw.count(b"{") > MAX_JSON_DEPTH and too_deep(body):
        raise body_error(f"not valid JSON: nested deeper than {MAX_JSON_DEPTH} levels")
    return body


def client_timeout(value: str | None) -> float | None:
    if value is None:
        return None
    try:
        t = float(value)
        if not t > 0 or t == float("inf"):
            raise ValueError
    except ValueError:
        raise InvalidRequest("X-Request-Timeout", f"must be a positive number of seconds, got {value!r}") \
            from None
    return t


def error_headers(exc: ServeError) -> dict:
    if exc.retry_after:
        return {"Retry-After": str(max(1, round(exc.retry_after)))}
    return {}



def decode_image(value) -> bytes:
    """A base64 image (or a data: URL holding one) -> its bytes; InvalidRequest("image", ...)."""
    if not isinstance(value, str) or not value.strip():
        raise InvalidRequest("image", "a base64-encoded image (or a data: URL) is required")
    value = value.strip()
    if value.startswith("data:"):
        value = value.partition(",")[2]
    try:
        return base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError):
        raise InvalidRequest("image", "not valid base64") from None
