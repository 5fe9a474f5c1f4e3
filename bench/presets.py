"""Few-step presets against the 20-step default: time to a 512x512 image on SD-size random weights.

    .venv/bin/python bench/presets.py --make      # once: the SD 1.5-size fp16 folder, an LCM-LoRA-size LoRA,
                                                  # an SD 2.1-size fp16 folder named as SD-Turbo
    .venv/bin/python bench/presets.py [--repeat 2]

Rows, each in a fresh process (2 threads, no memory budget, every network loaded up front), one JSON line per
run: the SD 1.5 default (20 steps DPM++ 2M, CFG 7.5), SD 1.5 + a rank-64 LoRA on every UNet linear and conv
layer (LCM-LoRA's shape: `--sampler lcm --steps 4 --cfg-scale 1`), and SD-Turbo's shape at 1 step (Euler a,
CFG 0). Columns: load s, time to image s (request to PNG in memory, after the load), s/step, the anonymous
memory the load added (with and without the LoRA: what the LoRA costs). Random weights: the images are
noise; the time is what this measures.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve()
sys.path.insert(0, str(HERE.parent.parent / "src"))

SD15 = Path("/tmp/sdlite-sd15-fp16")
LORA = Path("/tmp/sdlite-lcm-lora-size.safetensors")
TURBO = Path("/tmp/sdlite-sd-turbo-size")

ROWS = {
    "sd15 default (dpm++2m, 20 steps, cfg 7.5)": dict(model=SD15, steps=20, cfg=7.5, sampler="dpm++2m"),
    "sd15 + lcm-lora (lcm, 4 steps, cfg 1)": dict(model=SD15, steps=4, cfg=1.0, sampler="lcm", lora=LORA),
    "sd-turbo size (euler_a, 1 step, cfg 0)": dict(model=TURBO, steps=1, cfg=0.0, sampler="euler_a"),
}


def rss_anon() -> int:
    from sdlite.runtime.memory import rss
    return rss().anon


def child(spec: dict) -> None:
    import torch
    torch.set_num_threads(2)
    from sdlite.pipeline import Pipeline
    from sdlite.runtime.planner import Plan
    before = rss_anon()
    t0 = time.perf_counter()
    # scale 0.05: random LoRA weights at full scale overflow to NaN over 16 layers; the time is the same
    loras = [(spec["lora"], 0.05)] if spec.get("lora") else []
    pipe = Pipeline.load(spec["model"], plan=Plan(), loras=loras)
    load_s = time.perf_counter() - t0
    anon = rss_anon() - before
    steps = []
    t0 = time.perf_counter()
    last = [t0]

    def progress(i: int, n: int) -> None:
        now = time.perf_counter()
        steps.append(now - last[0])
        last[0] = now

    result = pipe.generate("a lighthouse at dusk", steps=spec["steps"], cfg_scale=spec["cfg"],
                           sampler=spec["sampler"], seed=1, width=512, height=512, progress=progress)
    import io
    result.image.save(io.BytesIO(), format="PNG")
    total = time.perf_counter() - t0
    print("RESULT " + json.dumps({"load_s": round(load_s, 1), "time_to_image_s": round(total, 1),
                                  "s_per_step": round(statistics.median(steps), 2),
                                  "anon_after_load_MiB": round(anon / 2**20)}), flush=True)


def make() -> None:
    import torch

    from sdlite.testing import architectures
    from sdlite.testing.random_model import write_random_model
    from sdlite.weights import standard_configs as sc
    if not SD15.exists():
        write_random_model("sd15", SD15, dtype=torch.float16)
    if not TURBO.exists():  # SD 2.1's shapes at 512 (sample_size 64), SD-Turbo's schedule
        architectures.ARCHITECTURES["sd21-turbo"] = {
            "unet": {**sc.SD21_UNET, "sample_size": 64}, "vae": sc.SD21_VAE, "text_encoder": sc.SD21_TEXT,
            "scheduler": sc.SD_TURBO_SCHEDULER, "vocab_size": 49408}
        write_random_model("sd21-turbo", TURBO, dtype=torch.float16)
    if not LORA.exists():
        spec = importlib.util.spec_from_file_location("test_lora", HERE.parent.parent / "tests" / "test_lora.py")
        mod = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(mod)
        mod.random_lora(SD15, LORA, fmt="kohya", conv=True, rank=64, text=False, dtype=torch.float16)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--make", action="store_true")
    ap.add_argument("--repeat", type=int, default=1)
    ap.add_argument("--rows", default=",".join(str(i) for i in range(len(ROWS))), help="row indexes to run")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        spec = json.loads(args.child)
        spec["model"] = Path(spec["model"])
        child(spec)
        return
    if args.make:
        make()
        return
    names = list(ROWS)
    for _ in range(args.repeat):
        for i in (int(x) for x in args.rows.split(",")):
            spec = {k: str(v) if isinstance(v, Path) else v for k, v in ROWS[names[i]].items()}
            proc = subprocess.run([sys.executable, str(HERE), "--child", json.dumps(spec)], capture_output=True,
                                  text=True)
            result = next((json.loads(x[7:]) for x in proc.stdout.splitlines() if x.startswith("RESULT ")), None)
            print(json.dumps({"row": names[i], "exit": proc.returncode,
                              **(result or {"error": proc.stderr[-400:]})}), flush=True)


if __name__ == "__main__":
    main()
