"""Generations inside a real memory cgroup with a hard limit: completed or OOM-killed, peak usage, s/step.

    sudo .venv/bin/python bench/memory.py --model fp32=/tmp/sdlite-sd15 --model int8=/tmp/sdlite-sd15-int8 \\
        [--limits 3G,2G,1.5G,1G,768M,512M] [--peer diffusers=/tmp/sdlite-sd15] [--steps 4] [--size 512] \
        [--vae TAESD_DIR]

For every (model, limit): a fresh child cgroup under this process's own memory cgroup (cgroup v1
`memory.limit_in_bytes`, or v2 `memory.max` with swap off), the model's files evicted from the page
cache first (posix_fadvise DONTNEED) so that their pages are charged to the new cgroup when read, then
a child process joins the cgroup and runs one generation (DPM++ 2M, CFG 7.5, 2 threads) with the
planner given the same budget. Afterwards: exit status, whether the kernel OOM-killed it, the cgroup's
peak usage, s/step (median), and the planner's estimate. The cgroup is removed. One JSON line per run.
The peer runs diffusers (fp32, attention slicing and VAE tiling on) under the same limits.
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


# --- cgroup handling -----------------------------------------------------------------------------

def own_memory_cgroup() -> tuple[Path, int]:
    lines = Path("/proc/self/cgroup").read_text().splitlines()
    for line in lines:
        _, controllers, rel = line.split(":", 2)
        if "memory" in controllers.split(","):
            p = Path("/sys/fs/cgroup/memory") / rel.lstrip("/")
            if (p / "memory.limit_in_bytes").exists():
                return p, 1
    for line in lines:
        hid, _, rel = line.split(":", 2)
        if hid == "0":
            for root in (Path("/sys/fs/cgroup"), Path("/sys/fs/cgroup/unified")):
                p = root / rel.lstrip("/")
                if (p / "cgroup.subtree_control").exists() and "memory" in \
                        (p / "cgroup.controllers").read_text():
                    return p, 2
    raise SystemExit("bench/memory.py: no writable memory cgroup (v1 memory controller or v2 with memory)")


class LimitedCgroup:
    def __init__(self, parent: Path, version: int, name: str, limit: int):
        self.path, self.version = parent / name, version
        self.path.mkdir()
        if version == 1:
            (self.path / "memory.limit_in_bytes").write_text(str(limit))
            try:
                (self.path / "memory.memsw.limit_in_bytes").write_text(str(limit))
            except OSError:
                pass
        else:
            (self.path / "memory.max").write_text(str(limit))
            try:
                (self.path / "memory.swap.max").write_text("0")
            except OSError:
                pass

    def procs_file(self) -> str:
        return str(self.path / "cgroup.procs")

    def peak(self) -> int | None:
        name = "memory.max_usage_in_bytes" if self.version == 1 else "memory.peak"
        try:
            return int((self.path / name).read_text())
        except (OSError, ValueError):
            return None

    def oom_kills(self) -> int:
        try:
            if self.version == 1:
                text = (self.path / "memory.oom_control").read_text()
            else:
                text = (self.path / "memory.events").read_text()
            for line in text.splitlines():
                k, v = line.split()
                if k == "oom_kill":
                    return int(v)
        except OSError:
            pass
        return 0

    def remove(self) -> None:
        for _ in range(50):
            try:
                if self.version == 1:
                    try:
                        (self.path / "memory.force_empty").write_text("0")
                    except OSError:
                        pass
                self.path.rmdir()
                return
            except OSError:
                time.sleep(0.1)


def evict(folder: str) -> int:
    n = 0
    for p in Path(folder).rglob("*"):
        if p.is_file():
            fd = os.open(p, os.O_RDONLY)
            try:
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
                n += 1
            finally:
                os.close(fd)
    return n


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

def parse_size(text: str) -> int:
    sys.path.insert(0, str(HERE.parent.parent / "src"))
    from sdlite.runtime.planner import parse_bytes
    return parse_bytes(text)


def run_one(engine: str, label: str, model: str, limit: int | None, steps: int, size: int,
            parent: Path | None, version: int, timeout: float, vae: str | None = None) -> dict:
    evict(model)
    if vae:
        evict(vae)
    # an unlimited run still gets its own cgroup (with a limit far above need) to measure its peak
    cg = LimitedCgroup(parent, version, f"sdlite-bench-{os.getpid()}-{time.time_ns()}",
                       limit if limit is not None else 64 << 30)
    args = [sys.executable, str(HERE), "--child", engine, model, str(limit or 0), str(steps), str(size)]
    if vae:
        args += ["--vae", vae]
    join = f"echo $$ > {cg.procs_file()} && "
    cmd = ["sh", "-c", join + "exec " + " ".join(f"'{a}'" for a in args)]
    t0 = time.perf_counter()
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
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
    parent, version = own_memory_cgroup()
    limits = [parse_size(x) for x in args.limits.split(",") if x]
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
        row = run_one(engine, label, folder, limit, args.steps, args.size, parent, version, args.timeout,
                      args.vae if engine == "sdlite" else None)
        print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main()
