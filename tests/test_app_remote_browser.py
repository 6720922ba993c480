"""The chat app in a real browser with remote models only: two `backend: openai` entries on a stand-in
OpenAI server. Covers what a remote model must do in the chat (answer, switch), that nothing on the
page fetches another origin (an image in an answer or in a message reaches no server; the page
carries a Content-Security-Policy), and that a chat's URL opened in a fresh browser shows that chat
(local-user mode).

One server for the module. Chromium missing: skipped with the install command, or a failure when
BABL_CI_STRICT=1.
"""

from __future__ import annotations

import pytest
import yaml

from tests.chat_page import ANSWERS
from tests.openai_stand_in import LeakStub, OpenAIStandIn
from tests.servers import assert_no_traceback, chainlit_server, chromium, require_playwright, server_env

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

LABELS = {"remote-a": "Remote A (chat, remote)", "remote-b": "Remote B (chat, remote)"}

# Reports every CSP violation of the page into window.__bablBlocked (installed before any script).
WATCH_VIOLATIONS = """
window.__bablBlocked = [];
document.addEventListener('securitypolicyviolation', (e) => window.__bablBlocked.push(e.blockedURI));
"""


@pytest.fixture(scope="module")
def stubs():
    with LeakStub() as leak:
        answer = f"Hello from {{model}}. Here is a chart: ![the chart]({leak.url}answer-image?q=secret) done."
        with OpenAIStandIn(answer) as openai:
            yield openai, leak


def remote_app(stubs, tmp_path_factory, **extra_env):
    """`chainlit run app.py` on a catalog of two remote entries (a context manager yielding the URL)."""
    require_playwright()
    openai, _ = stubs
    root = tmp_path_factory.mktemp("remote-app")
    catalog = root / "models.yaml"
    entries = [
        {"id": f"remote-{x}", "label": f"Remote {x.upper()}", "task": "chat", "backend": "openai",
         "base_url": openai.base_url, "remote_model": f"model-{x}"}
        for x in ("a", "b")
    ]  # fmt: skip
    catalog.write_text(yaml.safe_dump({"models": entries}))
    (root / "models").mkdir()
    env = server_env(root / "models", root / "data", BABL_MODELS=str(catalog), **extra_env)
    return chainlit_server(env=env, log_path=root / "chainlit.log"), root / "chainlit.log"


@pytest.fixture(scope="module")
def app_url(stubs, tmp_path_factory):
    server, log_path = remote_app(stubs, tmp_path_factory)
    with server as url:
        yield url
    assert_no_traceback(log_path)


@pytest.fixture(scope="module")
def browser(app_url):
    with chromium() as browser:
        yield browser


def fresh_page(browser):
    context = browser.new_context(viewport={"width": 1280, "height": 900})
    context.add_init_script(WATCH_VIOLATIONS)
    return context, context.new_page()


def ask_and_wait(page, text: str, expected: str) -> str:
    from playwright.sync_api import expect

    # Complete answers holding `expected` (the footer's "tokens/s" marks an answer as complete).
    done = page.locator(ANSWERS).filter(has_text=expected).filter(has_text="tokens/s")
    before = done.count()
    page.locator("#chat-input").fill(text)
    page.locator("#chat-input").press("Enter")
    expect(done).to_have_count(before + 1, timeout=60000)
    return done.last.inner_text()


def wait_until_stored(page, chat_url: str, text: str) -> None:
    """Waits until the chat's stored steps hold an answer with `text` (the answer is written to the
    history just after it is shown; a tab closed at once could otherwise race that write)."""
    base, thread_id = chat_url.split("/thread/")
    for _ in range(60):
        response = page.request.get(f"{base}/project/thread/{thread_id}")
        if response.ok and any(
            step.get("type") == "assistant_message" and text in (step.get("output") or "")
            for step in response.json().get("steps", [])
        ):
            return
        page.wait_for_timeout(500)
    raise AssertionError(f"the answer holding {text!r} was not stored in {chat_url}")


def test_remote_models_answer_and_switch_and_nothing_leaves_the_origin(browser, app_url, stubs):
    from playwright.sync_api import expect

    openai, leak = stubs
    context, page = fresh_page(browser)
    try:
        response = page.goto(app_url)
        policy = response.headers.get("content-security-policy", "")
        assert "img-src 'self' data: blob:" in policy and "default-src 'self'" in policy
        welcome = page.locator(ANSWERS).first
        expect(welcome).to_contain_text("Answering with Remote A", timeout=30000)

        text = ask_and_wait(page, "hello", "Hello from model-a")
        assert "the chart" in text
        answer = page.locator(ANSWERS).last
        assert answer.locator("img").count() == 0  # the image became a link
        assert answer.locator("a", has_text="the chart").get_attribute("href").startswith(leak.url)

        # A message of the user's own with an image: rendered on the page, blocked by the policy.
        ask_and_wait(page, f"look ![mine]({leak.url}user-image?q=secret)", "Hello from model-a")
        page.wait_for_timeout(1000)
        blocked = page.evaluate("window.__bablBlocked")
        assert any(uri.startswith(leak.url) for uri in blocked), blocked

        # Switching to the other remote entry in the settings: the next answer is its.
        page.locator("#chat-settings-open-modal").click()
        page.locator("#chat-settings #model").click()
        page.get_by_role("option", name=LABELS["remote-b"], exact=True).click()
        page.get_by_role("button", name="Confirm").click()
        expect(page.locator(ANSWERS).filter(has_text="Now answering with Remote B")).to_have_count(
            1, timeout=30000
        )
        ask_and_wait(page, "and you?", "Hello from model-b")
        assert [r["model"] for r in openai.requests][-1] == "model-b"

        page.wait_for_timeout(1000)
        assert leak.requests == [], f"the page reached another origin: {leak.requests}"
    finally:
        context.close()


def test_a_chats_url_opened_in_a_fresh_browser_shows_that_chat(browser, app_url):
    from playwright.sync_api import expect

    context, page = fresh_page(browser)
    try:
        page.goto(app_url)
        expect(page.locator(ANSWERS).first).to_contain_text("Answering with", timeout=30000)
        ask_and_wait(page, "remember the word pelican", "Hello from model-")
        page.wait_for_url("**/thread/**", timeout=30000)
        chat_url = page.url
        wait_until_stored(page, chat_url, "Hello from model-")
    finally:
        context.close()

    context, page = fresh_page(browser)  # no cookie: what a bookmark or a shared link opens in
    try:
        page.goto(chat_url)
        expect(page.locator('[data-step-type="user_message"]')).to_contain_text(
            "remember the word pelican", timeout=30000
        )
        expect(page.locator(ANSWERS).filter(has_text="Hello from model-")).to_have_count(1, timeout=30000)
        assert page.url == chat_url
        # It is the chat itself, resumed: the next answer continues it.
        ask_and_wait(page, "which word?", "Hello from model-")
        expect(page.locator('[data-step-type="user_message"]')).to_have_count(2)
    finally:
        context.close()


def test_with_passwords_a_chats_url_asks_for_the_login_then_shows_that_chat(browser, stubs, tmp_path_factory):
    from playwright.sync_api import expect

    def log_in(page) -> None:
        page.locator("#email").fill("alice")
        page.locator("#password").fill("s3cret-pw")
        page.get_by_role("button", name="Sign In").click()

    server, _ = remote_app(stubs, tmp_path_factory, BABL_AUTH="alice:s3cret-pw")
    with server as url:
        context, page = fresh_page(browser)
        try:
            page.goto(url)
            log_in(page)
            expect(page.locator(ANSWERS).first).to_contain_text("Answering with", timeout=30000)
            ask_and_wait(page, "remember the word heron", "Hello from model-")
            page.wait_for_url("**/thread/**", timeout=30000)
            chat_url = page.url
            wait_until_stored(page, chat_url, "Hello from model-")
        finally:
            context.close()

        context, page = fresh_page(browser)
        try:
            page.goto(chat_url)
            page.wait_for_url("**/login", timeout=30000)  # the login first, not an empty chat
            log_in(page)
            page.wait_for_url(chat_url, timeout=30000)
            expect(page.locator('[data-step-type="user_message"]')).to_contain_text(
                "remember the word heron", timeout=30000
            )
        finally:
            context.close()
