"""Full SD 1.5-size parity and speed: sdlite vs diffusers on the same random weights, side by side.

    .venv/bin/python bench/parity_sd15.py [--model /tmp/sdlite-sd15] [--repeats 3] [--threads 2]

Writes the random SD 1.5-size folder first if it is missing (about 4 GB, fp32). Prints one JSON line
per result:
  rss_after_load / rss_after_step  anonymous and file-backed RSS of a fresh process running sdlite
  unet_error                       max abs error of one UNet call (batch 2, 64x64 latents), relative
  unet_step_seconds                median s per UNet call, batch 2 (CFG), ours and diffusers, alternated
  image_error                      4-step DPM++ 2M 512x512 generation, latents and 8-bit image
Needs the test extras (diffusers, transformers). Run on a quiet machine: nothing else busy.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch


def emit(**kw):
    print(json.dumps(kw), flush=True)


def rss() -> dict:
    out = {}
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(("RssAnon:", "RssFile:", "VmHWM:")):
                key, value = line.split(":")
                out[key] = int(value.split()[0]) * 1024
    return out


def rss_child(model: str, threads: int) -> None:
    """Run in a fresh process: RSS after load and after one UNet step."""
    torch.set_num_threads(threads)
    from sdlite.pipeline import Pipeline
    before = rss()
    pipe = Pipeline.load(model)
    after = rss()
    weight_bytes = sum(c.weights.total_bytes for c in (pipe.text_encoder, pipe.unet, pipe.vae))
    emit(result="rss_after_load", weight_bytes=weight_bytes,
         anon_bytes=after["RssAnon"] - before["RssAnon"], file_bytes=after["RssFile"] - before["RssFile"],
         anon_fraction_of_weights=round((after["RssAnon"] - before["RssAnon"]) / weight_bytes, 4))
    x = torch.randn(2, 4, 64, 64)
    ctx = torch.randn(2, 77, 768)
    with torch.inference_mode():
        pipe.unet.module(x, torch.tensor(500.0), ctx)
    step = rss()
    emit(result="rss_after_step", anon_bytes=step["RssAnon"] - before["RssAnon"],
         file_bytes=step["RssFile"] - before["RssFile"], peak_rss_bytes=step["VmHWM"])


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="/tmp/sdlite-sd15")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rss-child", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--skip-image", action="store_true")
    args = ap.parse_args()
    if args.rss_child:
        rss_child(args.model, args.threads)
        return

    torch.set_num_threads(args.threads)
    if not Path(args.model, "model_index.json").is_file():
        from sdlite.testing.random_model import write_random_model
        t0 = time.perf_counter()
        write_random_model("sd15", args.model, seed=0)
        emit(result="wrote_model", path=args.model, seconds=round(time.perf_counter() - t0, 1))

    subprocess.run([sys.executable, __file__, "--rss-child", "--model", args.model,
                    "--threads", str(args.threads)], check=True)

    import diffusers

    from sdlite.pipeline import Pipeline

    ours = Pipeline.load(args.model)
    ref = diffusers.StableDiffusionPipeline.from_pretrained(args.model, safety_checker=None,
                                                            requires_safety_checker=False)
    ref.set_progress_bar_config(disable=True)
    ref.scheduler = diffusers.DPMSolverMultistepScheduler.from_config(ref.scheduler.config)

    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 4, 64, 64, generator=g)
    ctx = torch.randn(2, 77, 768, generator=g)
    t = torch.tensor(601.0)

    def run_ours():
        with torch.inference_mode():
            return ours.unet.module(x, t, ctx)

    def run_ref():
        with torch.inference_mode():
            return ref.unet(x, t, ctx).sample

    a, b = run_ours(), run_ref()  # also the warm-up of each
    emit(result="unet_error", max_abs=float((a - b).abs().max()), ref_max_abs=float(b.abs().max()),
         relative=float((a - b).abs().max() / b.abs().max()))

    times = {"sdlite": [], "diffusers": []}
    for _ in range(args.repeats):
        for name, fn in (("sdlite", run_ours), ("diffusers", run_ref)):
            t0 = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t0)
    med = {k: statistics.median(v) for k, v in times.items()}
    emit(result="unet_step_seconds", batch=2, latent="64x64", threads=args.threads,
         sdlite=round(med["sdlite"], 3), diffusers=round(med["diffusers"], 3),
         ratio=round(med["sdlite"] / med["diffusers"], 4),
         runs={k: [round(s, 3) for s in v] for k, v in times.items()})

    if args.skip_image:
        return
    prompt, seed = "a lighthouse at dusk", 42
    t0 = time.perf_counter()
    got = ours.generate(prompt, steps=4, cfg_scale=7.5, seed=seed, sampler="dpm++2m")
    ours_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    want_lat = ref(prompt, num_inference_steps=4, guidance_scale=7.5, height=512, width=512,
                   generator=torch.Generator().manual_seed(seed), output_type="latent").images
    with torch.inference_mode():
        img = ref.vae.decode(want_lat / ref.vae.config.scaling_factor).sample
    ref_s = time.perf_counter() - t0
    img = ((img / 2 + 0.5).clamp(0, 1)[0].permute(1, 2, 0).numpy() * 255).round()
    diff = np.abs(np.asarray(got.image).astype(np.float64) - img)
    emit(result="image_error", sampler="dpm++2m", steps=4, size="512x512",
         latent_relative=float((got.latents - want_lat).abs().max() / want_lat.abs().max()),
         image_max_abs_8bit=float(diff.max()), image_mean_abs_8bit=float(diff.mean()),
         sdlite_seconds=round(ours_s, 2), diffusers_seconds=round(ref_s, 2))


if __name__ == "__main__":
    main()
