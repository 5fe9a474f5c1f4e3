"""Time to image on the same CPU: sdlite's compute precisions and DeepCache against diffusers, same weights.

    .venv/bin/python bench/presets.py --make          # once: the SD 1.5-size fp16 folder (/tmp/sdlite-sd15-fp16)
    .venv/bin/python bench/speed.py [--repeat 3] [--rows sdlite-fp32,sdlite-bf16,...] [--out DIR]

Every row runs in a fresh process (2 threads, no memory budget, every network loaded up front), the rows of a
round one after the other and the rounds repeated, so that each row's median is taken side by side with the
others on the same machine state. One JSON line per run, then one summary line per row (medians).

What a run measures, 512x512, SD 1.5-size random weights (fp16 on disk):
  s_per_step      one UNet evaluation at batch 2 (classifier-free guidance as one batch), median of 3 after a
                  warm-up; with DeepCache N the mean over 20 steps of full and shallow evaluations
                  (ceil(20/N) full, the rest shallow, each timed, median of 3)
  tti_20_dpm_cfg  time to image for 20 steps of DPM++ 2M with CFG: text encoding (cond + uncond, timed) +
                  20 x s_per_step + the VAE decode (timed): derived from the measured parts, not run whole
                  (`--check ROWS` runs one such generation whole for those rows in the first round, to show
                  the two agree)
  tti_4_lcm       time to image for 4 LCM steps without CFG (cfg 1: batch 1), run whole: request -> PIL image
  peak_rss_MiB    the process's peak resident memory (VmHWM: anonymous + mapped weights)
  unet_rel_err    ||out - out_ref|| / ||out_ref|| of one UNet evaluation on fixed inputs against sdlite fp32;
                  for DeepCache, the shallow evaluation that reuses the feature of a full one at the previous
                  input (x, t=500) on the next (x', t=480), against the full fp32 evaluation on (x', t=480)
  channels_last   (the -channels-last row) the UNet's conv weights and the input in NHWC memory format: the
                  s/step comparison only (the generation runs as usual)
  psnr_db         8-bit image PSNR of the 4-step LCM image against sdlite fp32's (same seed); random weights,
                  so the picture means nothing: this measures numerical drift only
"""

from __future__ import annotations

import argparse
import json
import math
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve()
sys.path.insert(0, str(HERE.parent.parent / "src"))

SD15 = Path("/tmp/sdlite-sd15-fp16")
PROMPT = "a lighthouse at dusk"
ROWS = {
    "sdlite-fp32": dict(engine="sdlite", precision="fp32"),
    "sdlite-bf16": dict(engine="sdlite", precision="bf16"),
    "sdlite-int8": dict(engine="sdlite", precision="int8"),
    "sdlite-bf16-channels-last": dict(engine="sdlite", precision="bf16", channels_last=True),
    "sdlite-bf16-deepcache3": dict(engine="sdlite", precision="bf16", deep_cache=3),
    "sdlite-bf16-deepcache5": dict(engine="sdlite", precision="bf16", deep_cache=5),
    "diffusers-fp32": dict(engine="diffusers", precision="fp32"),
    "diffusers-bf16": dict(engine="diffusers", precision="bf16"),
}
REFERENCE = "sdlite-fp32"
STEPS = 20


def inputs():
    import torch
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 4, 64, 64, generator=g)
    ctx = torch.randn(2, 77, 768, generator=g)
    x_next = x + 0.05 * torch.randn(x.shape, generator=g)  # the next step's input, for DeepCache's reuse
    return x, ctx, x_next


def timed(fn, repeat: int = 3) -> tuple[float, object]:
    times, out = [], None
    for _ in range(repeat):
        t0 = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times), out


def sdlite_row(spec: dict, out_dir: Path, check: bool) -> dict:
    import torch

    from sdlite.pipeline import Pipeline
    from sdlite.request import GenerationRequest
    from sdlite.runtime.deep_cache import DeepCacheUNet
    pipe = Pipeline.load(SD15, precision=spec["precision"], threads=2)
    unet, dtype = pipe.unet.module, pipe.dtype
    x, ctx, x_next = inputs()
    if spec.get("channels_last"):  # the convolutions' weights and activations in NHWC (oneDNN's own layout)
        unet.to(memory_format=torch.channels_last)
        x, x_next = x.to(memory_format=torch.channels_last), x_next.to(memory_format=torch.channels_last)
    t, t_next = torch.tensor(500.0), torch.tensor(480.0)
    res = {}
    with torch.inference_mode():
        unet(x.to(dtype), t, ctx.to(dtype))  # warm-up
        full_s, out = timed(lambda: unet(x.to(dtype), t, ctx.to(dtype)).float())
        n = spec.get("deep_cache", 0)
        if n >= 2:
            def shallow():
                dc = DeepCacheUNet(unet, n)
                dc(x.to(dtype), t, ctx.to(dtype))
                t0 = time.perf_counter()
                y = dc(x_next.to(dtype), t_next, ctx.to(dtype)).float()
                return time.perf_counter() - t0, y
            runs = [shallow() for _ in range(3)]
            shallow_s, out = statistics.median(r[0] for r in runs), runs[-1][1]
            full_calls = math.ceil(STEPS / n)
            res["s_per_step"] = (full_calls * full_s + (STEPS - full_calls) * shallow_s) / STEPS
            res["shallow_s"] = shallow_s
        else:
            res["s_per_step"] = full_s
        res["full_s"] = full_s
        encode_s, _ = timed(lambda: (pipe.encode_prompt(PROMPT), pipe.encode_prompt("")), 1)
    torch.save(out, out_dir / f"{spec['name']}-unet.pt")
    request = GenerationRequest(PROMPT, "", 4, 1.0, 1, 512, 512, "lcm")
    request.deep_cache = spec.get("deep_cache", 0)
    t0 = time.perf_counter()
    result = pipe.run(request)
    res["tti_4_lcm"] = time.perf_counter() - t0
    result.image.save(out_dir / f"{spec['name']}-lcm.png")
    decode_s = next(s.seconds for s in result.timings if s.name == "decode")
    res["tti_20_dpm_cfg"] = encode_s + STEPS * res["s_per_step"] + decode_s
    res.update(encode_s=encode_s, decode_s=decode_s)
    if check:
        request = GenerationRequest(PROMPT, "", STEPS, 7.5, 1, 512, 512, "dpm++2m")
        request.deep_cache = spec.get("deep_cache", 0)
        t0 = time.perf_counter()
        pipe.run(request)
        res["tti_20_dpm_cfg_measured"] = time.perf_counter() - t0
    return res


def diffusers_row(spec: dict, out_dir: Path, check: bool) -> dict:
    import diffusers
    import torch
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[spec["precision"]]
    pipe = diffusers.StableDiffusionPipeline.from_pretrained(SD15, torch_dtype=dtype, safety_checker=None,
                                                             requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    x, ctx, _ = inputs()
    t = torch.tensor(500.0)
    res = {}
    with torch.inference_mode():
        pipe.unet(x.to(dtype), t, encoder_hidden_states=ctx.to(dtype))
        res["s_per_step"], out = timed(lambda: pipe.unet(x.to(dtype), t, encoder_hidden_states=ctx.to(dtype))
                                       .sample.float())
        res["full_s"] = res["s_per_step"]
        encode_s, _ = timed(lambda: pipe.encode_prompt(PROMPT, "cpu", 1, True, ""), 1)
        z = torch.randn(1, 4, 64, 64, generator=torch.Generator().manual_seed(2)).to(dtype)
        decode_s, _ = timed(lambda: pipe.vae.decode(z / pipe.vae.config.scaling_factor).sample, 1)
    torch.save(out, out_dir / f"{spec['name']}-unet.pt")
    pipe.scheduler = diffusers.LCMScheduler.from_config(pipe.scheduler.config)
    t0 = time.perf_counter()
    image = pipe(PROMPT, num_inference_steps=4, guidance_scale=1.0, height=512, width=512,
                 generator=torch.Generator().manual_seed(1)).images[0]
    res["tti_4_lcm"] = time.perf_counter() - t0
    image.save(out_dir / f"{spec['name']}-lcm.png")
    res["tti_20_dpm_cfg"] = encode_s + STEPS * res["s_per_step"] + decode_s
    res.update(encode_s=encode_s, decode_s=decode_s)
    return res


def child(spec: dict, out_dir: Path, check: bool) -> None:
    import torch
    torch.set_num_threads(2)
    row = (sdlite_row if spec["engine"] == "sdlite" else diffusers_row)(spec, out_dir, check)
    row["peak_rss_MiB"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print("RESULT " + json.dumps(row), flush=True)


def compare(name: str, out_dir: Path) -> dict:
    """UNet relative error and image PSNR of row `name` against the reference row's files."""
    import numpy as np
    import torch
    from PIL import Image
    ref, out = out_dir / f"{REFERENCE}-unet.pt", out_dir / f"{name}-unet.pt"
    if not (ref.exists() and out.exists()):
        return {}
    if name.startswith("sdlite-") and "deepcache" in name:  # reuse error: against fp32 at the next input
        ref = out_dir / f"{REFERENCE}-unet-next.pt"
    a, b = torch.load(ref), torch.load(out)
    img_a = np.asarray(Image.open(out_dir / f"{REFERENCE}-lcm.png")).astype(np.float64)
    img_b = np.asarray(Image.open(out_dir / f"{name}-lcm.png")).astype(np.float64)
    mse = float(((img_a - img_b) ** 2).mean())
    return {"unet_rel_err": float((a - b).norm() / a.norm()),
            "psnr_db": float("inf") if mse == 0 else 10 * math.log10(255**2 / mse)}


def reference_next(out_dir: Path) -> None:
    """sdlite fp32's full UNet evaluation at DeepCache's second input (x', t=480): the reuse error's reference."""
    import torch

    from sdlite.pipeline import Pipeline
    torch.set_num_threads(2)
    pipe = Pipeline.load(SD15, precision="fp32", threads=2)
    _, ctx, x_next = inputs()
    with torch.inference_mode():
        out = pipe.unet.module(x_next, torch.tensor(480.0), ctx).float()
    torch.save(out, out_dir / f"{REFERENCE}-unet-next.pt")


def run_child(name: str, out_dir: Path, check: bool) -> dict:
    spec = {**ROWS[name], "name": name}
    cmd = [sys.executable, str(HERE), "--child", json.dumps(spec), "--out", str(out_dir)] + (["--whole"] if check else [])
    proc = subprocess.run(cmd, capture_output=True, text=True)
    result = next((json.loads(x[7:]) for x in proc.stdout.splitlines() if x.startswith("RESULT ")), None)
    return {"row": name, "exit": proc.returncode, **(result or {"error": proc.stderr[-600:]})}


def summarize(runs: list[dict], out_dir: Path) -> None:
    base = statistics.median(r["s_per_step"] for r in runs if r["row"] == "diffusers-fp32" and "s_per_step" in r) \
        if any(r["row"] == "diffusers-fp32" and "s_per_step" in r for r in runs) else None
    for name in ROWS:
        mine = [r for r in runs if r["row"] == name and "s_per_step" in r]
        if not mine:
            continue
        summary = {"summary": name, "runs": len(mine)}
        for key in ("s_per_step", "tti_20_dpm_cfg", "tti_4_lcm", "peak_rss_MiB", "tti_20_dpm_cfg_measured"):
            values = [r[key] for r in mine if key in r]
            if values:
                summary[key] = round(statistics.median(values), 3)
        if base:
            summary["x_diffusers_fp32_per_step"] = round(summary["s_per_step"] / base, 3)
        summary.update({k: round(v, 6) for k, v in compare(name, out_dir).items()})
        print(json.dumps(summary), flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--rows", default=",".join(ROWS), help="comma-separated row names")
    ap.add_argument("--out", default=None, help="folder for the images and UNet outputs (default: a temp folder)")
    ap.add_argument("--check", default="", help="comma-separated sdlite rows that also run one whole 20-step "
                    "generation (first round)")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    ap.add_argument("--reference-next", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--whole", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    out_dir = Path(args.out or tempfile.mkdtemp(prefix="sdlite-speed-"))
    out_dir.mkdir(parents=True, exist_ok=True)
    if args.reference_next:
        reference_next(out_dir)
        return
    if args.child:
        child(json.loads(args.child), out_dir, args.whole)
        return
    if not SD15.exists():
        sys.exit(f"{SD15} is missing: run `bench/presets.py --make` first")
    rows = [r.strip() for r in args.rows.split(",") if r.strip()]
    unknown = [r for r in rows if r not in ROWS]
    if unknown:
        sys.exit(f"unknown rows {unknown}; rows: {', '.join(ROWS)}")
    if any("deepcache" in r for r in rows):
        subprocess.run([sys.executable, str(HERE), "--reference-next", "--out", str(out_dir)], check=True)
    runs = []
    for i in range(args.repeat):
        for name in rows:
            row = run_child(name, out_dir, i == 0 and name in args.check.split(",") and name.startswith("sdlite"))
            row["round"] = i
            runs.append(row)
            print(json.dumps(row), flush=True)
    summarize(runs, out_dir)


if __name__ == "__main__":
    main()
