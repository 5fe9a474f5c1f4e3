"""Per-stage profile of a generation: wall time and peak memory (RSS anon/file, cgroup usage).

    prof = Profiler()
    with prof.stage("load"):
        ...
    prof.table()               # text table
    prof.write_trace("t.json") # Chrome / Perfetto trace: a duration event per stage, memory counters

Peaks come from a sampling thread (every `interval` s) plus a reading at each stage's start and end,
so a spike shorter than the interval can be missed; the cgroup's own peak counter is exact but only
for the whole run (v1 can be reset per stage when writable).
"""

from __future__ import annotations

import json
import os
import threading
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path

from .memory import Cgroup, rss


@dataclass
class StageRecord:
    name: str
    start: float          # seconds since the profiler started
    seconds: float
    peak_anon: int
    peak_file: int
    peak_rss: int
    peak_cgroup: int | None = None
    category: str = "stage"


@dataclass
class Sample:
    t: float
    anon: int
    file: int
    cgroup: int | None


class Profiler:
    def __init__(self, interval: float = 0.02, sample: bool = True, echo=None):
        self.echo = echo  # a text stream: each stage is printed there as it ends
        self.t0 = time.perf_counter()
        self.records: list[StageRecord] = []
        self.meta: dict = {}  # what ran, for the reports: e.g. "precision" -> {stage: compute dtype}
        self.samples: list[Sample] = []
        cgroup = Cgroup.of_self()
        # only a cgroup of the process's own: the root one of a container counts everything in it
        self.cgroup = cgroup if cgroup is not None and cgroup.own else None
        self.interval = interval
        self._lock = threading.Lock()
        self._open: list[dict] = []  # peaks of the stages in progress (nested stages allowed)
        self._stop = threading.Event()
        self._thread = None
        if sample:
            self._thread = threading.Thread(target=self._run, name="sdlite-profiler", daemon=True)
            self._thread.start()

    def _now(self) -> float:
        return time.perf_counter() - self.t0

    def _measure(self) -> Sample:
        r = rss()
        cg = self.cgroup.usage() if self.cgroup else None
        s = Sample(self._now(), r.anon, r.file, cg)
        with self._lock:
            self.samples.append(s)
            for peaks in self._open:
                peaks["anon"] = max(peaks["anon"], s.anon)
                peaks["file"] = max(peaks["file"], s.file)
                peaks["rss"] = max(peaks["rss"], s.anon + s.file)
                if cg is not None:
                    peaks["cgroup"] = max(peaks["cgroup"] or 0, cg)
        return s

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            self._measure()

    def begin(self, name: str, category: str = "stage") -> dict:
        handle = {"name": name, "category": category, "anon": 0, "file": 0, "rss": 0, "cgroup": None}
        with self._lock:
            self._open.append(handle)
        handle["start"] = self._now()
        self._measure()
        return handle

    def end(self, handle: dict) -> StageRecord:
        self._measure()
        end = self._now()
        with self._lock:
            self._open = [h for h in self._open if h is not handle]
        record = StageRecord(handle["name"], handle["start"], end - handle["start"], handle["anon"],
                             handle["file"], handle["rss"], handle["cgroup"], handle["category"])
        self.records.append(record)
        if self.echo is not None:
            cg = f" cgroup {record.peak_cgroup / 2**20:.0f} MB" if record.peak_cgroup else ""
            print(f"[profile] {record.name}: {record.seconds:.2f} s, anon {record.peak_anon / 2**20:.0f} MB, "
                  f"file {record.peak_file / 2**20:.0f} MB{cg}", file=self.echo, flush=True)
        return record

    @contextmanager
    def stage(self, name: str, category: str = "stage"):
        handle = self.begin(name, category)
        try:
            yield
        finally:
            self.end(handle)

    def close(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=1.0)
            self._thread = None

    # --- reports --------------------------------------------------------------------------------

    def peak(self, key: str = "rss") -> int:
        with self._lock:
            if key == "cgroup":
                return max((s.cgroup or 0 for s in self.samples), default=0)
            if key == "rss":
                return max((s.anon + s.file for s in self.samples), default=0)
            return max((getattr(s, key) for s in self.samples), default=0)

    def table(self) -> str:
        mb = 1024 * 1024
        has_cg = any(r.peak_cgroup is not None for r in self.records)
        head = f"{'stage':<18}{'seconds':>9}{'anon MB':>10}{'file MB':>10}{'rss MB':>9}"
        head += f"{'cgroup MB':>11}" if has_cg else ""
        lines = [head]
        for r in self.records:
            line = (f"{r.name:<18}{r.seconds:9.3f}{r.peak_anon / mb:10.0f}{r.peak_file / mb:10.0f}"
                    f"{r.peak_rss / mb:9.0f}")
            if has_cg:
                line += f"{(r.peak_cgroup or 0) / mb:11.0f}"
            lines.append(line)
        if self.cgroup is None:
            lines.append("(no memory cgroup of its own: rss = anon + file is what this process holds)")
        return "\n".join(lines)

    def to_dict(self) -> dict:
        return {"stages": [asdict(r) for r in self.records],
                "peak_rss": self.peak("rss"), "peak_anon": self.peak("anon"),
                "peak_cgroup": self.peak("cgroup") or None, **({"meta": dict(self.meta)} if self.meta else {})}

    def trace(self) -> dict:
        """Chrome trace event format (chrome://tracing, ui.perfetto.dev)."""
        pid = os.getpid()
        events = [{"name": "process_name", "ph": "M", "pid": pid, "args": {"name": "sdlite", **self.meta}}]
        for r in self.records:
            events.append({"name": r.name, "cat": r.category, "ph": "X", "pid": pid, "tid": 1,
                           "ts": round(r.start * 1e6), "dur": max(1, round(r.seconds * 1e6)),
                           "args": {"peak_anon_mb": round(r.peak_anon / 2**20, 1),
                                    "peak_file_mb": round(r.peak_file / 2**20, 1),
                                    "peak_cgroup_mb": None if r.peak_cgroup is None
                                    else round(r.peak_cgroup / 2**20, 1)}})
        with self._lock:
            samples = list(self.samples)
        for s in samples:
            args = {"anon_mb": round(s.anon / 2**20, 1), "file_mb": round(s.file / 2**20, 1)}
            if s.cgroup is not None:
                args["cgroup_mb"] = round(s.cgroup / 2**20, 1)
            events.append({"name": "memory", "ph": "C", "pid": pid, "tid": 1,
                           "ts": round(s.t * 1e6), "args": args})
        return {"traceEvents": events, "displayTimeUnit": "ms"}

    def write_trace(self, path: str | os.PathLike) -> Path:
        path = Path(path)
        tmp = path.with_name(f".{path.name}.tmp")
        tmp.write_text(json.dumps(self.trace()))
        os.replace(tmp, path)
        return path
