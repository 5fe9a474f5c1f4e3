"""Measure the anonymous-memory peaks the planner's coefficients come from (runtime/planner.py).

    .venv/bin/python bench/calibrate_memory.py [--model /tmp/sdlite-sd15] [--taesd DIR]
    .venv/bin/python bench/calibrate_memory.py --taesd DIR --only taesd     # TAESD decoder cases only
    .venv/bin/python bench/calibrate_memory.py --model /tmp/sdlite-sd15-fp16 --precision bf16 --only unet
                                        # a 16-bit compute dtype (weights converted at load: no workspace)

Each measurement runs in a fresh process: load the one network, then run its forward pass while a
sampling thread records RssAnon every 5 ms; prints the peak above the loaded state as JSON lines,
with the per-pixel coefficient it implies.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys

CASES = [
    ("base", 0, 0),
    ("text_encoder", 1, 77),
    ("unet", 1, 64), ("unet", 2, 64), ("unet", 2, 32),
    ("vae", 1, 64), ("vae", 1, 32), ("vae", 1, 16),
    ("taesd", 1, 128), ("taesd", 1, 64), ("taesd", 1, 32),   # with --taesd DIR
]


def child(model: str, stage: str, batch: int, size: int, taesd: str | None, precision: str = "fp32") -> None:
    import torch
    torch.set_num_threads(2)
    from sdlite.runtime import memory
    from sdlite.runtime.components import LOADERS
    from sdlite.runtime.profiler import Profiler
    from sdlite.weights.model_folder import ModelFolder

    if stage == "base":
        import sdlite.pipeline  # noqa: F401
        x = torch.randn(1, 320, 64, 64)
        torch.nn.functional.conv2d(x, torch.randn(320, 320, 3, 3), padding=1)
        r = memory.rss()
        print(json.dumps({"stage": "base", "anon": r.anon, "file": r.file}))
        return
    folder = ModelFolder.open(model, vae=taesd if stage == "taesd" else None)
    from sdlite.runtime.precision import resolve_precision
    dtype = resolve_precision(precision).dtype_of("vae" if stage == "taesd" else stage)
    mode = "lazy" if dtype == torch.float32 else "materialize"
    part = LOADERS["vae" if stage == "taesd" else stage](folder, dtype, weights_mode=mode)
    memory.trim()
    before = memory.rss().anon
    prof = Profiler(interval=0.005)
    with torch.inference_mode(), prof.stage(stage):
        if stage == "text_encoder":
            part.module(torch.zeros(batch, 77, dtype=torch.long))
        elif stage == "unet":
            cfg = part.module.config
            part.module(torch.randn(batch, 4, size, size).to(dtype), torch.tensor(500.0),
                        torch.randn(batch, 77, cfg.cross_attention_dim).to(dtype))
        else:
            part.module.decode(torch.randn(1, 4, size, size).to(dtype))
    prof.close()
    peak = prof.records[-1].peak_anon - before
    if stage == "unet":
        coef = peak / (batch * size * size)
    elif stage in ("vae", "taesd"):
        coef = peak / ((size * 8) ** 2)
    else:
        coef = peak
    print(json.dumps({"stage": stage, "precision": precision, "batch": batch, "size": size, "anon_peak_above_loaded": peak,
                      "coefficient": round(coef), "seconds": round(prof.records[-1].seconds, 2)}))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="/tmp/sdlite-sd15")
    ap.add_argument("--taesd", help="a TAESD (AutoencoderTiny) folder: also measure its decoder")
    ap.add_argument("--only", help="measure only this stage (base, text_encoder, unet, vae, taesd)")
    ap.add_argument("--precision", default="fp32", help="fp32, bf16 or fp16 (runtime.precision)")
    ap.add_argument("--child", nargs=3)
    args = ap.parse_args()
    if args.child:
        child(args.model, args.child[0], int(args.child[1]), int(args.child[2]), args.taesd, args.precision)
        return
    for stage, batch, size in CASES:
        if (args.only and stage != args.only) or (stage == "taesd" and not args.taesd):
            continue
        cmd = [sys.executable, __file__, "--model", args.model, "--precision", args.precision,
               "--child", stage, str(batch), str(size)]
        subprocess.run(cmd + (["--taesd", args.taesd] if args.taesd else []), check=True)


if __name__ == "__main__":
    main()
