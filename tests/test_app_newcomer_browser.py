"""A new user's first hour in the chat, in a real browser (issue 18, items 1-8): the model dropdown,
switching, answers that are only Markdown syntax, HTML downloads, /status, commands in the sidebar
and in resumed chats, Babl's branding, and Compare with base.

One server for the module: `tests/assets/scripted_app.py` (the real app.py with scripted answers for
messages holding a key of its SCRIPTED) on the demo models, one LoRA adapter on demo-html (`ad-a`)
and two runs of one Q&A recipe that share a label. Driven by Debian's headless Chromium through
Playwright; each test saves a screenshot under its tmp dir when it fails.
"""

from __future__ import annotations

import re
import urllib.request
from contextlib import contextmanager

import pytest

from tests.chat_page import ANSWERS, FOOTER
from tests.conftest import install_adapter, make_lora_adapter
from tests.servers import assert_no_traceback, chainlit_server, chromium, require_playwright, server_env

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

USER_MESSAGES = '[data-step-type="user_message"]'
QA_LABEL = "Q&A — demo T5 + SQuAD LoRA"
DEMO_HTML = "HTML — demo Llama (html, demo — random weights)"
DEMO_QA = "Q&A — demo T5 (qa, demo — random weights)"
AD_A = "test adapter ad-a (html, demo — random weights)"


@pytest.fixture(scope="module")
def models(session_models_dir, html_adapters, tmp_path_factory):
    """The demo models, `ad-a` on demo-html, and two Q&A runs with one label (`squad-r4`, `squad-r8`)."""
    root = tmp_path_factory.mktemp("newcomer-models")
    (root / "demo").symlink_to(session_models_dir / "demo", target_is_directory=True)
    (root / "adapters").mkdir()
    install_adapter(html_adapters["ad-a"], root)
    t5 = session_models_dir / "demo" / "demo-t5"
    for seed, run in enumerate(("squad-r4", "squad-r8"), start=1):
        make_lora_adapter(t5, root / "adapters" / run, seed=seed, task="qa", prompt_style="t5-qa",
                          kind="seq2seq", label=QA_LABEL)  # fmt: skip
    return root


@pytest.fixture(scope="module")
def server(models, tmp_path_factory):
    """(base URL, path of the server's log)."""
    require_playwright()
    root = tmp_path_factory.mktemp("newcomer-server")
    log_path = root / "chainlit.log"
    env = server_env(models, root / "data")
    with chainlit_server("tests/assets/scripted_app.py", env=env, log_path=log_path) as url:
        yield url, log_path
    assert_no_traceback(log_path)


@pytest.fixture(scope="module")
def browser(server):
    with chromium() as browser:
        yield browser


@pytest.fixture
def tab(browser, server, tmp_path, request):
    """A new browser context on the chat, its welcome shown; records every HTTP error it sees. A
    screenshot `failure.png` is saved in the test's tmp dir when the test fails."""
    context = browser.new_context(viewport={"width": 1280, "height": 900})
    page = context.new_page()
    page.http_errors = []
    page.on("response", lambda r: page.http_errors.append(f"{r.status} {r.url}") if r.status >= 400 else None)
    with screenshot_on_failure(page, tmp_path / "failure.png", request):
        page.goto(server[0])
        page.locator(ANSWERS).filter(has_text="Answering with").first.wait_for(timeout=30000)
        yield page
    context.close()


@contextmanager
def screenshot_on_failure(page, path, request):
    """Save a screenshot at `path` when the code inside, or the test (`request`'s), fails: pytest
    reports a test's failure before its fixtures are torn down, so the session's count has grown."""
    failed_before = request.session.testsfailed
    try:
        yield
    except BaseException:
        page.screenshot(path=str(path), full_page=True)
        raise
    if request.session.testsfailed > failed_before:
        page.screenshot(path=str(path), full_page=True)


def open_dropdown(page):
    page.locator("#chat-settings-open-modal").click()
    page.locator("#chat-settings #model").click()
    return page.locator("#chat-settings"), page.get_by_role("listbox")


def confirm(page) -> None:
    page.get_by_role("button", name="Confirm").click()


def choose(page, label: str, *, max_new_tokens: int | None = None) -> str:
    """Pick a model (and optionally max new tokens); returns the text of the switch message."""
    switched = page.locator(ANSWERS).filter(has_text="Now answering with")
    before = switched.count()
    open_dropdown(page)
    page.get_by_role("option", name=label, exact=True).click()
    if max_new_tokens is not None:
        page.locator("#chat-settings #max_new_tokens").fill(str(max_new_tokens))
    confirm(page)
    switched.nth(before).wait_for(timeout=30000)
    return switched.nth(before).inner_text()


def ask(page, text: str):
    """Send `text`; returns the locator of its answer once the answer carries its footer."""
    answers = page.locator(ANSWERS)
    before = answers.filter(has_text=FOOTER).count()
    page.locator("#chat-input").fill(text)
    page.locator("#chat-input").press("Enter")
    answers.filter(has_text=FOOTER).nth(before).wait_for(timeout=60000)
    return answers.filter(has_text=FOOTER).nth(before)


def new_chat(page, url: str) -> None:
    page.goto(url)
    page.locator(ANSWERS).filter(has_text="Answering with").first.wait_for(timeout=30000)


def run_status(page) -> None:
    from playwright.sync_api import expect

    expect(page.locator("#stop-button")).to_have_count(0, timeout=30000)  # the last answer has ended
    before = page.locator(ANSWERS).filter(has_text="Answers running").count()
    page.locator("#chat-input").fill("/status")
    page.locator("#chat-input").press("Enter")
    page.locator(ANSWERS).filter(has_text="Answers running").nth(before).wait_for(timeout=15000)


def inside(inner: dict, outer: dict, slack: float = 1.0) -> bool:
    return (
        inner["x"] >= outer["x"] - slack
        and inner["y"] >= outer["y"] - slack
        and inner["x"] + inner["width"] <= outer["x"] + outer["width"] + slack
        and inner["y"] + inner["height"] <= outer["y"] + outer["height"] + slack
    )


# --- 1. the dropdown ------------------------------------------------------------------------------


def test_entries_that_cannot_be_used_are_disabled_with_the_reason_readable_inside_the_dialog(tab, tmp_path):
    dialog, listbox = open_dropdown(tab)
    email = tab.get_by_role("option", name=re.compile(r"^Email — T5-base \+ email LoRA"))
    email.scroll_into_view_if_needed()
    tab.screenshot(path=str(tmp_path / "dropdown.png"))
    assert email.get_attribute("aria-disabled") == "true"
    assert float(email.evaluate("el => getComputedStyle(el).opacity")) < 0.8  # greyed out
    text = email.inner_text()
    assert "needs-training: no adapter at" in text and "python -m finetune train --config" in text
    assert text.rstrip().endswith("email-t5.yaml")  # the whole reason, not cut with "…"
    # Seen, not only in the page: inside the dialog's width, in the viewport, and not clipped.
    dialog_box, list_box, option_box = dialog.bounding_box(), listbox.bounding_box(), email.bounding_box()
    assert inside(list_box, {**dialog_box, "y": 0, "height": 10_000}), (list_box, dialog_box)
    assert inside(option_box, list_box), (option_box, list_box)
    assert email.evaluate("el => el.scrollWidth <= el.clientWidth + 1")
    # Clicking it selects nothing: the dropdown keeps the model in use.
    email.click(force=True)
    tab.keyboard.press("Escape")
    assert dialog.locator("#model").inner_text().strip() == DEMO_HTML

    # Adapter runs that share a label each name their run; every label is unique.
    tab.locator("#chat-settings #model").click()
    labels = [name.split("\n")[0] for name in tab.get_by_role("option").all_inner_texts()]
    assert f"{QA_LABEL} (qa, demo — random weights) · squad-r4" in labels
    assert f"{QA_LABEL} (qa, demo — random weights) · squad-r8" in labels
    assert len(labels) == len(set(labels)), labels


# --- 2. switching -----------------------------------------------------------------------------------


def test_switching_keeps_what_the_user_changed_and_says_what_changed(tab):
    # demo-html's defaults: temperature 0, max new tokens 200. The user sets max new tokens only.
    tab.locator("#chat-settings-open-modal").click()
    tab.locator("#chat-settings #max_new_tokens").fill("77")
    confirm(tab)
    # Switch to demo-qa (defaults: temperature 0.9, max new tokens 60).
    text = choose(tab, DEMO_QA)
    assert "temperature 0 → 0.9, the new model's default" in text
    assert "max new tokens stays 77, your setting (the new model's default is 60)" in text
    tab.locator("#chat-settings-open-modal").click()
    assert tab.locator("#chat-settings #max_new_tokens").input_value() == "77"


# --- 3. an answer made only of Markdown syntax ----------------------------------------------------------


def test_an_answer_made_only_of_markdown_syntax_is_shown(tab):
    choose(tab, DEMO_QA)
    answer = ask(tab, "Question: [markdown only]")
    from playwright.sync_api import expect

    block = answer.locator("pre:visible")
    expect(block).to_have_count(1)
    # Measured in one call: the message is re-rendered once more after its footer arrives, and a
    # count() followed by bounding_box() could see the old node, then none (seen on a loaded machine).
    assert block.evaluate("e => e.getBoundingClientRect().height") > 20
    shown = block.inner_text()
    assert shown.count(">") == 4, shown  # "> \n>\n> >": what the model wrote, not an empty quote


# --- 4. one download control for an HTML answer ------------------------------------------------------


def test_an_html_answer_has_one_download_control(tab):
    from playwright.sync_api import expect

    ask(tab, "[bakery page]")  # a new chat: this is its only answer
    preview = tab.get_by_test_id("html-preview")
    expect(preview).to_have_count(1, timeout=15000)
    expect(preview).to_be_visible()
    download = preview.get_by_role("button", name="Download .html")
    expect(download).to_be_enabled()
    # No separate file chip for the same page: the preview's button is the only download.
    assert tab.get_by_text("bakery.html").count() == 0
    assert tab.get_by_role("link", name=re.compile(r"\.html")).count() == 0
    assert tab.get_by_role("button", name=re.compile("download", re.IGNORECASE)).count() == 1
    with tab.expect_download() as saved:
        download.click()
    assert saved.value.suggested_filename == "bakery.html"


# --- 5. /status ----------------------------------------------------------------------------------------


def test_status_runs_on_enter_and_shows_every_column_with_model_ids(tab, models):
    ask(tab, "A page for a bakery")  # loads demo-html
    run_status(tab)  # one Enter: the command runs (Chainlit's own first Enter only picks it)
    status = tab.locator(ANSWERS).filter(has_text="Answers running").last
    text = status.inner_text()
    assert "waiting:" in text and "demo-html" in text
    assert str(models) not in text and "/demo/" not in text  # ids, not folders
    headers = status.locator("th").all_inner_texts()
    assert [h.strip() for h in headers] == ["model", "adapters", "running", "waiting", "memory"]
    bubble = status.bounding_box()
    for cell in status.locator("th, td").all():
        box = cell.bounding_box()
        assert box and inside(box, bubble), (cell.inner_text(), box, bubble)
    assert tab.locator("#chat-input").input_value() == ""


# --- 6. command-only chats, and commands in resumed chats -------------------------------------------------


def test_command_only_chats_stay_out_of_the_sidebar_and_resumed_chats_show_the_command(tab, server):
    from playwright.sync_api import expect

    url = server[0]
    run_status(tab)  # a chat that only ran /status: not a chat to come back to
    new_chat(tab, url)
    run_status(tab)  # /status first, then a question: the chat is named after the question
    ask(tab, "A page about rye")
    new_chat(tab, url)  # a question, then /export picked from the command menu (an empty message)
    ask(tab, "A page about bread")
    tab.locator("#chat-input").fill("/exp")
    tab.get_by_text("Download this conversation as Markdown and JSON").click()
    tab.locator("#chat-input").press("Enter")
    tab.locator(ANSWERS).filter(has_text="as Markdown and as JSON").first.wait_for(timeout=15000)
    thread_url = tab.url
    assert "/thread/" in thread_url

    new_chat(tab, url)
    sidebar = tab.locator("#thread-history")
    expect(sidebar.get_by_text("A page about bread")).to_have_count(1, timeout=15000)
    expect(sidebar.get_by_text("A page about rye")).to_have_count(1)
    assert sidebar.get_by_text("Untitled Conversation").count() == 0
    assert sidebar.get_by_text("/status").count() == 0

    tab.goto(thread_url)  # the chat resumed: the /export turn says what it was
    expect(tab.locator(USER_MESSAGES).filter(has_text="/export")).to_have_count(1, timeout=30000)
    assert all(text.strip() for text in tab.locator(USER_MESSAGES).all_inner_texts())


# --- 7. Babl's branding --------------------------------------------------------------------------------------


def fetch(url: str) -> str:
    with urllib.request.urlopen(url, timeout=10) as response:
        return response.read().decode("utf-8", "replace")


def test_title_icon_and_logo_are_babl_and_page_loads_log_no_warnings(tab, server):
    url, log_path = server
    assert tab.title() == "Babl"
    for path in ("/favicon", "/logo?theme=light", "/logo?theme=dark", "/avatars/demo-html"):
        assert 'aria-label="Babl"' in fetch(url + path), path
    page = fetch(url + "/")
    assert "chainlit_banner" not in page and "github.com/Chainlit" not in page
    tab.reload()
    tab.locator(ANSWERS).filter(has_text="Answering with").first.wait_for(timeout=30000)
    log = log_path.read_text()
    assert "Missing custom logo" not in log and "Translated markdown file" not in log


def test_the_login_page_says_babl(browser, models, tmp_path, request):
    env = server_env(models, tmp_path / "data", BABL_AUTH="alice:wonderland")
    log_path = tmp_path / "login.log"
    with chainlit_server("app.py", env=env, log_path=log_path) as url:
        page = browser.new_page(viewport={"width": 1280, "height": 800})
        with screenshot_on_failure(page, tmp_path / "failure.png", request):
            page.goto(url + "/login")
            page.get_by_role("button", name="Sign In").wait_for(timeout=30000)
            page.screenshot(path=str(tmp_path / "login.png"))
            assert page.title() == "Babl"
            images = page.locator("img").evaluate_all("imgs => imgs.map(i => [i.src, i.naturalWidth])")
            assert images and all(width > 0 for _, width in images), images  # every image loaded
            for src, _ in images:
                assert "Babl" in fetch(src), src  # the logo and the side image are Babl's
        page.close()
    log = log_path.read_text()
    assert "Missing custom logo" not in log and "Translated markdown file" not in log


# --- 8. Compare with base -----------------------------------------------------------------------------


def test_compare_with_base_names_the_base_model_and_no_request_fails(tab):
    choose(tab, AD_A)
    ask(tab, "A page with a price list")
    tab.get_by_role("button", name="Compare with base").click()
    base = tab.locator(ANSWERS).filter(has_text="The same prompt on the base model, demo-html")
    base.filter(has_text=FOOTER).wait_for(timeout=60000)
    assert "`demo-html`" in base.inner_text() or "demo-html ·" in base.inner_text()
    assert [e for e in tab.http_errors if "/avatars/" in e] == []
    assert [e for e in tab.http_errors if " 400 " in f" {e} " or e.startswith("400")] == []
