"""runtime.threads: torch's threads are set up deliberately, with or without a number."""

import os

import pytest
import torch

from sdlite.runtime import threads
from sdlite.runtime.compute_thread import run_on_compute_thread


def test_load_without_threads_sets_the_default_on_the_compute_thread(tiny_model):
    from sdlite import Pipeline
    run_on_compute_thread(torch.set_num_threads, 1)
    Pipeline.load(tiny_model)
    assert run_on_compute_thread(torch.get_num_threads) == threads.default_threads()
    Pipeline.load(tiny_model, threads=1)
    assert run_on_compute_thread(torch.get_num_threads) == 1
    run_on_compute_thread(torch.set_num_threads, 2)


def test_default_threads_follows_affinity_smt_and_quota(monkeypatch):
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1, 2, 3})
    psutil = pytest.importorskip("psutil")
    monkeypatch.setattr(psutil, "cpu_count", lambda logical=True: 4 if logical else 2)  # SMT: 2 per core
    monkeypatch.setattr(threads, "_cpu_quota", lambda: None)
    assert threads.default_threads() == 2
    monkeypatch.setattr(threads, "_cpu_quota", lambda: 1.5)
    assert threads.default_threads() == 2
    monkeypatch.setattr(threads, "_cpu_quota", lambda: 0.5)
    assert threads.default_threads() == 1
    with pytest.raises(ValueError):
        threads.configure_threads(0)
