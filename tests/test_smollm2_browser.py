"""End to end, as a new user offline: the app opens a new chat on smollm2-chat (real weights) and
answers "What is the capital of France?" with Paris, in headless Chromium."""

from __future__ import annotations

import pytest

from tests.servers import (
    assert_no_traceback,
    chainlit_server,
    launch_chromium,
    require_playwright,
    server_env,
)
from tests.test_app_browser import ANSWERS, ask, open_chat, screenshot, wait_for_answer

pytestmark = [pytest.mark.e2e, pytest.mark.slow]


def test_a_new_chat_opens_on_smollm2_chat_and_answers_paris(smollm2, session_models_dir, tmp_path):
    from playwright.sync_api import sync_playwright

    require_playwright()
    _catalog, spec, _loaded = smollm2  # converted into the session's models dir: the server reuses it
    # No BABL_DEFAULT_MODEL: the app's own rule picks the model, as for a user who just ran `make run`.
    env = server_env(session_models_dir, tmp_path / "data", BABL_DEFAULT_MODEL="")
    log_path = tmp_path / "chainlit.log"
    with chainlit_server(env=env, log_path=log_path) as url, sync_playwright() as playwright:
        browser = launch_chromium(playwright)
        try:
            context, page = open_chat(browser, url)
            welcome = page.locator(ANSWERS).first.inner_text()
            assert spec.label in welcome
            ask(page, "What is the capital of France?")
            reply = wait_for_answer(page, 2, timeout_ms=180000)
            screenshot(page, "app-smollm2-paris.png")
            assert reply["model"] == "smollm2-chat"
            assert "Paris" in reply["text"]
            context.close()
        finally:
            browser.close()
    assert_no_traceback(log_path)
    assert "Converting" not in log_path.read_text()  # the conversion the session made was reused
