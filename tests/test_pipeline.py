"""Pipeline API behaviour: validation, progress, cancellation, determinism."""

import threading

import numpy as np
import pytest

from sdlite.errors import Cancelled, InvalidRequest
from sdlite.pipeline import GenerationRequest

SMALL = dict(width=32, height=32, steps=3)


@pytest.mark.parametrize("field,value", [
    ("steps", 0), ("steps", -2), ("steps", 2.5), ("width", 30), ("height", 0), ("width", 4096),
    ("sampler", "plms"), ("cfg_scale", float("nan")), ("cfg_scale", -1.0), ("seed", -5),
    ("prompt", None), ("clip_skip", -1),
])
def test_invalid_fields_are_named(field, value):
    kwargs = dict(prompt="x")
    kwargs[field] = value
    with pytest.raises(InvalidRequest) as exc:
        GenerationRequest(**kwargs).validate()
    assert exc.value.field == field


def test_random_seed_is_recorded(tiny_pipe):
    r = tiny_pipe.generate("x", **SMALL)
    assert isinstance(r.request.seed, int)
    assert f"Seed: {r.request.seed}" in r.parameters


def test_progress_called_once_per_step(tiny_pipe):
    calls = []
    tiny_pipe.generate("x", seed=1, progress=lambda i, n: calls.append((i, n)), **SMALL)
    assert calls == [(1, 3), (2, 3), (3, 3)]


def test_cancel_between_steps(tiny_pipe):
    ev = threading.Event()
    calls = []

    def progress(i, n):
        calls.append(i)
        if i == 2:
            ev.set()

    with pytest.raises(Cancelled):
        tiny_pipe.generate("x", seed=1, progress=progress, cancel=ev, width=32, height=32, steps=10)
    assert calls == [1, 2]
    # the pipeline is usable afterwards
    assert tiny_pipe.generate("x", seed=1, **SMALL).image.size == (32, 32)


def test_deterministic_and_prompt_sensitive(tiny_pipe):
    a = np.asarray(tiny_pipe.generate("a red circle", seed=3, **SMALL).image)
    b = np.asarray(tiny_pipe.generate("a red circle", seed=3, **SMALL).image)
    c = np.asarray(tiny_pipe.generate("a blue square", seed=3, **SMALL).image)
    assert np.array_equal(a, b)
    assert not np.array_equal(a, c)


def test_long_prompt_truncates_with_warning(tiny_pipe):
    with pytest.warns(UserWarning):
        tiny_pipe.generate("word " * 200, seed=1, prompt_syntax="plain", **SMALL)  # a1111 takes it whole


def test_non_square_size(tiny_pipe):
    r = tiny_pipe.generate("x", seed=1, width=40, height=24, steps=2)
    assert r.image.size == (40, 24)
