"""Errors raised by sdlite. Front ends turn these into one clear line and a non-zero exit (the CLI), or a
status code that names the bad field (the service).

    SdliteError            the base class: every error sdlite raises on purpose
      WeightsError         a weight file is missing, corrupt, truncated or does not match the model
      ModelFolderError     a model folder lacks a part or has an unreadable config
      InvalidRequest       a generation request has a bad field (.field names it)
      PlanError            no combination of memory levers fits the memory budget
      GenerationError      a generation ran but gave no valid image (NaN or infinite values)
      Cancelled            a generation was cancelled between sampler steps
"""


class SdliteError(Exception):
    """Base class for every error sdlite raises on purpose."""


class WeightsError(SdliteError):
    """A weight file is missing, corrupt, truncated or does not match the model."""


class ModelFolderError(SdliteError):
    """A model folder is missing a part or has an unreadable config."""


class InvalidRequest(SdliteError):
    """A generation request has a bad field (size, steps, sampler, ...).

    `field`: the request's field name ("width", "steps", ...); `message`: what is wrong with it.
    str(error) is "field: message"."""

    def __init__(self, field: str, message: str):
        super().__init__(f"{field}: {message}")
        self.field = field
        self.message = message


class PlanError(SdliteError):
    """No combination of memory levers fits the memory budget (the message names the smallest budget that
    would, and what else would help)."""


class GenerationError(SdliteError):
    """A generation ran but its result is not an image: NaN or infinite latents or pixels (from the
    weights, the config or the arithmetic). The message names the stage where they appeared."""


class Cancelled(SdliteError):
    """A generation was cancelled between sampler steps."""


class OutdatedConfigWarning(UserWarning):
    """A model's config carries values that diffusers rewrites for Stable Diffusion (e.g. an old scheduler
    config's `steps_offset: 0`); sdlite applies the same fix and says so."""


class PrecisionFallbackWarning(UserWarning):
    """A stage's reduced-precision output was not finite; it was computed again in fp32 (and stays fp32)."""
