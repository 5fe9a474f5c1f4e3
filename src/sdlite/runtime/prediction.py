"""Epsilon or v: settling the prediction type of an SD 2.x single file that nothing else names.

SD 2.x comes as 512-pixel epsilon models (2.0-base, 2.1-base) and 768-pixel v-prediction models (2.0,
2.1), identical in shape. A folder says which in its scheduler config, a single file only in a sidecar
`.yaml` (or in the user's `--prediction-type`). When neither is there, the file is tested as A1111 does
(`modules/sd_models_config.py`, `is_using_v_parameterization_for_sd2`): one UNet evaluation on a constant
input, x = 0.5 everywhere (1 x C x 8 x 8), t = 999, text embeddings 0.5 everywhere (1 x 2 x width); a v model's
output lies far below its input there (mean(out - x) < -1), an epsilon model's does not.

At t = 999 the noisy latent is almost pure noise, so an epsilon model predicts roughly x itself, while
v = sqrt(abar) eps - sqrt(1 - abar) x0 is dominated by -x0; the threshold separates the two on real SD 2.x
weights. It rests on trained weights: random test weights cannot show it right, only that it runs.
"""

from __future__ import annotations

import torch

from . import memory
from .components import load_unet

THRESHOLD = -1.0


def v_prediction_score(unet: torch.nn.Module) -> float:
    """mean(unet(x, 999, c) - x) over the constant test input above; float. Below THRESHOLD: v."""
    cfg = unet.config
    x = torch.full((1, cfg.in_channels, 8, 8), 0.5)
    context = torch.full((1, 2, cfg.cross_attention_dim), 0.5)
    with torch.inference_mode():
        out = unet(x, torch.tensor([999.0]), context).float()
    return float((out - x[:, : out.shape[1]]).mean())


def settle_prediction_type(model, dtype: torch.dtype = torch.float32) -> None:
    """For a model whose prediction type is still open (`model.needs_prediction_check`: an SD 2.x single
    file with no sidecar, config folder or override), load its UNet (mapped, lazily dequantized), run the
    test, record the answer on the model with a note saying how it was found, and drop the UNet again
    (its file pages evicted). Any other model is left as it is."""
    if not getattr(model, "needs_prediction_check", False):
        return
    part = load_unet(model, dtype)
    files = [f.path for f in getattr(part.weights, "files", [])]
    try:
        score = v_prediction_score(part.module)
    finally:
        part.close()
        del part
        memory.trim()
        for f in files:
            memory.drop_file_cache(f)
    kind = "v_prediction" if score < THRESHOLD else "epsilon"
    model.set_prediction_type(kind, f"detected: mean(out - x) = {score:.2f} at t=999 "
                              f"({'<' if score < THRESHOLD else '>='} {THRESHOLD}); override with --prediction-type")


__all__ = ["settle_prediction_type", "v_prediction_score", "THRESHOLD"]
