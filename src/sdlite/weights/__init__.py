"""Reading and writing checkpoints: mmap safetensors, key layouts, quantized storage."""

from sdlite.weights.safetensors_mmap import (
    DTYPES,
    SafetensorsFile,
    TensorInfo,
    open_safetensors,
    save_safetensors,
)
from sdlite.weights.state_dict import (
    ComponentWeights,
    LoadReport,
    format_names,
    load_component_weights,
    load_into,
)

__all__ = [
    "DTYPES",
    "ComponentWeights",
    "LoadReport",
    "SafetensorsFile",
    "TensorInfo",
    "format_names",
    "load_component_weights",
    "load_into",
    "open_safetensors",
    "save_safetensors",
]
