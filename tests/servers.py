"""Real processes for end-to-end tests: `chainlit run <app> --headless` on a free loopback port, and
Debian's Chromium driven by Playwright.

Chromium or Playwright missing: skipped with the install command, or a failure when BABL_CI_STRICT=1;
never `playwright install` (it downloads a browser and fails offline).
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from tests.conftest import REPO_ROOT, chromium_or_skip, skip_or_fail

CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]


def free_port() -> int:
    """A loopback port nothing listens on at the moment of asking."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def server_env(models_dir: Path, data_dir: Path, **extra: str) -> dict:
    """The environment for `chainlit run app.py`: this process's, without any BABL_/CHAINLIT_/NGROK_
    setting (a developer's shell must not change what the test serves), offline, on `models_dir`."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("BABL_", "CHAINLIT_", "NGROK_"))}
    env.update(
        PYTHONPATH=str(REPO_ROOT),
        HF_HUB_OFFLINE="1",
        TRANSFORMERS_OFFLINE="1",
        BABL_MODELS_DIR=str(models_dir),
        BABL_DATA_DIR=str(data_dir),
        BABL_DEFAULT_MODEL="demo-html",  # tiny random weights unless a test asks for another model
    )
    env.update(extra)
    return env


def start_chainlit(
    app: str, *, env: dict, log_path: Path, timeout_s: float = 90
) -> tuple[subprocess.Popen, str]:
    """`chainlit run <app> --headless` from the repo root on a free 127.0.0.1 port.

    Args:
        app: the Chainlit script, relative to the repo root (`app.py`, `tests/assets/preview_app.py`).
        env: the server's whole environment (see `server_env`).
        log_path: where its stdout and stderr go; the tail is shown when it fails.
        timeout_s: how long /health may take to answer.

    Returns:
        The process and its base URL, once /health answers 200. Fails the test with the log's tail
        when the server exits or does not answer in time (the process is stopped first).
    """
    port = free_port()
    command = [sys.executable, "-m", "chainlit", "run", app, "--headless"]
    command += ["--host", "127.0.0.1", "--port", str(port)]
    with open(log_path, "wb") as log:
        process = subprocess.Popen(command, cwd=REPO_ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + timeout_s
    while True:
        if process.poll() is not None:
            pytest.fail(f"chainlit exited with {process.returncode}:\n{log_path.read_text()[-3000:]}")
        try:
            with urllib.request.urlopen(f"{url}/health", timeout=2) as response:
                if response.status == 200:
                    return process, url
        except OSError:  # not listening yet, or an HTTP error while it starts
            pass
        if time.monotonic() > deadline:
            stop_chainlit(process)
            pytest.fail(
                f"chainlit did not answer /health in {timeout_s:g} s:\n{log_path.read_text()[-3000:]}"
            )
        time.sleep(0.3)


def stop_chainlit(process: subprocess.Popen) -> None:
    """SIGTERM (Chainlit's shutdown runs), SIGKILL when it takes over 10 s."""
    process.terminate()
    try:
        process.wait(timeout=10)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


@contextmanager
def chainlit_server(
    app: str = "app.py", *, env: dict, log_path: Path, timeout_s: float = 90
) -> Iterator[str]:
    """`start_chainlit` as a context: yields the base URL and stops the server on the way out."""
    process, url = start_chainlit(app, env=env, log_path=log_path, timeout_s=timeout_s)
    try:
        yield url
    finally:
        stop_chainlit(process)


def require_playwright() -> None:
    """Skips (or fails under BABL_CI_STRICT=1) unless both Chromium and Playwright are installed."""
    chromium_or_skip()
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError:
        skip_or_fail(
            "playwright is missing: pip install -r requirements-test.txt (never `playwright install`)"
        )


def launch_chromium(playwright):
    """Debian's headless Chromium through a `sync_playwright()` instance; close it when done."""
    return playwright.chromium.launch(executable_path=chromium_or_skip(), args=CHROMIUM_ARGS)


@contextmanager
def chromium() -> Iterator:
    """Debian's headless Chromium (see `launch_chromium`), closed afterwards; skips without it."""
    require_playwright()
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        browser = launch_chromium(playwright)
        try:
            yield browser
        finally:
            browser.close()


def assert_no_traceback(log_path: Path) -> None:
    """The server log of a test's app holds no traceback (its tail is the failure message)."""
    log = log_path.read_text()
    assert "Traceback" not in log, log[-4000:]
