"""`python -m finetune.launch` (accelerate launch's arguments): a failing multi-process run says why once."""

from __future__ import annotations

import os
import re
import subprocess
import sys

import pytest

from tests.conftest import REPO_ROOT


@pytest.mark.slow
def test_a_failing_two_process_run_prints_its_reason_once_and_no_traceback(models_dir):
    env = {**os.environ, "BABL_MODELS_DIR": str(models_dir), "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    done = subprocess.run(
        [sys.executable, "-m", "finetune.launch", "--config_file", "configs/accelerate/ddp.yaml",
         "--num_processes", "2", "--main_process_port", "0",
         "-m", "finetune", "train", "--config", "configs/finetune/demo-python.yaml", "--lora_r", "abc"],
        cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert done.returncode == 2, done.stderr  # finetune's own code for a bad config, not the launcher's 1
    err = done.stderr
    assert err.count("lora_r: 'abc' is not a whole number") == 1, err  # two processes, one reason
    assert "Traceback" not in err and "ChildFailedError" not in err and "elastic" not in err, err
    lines = [line for line in err.splitlines() if line.strip()]
    # Both processes fail on the same bad value; whichever the launcher sees end first is named.
    assert re.fullmatch(
        r"finetune\.launch: training process [01] stopped \(exit code 2\); its reason is printed above",
        lines[-1],
    ), err
    assert len(lines) <= 4, err
