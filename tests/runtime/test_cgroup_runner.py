"""bench/memory.py's cgroup runner on the tiny model: completes under a roomy limit, reports the
cgroup's peak, and detects an OOM kill. Needs root and a writable memory cgroup; skips elsewhere."""

import importlib.util
import os
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[2] / "bench" / "memory.py"


def load_runner():
    spec = importlib.util.spec_from_file_location("bench_memory", BENCH)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture(scope="module")
def runner():
    mod = load_runner()
    if os.geteuid() != 0:
        pytest.skip("memory cgroups need root")
    parent = mod.Cgroup.parent_for_children()
    if parent is None:
        pytest.skip("no writable memory cgroup here")
    try:
        parent.create_child(f"sdlite-test-probe-{os.getpid()}", 1 << 30).remove()
    except OSError as exc:
        pytest.skip(f"no writable memory cgroup here: {exc}")
    return mod, parent


def test_completes_within_a_roomy_limit(runner, tiny_model):
    mod, parent = runner
    row = mod.run_one("sdlite", "fp32", str(tiny_model), 1536 << 20, 2, 64, parent, 300)
    assert row["completed"], row
    assert row["oom_kills"] == 0
    assert 0 < row["peak_cgroup"] <= 1536 << 20
    assert row["s_per_step"] > 0 and len(row["steps_s"]) == 2
    assert not (parent.path / row["cgroup"]).exists()  # cleaned up


def test_detects_an_oom_kill(runner, tiny_model):
    mod, parent = runner
    # diffusers has no planner: under 100 MiB it is killed while importing torch or loading
    row = mod.run_one("diffusers", "fp32", str(tiny_model), 100 << 20, 2, 64, parent, 300)
    assert not row["completed"]
    assert row["oom_kills"] >= 1
    assert row["peak_cgroup"] >= 90 << 20


def test_planner_refuses_instead_of_being_killed(runner, tiny_model):
    mod, parent = runner
    # 230 MiB holds python + torch (about 160 MiB) but not the plan's estimate (about 290 MiB)
    row = mod.run_one("sdlite", "fp32", str(tiny_model), 230 << 20, 2, 64, parent, 300)
    assert not row["completed"] and row["oom_kills"] == 0
    assert "does not fit" in row["error"]
