"""Noise schedules, read from a diffusers ``scheduler_config.json``.

Stable Diffusion is trained on a discrete DDPM schedule: betas b_0..b_{T-1} (T = ``num_train_timesteps``) and
their cumulative products abar_t = prod_{s<=t} (1 - b_s). A latent noised to timestep t is

    x_t = alpha_t x_0 + sigma_t eps,   alpha_t = sqrt(abar_t), sigma_t = sqrt(1 - abar_t)     ("VP" form)

and divided by alpha_t it is x_0 + s_t eps with s_t = sqrt((1 - abar_t) / abar_t)            ("VE" form,
k-diffusion's sigmas). A sampler visits a few of the T timesteps; which ones is the *spacing*.

The arithmetic follows diffusers step by step (float32 torch for the training schedule, float64 numpy for
spacing and interpolation, float32 for the result), so our samplers see the same numbers diffusers' schedulers
see. Quirks are kept on purpose and marked "as diffusers".
"""

from __future__ import annotations

import math

import numpy as np
import torch

from sdlite.errors import ModelFolderError

_COMMON = dict(
    num_train_timesteps=1000,
    beta_start=0.0001,
    beta_end=0.02,
    beta_schedule="linear",
    trained_betas=None,
    prediction_type="epsilon",
    steps_offset=0,
    rescale_betas_zero_snr=False,
)

_K_COMMON = {
    **{k: v for k, v in _COMMON.items() if k != "rescale_betas_zero_snr"},
    "use_karras_sigmas": False,
    "use_exponential_sigmas": False,
    "use_beta_sigmas": False,
    "timestep_spacing": "linspace",
}

# The __init__ defaults of the diffusers class each sampler stands for: `XScheduler.from_config(config)` gives
# every key missing from `config` these values (they differ between classes, e.g. timestep_spacing).
DEFAULTS: dict[str, dict] = {
    "DDIMScheduler": {
        **_COMMON,
        "clip_sample": True,
        "clip_sample_range": 1.0,
        "set_alpha_to_one": True,
        "thresholding": False,
        "timestep_spacing": "leading",
    },
    "DPMSolverMultistepScheduler": {
        **_COMMON,
        "solver_order": 2,
        "thresholding": False,
        "algorithm_type": "dpmsolver++",
        "solver_type": "midpoint",
        "lower_order_final": True,
        "euler_at_final": False,
        "use_karras_sigmas": False,
        "use_exponential_sigmas": False,
        "use_beta_sigmas": False,
        "use_lu_lambdas": False,
        "use_flow_sigmas": False,
        "final_sigmas_type": "zero",
        "lambda_min_clipped": -math.inf,
        "variance_type": None,
        "timestep_spacing": "linspace",
        "use_dynamic_shifting": False,
    },
    "EulerDiscreteScheduler": {
        **_COMMON,
        "interpolation_type": "linear",
        "use_karras_sigmas": False,
        "use_exponential_sigmas": False,
        "use_beta_sigmas": False,
        "sigma_min": None,
        "sigma_max": None,
        "timestep_spacing": "linspace",
        "timestep_type": "discrete",
        "final_sigmas_type": "zero",
    },
    "EulerAncestralDiscreteScheduler": {**_COMMON, "timestep_spacing": "linspace"},
    # k-diffusion's Heun, LMS and DPM2 as diffusers ports them: no zero-SNR rescaling, their own beta defaults
    "HeunDiscreteScheduler": {**_K_COMMON, "beta_start": 0.00085, "beta_end": 0.012, "clip_sample": False,
                              "clip_sample_range": 1.0},
    "LMSDiscreteScheduler": dict(_K_COMMON),
    "KDPM2DiscreteScheduler": {**_K_COMMON, "beta_start": 0.00085, "beta_end": 0.012},
    "KDPM2AncestralDiscreteScheduler": {**_K_COMMON, "beta_start": 0.00085, "beta_end": 0.012},
    # UniPC (Zhao et al. 2023): its own spacing and sigmas (see `unipc_schedule`)
    "UniPCMultistepScheduler": {
        **_COMMON,
        "solver_order": 2,
        "thresholding": False,
        "predict_x0": True,
        "solver_type": "bh2",
        "lower_order_final": True,
        "disable_corrector": (),
        "use_karras_sigmas": False,
        "use_exponential_sigmas": False,
        "use_beta_sigmas": False,
        "use_flow_sigmas": False,
        "timestep_spacing": "linspace",
        "final_sigmas_type": "zero",
        "use_dynamic_shifting": False,
        "sigma_min": None,
        "sigma_max": None,
    },
    "LCMScheduler": {
        **_COMMON,
        "beta_start": 0.00085,
        "beta_end": 0.012,
        "beta_schedule": "scaled_linear",
        "original_inference_steps": 50,
        "clip_sample": False,
        "clip_sample_range": 1.0,
        "set_alpha_to_one": True,
        "thresholding": False,
        "timestep_spacing": "leading",  # not used by LCM's set_timesteps
        "timestep_scaling": 10.0,
    },
}

# Values we do not implement; a config asking for one is refused rather than silently sampled differently.
_SUPPORTED = {
    "beta_schedule": ("linear", "scaled_linear", "squaredcos_cap_v2"),
    "prediction_type": ("epsilon", "v_prediction"),
    "timestep_spacing": ("linspace", "leading", "trailing"),
    "thresholding": (False,),
    "algorithm_type": ("dpmsolver++", "sde-dpmsolver++"),
    "solver_order": (2,),
    "solver_type": ("midpoint", "bh2"),
    "predict_x0": (True,),
    "use_beta_sigmas": (False,),
    "use_lu_lambdas": (False,),
    "use_flow_sigmas": (False,),
    "use_dynamic_shifting": (False,),
    "variance_type": (None,),
    "final_sigmas_type": ("zero", "sigma_min"),
    "interpolation_type": ("linear",),
    "timestep_type": ("discrete",),
}


#: Generous bound on the training schedule's length (SD's is 1000): it sizes tensors built per request.
MAX_TRAIN_TIMESTEPS = 100_000

_BOOL_KEYS = ("clip_sample", "set_alpha_to_one", "thresholding", "rescale_betas_zero_snr", "lower_order_final",
              "euler_at_final", "use_karras_sigmas", "use_exponential_sigmas", "use_beta_sigmas",
              "use_lu_lambdas", "use_flow_sigmas", "use_dynamic_shifting", "predict_x0")
_STR_KEYS = ("beta_schedule", "prediction_type", "timestep_spacing", "algorithm_type", "solver_type",
             "final_sigmas_type", "interpolation_type", "timestep_type")
# key -> (lowest, highest, whether the bounds themselves are allowed); None: no such bound
_FLOAT_RANGES = {
    "beta_start": (0.0, 1.0, False),
    "beta_end": (0.0, 1.0, False),
    "clip_sample_range": (0.0, None, False),
    "timestep_scaling": (0.0, 1e6, False),
    "sigma_min": (0.0, None, False),
    "sigma_max": (0.0, None, False),
    "lambda_min_clipped": (None, None, True),  # diffusers' default is -inf (written "-Infinity")
}
_NULLABLE = ("sigma_min", "sigma_max", "variance_type", "trained_betas")


def _short(value) -> str:
    try:
        text = repr(value)
    except ValueError:
        text = f"<{type(value).__name__}>"
    return text if len(text) <= 60 else text[:57] + "..."


def _is_int(value) -> bool:
    return type(value) is int


def _is_number(value) -> bool:
    return type(value) in (int, float) and not math.isnan(value)


def _check_int(config: dict, key: str, lo: int, hi: int) -> None:
    if key in config and not (_is_int(config[key]) and lo <= config[key] <= hi):
        raise ModelFolderError(f"scheduler config: {key} must be an integer from {lo} to {hi}, "
                               f"got {_short(config[key])}")


def _check_float(key: str, value, lo, hi, inclusive: bool) -> None:
    ok = _is_number(value) and value != math.inf and (inclusive or value != -math.inf)
    if ok and lo is not None:
        ok = value >= lo if inclusive else value > lo
    if ok and hi is not None:
        ok = value <= hi if inclusive else value < hi
    if not ok:
        bounds = f" in ({lo}, {hi})" if lo is not None and hi is not None else (f" above {lo}" if lo is not None
                                                                                  else " (not NaN or +Infinity)")
        raise ModelFolderError(f"scheduler config: {key} must be a number{bounds}, got {_short(value)}")


def _check_trained_betas(betas, n: int) -> None:
    if not isinstance(betas, list) or len(betas) != n:
        raise ModelFolderError(f"scheduler config: trained_betas must be null or a list of num_train_timesteps={n} "
                               f"numbers, got {_short(betas)}")
    for b in betas:
        if not (_is_number(b) and 0 < b < 1):
            raise ModelFolderError(f"scheduler config: trained_betas must lie in (0, 1), got {_short(b)}")


def _check_disable_corrector(config: dict, n: int) -> None:
    """UniPC's `disable_corrector`: a list of step indices (integers from 0 to num_train_timesteps - 1)."""
    value = config.get("disable_corrector", ())
    if not isinstance(value, (list, tuple)) or not all(_is_int(i) and 0 <= i < n for i in value):
        raise ModelFolderError(f"scheduler config: disable_corrector must be a list of step indices from 0 to "
                               f"{n - 1}, got {_short(value)}")


def check_scheduler_config(config: dict) -> None:
    """Type- and range-check the keys of a scheduler config that sdlite's samplers read (those present;
    others are ignored): integers are integers (not bools or floats), flags true/false, numbers finite and
    in range, `num_train_timesteps` at most `MAX_TRAIN_TIMESTEPS`. Raises ModelFolderError. Values that are
    well-formed but not implemented are `resolve_config`'s to refuse (they depend on the sampler)."""
    if not isinstance(config, dict):
        raise ModelFolderError(f"scheduler config: expected a JSON object, got {type(config).__name__}")
    _check_int(config, "num_train_timesteps", 1, MAX_TRAIN_TIMESTEPS)
    n = config.get("num_train_timesteps", _COMMON["num_train_timesteps"])
    _check_int(config, "steps_offset", 0, n - 1)
    _check_int(config, "solver_order", 1, 3)
    _check_int(config, "original_inference_steps", 1, n)
    for key in _BOOL_KEYS:
        if key in config and type(config[key]) is not bool:
            raise ModelFolderError(f"scheduler config: {key} must be true or false, got {_short(config[key])}")
    for key in (*_STR_KEYS, "variance_type"):
        value = config.get(key)
        if key in config and not isinstance(value, str) and not (value is None and key in _NULLABLE):
            raise ModelFolderError(f"scheduler config: {key} must be a string, got {_short(value)}")
    for key, (lo, hi, inclusive) in _FLOAT_RANGES.items():
        if key in config and not (config[key] is None and key in _NULLABLE):
            _check_float(key, config[key], lo, hi, inclusive)
    if config.get("trained_betas") is not None:
        _check_trained_betas(config["trained_betas"], n)
    _check_disable_corrector(config, n)
    used = config.get("_use_default_values", [])
    if not isinstance(used, list) or not all(isinstance(k, str) for k in used):
        raise ModelFolderError(f"scheduler config: _use_default_values must be a list of key names, "
                               f"got {_short(used)}")


def resolve_config(class_name: str, config: dict, **forced) -> dict:
    """The config diffusers' `class_name.from_config(config, **forced)` would run with (the keys we use).

    Keys listed in `_use_default_values` (diffusers writes that list into a loaded scheduler's config) are
    dropped first, as `from_config` does, so they too take `class_name`'s defaults. `forced` overrides both.
    Raises ModelFolderError for a malformed value (`check_scheduler_config`, on the config and on the result)
    or one sdlite's samplers do not implement (see `_SUPPORTED`), KeyError for a class_name not in `DEFAULTS`.
    """
    defaults = DEFAULTS[class_name]
    check_scheduler_config(config)
    from_defaults = set(config.get("_use_default_values", ()))
    cfg = dict(defaults)
    cfg.update({k: v for k, v in config.items() if k in defaults and k not in from_defaults})
    cfg.update(forced)
    check_scheduler_config(cfg)
    if cfg.get("use_karras_sigmas") and cfg.get("use_exponential_sigmas"):
        raise ModelFolderError("scheduler config: use_karras_sigmas and use_exponential_sigmas are both true; "
                               "diffusers allows only one")
    for key, allowed in _SUPPORTED.items():
        if key in cfg and cfg[key] not in allowed:
            raise ModelFolderError(
                f"scheduler config: {key}={cfg[key]!r} is not supported by sdlite's samplers"
                f" (supported: {', '.join(map(repr, allowed))})"
            )
    return cfg


_OUTDATED_NOTE = "using {new} as diffusers' StableDiffusionPipeline does with an outdated scheduler config"


def fix_outdated_scheduler_config(config: dict) -> tuple[dict, list[str]]:
    """A model folder's raw scheduler config with the values diffusers' `StableDiffusionPipeline.__init__`
    rewrites in outdated SD 1.x configs, and one line per rewrite to warn with.

    diffusers rewrites `steps_offset` != 1 to 1 and `clip_sample` true to false (with a deprecation warning)
    on the scheduler it loads; which class declares those keys does not matter (a PNDM config's clip_sample
    is kept and rewritten too). Only keys the file sets are rewritten here: for a key the file lacks,
    diffusers rewrites the class default (0, or DDIM's clip_sample true) on its own scheduler object, but
    that config lists the key in `_use_default_values`, so `XScheduler.from_config(pipe.scheduler.config)`,
    how diffusers switches samplers and the result sdlite's samplers reproduce, drops the rewrite and takes
    X's default again. Keys listed in the config's own `_use_default_values` count as unset likewise.
    Apply this to the folder's config before `resolve_config` turns it into a sampler's. diffusers'
    LatentConsistencyModelPipeline makes no such rewrite.

    Pure: `config` is not modified; an up-to-date config comes back equal, with no lines. A line reads
    e.g. "steps_offset is 0; using 1 as diffusers' StableDiffusionPipeline does with an outdated scheduler
    config" (the caller prefixes the file's name). Values are not validated here (`check_scheduler_config`).
    """
    defaulted = config.get("_use_default_values")

    def is_set(key: str) -> bool:
        return key in config and not (isinstance(defaulted, list) and key in defaulted)

    fixed, notes = dict(config), []
    if is_set("steps_offset") and config["steps_offset"] != 1:
        fixed["steps_offset"] = 1
        notes.append(f"steps_offset is {_short(config['steps_offset'])}; " + _OUTDATED_NOTE.format(new=1))
    if is_set("clip_sample") and config["clip_sample"] is True:
        fixed["clip_sample"] = False
        notes.append("clip_sample is true; " + _OUTDATED_NOTE.format(new="false"))
    return fixed, notes


# ---------------------------------------------------------------------------------------------------------
# The training schedule


def _cosine_betas(n: int, max_beta: float = 0.999) -> torch.Tensor:
    """Nichol & Dhariwal (2021): abar(t) = cos^2((t + 0.008) / 1.008 * pi / 2), discretized into betas."""

    def abar(t: float) -> float:
        return math.cos((t + 0.008) / 1.008 * math.pi / 2) ** 2

    return torch.tensor([min(1 - abar((i + 1) / n) / abar(i / n), max_beta) for i in range(n)], dtype=torch.float32)


def _rescale_zero_terminal_snr(betas: torch.Tensor) -> torch.Tensor:
    """Lin et al. (2023), Algorithm 1: shift and scale sqrt(abar) so that abar_{T-1} = 0."""
    abar_sqrt = torch.cumprod(1.0 - betas, dim=0).sqrt()
    first, last = abar_sqrt[0].clone(), abar_sqrt[-1].clone()
    abar_sqrt = (abar_sqrt - last) * (first / (first - last))
    abar = abar_sqrt**2
    alphas = torch.cat([abar[0:1], abar[1:] / abar[:-1]])
    return 1 - alphas


def alphas_cumprod(cfg: dict, terminal_floor: bool = False) -> torch.Tensor:
    """abar_t for t = 0..T-1: float32 1-d (T,), T = num_train_timesteps.

    `terminal_floor`: the sigma-based schedulers (Euler, DPM-Solver) replace a zero-SNR abar_{T-1} = 0 by
    2**-24 so that sigma stays finite; DDIM and LCM keep the zero.
    """
    n = cfg["num_train_timesteps"]
    if cfg["trained_betas"] is not None:
        betas = torch.tensor(cfg["trained_betas"], dtype=torch.float32)
    elif cfg["beta_schedule"] == "linear":
        betas = torch.linspace(cfg["beta_start"], cfg["beta_end"], n, dtype=torch.float32)
    elif cfg["beta_schedule"] == "scaled_linear":
        betas = torch.linspace(cfg["beta_start"] ** 0.5, cfg["beta_end"] ** 0.5, n, dtype=torch.float32) ** 2
    else:
        betas = _cosine_betas(n)
    rescale = cfg.get("rescale_betas_zero_snr", False)  # absent: a class without it (Heun, LMS, DPM2)
    if rescale:
        betas = _rescale_zero_terminal_snr(betas)
    abar = torch.cumprod(1.0 - betas, dim=0)
    if rescale and terminal_floor:
        abar[-1] = 2**-24
    return abar


def sigmas_of(abar: torch.Tensor) -> np.ndarray:
    """VE sigmas s_t = sqrt((1 - abar_t) / abar_t) at every training timestep: float32 numpy (T,), ascending."""
    return (((1 - abar) / abar) ** 0.5).numpy()


def predicted_x0_and_eps(output: torch.Tensor, x: torch.Tensor, alpha, sigma, prediction_type: str):
    """Split the network output for x = alpha x0 + sigma eps into (x0, eps).

    epsilon-prediction returns eps itself; v-prediction (Salimans & Ho 2022) returns v = alpha eps - sigma x0.
    output, x: (B, C, H/8, W/8) float32; alpha, sigma: 0-d float32 tensors. Returns two tensors shaped as x.
    """
    if prediction_type == "epsilon":
        return (x - sigma * output) / alpha, output
    return alpha * x - sigma * output, alpha * output + sigma * x


# ---------------------------------------------------------------------------------------------------------
# Spacing: which training timesteps a run of `steps` visits (Lin et al. 2023, table 2)


def spaced_timesteps(spacing: str, steps: int, num_train: int, steps_offset: int) -> np.ndarray:
    """Descending float64 timesteps, unrounded for "linspace" (DDIM rounds them, Euler does not).

    As diffusers, "trailing" steps a float range down from T, which for some step counts (61, 103, ...) yields
    one extra timestep, -1.
    """
    if spacing == "linspace":
        return np.linspace(0, num_train - 1, steps)[::-1].copy()
    if spacing == "leading":
        return (np.arange(0, steps) * (num_train // steps)).round()[::-1] + steps_offset
    return np.arange(num_train, 0, -num_train / steps).round() - 1


def ddim_timesteps(cfg: dict, steps: int) -> torch.Tensor:
    """DDIM's integer timesteps, descending (diffusers rounds the spaced ones): int64 1-d (n,),
    n = steps, or steps + 1 with the "trailing" quirk of `spaced_timesteps`."""
    timesteps = spaced_timesteps(cfg["timestep_spacing"], steps, cfg["num_train_timesteps"], cfg["steps_offset"])
    return torch.from_numpy(timesteps.round().astype(np.int64))


def ddim_schedule(cfg: dict, steps: int):
    """DDIM's timesteps and, for each, abar at that step and at the step it jumps to.

    As diffusers, the jump is always T // steps, whatever the spacing; below t = 0 it lands on abar = 1
    (`set_alpha_to_one`) or abar_0. Returns (timesteps float32 1-d (n,), alphas, alphas_next), the last two
    lists of n 0-d float32 tensors; n as `ddim_timesteps`.
    """
    n_train = cfg["num_train_timesteps"]
    timesteps = ddim_timesteps(cfg, steps)
    abar = alphas_cumprod(cfg)
    final = torch.tensor(1.0) if cfg["set_alpha_to_one"] else abar[0]
    prev = timesteps - n_train // steps
    alphas = [abar[t] for t in timesteps]
    alphas_next = [abar[p] if p >= 0 else final for p in prev]
    return timesteps.to(torch.float32), alphas, alphas_next


def karras_sigmas(sigma_min: float, sigma_max: float, steps: int, rho: float = 7.0) -> np.ndarray:
    """Karras et al. (2022), eq. 5: `steps` sigmas from sigma_max to sigma_min, evenly spaced in sigma^(1/rho).

    Returns float64 numpy (steps,), descending.
    """
    ramp = np.linspace(0, 1, steps)
    max_inv_rho, min_inv_rho = sigma_max ** (1 / rho), sigma_min ** (1 / rho)
    return (max_inv_rho + ramp * (min_inv_rho - max_inv_rho)) ** rho


def exponential_sigmas(sigma_min: float, sigma_max: float, steps: int) -> np.ndarray:
    """`steps` sigmas from sigma_max to sigma_min, evenly spaced in log sigma (k-diffusion's
    `get_sigmas_exponential`, A1111's "Exponential" schedule type). Returns float64 numpy (steps,), descending."""
    return np.exp(np.linspace(math.log(sigma_max), math.log(sigma_min), steps))


def sigma_to_t(sigmas: np.ndarray, log_sigmas: np.ndarray) -> np.ndarray:
    """The (fractional) training timestep of each sigma: linear interpolation in log sigma.

    sigmas: numpy (n,); log_sigmas: numpy (T,), ascending. Returns float64 numpy (n,).
    """
    log_sigma = np.log(np.maximum(sigmas, 1e-10))
    low = np.clip(np.searchsorted(log_sigmas, log_sigma, side="right") - 1, 0, len(log_sigmas) - 2)
    w = np.clip((log_sigmas[low] - log_sigma) / (log_sigmas[low] - log_sigmas[low + 1]), 0, 1)
    return (1 - w) * low + w * (low + 1)


def euler_schedule(cfg: dict, steps: int):
    """Timesteps and VE sigmas (with a final 0 or sigma_min) for Euler and Euler ancestral.

    Returns (timesteps float32 1-d (n,), sigmas float32 1-d (n + 1,)); n = steps, or steps + 1 with the
    "trailing" quirk of `spaced_timesteps`.
    """
    timesteps = spaced_timesteps(cfg["timestep_spacing"], steps, cfg["num_train_timesteps"], cfg["steps_offset"])
    timesteps = timesteps.astype(np.float32)
    abar = alphas_cumprod(cfg, terminal_floor=True)
    train_sigmas = sigmas_of(abar)
    sigmas = np.interp(timesteps, np.arange(len(train_sigmas)), train_sigmas)
    if cfg.get("use_karras_sigmas"):
        lo = cfg["sigma_min"] if cfg["sigma_min"] is not None else sigmas[-1].item()
        hi = cfg["sigma_max"] if cfg["sigma_max"] is not None else sigmas[0].item()
        sigmas = karras_sigmas(lo, hi, steps)
        timesteps = sigma_to_t(sigmas, np.log(train_sigmas)).astype(np.float32)
    elif cfg.get("use_exponential_sigmas"):
        lo = cfg["sigma_min"] if cfg["sigma_min"] is not None else sigmas[-1].item()
        hi = cfg["sigma_max"] if cfg["sigma_max"] is not None else sigmas[0].item()
        sigmas = exponential_sigmas(lo, hi, steps)
        timesteps = sigma_to_t(sigmas, np.log(train_sigmas)).astype(np.float32)
    last = train_sigmas[0] if cfg.get("final_sigmas_type") == "sigma_min" else 0.0
    sigmas = np.concatenate([sigmas, [last]]).astype(np.float32)
    return torch.from_numpy(timesteps), torch.from_numpy(sigmas)


def euler_init_sigma(cfg: dict, sigmas: torch.Tensor) -> torch.Tensor:
    """The std of the initial latent: sigma_max, or as diffusers sqrt(sigma_max^2 + 1) for "leading" spacing.

    sigmas: float32 1-d; returns a 0-d float32 tensor.
    """
    if cfg["timestep_spacing"] in ("linspace", "trailing"):
        return sigmas.max()
    return (sigmas.max() ** 2 + 1) ** 0.5


def dpm_solver_schedule(cfg: dict, steps: int, karras: bool, exponential: bool = False):
    """Integer timesteps and VE sigmas (with a final 0 or sigma_min) for DPM-Solver++, float32 tensors.

    Unlike DDIM and Euler, diffusers spaces steps + 1 points and drops the last, and counts only timesteps
    whose log-SNR is above `lambda_min_clipped`. Returns (timesteps float32 1-d (n,), integral values;
    sigmas float32 1-d (n + 1,)); n = steps, or steps + 1 with "trailing" spacing's quirk.
    """
    n_train = cfg["num_train_timesteps"]
    abar = alphas_cumprod(cfg, terminal_floor=True)
    log_snr = torch.log(torch.sqrt(abar)) - torch.log(torch.sqrt(1 - abar))
    last = n_train - torch.searchsorted(torch.flip(log_snr, [0]), cfg["lambda_min_clipped"]).item()
    spacing = cfg["timestep_spacing"]
    if spacing == "linspace":
        timesteps = np.linspace(0, last - 1, steps + 1).round()[::-1][:-1]
    elif spacing == "leading":
        timesteps = (np.arange(0, steps + 1) * (last // (steps + 1))).round()[::-1][:-1] + cfg["steps_offset"]
    else:
        timesteps = np.arange(last, 0, -n_train / steps).round() - 1
    timesteps = timesteps.astype(np.int64)
    train_sigmas = sigmas_of(abar)
    if karras:
        sigmas = karras_sigmas(train_sigmas[0].item(), train_sigmas[-1].item(), steps)
        timesteps = sigma_to_t(sigmas, np.log(train_sigmas))
        if cfg["beta_schedule"] != "squaredcos_cap_v2":
            timesteps = timesteps.round()
    elif exponential:  # as diffusers, the timesteps are truncated to integers, not rounded
        sigmas = exponential_sigmas(train_sigmas[0].item(), train_sigmas[-1].item(), steps)
        timesteps = sigma_to_t(sigmas, np.log(train_sigmas))
    else:
        sigmas = np.interp(timesteps, np.arange(len(train_sigmas)), train_sigmas)
    final = train_sigmas[0] if cfg["final_sigmas_type"] == "sigma_min" else 0.0
    sigmas = np.concatenate([sigmas, [final]]).astype(np.float32)
    return torch.from_numpy(timesteps.astype(np.int64)).to(torch.float32), torch.from_numpy(sigmas)


def unipc_schedule(cfg: dict, steps: int):
    """Integer timesteps and VE sigmas (with a final 0 or sigma_min) for UniPC, float32 tensors.

    Spaced as DPM-Solver++ (steps + 1 points, the last dropped; no `lambda_min_clipped`), or Karras /
    exponential sigmas between the config's `sigma_min`/`sigma_max` (default: the training schedule's ends),
    mapped back to timesteps, rounded (Karras, whatever the beta schedule) or truncated (exponential) to
    integers as diffusers does. The final sigma is 0, or with "sigma_min" the smallest sigma of the schedule:
    the training one for the spaced schedule, the ramp's last for Karras / exponential. Returns as
    `dpm_solver_schedule`.
    """
    karras, exponential = cfg["use_karras_sigmas"], cfg["use_exponential_sigmas"]
    if not (karras or exponential):
        return dpm_solver_schedule({**cfg, "lambda_min_clipped": -math.inf}, steps, False)
    train_sigmas = sigmas_of(alphas_cumprod(cfg, terminal_floor=True))
    lo = cfg["sigma_min"] if cfg["sigma_min"] is not None else train_sigmas[0].item()
    hi = cfg["sigma_max"] if cfg["sigma_max"] is not None else train_sigmas[-1].item()
    sigmas = (karras_sigmas if karras else exponential_sigmas)(lo, hi, steps)
    timesteps = sigma_to_t(sigmas, np.log(train_sigmas))
    if karras:
        timesteps = timesteps.round()
    final = sigmas[-1] if cfg["final_sigmas_type"] == "sigma_min" else 0.0
    sigmas = np.concatenate([sigmas, [final]]).astype(np.float32)
    return torch.from_numpy(timesteps.astype(np.int64)).to(torch.float32), torch.from_numpy(sigmas)


def k_schedule(cfg: dict, steps: int, round_karras: bool = False):
    """Timesteps and VE sigmas (with a final 0) for Heun, LMS, DPM2 and DPM2 ancestral: spaced as Euler, or
    Karras / exponential sigmas between the spaced ones' ends (`use_karras_sigmas`, `use_exponential_sigmas`),
    each then mapped back to a fractional timestep (DPM2 rounds the Karras ones: `round_karras`).

    Returns (timesteps float64 numpy (n,), sigmas float32 1-d tensor (n + 1,)); n as `euler_schedule`.
    """
    timesteps = spaced_timesteps(cfg["timestep_spacing"], steps, cfg["num_train_timesteps"], cfg["steps_offset"])
    timesteps = timesteps.astype(np.float32)
    train_sigmas = sigmas_of(alphas_cumprod(cfg))
    sigmas = np.interp(timesteps, np.arange(len(train_sigmas)), train_sigmas)
    if cfg["use_karras_sigmas"] or cfg["use_exponential_sigmas"]:
        ramp = karras_sigmas if cfg["use_karras_sigmas"] else exponential_sigmas
        sigmas = ramp(sigmas[-1].item(), sigmas[0].item(), steps)
        timesteps = sigma_to_t(sigmas, np.log(train_sigmas))
        if round_karras and cfg["use_karras_sigmas"]:
            timesteps = timesteps.round()
    sigmas = np.concatenate([sigmas, [0.0]]).astype(np.float32)
    return timesteps.astype(np.float64), torch.from_numpy(sigmas)


def log_train_sigmas(cfg: dict) -> np.ndarray:
    """log s_t at every training timestep: float32 numpy (T,), ascending (for `sigma_to_t`)."""
    return np.log(sigmas_of(alphas_cumprod(cfg)))


def lcm_timesteps(cfg: dict, steps: int) -> torch.Tensor:
    """LCM (Luo et al. 2023): `steps` of the `original_inference_steps` skipping-step timesteps it was distilled on.

    Returns float32 1-d (steps,), integral values, descending; steps <= original_inference_steps.
    """
    original = cfg["original_inference_steps"]
    k = cfg["num_train_timesteps"] // original
    origin = (np.arange(1, original + 1) * k - 1)[::-1]
    picks = np.floor(np.linspace(0, len(origin), num=steps, endpoint=False)).astype(np.int64)
    return torch.from_numpy(origin[picks].astype(np.int64)).to(torch.float32)
