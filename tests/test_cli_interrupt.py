"""Ctrl-C during `sdlite generate`: the generation stops at its next step, exit 130, no partial file, and
never the abort ("terminate called without an active exception", SIGABRT) of a process that exits while
the compute thread is inside torch."""

import signal
import subprocess
import sys
import time

import pytest


def start(model, out):
    # a child of a test runner may inherit SIGINT as ignored; a user's shell gives the default
    return subprocess.Popen(
        [sys.executable, "-m", "sdlite", "generate", "x", "-m", str(model), "-o", str(out), "--steps", "900",
         "-W", "64", "-H", "64"],
        stderr=subprocess.PIPE, text=True, preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))


def wait_for_first_step(proc) -> str:
    seen = ""
    deadline = time.monotonic() + 120
    while "1/900" not in seen:
        line = proc.stderr.readline()
        assert line and time.monotonic() < deadline, seen
        seen += line
    return seen


@pytest.mark.parametrize("presses", [1, 2])
def test_ctrl_c_stops_cleanly(tiny_model, tmp_path, presses):
    out = tmp_path / "img.png"
    proc = start(tiny_model, out)
    wait_for_first_step(proc)
    t0 = time.monotonic()
    for _ in range(presses):
        proc.send_signal(signal.SIGINT)
        time.sleep(0.05)
    err = proc.communicate(timeout=60)[1]
    assert proc.returncode == 130, err
    assert time.monotonic() - t0 < 30
    assert "terminate called" not in err and "Traceback" not in err
    assert err.strip().splitlines()[-1] == "sdlite: interrupted"
    assert list(tmp_path.iterdir()) == []  # no image, no temporary file
