"""A seeded fuzzer over valid files written by `save_safetensors` (bench/fuzz_safetensors.py, short run):
the reader refuses each mutated file with WeightsError, or returns exactly the tensors the official
`safetensors` library reads from it. The long run: `python bench/fuzz_safetensors.py --examples N`."""

import importlib.util
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[2] / "bench" / "fuzz_safetensors.py"


@pytest.fixture(scope="module")
def fuzzer():
    pytest.importorskip("safetensors")
    spec = importlib.util.spec_from_file_location("bench_fuzz_safetensors", BENCH)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_mutated_files_are_refused_or_read_as_the_official_library_reads_them(fuzzer):
    result = fuzzer.fuzz(6000, seed=1234, time_limit=8.0)
    assert result["crashes"] == 0 and result["disagreements"] == 0, result["findings"]
    assert result["examples"] >= 1000  # enough examples ran in the time allowed
    assert result["accepted"] > 0 and result["refused"] > 0  # the mutations reach both outcomes


def test_seed_files_are_read_identically(fuzzer, tmp_path):
    import random
    for data in fuzzer.seed_files(random.Random(0), tmp_path, count=12):
        assert fuzzer.check(data, tmp_path / "seed.safetensors") == "accepted"


def test_checker_reports_what_the_official_library_refuses(fuzzer, tmp_path):
    """The cross-check itself works: a file the official library refuses but a lax reader would accept
    (bytes appended after the last tensor) is refused here."""
    import random
    data = fuzzer.seed_files(random.Random(0), tmp_path, count=1)[0] + b"\x00" * 16
    assert fuzzer.check(data, tmp_path / "t.safetensors") == "refused"
