"""Paths and environment settings shared by every part of Babl.

Every variable the contracts in DESIGN.md name is read here, once per call (tests change the
environment between calls, so nothing is frozen at import time).

Two places matter: what ships with Babl (the catalog, the recipes, the Chainlit app files) and Babl's
home, where it writes (`data/`, `models/`). In a checkout both are the repo root, as they always
were. Installed from a wheel, what ships is the copy the build put in `babl_core/_bundle/` (read-only,
inside site-packages) and the home is `BABL_HOME`, by default the platform's user data dir.
"""

from __future__ import annotations

import os
from pathlib import Path

# The folder holding babl_core and finetune: the checkout, or site-packages when installed.
REPO_ROOT = Path(__file__).resolve().parent.parent
# Written only by the wheel build (setup.py): app.py, chainlit.md, .chainlit/, public/, configs/.
BUNDLE_DIR = Path(__file__).resolve().parent / "_bundle"

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


def installed() -> bool:
    """True when running from an installed wheel (the build ships a bundle), False in a checkout."""
    return BUNDLE_DIR.is_dir()


def shipped_root() -> Path:
    """Where the files that ship with Babl are: `configs/`, `app.py`, `chainlit.md`, `.chainlit/`,
    `public/` — the repo root in a checkout, the wheel's bundle when installed."""
    return BUNDLE_DIR if installed() else REPO_ROOT


def serve_command() -> str:
    """How the user at hand starts the app, for messages: `make run` in a checkout, else `babl serve`."""
    return "babl serve" if installed() else "make run"


def home() -> Path:
    """Where Babl keeps `data/` and `models/`: `BABL_HOME` when set; otherwise the repo root in a
    checkout and the platform's user data dir (e.g. `~/.local/share/babl`) when installed, so
    nothing is ever written inside site-packages."""
    value = os.environ.get("BABL_HOME", "").strip()
    if value:
        return Path(value).expanduser().absolute()
    if not installed():
        return REPO_ROOT
    from platformdirs import user_data_path

    return user_data_path("babl", appauthor=False)


def _search_roots(*, cwd: bool = True) -> list[Path]:
    """Where a relative path from a config file or setting is looked for, in order. In a checkout
    without BABL_HOME this is the repo root alone, as before; installed, the home, the current folder
    (`cwd=False` leaves it out), the bundle (configs) and site-packages (`finetune/samples/`)."""
    roots = [home()]
    if cwd and installed():
        roots.append(Path.cwd())
    roots += [shipped_root(), REPO_ROOT]
    unique: list[Path] = []
    for root in roots:
        if root not in unique:
            unique.append(root)
    return unique


def resolve_path(value: str | os.PathLike) -> Path:
    """A path from a config file or a setting. A leading `models/` means the models directory
    (so `BABL_MODELS_DIR` and `BABL_HOME` move the demo models and adapters named in the catalog
    too); other relative paths are taken from the first search root where they exist (in a checkout:
    the repo root), else from the home (where a new file would go)."""
    path = Path(value).expanduser()
    if path.is_absolute():
        return path
    if path.parts and path.parts[0] == "models":
        return models_dir().joinpath(*path.parts[1:])
    roots = _search_roots()
    for root in roots:
        if (root / path).exists():
            return root / path
    return roots[0] / path


def shipped_file(value: str | os.PathLike) -> Path:
    """A file named on the command line (e.g. `--config configs/finetune/demo-html.yaml`): as given
    when it exists there, else the copy that ships with Babl, so the documented commands work from
    any folder once installed."""
    path = Path(value).expanduser()
    if path.exists() or path.is_absolute():
        return path
    shipped = shipped_root() / path
    return shipped if shipped.exists() else path


def portable_path(path: str | os.PathLike) -> str:
    """The inverse of `resolve_path`: `models/...` inside the models directory, relative inside the
    home or what ships with Babl, else absolute."""
    path = Path(path).resolve()
    # Not relative to the current folder: that would not resolve back when run from another one.
    roots = [(models_dir().resolve(), "models")] + [(r.resolve(), "") for r in _search_roots(cwd=False)]
    for root, prefix in roots:
        try:
            rel = path.relative_to(root).as_posix()
        except ValueError:
            continue
        return f"{prefix}/{rel}" if prefix else rel
    return str(path)


def models_dir() -> Path:
    """`models/` under the home (demo models, adapters); `BABL_MODELS_DIR` replaces it."""
    value = os.environ.get("BABL_MODELS_DIR")
    if not value:
        return home() / "models"
    path = Path(value).expanduser()
    return path if path.is_absolute() else home() / path


def adapters_dir() -> Path:
    return models_dir() / "adapters"


def finetuned_dir() -> Path:
    """Where full fine-tunes go (`models/finetuned/`), one complete model folder per run."""
    return models_dir() / "finetuned"


def demo_dir() -> Path:
    return models_dir() / "demo"


def gguf_dir() -> Path:
    """Where GGUF bases are written once as safetensors (`models/gguf/`), one folder per file and dtype."""
    return models_dir() / "gguf"


def data_dir() -> Path:
    """Local state (database, secrets, stored files): `data/` under the home; `BABL_DATA_DIR`
    replaces it."""
    value = os.environ.get("BABL_DATA_DIR")
    return resolve_path(value) if value else home() / "data"


def catalog_path() -> Path:
    """`configs/models.yaml` as shipped; `BABL_MODELS=path` replaces it."""
    value = os.environ.get("BABL_MODELS")
    return resolve_path(value) if value else shipped_root() / "configs" / "models.yaml"


def strict_ci() -> bool:
    """`BABL_CI_STRICT=1`: a missing Chromium/PostgreSQL fails tests instead of skipping them."""
    return env_flag("BABL_CI_STRICT")
