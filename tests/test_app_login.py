"""Login as app.py wires it (DESIGN.md "Login"), against `chainlit run app.py` subprocesses: the
login page and password check with BABL_AUTH, and the refusal to serve a non-loopback host without
a login. The local-user mode (no login page on 127.0.0.1) is what tests/test_app_browser.py uses.
"""

from __future__ import annotations

import subprocess
import sys
import urllib.error
import urllib.parse
import urllib.request

import pytest

from tests.conftest import REPO_ROOT
from tests.servers import chainlit_server, free_port, launch_chromium, require_playwright, server_env
from tests.test_app_browser import ANSWERS, screenshot

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

PASSWORD = "correct horse battery"


def post_login(url: str, username: str, password: str) -> int:
    body = urllib.parse.urlencode({"username": username, "password": password}).encode()
    try:
        with urllib.request.urlopen(
            urllib.request.Request(f"{url}/login", data=body), timeout=10
        ) as response:
            return response.status
    except urllib.error.HTTPError as error:
        return error.code


def test_password_login_with_babl_auth(session_models_dir, tmp_path):
    import json

    env = server_env(session_models_dir, tmp_path / "data", BABL_AUTH=f"alice:{PASSWORD}")
    with chainlit_server(env=env, log_path=tmp_path / "chainlit.log") as url:
        with urllib.request.urlopen(f"{url}/auth/config", timeout=10) as response:
            config = json.loads(response.read())
        assert config["requireLogin"] and config["passwordAuth"] and not config["headerAuth"]
        assert post_login(url, "alice", "wrong") == 401
        assert post_login(url, "mallory", PASSWORD) == 401
        assert post_login(url, "alice", PASSWORD) == 200

        require_playwright()
        from playwright.sync_api import expect, sync_playwright

        with sync_playwright() as playwright:
            browser = launch_chromium(playwright)
            try:
                page = browser.new_page(viewport={"width": 1280, "height": 800})
                page.goto(url)
                expect(page).to_have_url(f"{url}/login", timeout=30000)
                expect(page.get_by_text("User name")).to_be_visible()
                screenshot(page, "app-login.png")
                page.locator("#email").fill("alice")
                page.locator("#password").fill(PASSWORD)
                page.get_by_role("button", name="Sign In").click()
                expect(page.locator(ANSWERS).first).to_contain_text("Answering with", timeout=30000)
            finally:
                browser.close()
    assert PASSWORD not in (tmp_path / "chainlit.log").read_text()


def test_a_non_loopback_host_without_login_refuses_to_start(session_models_dir, tmp_path):
    # 192.0.2.1 (TEST-NET-1) is not an address of this machine: even if the policy failed, nothing
    # could listen on it, so this test never opens a port beyond loopback.
    env = server_env(session_models_dir, tmp_path / "data")
    command = [sys.executable, "-m", "chainlit", "run", "app.py", "--headless", "--host", "192.0.2.1"]
    command += ["--port", str(free_port())]
    result = subprocess.run(command, cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode != 0
    assert "Refusing to serve on 192.0.2.1 without a login" in result.stderr + result.stdout
    assert "BABL_AUTH" in result.stderr + result.stdout
