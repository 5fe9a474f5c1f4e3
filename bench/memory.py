"""Generations inside a real memory cgroup with a hard limit: completed or OOM-killed, peak usage, s/step.

    sudo .venv/bin/python bench/memory.py --model fp32=/tmp/sdlite-sd15 --model int8=/tmp/sdlite-sd15-int8 \\
        [--limits 3G,2G,1.5G,1G,768M,512M] [--peer diffusers=/tmp/sdlite-sd15] [--steps 4] [--size 512] \
        [--vae TAESD_DIR] [--precision fp32|bf16|fp16|int8|auto]

For every (model, limit): a fresh child cgroup under this process's own memory cgroup (cgroup v1
`memory.limit_in_bytes`, or v2 `memory.max` with swap off), the model's files evicted from the page
cache first (posix_fadvise DONTNEED) so that their pages are charged to the new cgroup when read, then
a child process joins the cgroup and runs one generation (DPM++ 2M, CFG 7.5, 2 threads) with the
planner given the same budget. Afterwards: exit status, whether the kernel OOM-killed it, the cgroup's
peak usage, s/step (median), and the planner's estimate. The cgroup is removed. One JSON line per run.
The peer runs diffusers (fp32, attention slicing and VAE tiling on) under the same limits. `--precision`
sets sdlite's compute precision (the child's $SDLITE_PRECISION; default fp32, the tables' setting).
Requires root and a writable memory cgroup; exits with a message where there is none.
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

from sdlite.runtime.memory import Cgroup, evict_folder  # noqa: E402  (no torch: the driver stays light)
from sdlite.units import parse_bytes  # noqa: E402

# --- the child processes -------------------------------------------------------------------------

def child_sdlite(model: str, budget: int | None, steps: int, size: int, vae: str | None = None) -> None:
    import torch
    torch.set_num_threads(2)
    from sdlite.pipeline import Pipeline
    from sdlite.runtime.profiler import Profiler
    prof = Profiler(interval=0.05, echo=sys.stderr)
    pipe = Pipeline.load(model, memory_budget=budget, width=size, height=size, profiler=prof, vae=vae)
    print(f"plan: {pipe.plan.describe()} estimates {pipe.plan.estimates}", file=sys.stderr, flush=True)
    pipe.generate("a lighthouse at dusk", steps=steps, cfg_scale=7.5, seed=1, width=size,
              height=size, sampler="dpm++2m", profiler=prof)
    prof.close()
    step_s = [r.seconds for r in prof.records if r.category == "step"]
    print("RESULT " + json.dumps({
        "s_per_step": statistics.median(step_s), "steps_s": [round(s, 2) for s in step_s],
        "plan": pipe.plan.describe(), "estimate": pipe.plan.peak(),
        "estimates": pipe.plan.estimates,
        "stages": [(r.name, round(r.seconds, 2), r.peak_cgroup) for r in prof.records
                   if r.category != "step"],
    }), flush=True)


def child_diffusers(model: str, steps: int, size: int) -> None:
    import torch
    torch.set_num_threads(2)
    import diffusers
    pipe = diffusers.StableDiffusionPipeline.from_pretrained(model, safety_checker=None,
                                                             requires_safety_checker=False)
    pipe.scheduler = diffusers.DPMSolverMultistepScheduler.from_config(pipe.scheduler.config)
    pipe.enable_attention_slicing()
    pipe.vae.enable_tiling()
    pipe.set_progress_bar_config(disable=True)
    marks = [time.perf_counter()]

    def on_step(p, i, t, kw):
        marks.append(time.perf_counter())
        return kw

    pipe("a lighthouse at dusk", num_inference_steps=steps, guidance_scale=7.5, height=size, width=size,
         generator=torch.Generator().manual_seed(1), callback_on_step_end=on_step)
    step_s = [b - a for a, b in zip(marks, marks[1:])]
    print("RESULT " + json.dumps({"s_per_step": statistics.median(step_s),
                                  "steps_s": [round(s, 2) for s in step_s]}), flush=True)


# --- driver --------------------------------------------------------------------------------------

def run_one(engine: str, label: str, model: str, limit: int | None, steps: int, size: int,
            parent: Cgroup, timeout: float, vae: str | None = None, precision: str = "fp32") -> dict:
    evict_folder(model)
    if vae:
        evict_folder(vae)
    # an unlimited run still gets its own cgroup (with a limit far above need) to measure its peak
    cg = parent.create_child(f"sdlite-bench-{os.getpid()}-{time.time_ns()}",
                             limit if limit is not None else 64 << 30)
    args = [sys.executable, str(HERE), "--child", engine, model, str(limit or 0), str(steps), str(size)]
    if vae:
        args += ["--vae", vae]
    join = f"echo $$ > {cg.procs_file} && "
    cmd = ["sh", "-c", join + "exec " + " ".join(f"'{a}'" for a in args)]
    t0 = time.perf_counter()
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout,
                              env={**os.environ, "SDLITE_PRECISION": precision})
        rc, out, err = proc.returncode, proc.stdout, proc.stderr
    except subprocess.TimeoutExpired as exc:
        rc, out, err = "timeout", exc.stdout or "", exc.stderr or ""
        if isinstance(out, bytes):
            out, err = out.decode(), (err or b"").decode()
    wall = time.perf_counter() - t0
    row = {"engine": engine, "weights": label, "limit": limit, "size": size, "steps": steps,
           "exit": rc, "wall_s": round(wall, 1), "cgroup": cg.path.name}
    if vae:
        row["vae"] = Path(vae).name
    if engine == "sdlite":
        row["precision"] = precision
    row["peak_cgroup"] = cg.peak()
    row["oom_kills"] = cg.oom_kills()
    cg.remove()
    result = next((json.loads(line[7:]) for line in out.splitlines() if line.startswith("RESULT ")), None)
    row["completed"] = rc == 0 and result is not None
    if result:
        row.update(result)
    if not row["completed"]:
        lines = [line for line in err.strip().splitlines() if line.strip()]
        row["error"] = (lines[-1] if lines else "")[-300:]
        row["last_stages"] = [line[10:] for line in lines if line.startswith("[profile] ")][-2:]
    if row.get("estimate") and row.get("peak_cgroup"):
        row["estimate_error"] = round(row["estimate"] / row["peak_cgroup"] - 1, 3)
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", action="append", default=[], help="LABEL=FOLDER (repeatable)")
    ap.add_argument("--peer", action="append", default=[], help="diffusers=FOLDER")
    ap.add_argument("--limits", default="3G,2G,1.5G,1G,768M,512M")
    ap.add_argument("--unlimited", action="store_true", help="also run each model with no limit")
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--size", type=int, default=512)
    ap.add_argument("--timeout", type=float, default=1200)
    ap.add_argument("--vae", default=None, help="sdlite runs decode with this VAE folder (e.g. TAESD)")
    ap.add_argument("--precision", default="fp32", help="sdlite's compute precision (default fp32)")
    ap.add_argument("--child", nargs=5, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        engine, model, limit, steps, size = args.child
        if engine == "sdlite":
            child_sdlite(model, int(limit) or None, int(steps), int(size), args.vae)
        else:
            child_diffusers(model, int(steps), int(size))
        return
    if os.geteuid() != 0:
        raise SystemExit("bench/memory.py: needs root to create memory cgroups")
    parent = Cgroup.parent_for_children()
    if parent is None:
        raise SystemExit("bench/memory.py: no writable memory cgroup (v1 memory controller or v2 with memory)")
    limits = [parse_bytes(x) for x in args.limits.split(",") if x]
    runs = []
    for spec in args.model:
        label, folder = spec.split("=", 1)
        if args.unlimited:
            runs.append(("sdlite", label, folder, None))
        runs += [("sdlite", label, folder, lim) for lim in limits]
    for spec in args.peer:
        label, folder = spec.split("=", 1)
        if args.unlimited:
            runs.append(("diffusers", "fp32", folder, None))
        runs += [("diffusers", "fp32", folder, lim) for lim in limits]
    for engine, label, folder, limit in runs:
        row = run_one(engine, label, folder, limit, args.steps, args.size, parent, args.timeout,
                      args.vae if engine == "sdlite" else None, args.precision)
        print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main()
