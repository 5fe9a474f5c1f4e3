"""Single-file checkpoints vs the diffusers folder they were made from: load time and anonymous memory.

    .venv/bin/python bench/single_file.py --make /tmp/sdlite-sd15-fp16    # once: folder + .safetensors + .ckpt
    .venv/bin/python bench/single_file.py --run /tmp/sdlite-sd15-fp16 [--repeat 3]

`--make DIR` writes the SD 1.5-size random-weight model as a diffusers folder with fp16 weights (DIR), the
same weights in the original single-file layout as `DIR.safetensors` (the "pruned fp16" layout users
download, 2.1 GB, with position_ids and schedule buffers as real files carry them) and as `DIR.ckpt`
(a torch zip pickle). `--run DIR` loads each of the three in a fresh process (`Pipeline.load`, every
network loaded up front, no budget), after evicting its files from the page cache, and reports per run:
load seconds, the process's anonymous RSS before and after the load, and that growth as a share of the
weight bytes (the promise: under 10 %, since weights stay mapped and are dequantized per layer).
One JSON line per run, then the medians. The 1 GiB cgroup run of the single file is bench/memory.py:

    sudo .venv/bin/python bench/memory.py --model file=/tmp/sdlite-sd15-fp16.safetensors --limits 1G --steps 4
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve()
sys.path.insert(0, str(HERE.parent.parent / "src"))


def rss_anon() -> int:
    from sdlite.runtime.memory import rss
    return rss().anon


def child(model: str) -> None:
    import torch
    torch.set_num_threads(2)
    from sdlite.pipeline import Pipeline
    from sdlite.runtime.planner import Plan
    before = rss_anon()
    t0 = time.perf_counter()
    pipe = Pipeline.load(model, plan=Plan())
    load_s = time.perf_counter() - t0
    after = rss_anon()
    weight_bytes = 0
    for name in ("text_encoder", "unet", "vae"):
        with pipe.folder.part(name).open_weights() as w:
            weight_bytes += w.total_bytes
    print("RESULT " + json.dumps({"load_s": round(load_s, 2), "anon_before": before, "anon_after": after,
                                  "anon_growth": after - before, "weight_bytes": weight_bytes,
                                  "anon_share": round((after - before) / weight_bytes, 4)}), flush=True)


def make(folder: str) -> None:
    import torch

    from sdlite.testing.random_model import write_random_model
    from sdlite.testing.single_file import write_single_file
    if not Path(folder).exists():
        write_random_model("sd15", folder, seed=0, dtype=torch.float16)
    for fmt in ("safetensors", "ckpt"):
        dst = f"{folder}.{fmt}"
        if not Path(dst).exists():
            t0 = time.perf_counter()
            write_single_file(folder, dst, fmt=fmt, dtype=torch.float16)
            print(f"{dst}: {os.path.getsize(dst) / 1e9:.2f} GB in {time.perf_counter() - t0:.0f} s", flush=True)


def run(folder: str, repeat: int) -> None:
    from sdlite.runtime.memory import evict_folder
    rows = []
    for _ in range(repeat):
        for label, model in (("folder", folder), ("safetensors", f"{folder}.safetensors"),
                             ("ckpt", f"{folder}.ckpt")):
            evict_folder(model)
            proc = subprocess.run([sys.executable, str(HERE), "--child", model], capture_output=True, text=True)
            result = next((json.loads(x[7:]) for x in proc.stdout.splitlines() if x.startswith("RESULT ")), None)
            row = {"model": label, "exit": proc.returncode, **(result or {"error": proc.stderr[-300:]})}
            rows.append(row)
            print(json.dumps(row), flush=True)
    for label in ("folder", "safetensors", "ckpt"):
        ok = [r for r in rows if r["model"] == label and "load_s" in r]
        if ok:
            print(json.dumps({"model": label, "median_load_s": statistics.median(r["load_s"] for r in ok),
                              "median_anon_growth_MiB": round(statistics.median(r["anon_growth"] for r in ok)
                                                              / 2**20, 1),
                              "median_anon_share": statistics.median(r["anon_share"] for r in ok),
                              "weight_GB": round(ok[0]["weight_bytes"] / 1e9, 3), "runs": len(ok)}), flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--make", metavar="DIR")
    ap.add_argument("--run", metavar="DIR")
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--child", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        child(args.child)
    elif args.make:
        make(args.make)
    elif args.run:
        run(args.run, args.repeat)
    else:
        ap.error("give --make DIR or --run DIR")


if __name__ == "__main__":
    main()
