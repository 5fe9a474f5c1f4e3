"""Models for tests and benches, with random weights, in the real on-disk formats.

    from sdlite.testing import write_random_model
    write_random_model("tiny", "/tmp/tiny")     # a complete diffusers folder in about a second

`architectures` names the shapes (tiny, tiny-bk, bk-sdm-tiny, sd15; taesd, tiny-taesd) as diffusers config
dicts; `random_model` writes them. The engine never imports it; `sdlite random-model` and the trainer (for its base configs) do.
"""

from .architectures import ARCHITECTURES, VAE_ARCHITECTURES, architecture
from .random_model import random_state_dict, write_random_model, write_random_vae

__all__ = ["ARCHITECTURES", "VAE_ARCHITECTURES", "architecture", "random_state_dict", "write_random_model",
           "write_random_vae"]
