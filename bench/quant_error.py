"""fp16 and int8 weight storage against fp32 on the same seed: UNet output error and image PSNR.

    .venv/bin/python bench/quant_error.py --fp32 /tmp/sdlite-sd15 --fp16 /tmp/sdlite-sd15-fp16 \\
        --int8 /tmp/sdlite-sd15-int8 [--size 512 --steps 4]

Prints one JSON line per weight format: the UNet output's max abs error relative to fp32's max abs
value (batch 2, CFG-style input), and the PSNR of the final 8-bit image against fp32's (DPM++ 2M, CFG 7.5).
"""

from __future__ import annotations

import argparse
import json

import numpy as np
import torch


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = float(np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2))
    return float("inf") if mse == 0 else 10 * np.log10(255.0**2 / mse)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--fp32", required=True)
    ap.add_argument("--fp16")
    ap.add_argument("--int8")
    ap.add_argument("--size", type=int, default=512)
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    from sdlite.pipeline import Pipeline

    def run(folder):
        pipe = Pipeline.load(folder)
        unet = pipe.unet.module
        g = torch.Generator().manual_seed(0)
        lat = args.size // pipe.vae_scale_factor
        x = torch.randn(2, pipe.latent_channels, lat, lat, generator=g)
        ctx = torch.randn(2, 77, unet.config.cross_attention_dim, generator=g)
        with torch.inference_mode():
            out = unet(x, torch.tensor(601.0), ctx)
        img = pipe.generate("a lighthouse at dusk", steps=args.steps, seed=42, width=args.size,
                            height=args.size, sampler="dpm++2m").image
        pipe.close()
        return out, np.asarray(img)

    ref_out, ref_img = run(args.fp32)
    for fmt in ("fp16", "int8"):
        folder = getattr(args, fmt)
        if not folder:
            continue
        out, img = run(folder)
        print(json.dumps({"weights": fmt, "model": folder, "size": args.size, "steps": args.steps,
                          "unet_relative_error": float((out - ref_out).abs().max() / ref_out.abs().max()),
                          "image_psnr_db": round(psnr(img, ref_img), 2),
                          "image_max_abs_8bit": int(np.abs(img.astype(int) - ref_img.astype(int)).max())}),
              flush=True)


if __name__ == "__main__":
    main()
