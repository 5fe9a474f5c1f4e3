"""sdlite: Stable Diffusion text-to-image for small CPU-only machines, inside a declared memory budget.

    from sdlite import Pipeline
    result = Pipeline.load("path/to/model", memory_budget="1.5G").generate("a lighthouse at dusk", seed=1)
    result.save("out.png")

Public names: `Pipeline`, `GenerationRequest`, `GenerationResult`, and the errors it raises
(`SdliteError` and its subclasses `InvalidRequest`, `ModelFolderError`, `WeightsError`, `PlanError`,
`GenerationError`, `Cancelled`).
"""

from typing import TYPE_CHECKING

from .errors import Cancelled, GenerationError, InvalidRequest, ModelFolderError, PlanError, SdliteError, WeightsError

if TYPE_CHECKING:  # for type checkers; at run time these come from __getattr__
    from .pipeline import GenerationResult, Pipeline
    from .request import GenerationRequest

__version__ = "0.1.0"

__all__ = ["Pipeline", "GenerationRequest", "GenerationResult", "SdliteError", "InvalidRequest",
           "ModelFolderError", "WeightsError", "PlanError", "GenerationError", "Cancelled", "__version__"]

_LAZY = {"Pipeline": "pipeline", "GenerationResult": "pipeline", "GenerationRequest": "request"}


def __getattr__(name: str):  # imported lazily so that `import sdlite` stays cheap (no torch)
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'sdlite' has no attribute {name!r}")
    from importlib import import_module
    return getattr(import_module(f".{module}", __name__), name)


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
