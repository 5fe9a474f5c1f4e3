#!/usr/bin/env python
"""`generate` called from the main thread vs from a thread pool after a warm-up on the main thread.

    .venv/bin/python bench/thread_pool.py [--model DIR] [--rounds 3] [--repeats 12]

A web framework calls the library from its worker threads. torch's OpenMP runtime keeps one thread team
per calling thread, and a second team made every generation about 35 % slower on 2 cores. sdlite runs its
work on one compute thread (runtime.compute_thread), so the two should now take the same time. Each mode
runs in a fresh process (a team, once made, lives as long as its thread); the rounds alternate the two
modes. A third mode does some torch work of its own on the main thread first (a second team again,
now the caller's). One JSON line per process, then the medians and their ratios. Run it on a quiet machine.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

CHILD = """
import json, statistics, sys, time
from concurrent.futures import ThreadPoolExecutor
from sdlite.pipeline import Pipeline
model, mode, repeats = sys.argv[1], sys.argv[2], int(sys.argv[3])
pipe = Pipeline.load(model, threads=2)
def one():
    t0 = time.perf_counter()
    pipe.generate("a red circle on a blue background", steps=20, seed=1, width=64, height=64)
    return time.perf_counter() - t0
one()  # warm-up, on the main thread
if mode == "main-after-torch":  # the caller's own torch work on the main thread, then sdlite's
    import torch
    torch.randn(512, 512) @ torch.randn(512, 512)
    mode = "main"
if mode == "main":
    times = [one() for _ in range(repeats)]
else:
    with ThreadPoolExecutor(4) as pool:
        times = [pool.submit(one).result() for _ in range(repeats)]
print(json.dumps(statistics.median(times)))
"""


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default=None, help="default: the tiny random model, written to a temp dir")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--repeats", type=int, default=12)
    args = ap.parse_args()
    print(json.dumps({"bench": "thread_pool_env", "loadavg": [round(x, 2) for x in os.getloadavg()]}),
          flush=True)
    with tempfile.TemporaryDirectory(prefix="sdlite-threads-") as tmp:
        model = args.model
        if model is None:
            from sdlite.testing.random_model import write_random_model
            model = str(write_random_model("tiny", Path(tmp) / "tiny"))
        medians = {"main": [], "pool": [], "main-after-torch": []}
        for _ in range(args.rounds):
            for mode in medians:
                out = subprocess.run([sys.executable, "-c", CHILD, model, mode, str(args.repeats)],
                                     check=True, capture_output=True, text=True).stdout
                medians[mode].append(json.loads(out.strip().splitlines()[-1]))
                print(json.dumps({"bench": "thread_pool", "mode": mode,
                                  "median_s": round(medians[mode][-1], 4)}), flush=True)
        med = {mode: statistics.median(v) for mode, v in medians.items()}
        print(json.dumps({"bench": "thread_pool", "result": "ratio",
                          **{f"{mode}_s": round(v, 4) for mode, v in med.items()},
                          "pool_over_main": round(med["pool"] / med["main"], 3),
                          "after_torch_over_main": round(med["main-after-torch"] / med["main"], 3)}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
