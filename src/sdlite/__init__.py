"""sdlite: Stable Diffusion text-to-image for small CPU-only machines."""

__version__ = "0.1.0"

__all__ = ["Pipeline", "GenerationRequest", "GenerationResult", "__version__"]


def __getattr__(name):  # imported lazily so that `import sdlite` stays cheap
    if name in ("Pipeline", "GenerationRequest", "GenerationResult"):
        from . import pipeline
        return getattr(pipeline, name)
    raise AttributeError(f"module 'sdlite' has no attribute {name!r}")
