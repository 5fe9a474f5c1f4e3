"""Thread setup by default vs explicit `--threads`, on a quiet and on a busy machine.

    .venv/bin/python bench/threads.py [--runs 5] [--steps 20]

For each machine state (quiet; busy = two other processes spinning on the CPU, as a second job on a
2-core box; busy-torch = another torch program computing with 2 threads) and each mode, fresh processes generate with the shipped model (the `make demo` request,
20 steps) through the Python API and print the generation's wall time (load excluded):

    before     torch left as it starts (what sdlite did without --threads: MKL's dynamic mode on)
    default    sdlite now, no threads given (runtime.threads: physical cores, dynamic mode off)
    explicit   threads=2
    one        threads=1
    mkl_env    "before" with MKL_DYNAMIC=FALSE in the environment

One JSON line per run, then a summary line per (state, mode) with the median.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import statistics
import subprocess
import sys
import time

CHILD = r"""
import sys, time
mode, steps, size = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
import sdlite.pipeline as pipeline
if mode in ("before", "mkl_env"):   # the old behaviour: torch's thread setup only when threads are given
    pipeline.configure_threads = lambda threads=None: threads and __import__("torch").set_num_threads(threads)
pipe = pipeline.Pipeline.load(threads={"explicit": 2, "one": 1}.get(mode))
kw = dict(seed=1, width=size, height=size)
pipe.generate("a red circle on a blue background", steps=1, **kw)   # warm-up
t0 = time.perf_counter()
pipe.generate("a red circle on a blue background", steps=steps, **kw)
print(time.perf_counter() - t0)
"""


def spin(stop_at: float) -> None:
    while time.time() < stop_at:
        pass


TORCH_HOG = "import torch, time\nx = torch.randn(512, 512)\nwhile True:\n    x = (x @ x).tanh()\n"


def run(mode: str, steps: int, size: int) -> float:
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    if mode == "mkl_env":
        env["MKL_DYNAMIC"] = "FALSE"
    out = subprocess.run([sys.executable, "-c", CHILD, mode, str(steps), str(size)], capture_output=True, text=True,
                         check=True, env=env)
    return float(out.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--states", default="quiet,busy")
    ap.add_argument("--size", type=int, default=64, help="image side (64: the shipped model's own size)")
    ap.add_argument("--modes", default="before,default,explicit,one")
    args = ap.parse_args()
    print(json.dumps({"loadavg": os.getloadavg(), "cpus": os.cpu_count()}), flush=True)
    for state in args.states.split(","):
        hogs, procs = [], []
        if state == "busy":  # two plain CPU spinners
            hogs = [multiprocessing.Process(target=spin, args=(time.time() + 3600,), daemon=True) for _ in range(2)]
            for h in hogs:
                h.start()
        if state == "busy-torch":  # another torch program with its own 2-thread OpenMP team
            procs = [subprocess.Popen([sys.executable, "-c", TORCH_HOG])]
        try:
            times = {m: [] for m in args.modes.split(",")}
            for _ in range(args.runs):
                for mode in times:  # interleaved, so drift in the machine's load hits every mode alike
                    t = run(mode, args.steps, args.size)
                    times[mode].append(t)
                    print(json.dumps({"state": state, "mode": mode, "size": args.size, "seconds": round(t, 3)}),
                          flush=True)
            for mode, ts in times.items():
                print(json.dumps({"state": state, "mode": mode, "size": args.size, "median_s": round(statistics.median(ts), 3),
                                  "runs": len(ts), "min_s": round(min(ts), 3), "max_s": round(max(ts), 3)}),
                      flush=True)
        finally:
            for h in hogs:
                h.terminate()
            for proc in procs:
                proc.kill()


if __name__ == "__main__":
    main()
