"""The chat app in a real browser: `chainlit run app.py --headless` on the demo models, driven by
headless Chromium (Debian's package) through Playwright.

One server for the module (starting Chainlit costs seconds). Screenshots go to test-output/.
Chromium missing: skipped with the install command, or a failure when BABL_CI_STRICT=1; never
`playwright install` (it downloads a browser and fails offline).
"""

from __future__ import annotations

import urllib.request

import pytest

from tests.chat_page import ANSWERS, FOOTER
from tests.conftest import REPO_ROOT, install_adapter
from tests.servers import assert_no_traceback, chainlit_server, chromium, require_playwright, server_env

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

OUTPUT_DIR = REPO_ROOT / "test-output"
LABELS = {
    "demo-python": "Python — demo CodeGen (python, demo — random weights)",
    "demo-html": "HTML — demo Llama (html, demo — random weights)",
    "demo-qa": "Q&A — demo T5 (qa, demo — random weights)",
    "ad-a": "test adapter ad-a (html, demo — random weights)",
}
# The small label under each answer: "`model` · N tokens · R tokens/s[ · how it ended]".


@pytest.fixture(scope="module")
def app_url(session_models_dir, html_adapters, tmp_path_factory):
    """The app on the demo models plus one LoRA adapter on demo-html (`ad-a`, discovered)."""
    require_playwright()
    root = tmp_path_factory.mktemp("app-server")
    models = root / "models"
    models.mkdir()
    (models / "demo").symlink_to(session_models_dir / "demo", target_is_directory=True)
    (models / "adapters").mkdir()
    install_adapter(html_adapters["ad-a"], models)
    log_path = root / "chainlit.log"
    with chainlit_server(env=server_env(models, root / "data"), log_path=log_path) as url:
        yield url
    assert_no_traceback(log_path)


@pytest.fixture(scope="module")
def browser(app_url):
    with chromium() as browser:
        yield browser


def open_chat(browser, url):
    context = browser.new_context(viewport={"width": 1280, "height": 900})
    page = context.new_page()
    page.goto(url)
    # Local-user mode: no login page, the welcome message comes at once.
    page.locator(ANSWERS).first.wait_for(timeout=30000)
    assert "Answering with" in page.locator(ANSWERS).first.inner_text()
    return context, page


def choose(page, model_id: str, *, max_new_tokens: int | None = None) -> None:
    """Pick a model (and optionally max new tokens) in the settings dialog and wait for the switch."""
    from playwright.sync_api import expect

    switched = page.locator(ANSWERS).filter(has_text=f"Now answering with {LABELS[model_id]}")
    before = switched.count()
    page.locator("#chat-settings-open-modal").click()
    dialog = page.locator("#chat-settings")
    dialog.locator("#model").click()
    page.get_by_role("option", name=LABELS[model_id], exact=True).click()
    if max_new_tokens is not None:
        dialog.locator("#max_new_tokens").fill(str(max_new_tokens))
    page.get_by_role("button", name="Confirm").click()
    expect(switched).to_have_count(before + 1, timeout=30000)


def ask(page, text: str) -> None:
    page.locator("#chat-input").fill(text)
    page.locator("#chat-input").press("Enter")


def wait_for_answer(page, count: int, timeout_ms: int = 60000) -> dict:
    """Waits until answer number `count` (welcome included) carries its footer; returns the footer."""
    answer = page.locator(ANSWERS).nth(count - 1)
    answer.filter(has_text=FOOTER).wait_for(timeout=timeout_ms)
    match = FOOTER.search(answer.inner_text())
    return {"model": match[1], "tokens": int(match[2]), "text": answer.inner_text()}


WATCH_LAST_ANSWER = """() => {
  window.__bablLengths = [];
  const observer = new MutationObserver(() => {
    const answers = document.querySelectorAll('[data-step-type="assistant_message"] .message-content');
    const last = answers[answers.length - 1];
    if (last) window.__bablLengths.push(last.textContent.length);
  });
  observer.observe(document.body, {subtree: true, childList: true, characterData: true});
}"""


def screenshot(page, name: str) -> None:
    OUTPUT_DIR.mkdir(exist_ok=True)
    page.screenshot(path=str(OUTPUT_DIR / name))


def test_pick_switch_stream_preview_and_stop(browser, app_url):
    from playwright.sync_api import expect

    context, page = open_chat(browser, app_url)
    try:
        # demo-python, picked in the settings dialog: the answer streams and is labelled.
        choose(page, "demo-python")
        answers = page.locator(ANSWERS).count()
        page.evaluate(WATCH_LAST_ANSWER)
        ask(page, "def add(a, b):")
        first = wait_for_answer(page, answers + 1)
        assert first["model"] == "demo-python"
        assert first["text"].startswith("python")  # the code block's language bar
        lengths = page.evaluate("window.__bablLengths")
        assert len(set(lengths)) >= 3, f"the answer did not stream: {lengths}"
        screenshot(page, "app-python.png")

        # Switch to demo-html mid-session: the next answer is demo-html's, with a sandboxed preview.
        choose(page, "demo-html")
        answers = page.locator(ANSWERS).count()
        ask(page, "A landing page for a bakery")
        second = wait_for_answer(page, answers + 1)
        assert second["model"] == "demo-html"
        preview = page.get_by_test_id("html-preview").last
        expect(preview).to_be_visible(timeout=15000)
        frame = preview.locator("iframe")
        sandbox = frame.get_attribute("sandbox")
        assert sandbox is not None and "allow-same-origin" not in sandbox
        expect(preview.get_by_role("button", name="Download .html")).to_be_enabled()
        preview.scroll_into_view_if_needed()
        screenshot(page, "app-html-preview.png")

        # A long answer, stopped: it ends early with the text so far and says so.
        choose(page, "demo-python", max_new_tokens=1900)
        answers = page.locator(ANSWERS).count()
        ask(page, "class Widget:")
        stop = page.locator("#stop-button")
        stop.wait_for(timeout=30000)
        page.locator(ANSWERS).nth(answers).wait_for(timeout=30000)  # text is streaming
        stop.click()
        stopped = wait_for_answer(page, answers + 1)
        assert stopped["model"] == "demo-python" and stopped["tokens"] < 1900
        assert "· stopped" in stopped["text"]
        expect(page.locator("#chat-input")).to_be_enabled()
        screenshot(page, "app-stopped.png")
    finally:
        context.close()


def test_two_browsers_with_two_models_at_once(browser, app_url):
    first_context, first = open_chat(browser, app_url)
    second_context, second = open_chat(browser, app_url)
    try:
        choose(first, "demo-qa")  # the second keeps the default, demo-html
        counts = [page.locator(ANSWERS).count() for page in (first, second)]
        ask(first, "Question: Who baked the bread?\nContext: Ana baked the bread at dawn.")
        ask(second, "A page with a contact form")
        qa = wait_for_answer(first, counts[0] + 1)
        html = wait_for_answer(second, counts[1] + 1)
        assert qa["model"] == "demo-qa" and html["model"] == "demo-html"
        screenshot(first, "app-two-sessions-qa.png")
        screenshot(second, "app-two-sessions-html.png")
    finally:
        first_context.close()
        second_context.close()


def test_compare_with_base_button(browser, app_url):
    from playwright.sync_api import expect

    context, page = open_chat(browser, app_url)
    try:
        choose(page, "ad-a")
        answers = page.locator(ANSWERS).count()
        ask(page, "A page with a price list")
        assert wait_for_answer(page, answers + 1)["model"] == "ad-a"
        button = page.get_by_role("button", name="Compare with base")
        expect(button).to_have_count(1)
        button.scroll_into_view_if_needed()
        screenshot(page, "app-compare-button.png")
        button.click()
        base = wait_for_answer(page, answers + 2)
        assert base["model"] == "demo-html"  # the base, by its model name
        assert base["text"].startswith("The same prompt on the base model, demo-html, without the adapter:")
        expect(button).to_have_count(0)  # used: the comparison is shown
        screenshot(page, "app-compare.png")
    finally:
        context.close()


def test_other_origins_cannot_call_the_app_with_the_users_cookie(app_url):
    request = urllib.request.Request(
        f"{app_url}/auth/config", headers={"Origin": "http://evil.example", "Cookie": "access_token=x"}
    )
    with urllib.request.urlopen(request, timeout=5) as response:
        assert response.headers.get("access-control-allow-origin") is None
