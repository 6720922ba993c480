"""Whether a catalog entry can be served here, in one word (DESIGN.md "Catalog": local, cached,
downloadable, needs-training, unavailable) and a reason that names the fix.

Apart from the catalog because it asks the engines: a GGUF entry's file (`gguf`), a remote entry's
server (`remote.probe`), a llama.cpp entry's binary and exports (`llama_cpp`); the catalog itself only
reads and checks entries.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

from babl_core import settings
from babl_core.engine import gguf, llama_cpp
from babl_core.engine.catalog import (
    AVAILABILITY_WORDS,
    Availability,
    BaseWeights,
    Catalog,
    ModelSpec,
    hub_cached_dir,
    is_offline,
    looks_like_path,
)
from babl_core.engine.remote import probe

log = logging.getLogger(__name__)


def _fix_for_missing(spec: ModelSpec | BaseWeights, what: str, path: Path) -> str:
    if spec.demo:
        return f"{what} {settings.portable_path(path)} is missing; build the demo models: python -m babl_core demo"
    if isinstance(spec, BaseWeights):
        return f"{what} {path} is missing; fix the path or restore the directory"
    return f"{what} {path} is missing; fix the path in the catalog or restore the directory"


def _download_fix(spec: ModelSpec | BaseWeights) -> str:
    if isinstance(spec, BaseWeights):  # not a catalog entry: no download command names it
        return "when online run this again: the hub's files are downloaded on first use"
    return f"when online run: python -m babl_core download {spec.id}"


def _where(spec: ModelSpec | BaseWeights, ref: str, what: str, marker: str) -> Availability:
    """Availability of one artefact (base or adapter) named by hub id or path."""
    if looks_like_path(ref):
        path = settings.resolve_path(ref)
        if (path / marker).is_file():
            return Availability("local", f"{what} at {settings.portable_path(path)}")
        return Availability("unavailable", _fix_for_missing(spec, what, path))
    if hub_cached_dir(ref, marker):
        return Availability("cached", f"{what} {ref} is in the Hugging Face cache")
    if is_offline():
        return Availability(
            "unavailable", f"offline and {what} {ref} is not in the Hugging Face cache; {_download_fix(spec)}"
        )
    return Availability("downloadable", f"{what} {ref} will be downloaded from the hub on first use")


def base_availability(spec: ModelSpec | BaseWeights) -> Availability:
    """Where the base weights are: the GGUF file for GGUF bases, else the base folder or hub id."""
    if spec.gguf_file:
        return Availability(*gguf.availability(spec.gguf_file, spec.base))
    return _where(spec, spec.base, "base model", "config.json")


def availability(spec: ModelSpec) -> Availability:
    """One word (local, cached, downloadable, needs-training, unavailable) and a reason."""
    if spec.backend == "openai":
        problem = probe(spec)
        if problem:
            return Availability("unavailable", problem)
        return Availability("local", f"served by the OpenAI-compatible server at {spec.base_url}")
    if spec.requires_adapter and spec.adapter and looks_like_path(spec.adapter):
        adapter_dir = settings.resolve_path(spec.adapter)
        if not (adapter_dir / "adapter_config.json").is_file():
            how = spec.train_command or "python -m finetune train --config <recipe>.yaml"
            where = settings.portable_path(adapter_dir)
            base = base_availability(spec)
            if base.word != "unavailable":
                return Availability("needs-training", f"no adapter at {where} yet; train one: {how}")
            # Training needs the base too: say so before the commands, which are long.
            if looks_like_path(spec.base):
                reason = f"no adapter at {where} yet, and its {base.reason}; then train one: {how}"
            else:
                reason = (
                    f"no adapter at {where} yet, and its base {spec.base} is not downloaded (offline, not in "
                    f"the Hugging Face cache): when online run python -m babl_core download {spec.id}, then "
                    f"train one: {how}"
                )
            return Availability("needs-training", reason)
    base = base_availability(spec)
    if base.word != "unavailable" and spec.engine == "llama.cpp":
        problem = llama_cpp.availability_problem(spec)
        if problem:
            return Availability("unavailable", problem)
    if not spec.adapter or base.word == "unavailable":
        return base
    adapter = _where(spec, spec.adapter, "adapter", "adapter_config.json")
    order = {w: i for i, w in enumerate(AVAILABILITY_WORDS)}
    worst = max((base, adapter), key=lambda a: order[a.word])
    if worst.word == "unavailable":
        return worst
    return Availability(worst.word, f"{base.reason}; {adapter.reason}")


def default_model(catalog: Catalog, cuda: bool | None = None) -> ModelSpec | None:
    """The model a new chat opens on: `BABL_DEFAULT_MODEL` when set and servable, else the first
    servable entry; without CUDA, entries marked prefer_gpu are passed over."""
    if cuda is None:
        from babl_core.engine.devices import cuda_available

        cuda = cuda_available()
    specs = catalog.list()
    chosen = os.environ.get("BABL_DEFAULT_MODEL", "").strip()
    if chosen:
        spec = next((s for s in specs if s.id == chosen), None)
        if spec is None:
            log.warning("BABL_DEFAULT_MODEL=%s is not in the catalog; using the first usable entry", chosen)
        elif availability(spec).servable:
            return spec
        else:
            log.warning("BABL_DEFAULT_MODEL=%s cannot be served here; using the first usable entry", chosen)
    servable = [s for s in specs if availability(s).servable]
    for spec in servable:
        if cuda or not spec.prefer_gpu:
            return spec
    return servable[0] if servable else None
