"""The request contract (`sdlite.request`): one set of rules, a front end's caps, checked once."""

import pytest

from sdlite import samplers
from sdlite.errors import InvalidRequest
from sdlite.request import LIBRARY_CAPS, MAX_SIDE, Caps, GenerationRequest, check_size, format_parameters
from sdlite.testing.architectures import SD15_SCHEDULER


def test_size_rule():
    assert check_size("width", 512, MAX_SIDE) == 512
    for bad in (0, 4, 12, 2056, 512.0, True, "512"):
        with pytest.raises(InvalidRequest) as exc:
            check_size("width", bad, MAX_SIDE)
        assert exc.value.field == "width"


def test_caps_narrow_the_library_rules():
    caps = Caps(max_width=256, max_height=256, max_steps=50, max_cfg_scale=20, max_clip_skip=1,
                max_prompt_chars=10)
    GenerationRequest("short", width=256, height=256, steps=50, cfg_scale=20, clip_skip=1).validate(caps)
    for field, value in [("width", 264), ("height", 512), ("steps", 51), ("cfg_scale", 20.5),
                         ("clip_skip", 2), ("prompt", "x" * 11), ("negative_prompt", "y" * 11)]:
        req = GenerationRequest("short", width=256, height=256)
        setattr(req, field, value)
        with pytest.raises(InvalidRequest) as exc:
            req.validate(caps)
        assert exc.value.field == field
        setattr(req, field, value)
        req.validate()  # the library's own caps allow it
    assert caps.within(LIBRARY_CAPS) and not LIBRARY_CAPS.within(caps)


@pytest.mark.parametrize("name", samplers.SAMPLERS)
def test_sampler_label_and_alias_become_the_name(name):
    spec = samplers.SAMPLER_SPECS[name]
    for text in (name, spec.label, spec.label.upper(), *spec.aliases):
        assert GenerationRequest("x", sampler=text).validate().sampler == name


def test_checked_once_until_a_field_changes(monkeypatch):
    calls = []
    real = samplers.check_steps
    monkeypatch.setattr(samplers, "check_steps", lambda *a: calls.append(a) or real(*a))
    req = GenerationRequest("x", steps=10, sampler="DDIM")
    req.validate(Caps(max_steps=100), SD15_SCHEDULER)
    req.validate(LIBRARY_CAPS, SD15_SCHEDULER)  # wider caps, same schedule: nothing to check again
    assert len(calls) == 1 and req.sampler == "ddim"
    req.steps = 1000  # a changed field is checked again: past the schedule
    with pytest.raises(InvalidRequest) as exc:
        req.validate(LIBRARY_CAPS, SD15_SCHEDULER)
    assert exc.value.field == "steps" and len(calls) == 2
    req.steps = 5
    req.validate(Caps(max_steps=100))
    with pytest.raises(InvalidRequest):
        req.validate(Caps(max_steps=4))  # stricter caps than it passed: checked again


def test_random_seed_is_chosen_once():
    req = GenerationRequest("x").validate()
    seed = req.seed
    assert 0 <= seed < 2**32 and req.validate().seed == seed


def test_parameters_text_uses_the_a1111_label():
    req = GenerationRequest("a cat", negative_prompt="blurry", sampler="euler_a", seed=3, clip_skip=1,
                            steps=7, cfg_scale=5.0).validate()
    text = format_parameters(req, "model", "taesd")
    assert text.splitlines() == ["a cat", "Negative prompt: blurry",
                                 "Steps: 7, Sampler: Euler a, CFG scale: 5, Seed: 3, Size: 512x512, Model: model, "
                                 "VAE: taesd, Clip skip: 2, Version: sdlite"]
