"""Paths and environment settings shared by every part of Babl.

Every variable the contracts in DESIGN.md name is read here, once per call (tests change the
environment between calls, so nothing is frozen at import time).
"""

from __future__ import annotations

import os
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent

TASKS = ("html", "python", "email", "qa", "code", "chat")


def env_flag(name: str, default: bool = False) -> bool:
    """True for 1/true/yes/on (any case), False for 0/false/no/off/empty."""
    value = os.environ.get(name)
    if value is None:
        return default
    return value.strip().lower() in ("1", "true", "yes", "on")


def env_int(name: str, default: int) -> int:
    value = os.environ.get(name, "").strip()
    if not value:
        return default
    try:
        return int(value)
    except ValueError:
        raise ValueError(f"{name}={value!r} is not a whole number; set it to e.g. {default}") from None


def env_float(name: str, default: float | None) -> float | None:
    value = os.environ.get(name, "").strip()
    if not value:
        return default
    try:
        return float(value)
    except ValueError:
        raise ValueError(f"{name}={value!r} is not a number; unset it or set e.g. 8") from None


def resolve_path(value: str | os.PathLike) -> Path:
    """A path from a config file: relative paths are taken from the repo root, except that a
    leading `models/` means the models directory (so `BABL_MODELS_DIR` moves demo models and
    adapters named in the catalog too)."""
    path = Path(value).expanduser()
    if path.is_absolute():
        return path
    if path.parts and path.parts[0] == "models" and os.environ.get("BABL_MODELS_DIR"):
        return models_dir().joinpath(*path.parts[1:])
    return REPO_ROOT / path


def portable_path(path: str | os.PathLike) -> str:
    """The inverse of `resolve_path`: `models/...` inside the models directory, relative to the
    repo root inside the repo, else absolute."""
    path = Path(path).resolve()
    for root, prefix in ((models_dir().resolve(), "models"), (REPO_ROOT, "")):
        try:
            rel = path.relative_to(root).as_posix()
        except ValueError:
            continue
        return f"{prefix}/{rel}" if prefix else rel
    return str(path)


def models_dir() -> Path:
    """`models/` (demo models, adapters); `BABL_MODELS_DIR` replaces it."""
    value = os.environ.get("BABL_MODELS_DIR")
    if not value:
        return REPO_ROOT / "models"
    path = Path(value).expanduser()
    return path if path.is_absolute() else REPO_ROOT / path


def adapters_dir() -> Path:
    return models_dir() / "adapters"


def demo_dir() -> Path:
    return models_dir() / "demo"


def gguf_dir() -> Path:
    """Where GGUF bases are written once as safetensors (`models/gguf/`), one folder per file and dtype."""
    return models_dir() / "gguf"


def data_dir() -> Path:
    """Local state (database, secrets, stored files); `BABL_DATA_DIR` replaces `data/`."""
    value = os.environ.get("BABL_DATA_DIR")
    return resolve_path(value) if value else REPO_ROOT / "data"


def catalog_path() -> Path:
    """`configs/models.yaml`; `BABL_MODELS=path` replaces it."""
    value = os.environ.get("BABL_MODELS")
    return resolve_path(value) if value else REPO_ROOT / "configs" / "models.yaml"


def strict_ci() -> bool:
    """`BABL_CI_STRICT=1`: a missing Chromium/PostgreSQL fails tests instead of skipping them."""
    return env_flag("BABL_CI_STRICT")
