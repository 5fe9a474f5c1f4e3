"""runtime.memory's view of the cgroup, and what `-v` shows from it."""

import os

from sdlite.runtime import memory
from sdlite.runtime.profiler import Profiler


def test_a_cgroup_is_the_processs_own_only_when_it_is_alone_in_it(tmp_path):
    (tmp_path / "cgroup.procs").write_text(f"{os.getpid()}\n")
    assert memory._alone_in(tmp_path)
    (tmp_path / "cgroup.procs").write_text(f"1\n{os.getpid()}\n")
    assert not memory._alone_in(tmp_path)  # a shell's or a container's cgroup: not this process's figure
    assert not memory._alone_in(tmp_path / "missing")


def test_profile_table_says_when_there_is_no_cgroup_of_its_own(monkeypatch):
    monkeypatch.setattr(memory.Cgroup, "of_self", classmethod(lambda cls: cls(memory.Path("/x"), 2, own=False)))
    import sdlite.runtime.profiler as profiler
    monkeypatch.setattr(profiler, "Cgroup", memory.Cgroup)
    prof = Profiler(sample=False)
    with prof.stage("encode"):
        pass
    table = prof.table()
    assert "cgroup MB" not in table and "no memory cgroup of its own" in table
    prof.close()
