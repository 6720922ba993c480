"""Where a trained run's folder is, and how finetune writes results so that no reader sees half of one.

Finding a run: `find_run_dir` and `find_adapter_dir` turn what a user gives as `--adapter` (a folder, or a
bare run name under models/adapters/ or models/finetuned/) into that folder; when nothing is there, the
error says where it looked and which runs exist. The engine's catalog resolves its own `adapter:` entries
(`babl_core.engine.catalog`); this is the command line's lookup.

Writing: a result file is written to a temporary file beside it and renamed over it (`write_text_atomic`,
`write_json_atomic`, or `replacing` for a writer that wants a path), so the app, a second command or a
crash never leaves or shows a half-written file: a reader sees the old file or the new one. A result folder
(an adapter, a merged model) is assembled in `<parent>/.partial/<name>/` (`staged_dir`, `into_place`) and
renamed into place once complete; `.partial` is on the same file system, so the rename is atomic, and one
level too deep for the app's adapter discovery. Replacing a folder swaps: the old one steps aside into
`.partial` first and is deleted after the new one is in place.

The standard library does all of this in a few lines; the packages that once did it for files
(`atomicwrites`) are no longer maintained, and none stages folders.
"""

from __future__ import annotations

import contextlib
import glob
import json
import os
import shutil
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from babl_core import settings

PARTIAL_DIR = ".partial"
"""The folder, beside a result folder, that the result is assembled in."""
TRAIN_HINT = "python -m finetune train --config <recipe>.yaml"
LISTED_RUNS = 20
"""At most this many run names in a "not found" error (then: "and N more")."""


# --------------------------------------------------------------------------------------------------
# Finding a trained run from what a user typed


class RunNotFound(ValueError):
    """No trained run where a user pointed; the message says where it looked and which runs exist."""

    def __init__(self, message: str, candidates: list[Path]):
        super().__init__(message)
        self.candidates = candidates
        """The folders looked in, in order."""


def _run_folders() -> tuple[Path, Path]:
    """Where finetune saves runs: adapters, then full fine-tunes."""
    return settings.adapters_dir(), settings.finetuned_dir()


def run_dir_candidates(value: str) -> list[Path]:
    """The folders `value` may mean: the path itself (relative to the repo root, or models/...), then,
    for a bare name, models/adapters/<name> and models/finetuned/<name> (full fine-tunes)."""
    candidates = [settings.resolve_path(value)]
    if "/" not in value and "\\" not in value:
        for folder in _run_folders():
            if folder / value not in candidates:
                candidates.append(folder / value)
    return candidates


def trained_runs(marker: str = "babl.json") -> list[str]:
    """The run names under models/adapters/ and models/finetuned/ whose folder holds `marker`, sorted."""
    names = set()
    for folder in _run_folders():
        if folder.is_dir():
            names.update(
                p.name for p in folder.iterdir() if not p.name.startswith(".") and (p / marker).is_file()
            )
    return sorted(names)


def find_run_dir(value: str, *, marker: str = "babl.json", option: str = "--adapter") -> Path:
    """The first folder `value` may mean (`run_dir_candidates`) that holds `marker`.

    Args:
        value: a run folder, or a run name.
        marker: the file that folder must hold: babl.json (what finetune writes last) by default.
        option: the command-line option `value` came from, for the message.

    Raises:
        RunNotFound: no such folder; the message names where it looked and the runs that exist.
    """
    candidates = run_dir_candidates(value)
    for path in candidates:
        if (path / marker).is_file():
            return path
    looked = ", ".join(settings.portable_path(p) for p in candidates)
    runs = trained_runs(marker)
    if runs:
        shown = ", ".join(runs[:LISTED_RUNS]) + (
            f" and {len(runs) - LISTED_RUNS} more" if len(runs) > LISTED_RUNS else ""
        )
        known = (
            f"trained runs here: {shown}; name one of them or a run's folder, or train it first: {TRAIN_HINT}"
        )
    else:
        where = settings.portable_path(settings.adapters_dir())
        known = f"nothing is trained here yet ({where}/ holds no run); train it first: {TRAIN_HINT}"
    raise RunNotFound(
        f"{option} {value}: no trained model there (looked for {marker} in {looked}); {known}", candidates
    )


def find_adapter_dir(value: str, *, option: str = "--adapter") -> Path:
    """The PEFT adapter folder `value` names (it holds adapter_config.json), for merging or exporting it.

    Raises:
        RunNotFound: no adapter there, or a full model (nothing to merge or export), with the fix.
    """
    try:
        return find_run_dir(value, marker="adapter_config.json", option=option)
    except RunNotFound as exc:
        full = next((p for p in exc.candidates if (p / "config.json").is_file()), None)
        if full is None:
            raise
        raise RunNotFound(
            f"{option}: {settings.portable_path(full)} is a full model, not an adapter: there is nothing to merge "
            "or export; serve it directly as a catalog entry's base",
            exc.candidates,
        ) from None


# --------------------------------------------------------------------------------------------------
# Files: the old one or the new one, never half of one


@contextlib.contextmanager
def replacing(path: Path) -> Iterator[Path]:
    """A temporary file beside `path` to write; renamed over `path` when the block ends, deleted if it raises.

    The temporary file exists (empty) when the block starts. It gets the mode the file had (new files
    0644: `mkstemp` alone would make them private, and the app must read them).
    """
    path = Path(path)
    mode = path.stat().st_mode & 0o777 if path.exists() else 0o644
    handle, name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(handle)
    temporary = Path(name)
    try:
        yield temporary
        # On disk before the rename, so that a power cut cannot leave the new name on empty contents.
        fd = os.open(temporary, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        os.chmod(temporary, mode)
        os.replace(temporary, path)
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise


def write_text_atomic(path: Path, text: str) -> None:
    """Write `text` (UTF-8) to `path` through a temporary file, so readers see the old file or the new one."""
    with replacing(path) as temporary:
        temporary.write_text(text, encoding="utf-8")


def write_json_atomic(path: Path, document: Any) -> None:
    """`document` as indented JSON (non-ASCII kept, NaN allowed), written as `write_text_atomic` does."""
    write_text_atomic(path, json.dumps(document, indent=2, ensure_ascii=False, allow_nan=True) + "\n")


# --------------------------------------------------------------------------------------------------
# Folders: assembled aside, renamed into place when complete


def staging_path(target: Path) -> Path:
    """Where `target` is assembled: `<parent>/.partial/<name>`."""
    return target.parent / PARTIAL_DIR / target.name


def fresh_staging_dir(target: Path) -> Path:
    """`staging_path(target)`, emptied and created. What a killed attempt left of this target goes first:
    its half-assembled folder, and an old folder it had swapped out but not yet deleted."""
    staging = staging_path(target)
    if staging.exists():
        shutil.rmtree(staging)
    for old in staging.parent.glob(f"{glob.escape(target.name)}.old-*"):
        shutil.rmtree(old, ignore_errors=True)
    staging.mkdir(parents=True)
    return staging


@contextlib.contextmanager
def into_place(
    staging: Path, target: Path, *, overwrite: bool, refusal: Exception | None = None
) -> Iterator[Path]:
    """Finish `staging` in the block; then it becomes `target`. If the block raises, it is deleted.

    Either way an emptied `.partial` folder is removed too.

    Args:
        staging: the folder being assembled (from `fresh_staging_dir`).
        target: where it goes.
        overwrite: replace `target` if it exists (swapped: the old folder is deleted only after).
        refusal: raised when `target` exists and `overwrite` is off (it appeared while the folder was
            assembled); by default a FileExistsError naming it. The staged folder is deleted then too.
    """
    try:
        yield staging
        move_into_place(staging, target, overwrite=overwrite, refusal=refusal)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    finally:
        with contextlib.suppress(OSError):  # not empty (another folder is assembled there) or gone already
            staging.parent.rmdir()


def staged_dir(target: Path, *, overwrite: bool, refusal: Exception | None = None):
    """`into_place` on a fresh staging folder: `with staged_dir(out, overwrite=...) as staging: ...`."""
    return into_place(fresh_staging_dir(target), target, overwrite=overwrite, refusal=refusal)


def move_into_place(
    staging: Path, target: Path, *, overwrite: bool, refusal: Exception | None = None
) -> None:
    """Rename the complete `staging` folder to `target` (see `into_place` for the arguments)."""
    if target.exists():
        if not overwrite:
            raise refusal or FileExistsError(f"{settings.portable_path(target)} already exists")
        # Swap: the old folder steps aside first, so the target is without its files only between two renames.
        old = staging.parent / f"{target.name}.old-{time.time_ns()}"
        target.rename(old)
        try:
            staging.rename(target)
        except BaseException:
            old.rename(target)  # the old folder back where it was: a failed replace changes nothing
            raise
        shutil.rmtree(old, ignore_errors=True)
        return
    target.parent.mkdir(parents=True, exist_ok=True)
    staging.rename(target)
