"""The shared model cache: one copy of each base in memory, however many sessions and adapters use it.

Keyed by (base, quantization, dtype, device, engine); a llama.cpp entry's "model" is its managed
`llama-server` process, evicted (stopped) like any base. Adapters are loaded once each as named PEFT adapters on
their base; a request selects its adapter per call (`adapter_names=` in generate), never by switching
the base's global active adapter. Attaching a new adapter changes the module tree, so it waits until
no generation runs on that base (and new ones wait for it) — a readers/writer rule per base.

Budget: `BABL_MAX_MODELS` bases (default 2) and optionally `BABL_MEMORY_GB`; least recently used idle
bases are evicted first, busy ones never. When nothing can be evicted a load waits up to
`BABL_LOAD_TIMEOUT_S` (default 120) and then fails with `ModelBusy` (HTTP 503 in the API).

Why not `cl.cache` or functools caches: they never evict, hold one global lock during loads, and know
nothing about adapters sharing a base (STYLE.md).
"""

from __future__ import annotations

import gc
import logging
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

from babl_core import settings
from babl_core.engine.catalog import ModelSpec, hub_cached_dir, looks_like_path
from babl_core.engine.devices import in_passing_thread
from babl_core.engine.loaded import LoadedModel, LoadPlan
from babl_core.engine.loading import attach_adapter, load_base, plan_load

log = logging.getLogger(__name__)


class ModelBusy(RuntimeError):
    """No room to load a model within the timeout (every loaded base is busy)."""


@dataclass
class _Entry:
    key: tuple
    spec: ModelSpec
    loaded: LoadedModel | None = None
    loading: bool = True
    attaching: bool = False
    active: int = 0  # generations running on this base now
    adapters: dict[str, str] = field(default_factory=dict)  # adapter ref -> PEFT name
    last_used: float = field(default_factory=time.monotonic)
    estimate_bytes: int = 0

    @property
    def footprint(self) -> int:
        return self.loaded.footprint_bytes if self.loaded else self.estimate_bytes


def base_ref(spec: ModelSpec) -> str:
    """The entry's base as the cache names it: a hub id, or the absolute path of a local folder, plus
    the GGUF file for GGUF entries (entries on one GGUF share a copy; other files of one repo do not)."""
    base = str(settings.resolve_path(spec.base).resolve()) if looks_like_path(spec.base) else spec.base
    return f"{base} ({spec.gguf_file})" if spec.gguf_file else base


def cache_key(spec: ModelSpec, plan: LoadPlan) -> tuple:
    return (base_ref(spec), plan.quantization, plan.dtype, plan.device, plan.engine)


def estimate_bytes(spec: ModelSpec, plan: LoadPlan) -> int:
    """Rough in-memory size before loading: weight files on disk, scaled for 4/8-bit loads."""
    if plan.engine == "llama.cpp":  # llama-server maps the GGUF file as it is, plus its KV cache
        from babl_core.engine import gguf, llama_cpp

        try:
            path = gguf.locate(gguf.parse_ref(spec.gguf_file, spec.base))
            return llama_cpp.server_footprint_bytes(path, llama_cpp.server_settings(spec.llama_cpp))
        except (gguf.GGUFUnavailable, OSError):
            return 0
    if spec.gguf_file:
        folder = _converted_if_present(spec, plan)
    elif looks_like_path(spec.base):
        folder = settings.resolve_path(spec.base)
    else:
        folder = hub_cached_dir(spec.base)
    if not folder or not folder.is_dir():
        return 0
    size = sum(p.stat().st_size for p in folder.iterdir() if p.suffix in (".safetensors", ".bin"))
    return int(size * {"nf4": 0.3, "int8": 0.55}.get(plan.quantization, 1.0))


def _converted_if_present(spec: ModelSpec, plan: LoadPlan):
    """A GGUF entry's converted folder when it exists already (never converts: this is an estimate)."""
    from babl_core.engine import gguf

    try:
        sha = gguf.remembered_sha256(gguf.locate(gguf.parse_ref(spec.gguf_file, spec.base)))
    except (gguf.GGUFUnavailable, OSError):
        return None
    return gguf.target_dir(sha, plan.dtype) if sha else None


class ModelCache:
    """Thread-safe; async code calls `acquire` through `asyncio.to_thread` (loads take seconds)."""

    def __init__(
        self,
        max_models: int | None = None,
        memory_gb: float | None = None,
        load_timeout_s: float | None = None,
        loader: Callable[[ModelSpec, LoadPlan], LoadedModel] = load_base,
        adapter_loader: Callable[[LoadedModel, str], LoadedModel] = attach_adapter,
    ):
        self.max_models = max_models if max_models is not None else settings.env_int("BABL_MAX_MODELS", 2)
        if self.max_models < 1:
            raise ValueError(f"BABL_MAX_MODELS={self.max_models} is not valid; use 1 or more")
        self.memory_bytes = None
        gb = memory_gb if memory_gb is not None else settings.env_float("BABL_MEMORY_GB", None)
        if gb is not None:
            if gb <= 0:
                raise ValueError(f"BABL_MEMORY_GB={gb} is not valid; use a positive number of GB or unset it")
            self.memory_bytes = int(gb * 1e9)
        timeout = (
            load_timeout_s if load_timeout_s is not None else settings.env_float("BABL_LOAD_TIMEOUT_S", 120.0)
        )
        self.load_timeout_s = float(timeout)
        self._loader = loader
        self._adapter_loader = adapter_loader
        self._entries: dict[tuple, _Entry] = {}
        self._cond = threading.Condition()
        self._waiting = 0
        self.loads = 0  # how many base loads happened (tests and status)
        self.evictions = 0

    # ---------------------------------------------------------------------------------------------
    @contextmanager
    def lease(
        self, spec: ModelSpec, *, use_adapter: bool = True, on_wait: Callable[[str], None] | None = None
    ) -> Iterator[LoadedModel]:
        """Hold `spec`'s model for one generation: `with cache.lease(spec) as loaded: ...`."""
        loaded = self.acquire(spec, use_adapter=use_adapter, on_wait=on_wait)
        try:
            yield loaded
        finally:
            self.release(loaded)

    def acquire(
        self, spec: ModelSpec, *, use_adapter: bool = True, on_wait: Callable[[str], None] | None = None
    ) -> LoadedModel:
        """Load (or reuse) `spec`'s base and adapter and mark the base busy until `release`.

        Raises:
            ModelUnavailable: the entry cannot be served here.
            ModelBusy: no room within the load timeout.
        """
        plan = plan_load(spec)
        key = cache_key(spec, plan)
        deadline = time.monotonic() + self.load_timeout_s
        notified: set[str] = set()

        def wait(reason: str) -> None:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise ModelBusy(
                    f"{spec.id} could not be loaded within {self.load_timeout_s:.0f} s: {reason}. "
                    "Try again when a running answer finishes, or raise BABL_MAX_MODELS / BABL_MEMORY_GB."
                )
            if on_wait and reason not in notified:
                notified.add(reason)
                on_wait(reason)
            self._waiting += 1
            try:
                self._cond.wait(timeout=min(remaining, 1.0))
            finally:
                self._waiting -= 1

        with self._cond:
            while True:
                entry = self._entries.get(key)
                if entry is not None and entry.loading:
                    wait(f"{spec.base} is being loaded by another request")
                    continue
                if entry is not None:
                    break
                blocked = self._make_room(spec, plan, key)
                if blocked is None:
                    entry = _Entry(key=key, spec=spec, estimate_bytes=estimate_bytes(spec, plan))
                    self._entries[key] = entry
                    break
                wait(blocked)

        if entry.loading:
            self._load(entry, spec, plan)

        ref = spec.adapter if use_adapter else None
        with self._cond:
            while True:
                if entry.key not in self._entries:  # evicted while we waited: start over
                    return self.acquire(spec, use_adapter=use_adapter, on_wait=on_wait)
                if entry.attaching:
                    wait(f"an adapter is being added to {spec.base}")
                    continue
                if ref and ref not in entry.adapters:
                    entry.attaching = True
                    break
                entry.active += 1
                entry.last_used = time.monotonic()
                name = entry.adapters.get(ref) if ref else None
                return entry.loaded.with_adapter(name, ref if name else None)

        # Attach the adapter once no generation runs on this base (the module tree changes).
        try:
            with self._cond:
                while entry.active > 0:
                    wait(f"waiting for running answers on {spec.base} before adding adapter {ref}")
            view = in_passing_thread(self._adapter_loader, entry.loaded, ref)
            with self._cond:
                entry.loaded.model = view.model  # the first adapter wraps the base in a PeftModel
                entry.loaded.footprint_bytes = view.footprint_bytes
                entry.adapters[ref] = view.adapter_name
                entry.active += 1
                entry.last_used = time.monotonic()
                return entry.loaded.with_adapter(view.adapter_name, ref)
        finally:
            with self._cond:
                entry.attaching = False
                self._cond.notify_all()

    def _load(self, entry: _Entry, spec: ModelSpec, plan: LoadPlan) -> None:
        try:
            loaded = in_passing_thread(self._loader, spec, plan)  # why: devices.in_passing_thread
        except BaseException:
            with self._cond:
                self._entries.pop(entry.key, None)
                self._cond.notify_all()
            raise
        with self._cond:
            entry.loaded = loaded
            entry.loading = False
            self.loads += 1
            self._enforce_memory(exclude=entry.key)
            self._cond.notify_all()

    def release(self, loaded: LoadedModel) -> None:
        """End one generation's hold on its base (the base stays cached until evicted)."""
        with self._cond:
            for entry in self._entries.values():
                if entry.loaded is not None and entry.loaded.model is loaded.model:
                    entry.active = max(0, entry.active - 1)
                    entry.last_used = time.monotonic()
                    break
            self._cond.notify_all()

    # ---------------------------------------------------------------------------------------------
    def _idle_lru(self, exclude: tuple | None = None) -> list[_Entry]:
        idle = [
            e for e in self._entries.values()
            if e.key != exclude and not e.loading and not e.attaching and e.active == 0
        ]  # fmt: skip
        return sorted(idle, key=lambda e: e.last_used)

    def _make_room(self, spec: ModelSpec, plan: LoadPlan, key: tuple) -> str | None:
        """Evict idle bases until `spec` fits; None when it fits, else why it must wait."""
        need = estimate_bytes(spec, plan)
        while True:
            count_ok = len(self._entries) < self.max_models
            used = sum(e.footprint for e in self._entries.values())
            memory_ok = self.memory_bytes is None or not self._entries or used + need <= self.memory_bytes
            if count_ok and memory_ok:
                return None
            victims = self._idle_lru(exclude=key)
            if not victims:
                what = (
                    f"{len(self._entries)} of {self.max_models} model slots"
                    if not count_ok
                    else "the memory budget"
                )
                return f"{what} in use by running answers"
            self._evict(victims[0])

    def _enforce_memory(self, exclude: tuple) -> None:
        if self.memory_bytes is None:
            return
        while sum(e.footprint for e in self._entries.values()) > self.memory_bytes:
            victims = self._idle_lru(exclude=exclude)
            if not victims:
                return
            self._evict(victims[0])

    def _evict(self, entry: _Entry) -> None:
        log.info("evicting %s (idle, least recently used)", entry.key[0])
        self._entries.pop(entry.key, None)
        if entry.loaded is not None and entry.loaded.plan.engine == "llama.cpp":
            entry.loaded.model.stop()  # the child process is the model: end it
        if entry.loaded is not None:
            entry.loaded.model = None
            entry.loaded.tokenizer = None
            entry.loaded = None
        self.evictions += 1
        gc.collect()
        try:
            import torch

            if torch.cuda.is_available():
                torch.cuda.empty_cache()
        except ImportError:  # pragma: no cover
            pass

    def clear(self) -> None:
        """Evict every idle base (used at shutdown and in tests)."""
        with self._cond:
            for entry in self._idle_lru():
                self._evict(entry)

    # ---------------------------------------------------------------------------------------------
    def status(self) -> dict:
        """Loaded bases, their adapters, memory, active generations, batches and the wait queues.

        `queue` counts every request that waits: for a model to load (`waiting_for_load`) and for a
        row in its base's batch (`waiting_to_join`). Each base's `batch` is its scheduler's status
        (rows decoding now, waiting, KV-cache MB), or None before its first batched answer.
        """
        from babl_core.engine.batching import scheduler_status

        with self._cond:
            entries = [(e, e.loaded.model if e.loaded else None) for e in self._entries.values()]
            bases = [
                {
                    "base": e.key[0],
                    "quantization": e.key[1],
                    "dtype": e.key[2],
                    "device": e.key[3],
                    "engine": e.key[4],
                    "state": "loading" if e.loading else ("adding adapter" if e.attaching else "ready"),
                    "memory_mb": round(e.footprint / 1e6, 1),
                    "adapters": sorted(e.adapters),
                    "active_generations": e.active,
                    "idle_s": round(time.monotonic() - e.last_used, 1),
                    "description": e.loaded.describe() if e.loaded else "",
                }
                for e, _ in entries
            ]
            waiting_for_load = self._waiting
        # Outside the lock: a scheduler's status takes its own lock, never ours.
        for base, (_, model) in zip(bases, entries, strict=True):
            base["batch"] = scheduler_status(model) if model is not None else None
        waiting_to_join = sum(b["batch"]["waiting"] for b in bases if b["batch"])
        return {
            "bases": bases,
            "max_models": self.max_models,
            "memory_budget_mb": round(self.memory_bytes / 1e6, 1) if self.memory_bytes else None,
            "memory_mb": round(sum(b["memory_mb"] for b in bases), 1),
            "kv_cache_mb": round(sum(b["batch"]["kv_cache_mb"] for b in bases if b["batch"]), 2),
            "active_generations": sum(b["active_generations"] for b in bases),
            "queue": waiting_for_load + waiting_to_join,
            "waiting_for_load": waiting_for_load,
            "waiting_to_join": waiting_to_join,
        }

    def is_loaded(self, spec: ModelSpec) -> bool:
        with self._cond:
            entry = self._entries.get(cache_key(spec, plan_load(spec)))
            return bool(entry and not entry.loading and (not spec.adapter or spec.adapter in entry.adapters))
