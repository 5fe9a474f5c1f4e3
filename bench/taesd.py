#!/usr/bin/env python
"""TAESD against the model's own VAE: decode time, peak memory, and what the planner makes of each.

    .venv/bin/sdlite random-model sd15 /tmp/sdlite-sd15        # once (4 GB)
    .venv/bin/python bench/taesd.py --model /tmp/sdlite-sd15 [--taesd DIR] [--size 512] [--repeats 3]

Without --taesd a random-weight TAESD (SD 1.x shapes) is written to a temporary folder. Each decoder runs in
a fresh process: load it, decode the same seeded latents `repeats` times after one warm-up, report the
median seconds and the anonymous-memory peak above the loaded state (sampled every 5 ms). Then the
planner's VAE-stage estimate for both, unbudgeted and at --budget (default 1G), and the plan it picks.
One JSON line per result. Run on a quiet machine.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def child(model: str, vae: str | None, size: int, repeats: int, threads: int) -> None:
    import torch
    torch.set_num_threads(threads)
    from sdlite.runtime import memory
    from sdlite.runtime.components import load_vae
    from sdlite.runtime.profiler import Profiler
    from sdlite.weights.model_folder import ModelFolder

    part = load_vae(ModelFolder.open(model, vae=vae))
    z = torch.randn(1, 4, size // 8, size // 8, generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        part.module.decode(z)  # warm-up
    memory.trim()
    before = memory.rss().anon
    prof = Profiler(interval=0.005)
    times = []
    with torch.inference_mode():
        for i in range(repeats):
            with prof.stage(f"decode {i}"):
                t0 = time.perf_counter()
                part.module.decode(z)
                times.append(time.perf_counter() - t0)
    prof.close()
    peak = max(r.peak_anon for r in prof.records) - before
    print(json.dumps({"median_s": statistics.median(times), "anon_peak_bytes": peak,
                      "params": part.num_parameters}))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="/tmp/sdlite-sd15")
    ap.add_argument("--taesd", default=None, help="a TAESD folder (default: random SD 1.x TAESD weights)")
    ap.add_argument("--size", type=int, default=512)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--budget", default="1G")
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--vae", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        child(args.model, args.vae, args.size, args.repeats, args.threads)
        return 0
    print(json.dumps({"bench": "taesd_env", "loadavg": [round(x, 2) for x in os.getloadavg()],
                      "cpus": os.cpu_count()}), flush=True)
    with tempfile.TemporaryDirectory(prefix="sdlite-taesd-") as tmp:
        taesd = args.taesd
        if taesd is None:
            from sdlite.testing.random_model import write_random_vae
            taesd = str(write_random_vae("taesd", Path(tmp) / "taesd"))
        from sdlite.runtime.planner import fmt_bytes, make_plan, parse_bytes
        from sdlite.weights.model_folder import ModelFolder

        for label, vae in (("own_vae", None), ("taesd", taesd)):
            cmd = [sys.executable, __file__, "--child", "--model", args.model, "--size", str(args.size),
                   "--repeats", str(args.repeats), "--threads", str(args.threads)]
            out = subprocess.run(cmd + (["--vae", vae] if vae else []), check=True, capture_output=True,
                                 text=True).stdout
            measured = json.loads(out.strip().splitlines()[-1])
            folder = ModelFolder.open(args.model, vae=vae)
            free = make_plan(folder, None, args.size, args.size)
            budget = parse_bytes(args.budget)
            tight = make_plan(folder, budget, args.size, args.size)
            print(json.dumps({"bench": "taesd", "vae": label, "size": args.size, "threads": args.threads,
                              "repeats": args.repeats, "params": measured["params"],
                              "decode_median_s": round(measured["median_s"], 3),
                              "anon_peak_mib": round(measured["anon_peak_bytes"] / 2**20, 1),
                              "plan_vae_estimate_unbudgeted": fmt_bytes(free.estimates["vae"]),
                              "budget": args.budget, "plan_at_budget": tight.describe(),
                              "plan_vae_estimate_at_budget": fmt_bytes(tight.estimates["vae"])}),
                  flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
