"""ModelCache: one base per key, concurrent loads once, adapters per request, budget and eviction."""

from __future__ import annotations

import gc
import threading
import time
import weakref

import pytest

from babl_core.engine.batching import generate_text
from babl_core.engine.cache import ModelBusy, ModelCache
from babl_core.engine.catalog import ModelSpec
from babl_core.engine.generation import GenerationParams
from babl_core.engine.loading import load_base

GREEDY = GenerationParams(max_new_tokens=16, temperature=0)


def spec(id_, base="models/demo/demo-html", adapter=None, **kw):
    return ModelSpec(id=id_, label=id_, task="html", base=base, adapter=adapter, kind="causal",
                     quantization="none", dtype="float32", prompt_style="codellama-inst", **kw)  # fmt: skip


def test_two_sessions_share_one_model_object():
    cache = ModelCache(max_models=2)
    with cache.lease(spec("a")) as one, cache.lease(spec("a")) as two:
        assert one.model is two.model
    assert cache.loads == 1


def test_concurrent_first_requests_load_once():
    calls = []

    def slow_loader(s, plan):
        calls.append(s.id)
        time.sleep(0.3)
        return load_base(s, plan)

    cache = ModelCache(max_models=2, loader=slow_loader)
    models = []

    def worker():
        with cache.lease(spec("a")) as loaded:
            models.append(loaded.model)

    threads = [threading.Thread(target=worker) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(calls) == 1
    assert len({id(m) for m in models}) == 1


def test_two_adapters_on_one_base_generate_concurrently_with_their_own_output(html_adapters):
    a, b = str(html_adapters["ad-a"]), str(html_adapters["ad-b"])
    # Reference texts, each from a cache that only ever saw one adapter.
    refs = {}
    for name, ref in (("a", a), ("b", b)):
        with ModelCache().lease(spec(name, adapter=ref)) as loaded:
            refs[name] = generate_text(loaded, "<body>", GREEDY)
    with ModelCache().lease(spec("plain")) as loaded:
        refs["base"] = generate_text(loaded, "<body>", GREEDY)
    assert len(set(refs.values())) == 3

    cache = ModelCache()
    results: dict[str, list[str]] = {"a": [], "b": [], "base": []}
    errors = []

    def worker(name, s, use_adapter=True):
        try:
            for _ in range(3):
                with cache.lease(s, use_adapter=use_adapter) as loaded:
                    results[name].append(generate_text(loaded, "<body>", GREEDY))
        except Exception as exc:  # surfaced below
            errors.append(exc)

    threads = [
        threading.Thread(target=worker, args=("a", spec("a", adapter=a))),
        threading.Thread(target=worker, args=("b", spec("b", adapter=b))),
        threading.Thread(target=worker, args=("base", spec("a", adapter=a), False)),
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    for name in ("a", "b", "base"):
        assert results[name] == [refs[name]] * 3, name
    assert cache.loads == 1
    assert len(cache.status()["bases"][0]["adapters"]) == 2


def test_lru_eviction_under_the_model_budget_frees_memory():
    cache = ModelCache(max_models=1)
    with cache.lease(spec("html")) as first:
        ref = weakref.ref(first.model)
    del first
    with cache.lease(spec("py", base="models/demo/demo-python")) as second:
        assert second.model is not None
    gc.collect()
    assert ref() is None, "the evicted base is still referenced somewhere"
    assert cache.evictions == 1
    assert [b["base"].endswith("demo-python") for b in cache.status()["bases"]] == [True]


def test_a_busy_model_is_never_evicted_and_the_new_load_waits_then_fails():
    cache = ModelCache(max_models=1, load_timeout_s=0.5)
    waits = []
    busy = cache.acquire(spec("html"))
    try:
        start = time.monotonic()
        with pytest.raises(ModelBusy, match="BABL_MAX_MODELS"):
            cache.acquire(spec("py", base="models/demo/demo-python"), on_wait=waits.append)
        assert 0.4 < time.monotonic() - start < 3
        assert waits and "in use" in waits[0]
        assert cache.status()["bases"][0]["active_generations"] == 1
    finally:
        cache.release(busy)


def test_waiting_load_proceeds_when_the_busy_model_is_released():
    cache = ModelCache(max_models=1, load_timeout_s=10)
    busy = cache.acquire(spec("html"))
    threading.Timer(0.3, cache.release, args=(busy,)).start()
    with cache.lease(spec("py", base="models/demo/demo-python")) as loaded:
        assert loaded.model is not None
    assert cache.evictions == 1


def test_memory_budget_evicts_idle_bases():
    cache = ModelCache(max_models=5, memory_gb=0.004)  # 4 MB: one demo model (2-3 MB) at a time
    with cache.lease(spec("html")):
        pass
    with cache.lease(spec("py", base="models/demo/demo-python")):
        pass
    assert len(cache.status()["bases"]) == 1
    assert cache.evictions == 1


def test_status_reports_memory_active_generations_and_queue():
    cache = ModelCache()
    with cache.lease(spec("html")):
        status = cache.status()
        assert status["active_generations"] == 1
        assert status["memory_mb"] > 0
        assert status["bases"][0]["state"] == "ready"
    assert cache.status()["active_generations"] == 0


def test_bad_budget_settings_name_the_variable(monkeypatch):
    monkeypatch.setenv("BABL_MAX_MODELS", "zero")
    with pytest.raises(ValueError, match="BABL_MAX_MODELS"):
        ModelCache()
    monkeypatch.setenv("BABL_MAX_MODELS", "2")
    monkeypatch.setenv("BABL_MEMORY_GB", "-1")
    with pytest.raises(ValueError, match="BABL_MEMORY_GB"):
        ModelCache()


def test_loads_and_adapter_attaches_run_in_a_thread_that_ends(html_adapters):
    """A load computes (weight copies, quantization); in the caller's long-lived thread it would leave an
    OpenMP pool that slows the generating threads (devices.in_passing_thread), so it runs elsewhere."""
    from babl_core.engine.loading import attach_adapter

    seen = []

    def loader(s, plan):
        seen.append(threading.current_thread())
        return load_base(s, plan)

    def adapter_loader(loaded, ref):
        seen.append(threading.current_thread())
        return attach_adapter(loaded, ref)

    cache = ModelCache(max_models=1, loader=loader, adapter_loader=adapter_loader)
    with cache.lease(spec("a", adapter=str(html_adapters["ad-a"]))):
        pass
    assert len(seen) == 2
    assert all(t is not threading.current_thread() and not t.is_alive() for t in seen)

    def failing(s, plan):
        raise FileNotFoundError("no weights here")

    with pytest.raises(FileNotFoundError, match="no weights here"):  # errors reach the caller as they were
        ModelCache(loader=failing).acquire(spec("b"))
