"""babl_core.web.session_files: each instance's own folder for Chainlit's session files, and folders of
instances that died removed at the next start (live ones kept)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import chainlit.config

from babl_core.web import session_files
from tests.conftest import REPO_ROOT

HOLD = """
import sys, time
from pathlib import Path
from babl_core.web import session_files
folder = session_files.use_own_files_dir(Path(sys.argv[1]))
(folder / "a-download.html").write_text("page")
print(folder, flush=True)
if sys.argv[2] == "wait":
    sys.stdin.readline()
"""


def start(root, mode: str) -> tuple[subprocess.Popen, str]:
    process = subprocess.Popen(
        [sys.executable, "-c", HOLD, str(root), mode],
        cwd=REPO_ROOT, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    return process, process.stdout.readline().strip()


def test_each_instance_has_its_own_folder_and_dead_ones_are_cleaned_up(tmp_path, monkeypatch):
    root = tmp_path / "session-files"
    monkeypatch.setattr(chainlit.config, "FILES_DIRECTORY", chainlit.config.FILES_DIRECTORY)
    live, live_folder = start(root, "wait")  # a running instance
    dead, dead_folder = start(root, "exit")  # an instance that ended without cleaning up
    dead.wait(timeout=30)
    try:
        assert Path(dead_folder).exists()
        mine = session_files.use_own_files_dir(root)
        assert mine == chainlit.config.FILES_DIRECTORY and mine.is_dir()
        assert str(mine) not in (live_folder, dead_folder)
        assert (Path(live_folder) / "a-download.html").read_text() == "page"
        assert not Path(dead_folder).exists()  # removed: nobody held its lock
        session_files.remove_files_dir(mine)
        assert not mine.exists() and not mine.with_name(mine.name + ".lock").exists()
    finally:
        live.communicate("\n", timeout=30)
