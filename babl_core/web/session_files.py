"""Where Chainlit keeps the files of live chat sessions (HTML downloads, exports, previews' content):
a folder of this process's own under the data directory, not `<app root>/.files/`.

Chainlit 2.12 writes each session's files under `.files/<session id>/` and removes the whole `.files/`
folder when any instance started from the same folder stops: a second `chainlit run` from the same
checkout, stopped, silently broke the first one's downloads. Chainlit reads the folder from
`chainlit.config.FILES_DIRECTORY` each time it stores or serves a file, so pointing that at
`<data dir>/session-files/<pid>-<random>/` gives each instance its own; its shutdown still removes
`.files/`, which then holds nothing of ours. Each instance removes its folder when it stops
(`remove_files_dir`), and folders left by instances that died are removed at the next start: one
is stale when no live process holds the lock file next to it (an advisory `flock`, released by the
kernel when its process ends, however it ends).

Stored history (elements kept with a chat) is elsewhere: `babl_core.storage.files.LocalFileStorage`, `data/files/`.
"""

from __future__ import annotations

import fcntl
import logging
import os
import shutil
import uuid
from pathlib import Path

from babl_core import settings

log = logging.getLogger("babl.session_files")

_held: dict[Path, int] = {}  # this process's folders -> the descriptor holding their lock


def root_dir() -> Path:
    """`session-files/` in the data directory (`BABL_DATA_DIR` moves it)."""
    return settings.data_dir() / "session-files"


def _lock_path(folder: Path) -> Path:
    return folder.with_name(folder.name + ".lock")


def _remove_stale(root: Path) -> None:
    for lock in root.glob("*.lock"):
        try:
            fd = os.open(lock, os.O_RDWR)
        except OSError:
            continue  # removed meanwhile
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            continue  # a live instance holds it
        try:
            shutil.rmtree(lock.with_suffix(""), ignore_errors=True)
            lock.unlink(missing_ok=True)
        finally:
            os.close(fd)


def use_own_files_dir(root: Path | None = None) -> Path:
    """Give this process its own folder for Chainlit's session files (call once at start, before any
    session; app.py does). Removes folders left by instances that are gone.

    Returns:
        The folder, now `chainlit.config.FILES_DIRECTORY`.

    Raises:
        OSError: the data directory cannot be written (the message names the folder).
    """
    import chainlit.config

    root = root or root_dir()
    root.mkdir(parents=True, exist_ok=True)
    _remove_stale(root)
    folder = root / f"{os.getpid()}-{uuid.uuid4().hex[:8]}"
    # The lock first, held before the folder exists: another instance starting now never sees the
    # folder without a held lock.
    fd = os.open(_lock_path(folder), os.O_RDWR | os.O_CREAT, 0o600)
    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    folder.mkdir(mode=0o700)
    _held[folder] = fd
    chainlit.config.FILES_DIRECTORY = folder
    log.debug("chat session files in %s", folder)
    return folder


def remove_files_dir(folder: Path | None = None) -> None:
    """Remove this process's session-files folder (at shutdown: its sessions are gone with it)."""
    folders = [folder] if folder is not None else list(_held)
    for path in folders:
        fd = _held.pop(path, None)
        shutil.rmtree(path, ignore_errors=True)
        _lock_path(path).unlink(missing_ok=True)
        if fd is not None:
            os.close(fd)
