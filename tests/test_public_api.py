"""The public surface: `from sdlite import ...`, the error hierarchy, py.typed, docstrings."""

import importlib.resources
import inspect
import subprocess
import sys

import sdlite


def test_public_names_import():
    from sdlite import (  # noqa: F401
        Cancelled,
        GenerationRequest,
        GenerationResult,
        InvalidRequest,
        ModelFolderError,
        Pipeline,
        PlanError,
        SdliteError,
        WeightsError,
    )
    for error in (InvalidRequest, ModelFolderError, WeightsError, PlanError, Cancelled):
        assert issubclass(error, SdliteError)
    assert set(sdlite.__all__) >= {"Pipeline", "GenerationResult", "SdliteError", "PlanError"}
    from sdlite.runtime.planner import PlanError as planner_error
    assert planner_error is PlanError  # one class, wherever it is imported from


def test_import_stays_light():
    code = "import sys, sdlite; from sdlite import SdliteError; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False"


def test_py_typed_is_shipped():
    assert importlib.resources.files("sdlite").joinpath("py.typed").is_file()


def test_public_methods_are_documented():
    from sdlite import GenerationRequest, GenerationResult, Pipeline
    public = [m for name, m in vars(Pipeline).items() if not name.startswith("_")]
    for member in public:
        target = member.fget if isinstance(member, property) else getattr(member, "__func__", member)
        assert inspect.getdoc(target), member
    for doc in (Pipeline.load.__doc__, Pipeline.generate.__doc__):
        assert "Raises" in doc
    for cls in (GenerationRequest, GenerationResult):
        doc = inspect.getdoc(cls)
        for field in cls.__dataclass_fields__:
            assert field in doc, (cls.__name__, field)
