"""runtime.residency: the plan decides where the networks live; the pipeline only names stages."""

import pytest

from sdlite.runtime import memory, residency
from sdlite.runtime.planner import STAGES, Plan
from sdlite.runtime.residency import Residency
from sdlite.weights.model_folder import ModelFolder


@pytest.fixture
def trims(monkeypatch):
    calls = []
    monkeypatch.setattr(memory, "trim", lambda: calls.append("trim"))
    evicted = []
    monkeypatch.setattr(memory, "drop_file_cache", lambda path: evicted.append(str(path)))
    frozen = []
    monkeypatch.setattr(residency.gc, "freeze", lambda: frozen.append(True))
    return calls, evicted, frozen


def test_all_resident_loads_up_front_and_keeps(tiny_model, trims):
    calls, evicted, frozen = trims
    r = Residency(ModelFolder.open(tiny_model), Plan(residency="all"))
    r.prepare()
    assert r.loaded() == list(STAGES) and frozen == [True]
    unet = r.acquire("unet")
    r.release("unet", Plan(trim=True))
    assert r.acquire("unet") is unet and calls == ["trim"] and evicted == []
    r.release("unet", Plan(trim=False))
    r.release_all()
    assert calls == ["trim"] and r.loaded() == list(STAGES)
    r.close()
    assert r.loaded() == []


def test_staged_loads_on_demand_and_evicts(tiny_model, trims):
    calls, evicted, frozen = trims
    r = Residency(ModelFolder.open(tiny_model), Plan(residency="staged"))
    r.prepare()
    assert r.loaded() == [] and frozen == []
    r.acquire("text_encoder")
    assert r.loaded() == ["text_encoder"]
    r.release("text_encoder", Plan())
    assert r.loaded() == [] and calls == ["trim"]
    assert evicted and all(p.endswith(".safetensors") and "text_encoder" in p for p in evicted)
    r.acquire("unet"), r.acquire("vae")
    r.release_all()
    assert r.loaded() == []


def test_levers_applied_at_load(tiny_model, trims):
    from sdlite.models.layers import Attention
    from sdlite.runtime.attention import sdpa_attend
    from sdlite.runtime.lazy_weights import _Lazy
    plan = Plan(residency="staged", attention="sliced", layer_chunk=1 << 10)
    unet = Residency(ModelFolder.open(tiny_model), plan).acquire("unet").module
    attends = [m.attend for m in unet.modules() if isinstance(m, Attention)]
    assert attends and all(getattr(a, "func", None) is not sdpa_attend and a is not sdpa_attend for a in attends)
    chunks = [m.chunk_bytes for m in unet.modules() if isinstance(m, _Lazy)]
    assert chunks and set(chunks) == {1 << 10}
