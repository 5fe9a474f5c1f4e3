"""Errors raised by sdlite. Front ends turn these into one clear line and a non-zero exit."""


class SdliteError(Exception):
    """Base class for every error sdlite raises on purpose."""


class WeightsError(SdliteError):
    """A weight file is missing, corrupt, truncated or does not match the model."""


class ModelFolderError(SdliteError):
    """A model folder is missing a part or has an unreadable config."""


class InvalidRequest(SdliteError):
    """A generation request has a bad field (size, steps, sampler, ...)."""

    def __init__(self, field: str, message: str):
        super().__init__(f"{field}: {message}")
        self.field = field


class Cancelled(SdliteError):
    """A generation was cancelled between sampler steps."""
