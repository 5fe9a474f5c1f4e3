"""`sdlite doctor`: one screen about this machine that a Raspberry Pi user can paste into a bug report.

What it gathers (everything from the kernel's files under `root`, "/" unless a test points it at a copy of
another board's /proc and /sys):

- the OS: architecture, 32 or 64-bit processes (a 32-bit ARM OS cannot run sdlite), os-release, kernel, board
- the CPU (runtime.cpu_features): core, vector ISA, bf16 / fp16 / int8 dot products, physical cores against
  logical CPUs, and the threads sdlite computes with (runtime.threads)
- memory: /proc/meminfo, every swap area of /proc/swaps (a swap partition or file on an SD card: mmcblk),
  zram devices (/sys/block/zram*), the memory cgroup and the smallest limit in force above it
  (runtime.memory.Cgroup: v1 memory.limit_in_bytes, v2 memory.max), whether a service manager runs us
- free disk at the model, torch's build (CPU-only? CUDA libraries installed?), its threads, and what
  precision `auto` resolves to (runtime.precision)
- a model (the one sdlite ships when none is given): the memory budget to plan for, the plan the planner
  picks for the model's native size or why nothing fits; with `probe`, a timed UNet step at that size and
  the time per image it implies for the model's recommended settings

Each known pitfall is a Finding with a stable id (FINDINGS); an "error" finding makes the verdict "error"
(`sdlite doctor` then exits 1).
"""

from __future__ import annotations

import contextlib
import os
import platform
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from .runtime.cpu_features import CpuFeatures, is_32bit_arm_os, process_bits, read_cpu_features
from .units import GiB, MiB, format_bytes

HEADROOM = 200 * MiB        # kept out of the budget: what the planner does not count (a service's front ends,
                            # request and PNG buffers, shared libraries charged on a fresh boot: ~90 MB)
LOW_AVAILABLE = 700 * MiB   # an int8 SD 1.5-size 512x512 generation needs about 682 MiB (README, TAESD)
LOW_DISK = 2 * GiB          # a conversion (`sdlite convert`) writes a whole copy of a model
PROBE_WARM_CALLS, PROBE_SECONDS = 3, 10.0   # --probe: warm UNet calls timed (the fastest counts), while short
SMALL_BOARD = 3 * GiB       # MemTotal of a 2 GB board is 1.8-1.9 GiB; a 4 GB one reports 3.7 GiB

FINDINGS = {  # id -> level; the ids are stable: tools and bug reports refer to them
    "os-32bit": "error",
    "model-does-not-fit": "error",
    "model-unreadable": "error",
    "swap-on-sd-card": "warning",
    "no-swap-no-zram": "warning",
    "service-without-memory-limit": "warning",
    "memory-cgroup-disabled": "warning",
    "low-memory-available": "warning",
    "low-disk": "warning",
    "bf16-not-native": "warning",
    "fp16-not-native": "warning",
    "torch-cuda-on-arm": "warning",
}


@dataclass
class Finding:
    id: str
    message: str

    @property
    def level(self) -> str:
        return FINDINGS[self.id]


@dataclass
class Swap:
    name: str               # /dev/mmcblk0p3, /var/swap, /dev/zram0
    kind: str               # "partition" or "file"
    size: int
    used: int
    device: str = ""        # the block device that holds it (a file's: its mount's)
    priority: int = 0

    @property
    def zram(self) -> bool:
        return Path(self.name).name.startswith("zram")

    @property
    def on_sd_card(self) -> bool:
        """On an SD card or eMMC (mmcblk): slow random writes, and swapping wears it out."""
        return Path(self.device or self.name).name.startswith("mmcblk")


@dataclass
class Zram:
    name: str
    disksize: int
    algorithm: str          # the one in use ([zstd] in comp_algorithm)
    swap: bool              # listed in /proc/swaps


@dataclass
class MemoryCgroup:
    version: int
    path: str               # relative to the cgroup mount ("/system.slice/sdlite.service")
    limit: int | None       # the smallest limit in force, this cgroup's or an ancestor's
    swap_limit: int | None
    usage: int | None


@dataclass
class System:
    """What the kernel's files say about the machine (`read_system`)."""
    machine: str
    bits: int
    os_name: str
    kernel: str
    board: str
    cpu: CpuFeatures
    mem_total: int
    mem_available: int
    swaps: list = field(default_factory=list)       # [Swap]
    zram: list = field(default_factory=list)        # [Zram]
    cgroup: MemoryCgroup | None = None
    memory_controller: bool | None = None            # the kernel's memory cgroup controller on (None: unknown)
    service: str | None = None                       # the systemd unit we run in, when one does
    jetson: bool = False                             # an NVIDIA Jetson (CUDA on ARM is real there)

    @property
    def arm32(self) -> bool:
        return is_32bit_arm_os(self.machine, self.bits)

    @property
    def swap_total(self) -> int:
        return sum(s.size for s in self.swaps)


@dataclass
class TorchInfo:
    version: str
    cuda: str | None                 # torch.version.cuda: None for a CPU-only build
    cuda_packages: list              # installed nvidia-* distributions (CUDA libraries pip pulled in)
    cuda_bytes: int                  # their size on disk
    threads: int                     # torch.get_num_threads() as it stands
    onednn: bool
    capability: str                  # the kernels torch dispatches to (AVX2, AVX512, SVE256, DEFAULT, ...)

    @property
    def has_cuda_libraries(self) -> bool:
        return self.cuda is not None or bool(self.cuda_packages)


@dataclass
class ModelCheck:
    path: str
    name: str
    shipped: bool
    native: int                      # the side, in pixels, the planner and the probe use
    settings: dict                   # recommended steps, cfg_scale, sampler
    stored_bytes: int
    budget: int
    budget_source: str
    precision: str
    plan: str | None = None          # Plan.describe(); None when nothing fits
    peak: int | None = None          # the plan's estimated peak
    error: str | None = None         # PlanError's message, or why the model could not be read
    readable: bool = True            # False: the folder or file could not be opened as a model


@dataclass
class Report:
    system: System
    torch: TorchInfo | None
    threads: int
    precision_auto: str              # Precision.describe() of `auto` on this CPU
    precision_requested: str         # the name --precision / $SDLITE_PRECISION asked for ("auto" if none)
    precision_native: bool           # the requested 16-bit precision is native here (True for fp32 / auto)
    disk_path: str
    disk_free: int | None
    budget: int
    budget_source: str
    model: ModelCheck | None = None
    probe: dict | None = None
    findings: list = field(default_factory=list)    # [Finding]

    @property
    def verdict(self) -> str:
        levels = {f.level for f in self.findings}
        return "error" if "error" in levels else "warnings" if levels else "ok"

    def to_dict(self) -> dict:
        from . import __version__
        out = {"sdlite": __version__, "verdict": self.verdict,
               "findings": [{"id": f.id, "level": f.level, "message": f.message} for f in self.findings]}
        system = asdict(self.system)
        cpu = self.system.cpu
        system["cpu"] = {"model": cpu.model, "features": cpu.summary(), "bf16": cpu.bf16, "fp16": cpu.fp16,
                         "int8_dot": cpu.int8_dot, "vector_isa": cpu.vector_isa(), "logical_cpus": cpu.logical_cpus,
                         "physical_cores": cpu.physical_cores, "flags": len(cpu.flags)}
        system["arm32"] = self.system.arm32
        system["swap_total"] = self.system.swap_total
        for swap, raw in zip(system["swaps"], self.system.swaps):
            swap.update(zram=raw.zram, on_sd_card=raw.on_sd_card)
        out["system"] = system
        out["torch"] = asdict(self.torch) if self.torch else None
        out["threads"] = self.threads
        out["precision"] = {"auto": self.precision_auto, "requested": self.precision_requested,
                            "native": self.precision_native}
        out["disk"] = {"path": self.disk_path, "free": self.disk_free}
        out["budget"] = {"bytes": self.budget, "source": self.budget_source, "headroom": HEADROOM}
        out["model"] = asdict(self.model) if self.model else None
        out["probe"] = self.probe
        return out

    def text(self) -> str:
        return "\n".join(_text_lines(self))


# --- reading the machine ------------------------------------------------------------------------------

def _read(root: Path, rel: str) -> str:
    try:
        return (root / rel).read_text(errors="replace")
    except OSError:
        return ""


def _unescape(path: str) -> str:
    """/proc/swaps and /proc/mounts write a space as \\040 (and tab, newline, backslash alike)."""
    if "\\" not in path:
        return path
    import re
    return re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), path)


def read_meminfo(root: Path) -> dict:
    """/proc/meminfo -> {"MemTotal": bytes, ...}."""
    out = {}
    for line in _read(root, "proc/meminfo").splitlines():
        key, _, rest = line.partition(":")
        parts = rest.split()
        if parts and parts[0].isdigit():
            out[key.strip()] = int(parts[0]) * (1024 if parts[1:] == ["kB"] else 1)
    return out


def read_mounts(root: Path) -> list[tuple[str, str]]:
    """(device, mount point) of every mount, longest mount point first."""
    text = _read(root, "proc/self/mounts") or _read(root, "proc/mounts")
    mounts = []
    for line in text.splitlines():
        parts = line.split()
        if len(parts) >= 2:
            mounts.append((_unescape(parts[0]), _unescape(parts[1])))
    return sorted(mounts, key=lambda m: len(m[1]), reverse=True)


def _device_of(root: Path, path: str, mounts: list[tuple[str, str]]) -> str:
    """The block device holding `path`: its mount's (/dev/root resolved through the kernel command line)."""
    for device, point in mounts:
        if path == point or path.startswith(point.rstrip("/") + "/"):
            return _real_root_device(root) if device == "/dev/root" else device
    return ""


def _real_root_device(root: Path) -> str:
    """What /dev/root stands for: root= of /proc/cmdline, a PARTUUID resolved through /dev/disk/by-partuuid."""
    for arg in _read(root, "proc/cmdline").split():
        if arg.startswith("root="):
            value = arg[5:]
            if value.startswith("PARTUUID="):
                link = root / "dev/disk/by-partuuid" / value[9:]
                try:
                    return "/dev/" + Path(os.readlink(link)).name
                except OSError:
                    return value
            return value
    return "/dev/root"


def read_swaps(root: Path) -> list[Swap]:
    """/proc/swaps: Filename Type Size Used Priority (sizes in KiB), with the device each lies on."""
    mounts = None
    swaps = []
    for line in _read(root, "proc/swaps").splitlines()[1:]:
        parts = line.split()
        if len(parts) < 5:
            continue
        name, kind = _unescape(parts[0]), parts[1]
        device = name
        if kind == "file":
            mounts = read_mounts(root) if mounts is None else mounts
            device = _device_of(root, name, mounts)
        swaps.append(Swap(name, kind, int(parts[2]) * 1024, int(parts[3]) * 1024, device, int(parts[4])))
    return swaps


def read_zram(root: Path, swaps: list[Swap]) -> list[Zram]:
    out = []
    swap_names = {Path(s.name).name for s in swaps}
    for dev in sorted((root / "sys/block").glob("zram*")):
        size = _read(dev, "disksize").strip()
        algos = _read(dev, "comp_algorithm").split()
        chosen = next((a.strip("[]") for a in algos if a.startswith("[")), algos[0] if algos else "")
        out.append(Zram(dev.name, int(size) if size.isdigit() else 0, chosen, dev.name in swap_names))
    return out


def read_memory_cgroup(root: Path) -> MemoryCgroup | None:
    from .runtime.memory import Cgroup
    cg = Cgroup.of_self(root)
    if cg is None:
        return None
    base = root / "sys/fs/cgroup" / ("memory" if cg.version == 1 else "")
    try:
        rel = "/" + cg.path.relative_to(base).as_posix().lstrip(".")
    except ValueError:  # v2 under /sys/fs/cgroup/unified (a hybrid layout)
        rel = "/" + cg.path.relative_to(root / "sys/fs/cgroup/unified").as_posix().lstrip(".")
    return MemoryCgroup(cg.version, rel.rstrip("/") or "/", cg.limit_in_force(), cg.swap_limit(), cg.usage())


def memory_controller_on(root: Path) -> bool | None:
    """Whether the kernel's memory cgroup controller is on (/proc/cgroups `enabled`, else the v2 root's
    cgroup.controllers). Raspberry Pi kernels have shipped with it off (`cgroup_disable=memory`): then a
    unit's MemoryMax= is not enforced."""
    for line in _read(root, "proc/cgroups").splitlines():
        parts = line.split()
        if parts and parts[0] == "memory" and len(parts) >= 4:
            return parts[3] == "1"
    controllers = _read(root, "sys/fs/cgroup/cgroup.controllers")
    return ("memory" in controllers.split()) if controllers else None


def service_unit(root: Path, env: dict) -> str | None:
    """The systemd service this process runs in, when systemd is PID 1 and we are in a service's cgroup
    (or it set INVOCATION_ID and we are not in a login session's scope); else None. Where PID 1 is hidden
    (the unit's ProtectProc=invisible), systemd's INVOCATION_ID stands in for it."""
    pid1 = _read(root, "proc/1/comm").strip()
    if (pid1 and pid1 != "systemd") or (not pid1 and not env.get("INVOCATION_ID")):
        return None
    leaf = ""
    for line in _read(root, "proc/self/cgroup").splitlines():
        hid, _, rest = line.partition(":")
        controllers, _, rel = rest.partition(":")
        if hid == "0" or controllers == "name=systemd":
            leaf = rel.rstrip("/").rsplit("/", 1)[-1]
    if leaf.endswith(".service"):
        return leaf
    if env.get("INVOCATION_ID") and not leaf.endswith(".scope"):
        return leaf or "a systemd service"
    return None


def os_name(root: Path) -> str:
    fields = {}
    for line in (_read(root, "etc/os-release") or _read(root, "usr/lib/os-release")).splitlines():
        key, _, value = line.partition("=")
        fields[key.strip()] = value.strip().strip('"')
    return fields.get("PRETTY_NAME") or fields.get("NAME") or ""


def board_name(root: Path, cpu: CpuFeatures) -> str:
    """The board (device tree's model, the `Model` line of an ARM cpuinfo) or the x86 machine (DMI)."""
    model = _read(root, "proc/device-tree/model").strip("\x00\n ")
    if model or cpu.board:
        return model or cpu.board
    vendor = _read(root, "sys/class/dmi/id/sys_vendor").strip()
    product = _read(root, "sys/class/dmi/id/product_name").strip()
    return " ".join(p for p in (vendor, product) if p)


def read_system(root: str | Path = "/", machine: str | None = None, bits: int | None = None,
                env: dict | None = None) -> System:
    """This machine as its kernel files under `root` describe it; `machine` (uname -m), `bits` and `env`
    default to this process's."""
    root = Path(root)
    machine = machine or platform.machine()
    env = dict(os.environ) if env is None else env
    cpu = read_cpu_features(root, machine)
    mem = read_meminfo(root)
    swaps = read_swaps(root)
    kernel = _read(root, "proc/sys/kernel/osrelease").strip()
    return System(machine=machine, bits=bits or process_bits(), os_name=os_name(root),
                  kernel=kernel, board=board_name(root, cpu), cpu=cpu,
                  mem_total=mem.get("MemTotal", 0), mem_available=mem.get("MemAvailable", mem.get("MemFree", 0)),
                  swaps=swaps, zram=read_zram(root, swaps), cgroup=read_memory_cgroup(root),
                  memory_controller=memory_controller_on(root), service=service_unit(root, env),
                  jetson=(root / "etc/nv_tegra_release").exists())


def read_torch() -> TorchInfo:
    import importlib.metadata

    import torch
    packages, size = [], 0
    for dist in importlib.metadata.distributions():
        name = dist.metadata["Name"] or ""
        if name.lower().startswith("nvidia-"):
            packages.append(f"{name}=={dist.version}")
            size += sum(f.size or 0 for f in dist.files or ())
    try:
        capability = torch.backends.cpu.get_cpu_capability()
    except (AttributeError, RuntimeError):
        capability = ""
    return TorchInfo(torch.__version__, torch.version.cuda, sorted(packages), size, torch.get_num_threads(),
                     torch.backends.mkldnn.is_available(), capability)


# --- the budget and the model -------------------------------------------------------------------------

def memory_budget(system: System, requested: int | None = None) -> tuple[int, str]:
    """The budget a generation should plan for here, and where it comes from: `requested`, else the
    smaller of the memory available and the cgroup limit in force, less HEADROOM."""
    if requested:
        return requested, "--memory-budget"
    room, source = system.mem_available, "available memory"
    if system.cgroup and system.cgroup.limit is not None and system.cgroup.limit < room:
        room, source = system.cgroup.limit, "cgroup limit"
    return max(0, room - HEADROOM), f"{source} {format_bytes(room)} - {format_bytes(HEADROOM)} headroom"


def check_model(path: str | Path, shipped: bool, budget: int, budget_source: str, precision) -> ModelCheck:
    """Whether the model at `path` fits `budget` at its native size: the plan, or why nothing fits."""
    from .errors import PlanError, SdliteError
    from .runtime.components import native_size, recommended_settings
    from .runtime.planner import ModelSizes, make_plan
    from .weights.sources import open_model

    check = ModelCheck(str(path), Path(path).name, shipped, 0, {}, 0, budget, budget_source, precision.name)
    try:
        folder = open_model(path)
        check.native, check.settings = native_size(folder), recommended_settings(folder)
        sizes = ModelSizes.of(folder)
        check.stored_bytes = sum(sizes.component(s).stored_bytes for s in ("text_encoder", "unet", "vae"))
        plan = make_plan(folder, budget, check.native, check.native, sizes=sizes, precision=precision)
    except PlanError as exc:
        check.error = str(exc)
        return check
    except (SdliteError, OSError) as exc:
        check.error, check.readable = f"cannot read the model: {exc}", False
        return check
    check.plan, check.peak = plan.describe(), plan.peak()
    return check


def run_probe(path: str | Path, budget: int | None, precision, threads: int | None = None) -> dict:
    """Load the model under `budget` and time its UNet at the native size: one cold call (it reads the weights),
    then warm ones (the fastest counts; a single one when a call takes more than PROBE_SECONDS, as an SD 1.5-size
    step on a Pi does). The time per image is the text encoder plus the recommended steps at the warm time (the
    recommended samplers call the UNet once a step; the VAE decode is not included)."""
    from .pipeline import Pipeline
    from .runtime.compute_thread import run_on_compute_thread
    t0 = time.perf_counter()
    pipe = Pipeline.load(path, memory_budget=budget, precision=precision, threads=threads)
    load_s = time.perf_counter() - t0
    try:
        out = run_on_compute_thread(_probe_steps, pipe)
    finally:
        pipe.close()
    out["load_s"] = round(load_s, 3)
    return out


def _probe_steps(pipe) -> dict:
    import torch

    from .runtime.kv_cache import cross_attention_cache
    settings, size = pipe.recommended, pipe.native_size
    t0 = time.perf_counter()
    cond = pipe.encode_prompt("a lighthouse at dusk")
    guided = settings["cfg_scale"] > 1 and not pipe.unet_config.time_cond_proj_dim
    uncond = pipe.encode_prompt("") if guided else None
    text_s = time.perf_counter() - t0
    plan = pipe.plan_for(size, size)
    f = pipe.vae_scale_factor
    x = torch.randn((1, pipe.latent_channels, size // f, size // f), generator=torch.Generator().manual_seed(0))
    t = torch.tensor(500.0)
    times = []
    start = t0 = time.perf_counter()
    model = pipe.guided_model(cond, uncond, settings["cfg_scale"], plan)
    cache = cross_attention_cache(pipe.unet.module, plan.kv_store) if plan.kv_cache else None
    with torch.inference_mode(), cache or contextlib.nullcontext():
        # a cold call, then warm ones: up to PROBE_WARM_CALLS while the probe is under PROBE_SECONDS, one at least
        while len(times) < 2 or (len(times) <= PROBE_WARM_CALLS and time.perf_counter() - start < PROBE_SECONDS):
            model(x, t)
            times.append(time.perf_counter() - t0)
            t0 = time.perf_counter()
    steps, warm = int(settings["steps"]), min(times[1:])
    return {"width": size, "height": size, "steps": steps, "sampler": settings["sampler"],
            "cfg_scale": settings["cfg_scale"], "plan": plan.describe(), "threads": torch.get_num_threads(),
            "text_encoder_s": round(text_s, 3), "first_step_s": round(times[0], 3), "step_s": round(warm, 3),
            "warm_calls": len(times) - 1, "per_image_s": round(text_s + steps * warm, 2),
            "vae_decode": "not included"}


# --- the findings -------------------------------------------------------------------------------------

def _os_32bit(r: Report) -> Finding | None:
    s = r.system
    if s.arm32:
        return Finding("os-32bit", f"32-bit ARM OS ({s.machine}, {s.bits}-bit processes): sdlite needs a 64-bit "
                       "OS; install the 64-bit Raspberry Pi OS (or another arm64 OS)")
    return None


def _model_does_not_fit(r: Report) -> Finding | None:
    m = r.model
    if m is not None and m.error:
        return Finding("model-does-not-fit" if m.readable else "model-unreadable", f"{m.name}: {m.error}")
    return None


def _swap_on_sd_card(r: Report) -> Finding | None:
    on_sd = [s for s in r.system.swaps if s.on_sd_card and not s.zram]
    if on_sd:
        where = ", ".join(f"{s.name} on {s.device}" if s.kind == "file" else s.name for s in on_sd)
        return Finding("swap-on-sd-card", f"swap on an SD card ({where}): swapping is slow there and wears the "
                       "card out; use zram instead (README: Running on a Raspberry Pi)")
    return None


def _no_swap_no_zram(r: Report) -> Finding | None:
    s = r.system
    if s.mem_total and s.mem_total < SMALL_BOARD and not s.swaps:
        return Finding("no-swap-no-zram", f"{format_bytes(s.mem_total)} of memory and no swap or zram: anything "
                       "else that grows on this board meets the OOM killer at once; set up zram swap")
    return None


def _service_without_limit(r: Report) -> Finding | None:
    s = r.system
    if s.service and (s.cgroup is None or s.cgroup.limit is None):
        return Finding("service-without-memory-limit", f"running as a service ({s.service}) with no memory cgroup "
                       "limit: set MemoryMax= in the unit (deploy/sdlite.service) so that the OOM killer "
                       "stops sdlite, not the rest of the board")
    return None


def _memory_cgroup_disabled(r: Report) -> Finding | None:
    if r.system.memory_controller is False:
        return Finding("memory-cgroup-disabled", "the kernel's memory cgroup controller is off (/proc/cgroups): "
                       "MemoryMax= is not enforced; add `cgroup_enable=memory cgroup_memory=1` to the kernel command "
                       "line (/boot/firmware/cmdline.txt; /boot/cmdline.txt before bookworm) and reboot")
    return None


def _low_memory_available(r: Report) -> Finding | None:
    s = r.system
    room = s.mem_available
    if s.cgroup and s.cgroup.limit is not None:
        room = min(room, s.cgroup.limit)
    if room < LOW_AVAILABLE:
        return Finding("low-memory-available", f"only {format_bytes(room)} of memory available (less than "
                       f"{format_bytes(LOW_AVAILABLE)}: an int8 SD 1.5-size 512x512 generation needs about 682 MiB)")
    return None


def _low_disk(r: Report) -> Finding | None:
    if r.disk_free is not None and r.disk_free < LOW_DISK:
        return Finding("low-disk", f"only {format_bytes(r.disk_free)} free at {r.disk_path} (converting a model "
                       "writes a whole copy of it)")
    return None


def _not_native(name: str):
    def check(r: Report) -> Finding | None:
        if r.precision_requested == name and not r.precision_native:
            return Finding(f"{name}-not-native", f"{name} asked for (--precision or $SDLITE_PRECISION), but this CPU "
                           f"({r.system.cpu.model or r.system.machine}: {r.system.cpu.vector_isa()}) has no "
                           f"{name} arithmetic: torch emulates it, slower than fp32; use --precision auto")
        return None
    return check


def _torch_cuda_on_arm(r: Report) -> Finding | None:
    t, s = r.torch, r.system
    if t is None or not t.has_cuda_libraries or not (s.cpu.is_arm64 or s.cpu.is_32bit_arm) or s.jetson:
        return None
    what = f"torch {t.version} built with CUDA {t.cuda}" if t.cuda else f"torch {t.version}"
    extra = f" and {len(t.cuda_packages)} nvidia-* packages ({format_bytes(t.cuda_bytes)})" if t.cuda_packages else ""
    return Finding("torch-cuda-on-arm", f"{what}{extra} on a board without a CUDA GPU: wasted disk; reinstall "
                   "the CPU build: pip install torch==<version> --index-url https://download.pytorch.org/whl/cpu")


CHECKS = (_os_32bit, _model_does_not_fit, _swap_on_sd_card, _no_swap_no_zram, _service_without_limit,
          _memory_cgroup_disabled, _low_memory_available, _low_disk, _not_native("bf16"), _not_native("fp16"),
          _torch_cuda_on_arm)


def findings(report: Report) -> list[Finding]:
    return [f for f in (check(report) for check in CHECKS) if f is not None]


# --- all together -------------------------------------------------------------------------------------

def diagnose(model: str | Path | None = None, *, root: str | Path = "/", machine: str | None = None,
             bits: int | None = None, env: dict | None = None, precision: str | None = None,
             memory_budget_bytes: int | None = None, check_model_fit: bool = True, probe: bool = False,
             torch_info: TorchInfo | None = None, disk_free: int | None = None,
             threads: int | None = None) -> Report:
    """The report for this machine (or the tree at `root`). `model`: a model folder or file (None: the model
    sdlite ships, if installed). `precision`: what --precision asked for (None: $SDLITE_PRECISION, else auto).
    The other keywords stand in for this process's own facts in tests (torch, disk, threads)."""
    from .runtime.precision import native_bf16, resolve_precision
    from .weights.model_folder import shipped_model

    env = dict(os.environ) if env is None else env
    system = read_system(root, machine, bits, env)
    live = Path(root).resolve() == Path("/")
    requested = (precision or env.get("SDLITE_PRECISION") or "auto").strip().lower()
    auto = resolve_precision("auto", system.cpu)
    chosen = resolve_precision(requested, system.cpu)
    native = {"bf16": native_bf16(system.cpu)[0], "fp16": system.cpu.fp16}.get(requested, True)
    shipped = model is None
    path = shipped_model() if shipped else Path(model)
    disk_path = str(path if path is not None and path.exists() else Path.cwd())
    if disk_free is None:
        disk_free = shutil.disk_usage(disk_path).free
    if threads is None:
        threads = _default_threads() if live else (system.cpu.physical_cores or 1)
    budget, source = memory_budget(system, memory_budget_bytes)
    report = Report(system, torch_info if torch_info is not None else read_torch(), threads, auto.describe(),
                    requested, native, disk_path, disk_free, budget, source)
    if check_model_fit and path is not None:
        report.model = check_model(path, shipped, budget, source, chosen)
        if probe and report.model.error is None:
            report.probe = run_probe(path, budget, chosen, threads)
    report.findings = findings(report)
    return report


def _default_threads() -> int:
    from .runtime.threads import default_threads
    return default_threads()


# --- the screen ---------------------------------------------------------------------------------------

def _text_lines(r: Report) -> list[str]:
    from . import __version__
    s, cpu = r.system, r.system.cpu
    lines = [f"sdlite {__version__} doctor (Python {platform.python_version()})",
             f"system   {s.machine}, {s.bits}-bit, {s.os_name or 'unknown OS'}, kernel {s.kernel or '?'}"
             + (f"; {s.board}" if s.board else "")]
    features = ", ".join(cpu.summary())
    lines.append(f"cpu      {cpu.model or '?'} [{features}]; {cpu.physical_cores} cores, {cpu.logical_cpus} "
                 f"logical CPUs; sdlite uses {r.threads} threads")
    lines.append(f"memory   {format_bytes(s.mem_total)} total, {format_bytes(s.mem_available)} available; "
                 f"swap {_swap_text(s)}")
    lines.append(f"cgroup   {_cgroup_text(s)}")
    disk = format_bytes(r.disk_free) if r.disk_free is not None else "?"
    lines.append(f"disk     {disk} free at {r.disk_path}")
    lines.append(f"torch    {_torch_text(r.torch)}")
    lines.append(f"compute  auto -> {r.precision_auto}"
                 + (f"; asked for {r.precision_requested}" if r.precision_requested != "auto" else ""))
    lines.append(f"budget   {format_bytes(r.budget)} ({r.budget_source})")
    if r.model is not None:
        lines += _model_lines(r.model)
    if r.probe is not None:
        p = r.probe
        lines.append(f"probe    UNet at {p['width']}x{p['height']}: {p['step_s']:.2f} s/step (first call "
                     f"{p['first_step_s']:.2f} s, load {p['load_s']:.1f} s) -> about {p['per_image_s']:.1f} s per "
                     f"image at {p['steps']} steps of {p['sampler']} (VAE decode not included)")
    for f in r.findings:
        lines.append(f"{f.level:<8} [{f.id}] {f.message}")
    count = len(r.findings)
    lines.append(f"verdict  {r.verdict}" + (f" ({count} finding{'s' if count != 1 else ''})" if count else ""))
    return lines


def _swap_text(s: System) -> str:
    parts = [f"{sw.name} ({sw.kind}{', SD card' if sw.on_sd_card and not sw.zram else ''}) "
             f"{format_bytes(sw.size)}, {format_bytes(sw.used)} used" for sw in s.swaps]
    zram = [f"{z.name} {format_bytes(z.disksize)} {z.algorithm}{'' if z.swap else ' (not swap)'}"
            for z in s.zram if z.disksize or z.swap]
    return ("; ".join(parts) or "none") + (f"; zram {', '.join(zram)}" if zram else "; no zram in use")


def _cgroup_text(s: System) -> str:
    ctrl = "" if s.memory_controller is not False else " (the kernel's memory controller is off)"
    service = f"; service {s.service}" if s.service else ""
    c = s.cgroup
    if c is None:
        return f"no memory cgroup{ctrl}{service}"
    limit = format_bytes(c.limit) if c.limit is not None else "no limit"
    swap = f", swap limit {format_bytes(c.swap_limit)}" if c.swap_limit is not None else ""
    usage = f", {format_bytes(c.usage)} charged" if c.usage is not None else ""
    return f"v{c.version} {c.path}: {limit}{swap}{usage}{ctrl}{service}"


def _torch_text(t: TorchInfo | None) -> str:
    if t is None:
        return "not read"
    build = f"CUDA {t.cuda}" if t.cuda else "CPU-only"
    libs = f", {len(t.cuda_packages)} nvidia-* packages ({format_bytes(t.cuda_bytes)})" if t.cuda_packages else ""
    return (f"{t.version} ({build}{libs}), {t.threads} threads as it starts, kernels {t.capability or '?'}, "
            f"oneDNN {'yes' if t.onednn else 'no'}")


def _model_lines(m: ModelCheck) -> list[str]:
    name = f"{m.name}{' (shipped)' if m.shipped else ''}"
    if m.native:
        st = m.settings
        head = (f"model    {name}: {format_bytes(m.stored_bytes)} of weights, {m.native}x{m.native}, "
                f"recommended {st.get('steps')} steps of {st.get('sampler')}, cfg {st.get('cfg_scale')}")
    else:
        head = f"model    {name}"
    if m.error:
        return [head, f"fit      no: {m.error}"]
    return [head, f"fit      yes: estimated peak {format_bytes(m.peak)} in {format_bytes(m.budget)}; "
                  f"plan {m.plan}"]


def main_exit_code(report: Report) -> int:
    """1 for an error verdict (the machine or the model cannot work as it is), else 0."""
    return 1 if report.verdict == "error" else 0
