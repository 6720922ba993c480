"""The Makefile's two commands, as far as a test can run them without building a new virtualenv."""

from __future__ import annotations

import shlex
import shutil
import subprocess
import sys

import pytest

from tests.conftest import REPO_ROOT

pytestmark = pytest.mark.skipif(shutil.which("make") is None, reason="make is not installed")


def planned_commands(target: str, tmp_path) -> list[str]:
    """What `make <target>` would run from scratch (-B: every step out of date, -n: run nothing)."""
    result = subprocess.run(
        ["make", "-n", "-B", target, f"VENV={tmp_path / 'venv'}"],
        cwd=REPO_ROOT, capture_output=True, text=True, timeout=60, check=True,
    )  # fmt: skip
    return result.stdout.splitlines()


def test_make_run_lists_no_requirement_already_satisfied(tmp_path):
    """`make run` after requirements.txt changed: pip's install line, run with this venv's pip against
    packages it already has, prints no "Requirement already satisfied" wall."""
    lines = [line for line in planned_commands("run", tmp_path) if "pip install" in line and "-r " in line]
    assert lines, "make run installs requirements.txt"
    requirements = tmp_path / "requirements.txt"
    requirements.write_text("pyyaml\njinja2\n")  # installed here; --no-index keeps pip off the network
    for line in lines:
        argv = shlex.split(line)
        argv[0] = sys.executable
        argv[argv.index("-r") + 1] = str(requirements)
        result = subprocess.run([*argv, "--no-index"], capture_output=True, text=True, timeout=120)
        assert result.returncode == 0, result.stderr
        assert "Requirement already satisfied" not in result.stdout + result.stderr
        assert result.stdout.strip() == ""
