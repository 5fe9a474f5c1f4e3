"""Hostile scheduler configs: type- and range-checked before any schedule is built (issue "Hardening",
faults 6-7): `num_train_timesteps: 1000.5` or `1e9` is one ModelFolderError, not a traceback or 4 GB."""

import importlib
import json
import math
import time

import pytest

from sdlite.errors import ModelFolderError
from sdlite.fileio import read_json
from sdlite.samplers import check_steps
from sdlite.samplers.schedule import DEFAULTS, check_scheduler_config, resolve_config
from sdlite.testing.architectures import SD15_SCHEDULER

HOSTILE = {
    "timesteps_float": ({"num_train_timesteps": 1000.5}, "num_train_timesteps must be an integer"),
    "timesteps_integral_float": ({"num_train_timesteps": 1000.0}, "num_train_timesteps must be an integer"),
    "timesteps_huge": ({"num_train_timesteps": 10**9}, "num_train_timesteps must be an integer from 1 to 100000"),
    "timesteps_0": ({"num_train_timesteps": 0}, "num_train_timesteps must be an integer from 1"),
    "timesteps_bool": ({"num_train_timesteps": True}, "num_train_timesteps must be an integer"),
    "steps_offset_string": ({"steps_offset": "1"}, "steps_offset must be an integer"),
    "steps_offset_past_end": ({"steps_offset": 1000}, "steps_offset must be an integer from 0 to 999"),
    "beta_nan": ({"beta_start": math.nan}, "beta_start must be a number in (0.0, 1.0)"),
    "beta_inf": ({"beta_end": math.inf}, "beta_end must be a number"),
    "beta_negative": ({"beta_start": -0.1}, "beta_start must be a number in (0.0, 1.0)"),
    "beta_one": ({"beta_end": 1.0}, "beta_end must be a number in (0.0, 1.0)"),
    "beta_string": ({"beta_end": "0.012"}, "beta_end must be a number"),
    "flag_string": ({"clip_sample": "no"}, "clip_sample must be true or false"),
    "flag_int": ({"set_alpha_to_one": 0}, "set_alpha_to_one must be true or false"),
    "schedule_list": ({"beta_schedule": ["linear"]}, "beta_schedule must be a string"),
    "trained_betas_short": ({"trained_betas": [0.1, 0.2]}, "trained_betas must be null or a list of"),
    "trained_betas_bad_value": ({"trained_betas": [0.5] * 999 + [1.5]}, "trained_betas must lie in (0, 1)"),
    "lambda_nan": ({"lambda_min_clipped": math.nan}, "lambda_min_clipped must be a number"),
    "sigma_min_negative": ({"sigma_min": -1.0}, "sigma_min must be a number above 0.0"),
    "original_steps_0": ({"original_inference_steps": 0}, "original_inference_steps must be an integer from 1"),
    "use_default_values_int": ({"_use_default_values": 3}, "_use_default_values must be a list"),
    "use_default_values_nested": ({"_use_default_values": [["a"]]}, "_use_default_values must be a list"),
}


@pytest.mark.parametrize("case", sorted(HOSTILE))
def test_hostile_scheduler_config(case):
    changes, message = HOSTILE[case]
    config = {**SD15_SCHEDULER, **changes}
    with pytest.raises(ModelFolderError, match="scheduler config: " + message.replace("(", r"\(").replace(")", r"\)")):
        check_scheduler_config(config)
    for class_name in DEFAULTS:  # every sampler refuses it, whichever keys its class reads
        with pytest.raises(ModelFolderError):
            resolve_config(class_name, config)


@pytest.mark.parametrize("sampler", ["ddim", "euler", "euler_a", "dpm++2m", "dpm++2m_karras", "lcm"])
def test_huge_schedule_is_refused_at_once(sampler):
    start = time.perf_counter()
    with pytest.raises(ModelFolderError, match="num_train_timesteps"):
        check_steps(sampler, 20, {**SD15_SCHEDULER, "num_train_timesteps": 10**9})
    assert time.perf_counter() - start < 1.0


def test_scheduler_configs_as_diffusers_writes_them_pass(tmp_path):
    """Each scheduler class's full config, as diffusers saves it (`-Infinity` for lambda_min_clipped,
    nulls), passes the checks after a round trip through the file."""
    diffusers = pytest.importorskip("diffusers")
    for class_name in DEFAULTS:
        # LMS from its module: without scipy diffusers' top-level name is a stub (its config needs no scipy)
        cls = (importlib.import_module("diffusers.schedulers.scheduling_lms_discrete").LMSDiscreteScheduler
               if class_name == "LMSDiscreteScheduler" else getattr(diffusers, class_name))
        scheduler = cls.from_config(SD15_SCHEDULER)
        path = tmp_path / f"{class_name}.json"
        path.write_text(scheduler.to_json_string())
        config = read_json(path)
        check_scheduler_config(config)
        resolve_config(class_name, config)
    assert json.loads(json.dumps({"x": -math.inf}))["x"] == -math.inf  # the JSON module keeps -Infinity


def test_limits_are_generous():
    check_scheduler_config({**SD15_SCHEDULER, "num_train_timesteps": 100_000, "steps_offset": 99_999})
    check_scheduler_config({**SD15_SCHEDULER, "trained_betas": [0.01] * 1000})
