"""sdlite: Stable Diffusion text-to-image for small CPU-only machines."""

__version__ = "0.1.0"
