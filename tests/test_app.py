"""app.py's Chainlit hooks, called in-process with a fake browser session (no server, no browser).

Each `FakeBrowser` is a real Chainlit `WebsocketSession` whose socket emits are recorded, so the
hooks run through Chainlit's own Message/Step/Element/ChatSettings code; `screen()` replays the
recorded events into the messages a browser would show. The models are the demo models, run for
real through the shared ChatService (replaced per test by one on a fresh cache).
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from pathlib import Path

import pytest

from babl_core.engine.batching import stream as real_stream
from babl_core.engine.cache import ModelCache
from babl_core.engine.catalog import Catalog
from babl_core.engine.loading import load_base
from babl_core.engine.service import ChatService
from babl_core.web import runtime, ui
from babl_core.web.render import DOWNLOAD_MIME, format_answer
from tests.chainlit_client import shown_steps
from tests.conftest import REPO_ROOT, install_adapter


@pytest.fixture(scope="module")
def app_module():
    """Imports app.py once (Chainlit's import costs seconds), with the env it changes restored."""
    with pytest.MonkeyPatch.context() as mp:
        for name in ("BABL_AUTH", "CHAINLIT_HOST", "CHAINLIT_PORT", "BABL_TUNNEL"):
            mp.delenv(name, raising=False)
        mp.delenv("CHAINLIT_AUTH_SECRET", raising=False)  # auth_secret() exports it; undone after
        import app

        yield app


class Recorder:
    """The prompts the service sent to the model (wraps the real streaming function)."""

    def __init__(self) -> None:
        self.prompts: list[str] = []

    def __call__(self, loaded, prompt, params, stop_event, **kwargs):
        self.prompts.append(prompt)
        return real_stream(loaded, prompt, params, stop_event, **kwargs)


@pytest.fixture
def recorder(models_dir):
    return Recorder()


@pytest.fixture
def svc(models_dir, recorder):
    """A fresh shared service on the per-test models dir (its own adapters/)."""

    def loader(spec, plan):
        if spec.id == "demo-email":
            raise OSError("the weights file is truncated (test)")
        return load_base(spec, plan)

    service = ChatService(
        Catalog.load(REPO_ROOT / "configs" / "models.yaml"),
        ModelCache(max_models=3, loader=loader),
        stream_fn=recorder,
    )
    runtime.reset_service(service)
    yield service
    runtime.reset_service(None)


OPEN_TABS: list[FakeBrowser] = []


@pytest.fixture(autouse=True)
def _close_tabs():
    """Delete each fake session after the test (Chainlit keeps its files under .files/<session>)."""
    yield
    from chainlit.user_session import user_sessions

    while OPEN_TABS:
        tab = OPEN_TABS.pop()
        asyncio.run(tab.session.delete())
        user_sessions.pop(tab.session.id, None)


class FakeBrowser:
    """One browser tab: a Chainlit WebsocketSession whose emits are recorded."""

    def __init__(self) -> None:
        OPEN_TABS.append(self)
        from chainlit.session import WebsocketSession
        from chainlit.user import User

        self.events: list[tuple[str, dict]] = []

        async def emit(event, data):
            self.events.append((event, data))

        async def emit_call(*args, **kwargs):
            return None

        self.session = WebsocketSession(
            id=uuid.uuid4().hex,
            socket_id=uuid.uuid4().hex,
            emit=emit,
            emit_call=emit_call,
            user_env={},
            client_type="webapp",
            user=User(identifier="local"),
        )

    def enter(self) -> None:
        """Make this tab Chainlit's current context (per asyncio task)."""
        from chainlit.context import ChainlitContext, context_var

        context_var.set(ChainlitContext(self.session))

    async def send(self, app, text: str, *, message_id: str | None = None, command: str | None = None):
        import chainlit as cl

        self.enter()
        message = cl.Message(content=text, type="user_message", id=message_id, command=command)
        await app.answer(message)
        return message

    async def settings(self, app, **changes):
        """Submit the settings dialog: the last widgets sent, with `changes` applied."""
        self.enter()
        values = {w["id"]: w["initial"] for w in self.widgets()}
        values.update(changes)
        await app.update_settings(values)

    def widgets(self) -> list[dict]:
        return [data for event, data in self.events if event == "chat_settings"][-1]

    def widget(self, widget_id: str) -> dict:
        return next(w for w in self.widgets() if w["id"] == widget_id)

    def screen(self) -> list[dict]:
        """The steps (messages, status steps) in the order shown, with their last content."""
        return list(shown_steps(self.events).values())

    def answers(self) -> list[dict]:
        return [s for s in self.screen() if s["type"] == "assistant_message"]

    def last_answer(self) -> dict:
        return self.answers()[-1]

    def errors(self) -> list[str]:
        return [s["output"] for s in self.screen() if s.get("isError")]

    def elements(self, for_id: str | None = None) -> list[dict]:
        found = [data for event, data in self.events if event == "element"]
        return [e for e in found if for_id is None or e["forId"] == for_id]

    def updates(self, step_id: str) -> int:
        return sum(
            1
            for event, data in self.events
            if event in ("stream_token", "update_message", "new_message", "stream_start")
            and data["id"] == step_id
        )


def run(coro):
    return asyncio.run(coro)


async def started(app) -> FakeBrowser:
    tab = FakeBrowser()
    tab.enter()
    await app.start_chat()
    return tab


def state_of(tab: FakeBrowser) -> ui.UiState:
    from chainlit.user_session import user_sessions

    return user_sessions[tab.session.id][app_state_key()]


def app_state_key() -> str:
    import app

    return app.STATE


# --------------------------------------------------------------------------------------------------


def test_login_is_the_local_user_on_loopback(app_module):
    from babl_core.web.auth import LOCAL_USER, AuthMode

    assert app_module.AUTH_MODE == AuthMode.LOCAL_USER
    user = run(app_module.local_user({}))
    assert user.identifier == LOCAL_USER
    assert not hasattr(app_module, "password_login")  # only one auth callback is registered


def test_chat_start_sends_settings_with_the_default_model_and_a_welcome(app_module, svc):
    tab = run(started(app_module))
    model = tab.widget(ui.MODEL)
    assert model["initial"] == "demo-html"  # first servable entry offline, without CUDA
    labels = {item["value"]: item["label"] for item in model["items"]}
    assert labels["demo-python"] == "Python — demo CodeGen (python, demo — random weights)"
    assert labels["email-t5"].startswith("Email — T5-base + email LoRA (email)\nneeds-training: ")
    assert tab.widget(ui.MAX_NEW_TOKENS)["initial"] == 200  # demo-html's default
    assert tab.widget(ui.TEMPERATURE)["initial"] == 0.0
    assert tab.widget(ui.HTML_PREVIEW)["initial"] is True
    welcome = tab.answers()[0]["output"]
    assert "`demo-html`" in welcome and "random weights" in welcome
    assert any(event == "set_commands" and data[0]["id"] == "status" for event, data in tab.events)


def test_answer_is_streamed_coalesced_and_labelled(app_module, svc):
    async def go():
        tab = await started(app_module)
        await tab.settings(app_module, model="demo-python", max_new_tokens=300)
        started_at = time.monotonic()
        await tab.send(app_module, "def add(a, b):")
        return tab, time.monotonic() - started_at

    tab, elapsed = run(go())
    answer = tab.last_answer()
    session = state_of(tab).chat
    text = session.messages[-1]["content"]
    assert answer["name"] == "demo-python"  # the author
    assert answer["output"].startswith(format_answer("python", text))
    assert answer["output"].startswith("```python")
    assert "*`demo-python` · " in answer["output"] and "tokens/s" in answer["output"]
    updates = tab.updates(answer["id"])
    assert 2 <= updates < 300  # coalesced: far fewer updates than tokens
    assert updates <= 30 * elapsed + 3


def test_switch_keeps_the_conversation_and_applies_the_new_entrys_defaults(app_module, svc, recorder):
    async def go():
        tab = await started(app_module)
        await tab.settings(app_module, model="demo-python", temperature=0.5)
        await tab.send(app_module, "first question about lists")
        await tab.settings(app_module, model="demo-html")
        await tab.send(app_module, "second question")
        return tab

    tab = run(go())
    session = state_of(tab).chat
    assert session.model_id == "demo-html"
    assert [m["role"] for m in session.messages] == ["user", "assistant", "user", "assistant"]
    assert session.messages[1]["model"] == "demo-python" and session.messages[3]["model"] == "demo-html"
    assert "first question about lists" in recorder.prompts[-1]  # history went to the new model
    steps = [s for s in tab.screen() if s["type"] == "tool"]
    assert steps[-1]["name"] == "loader for demo-html"
    assert steps[-1]["output"].startswith("float32 on cpu")
    assert any("Now answering with **HTML — demo Llama" in s["output"] for s in tab.answers())
    assert tab.widget(ui.MODEL)["initial"] == "demo-html"
    # The user set temperature 0.5 together with demo-python: switching on keeps it, and says so.
    assert session.settings["temperature"] == 0.5
    switched = next(
        s["output"] for s in tab.answers() if "Now answering with **HTML — demo Llama" in s["output"]
    )
    assert "- temperature stays 0.5, your setting (the new model's default is 0)" in switched
    assert tab.last_answer()["name"] == "demo-html"


def test_a_message_sent_during_a_switch_is_answered_by_the_model_switched_to(app_module, svc, monkeypatch):
    """Chainlit runs a settings change and a message concurrently: the message waits for the switch
    (here a load held open) and is answered by the new model, not the one in effect when it arrived."""
    import threading

    loading, release = threading.Event(), threading.Event()
    real_loader = svc.cache._loader

    def slow_loader(spec, plan):
        if spec.id == "demo-python":
            loading.set()
            assert release.wait(30)
        return real_loader(spec, plan)

    monkeypatch.setattr(svc.cache, "_loader", slow_loader)

    async def go():
        tab = await started(app_module)
        await tab.send(app_module, "a page about tea")  # demo-html, loaded
        switching = asyncio.ensure_future(tab.settings(app_module, model="demo-python"))
        assert await asyncio.to_thread(loading.wait, 30)
        sending = asyncio.ensure_future(tab.send(app_module, "def add(a, b):"))
        await asyncio.sleep(0.5)  # the message has arrived while demo-python is still loading
        assert not sending.done()
        release.set()
        await asyncio.gather(switching, sending)
        return tab

    tab = run(go())
    session = state_of(tab).chat
    assert [m.get("model") for m in session.messages[1::2]] == ["demo-html", "demo-python"]
    assert tab.last_answer()["name"] == "demo-python" and not tab.errors()


def test_a_chat_turn_reads_the_catalog_listing_once(app_module, svc, monkeypatch):
    """Each listing reads every adapter's babl.json: the message's listing also picks its model."""
    listings = []
    real = svc.catalog.list
    monkeypatch.setattr(svc.catalog, "list", lambda: listings.append(1) or real())

    async def go():
        tab = await started(app_module)
        await tab.send(app_module, "a page about tea")  # the first answer loads the model
        before = len(listings)
        await tab.send(app_module, "now in blue")
        return tab, len(listings) - before

    tab, reads = run(go())
    assert [m.get("model") for m in state_of(tab).chat.messages[1::2]] == ["demo-html", "demo-html"]
    assert reads == 1


def test_values_set_with_the_switch_are_kept(app_module, svc):
    async def go():
        tab = await started(app_module)
        await tab.settings(app_module, model="demo-python", temperature=0.7, max_new_tokens=64)
        return tab

    tab = run(go())
    assert state_of(tab).chat.settings == {"temperature": 0.7, "top_p": 0.95, "max_new_tokens": 64}
    assert tab.widget(ui.TEMPERATURE)["initial"] == 0.7


def test_a_model_that_cannot_be_served_is_refused_with_its_reason(app_module, svc):
    async def go():
        tab = await started(app_module)
        await tab.settings(app_module, model="email-t5")
        return tab

    tab = run(go())
    assert state_of(tab).chat.model_id == "demo-html"
    note = tab.answers()[-1]["output"]
    assert "needs-training" in note and "python -m finetune train" in note and "demo-html" in note
    assert tab.widget(ui.MODEL)["initial"] == "demo-html"  # the dropdown shows what is in effect
    assert svc.cache.loads == 0  # nothing was loaded for it


def test_a_failed_load_says_why_and_keeps_the_previous_model(app_module, svc):
    async def go():
        tab = await started(app_module)
        await tab.send(app_module, "hello")
        await tab.settings(app_module, model="demo-email")
        await tab.send(app_module, "still there?")
        return tab

    tab = run(go())
    session = state_of(tab).chat
    assert session.model_id == "demo-html"
    step = [s for s in tab.screen() if s["type"] == "tool"][-1]
    assert step["isError"] and "truncated" in step["output"]
    assert any(
        "Could not switch to `demo-email`" in s["output"] and "truncated" in s["output"]
        for s in tab.answers()
    )
    assert tab.widget(ui.MODEL)["initial"] == "demo-html"
    assert len(session.messages) == 4 and session.messages[-1]["model"] == "demo-html"


def test_invalid_setting_values_are_named_and_not_applied(app_module, svc):
    async def go():
        tab = await started(app_module)
        await tab.settings(app_module, max_new_tokens="lots", top_p=0)
        return tab

    tab = run(go())
    note = tab.answers()[-1]["output"]
    assert "Max new tokens 'lots' is not valid" in note and "Top p 0 is not valid" in note
    assert state_of(tab).chat.settings["max_new_tokens"] == 200
    assert tab.widget(ui.MAX_NEW_TOKENS)["initial"] == 200


def test_stop_keeps_the_partial_answer_and_stops_only_that_session(app_module, svc):
    async def go():
        a, b = await started(app_module), await started(app_module)
        for tab in (a, b):
            await tab.settings(app_module, model="demo-python", max_new_tokens=1500)

        async def ask(tab, text):
            await tab.send(app_module, text)

        task_a = asyncio.create_task(ask(a, "class Widget:"))
        task_b = asyncio.create_task(ask(b, "import os"))
        deadline = time.monotonic() + 30
        while not any(event == "stream_start" for event, _ in a.events):
            assert time.monotonic() < deadline, "session A never streamed"
            await asyncio.sleep(0.01)
        a.enter()
        # What Chainlit's stop button does: cancel the on_message task, then call on_stop.
        task_a.cancel()
        await app_module.stop_answer()
        with pytest.raises(asyncio.CancelledError):
            await task_a
        await task_b
        return a, b

    a, b = run(go())
    chat_a, chat_b = state_of(a).chat, state_of(b).chat
    assert chat_a.messages[-1]["stopped"] is True
    partial = chat_a.messages[-1]["content"]
    answer_a = a.last_answer()
    assert answer_a["output"].startswith(format_answer("python", partial))
    assert "· stopped*" in answer_a["output"]
    tokens = int(answer_a["output"].split("` · ")[1].split(" tokens")[0])
    assert tokens < 1500
    assert chat_b.messages[-1]["stopped"] is False
    assert "reached max new tokens (1500)" in b.last_answer()["output"]
    assert svc.active_generations == 0


def test_editing_a_message_regenerates_from_there(app_module, svc, recorder):
    async def go():
        tab = await started(app_module)
        first = await tab.send(app_module, "first question")
        await tab.send(app_module, "second question")
        await tab.send(app_module, "first question, edited", message_id=first.id)
        return tab

    tab = run(go())
    session = state_of(tab).chat
    assert [m["content"] for m in session.messages if m["role"] == "user"] == ["first question, edited"]
    assert len(session.messages) == 2
    assert "second question" not in recorder.prompts[-1] and "first question, edited" in recorder.prompts[-1]


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("   ", "The message is empty"),
        ("x" * 1_000_000, "the limit is 100,000"),
        (" ".join(f"word{i}" for i in range(6000)), "The prompt is too long"),
        ("a lone surrogate \ud800 here", "The message contains an invalid character"),
    ],
    ids=["empty", "1MB", "longer-than-the-context", "lone-surrogate"],
)
def test_bad_input_gets_a_clear_message_and_the_session_stays_usable(app_module, svc, text, expected):
    async def go():
        tab = await started(app_module)
        await tab.send(app_module, text)
        await tab.send(app_module, "a short question")
        return tab

    tab = run(go())
    assert len(tab.errors()) == 1 and expected in tab.errors()[0]
    session = state_of(tab).chat
    assert [m["content"] for m in session.messages if m["role"] == "user"] == ["a short question"]
    assert tab.last_answer()["name"] == "demo-html"


def test_a_busy_server_shows_the_place_in_line_then_answers(app_module, svc):
    from babl_core.engine.admission import Admission, Limits

    svc.admission = Admission(Limits(max_running=1, max_queued=1))

    async def go():
        blocker = svc.admission.admit("user:someone-else", 1)[0]
        await blocker.wait()  # the only running slot is taken
        tab = await started(app_module)
        sending = asyncio.create_task(tab.send(app_module, "a short question"))
        for _ in range(1200):  # the first message loads the model first: seconds on a busy machine
            await asyncio.sleep(0.05)
            if any("Busy" in (s.get("output") or "") for s in tab.screen()):
                break
        waiting = [s["output"] for s in tab.screen() if "Busy" in (s.get("output") or "")]
        assert waiting == ["*Busy: you are next…*"] and not sending.done()
        other = await started(app_module)  # another tab while the one place in line is taken: told so
        await other.send(app_module, "me too")
        blocker.release()
        await asyncio.wait_for(sending, 60)
        return tab, other

    tab, other = run(go())
    assert tab.last_answer()["output"] and not tab.errors()
    assert len(other.errors()) == 1 and other.errors()[0].startswith("The server is busy")


def test_html_answer_has_a_sandboxed_preview_that_is_its_one_download(app_module, svc):
    async def go():
        tab = await started(app_module)
        await tab.send(app_module, "a landing page for a bakery")
        return tab

    tab = run(go())
    answer = tab.last_answer()
    text = state_of(tab).chat.messages[-1]["content"]
    assert answer["output"].startswith(format_answer("html", text))
    previews = [e for e in tab.elements(answer["id"]) if e["type"] == "custom"]
    assert previews and all(e["name"] == "HtmlPreview" for e in previews)
    final = previews[-1]["props"]
    assert final["final"] is True and final["html"] == text.strip()
    assert "allow-same-origin" not in final["sandbox"]
    assert "default-src 'none'" in final["srcdoc"]
    assert len({e["id"] for e in previews}) == 1  # one element, updated in place
    stored = Path(tab.session.files[previews[-1]["chainlitKey"]]["path"]).read_text()
    assert json.loads(stored) == final  # the element's content (what is stored) follows its props
    # One download control: the preview's button carries the page; no file chip beside it.
    assert final["filename"].endswith(".html")
    assert [e for e in tab.elements(answer["id"]) if e["type"] == "file"] == []


def test_preview_switch_off_offers_the_page_as_a_file(app_module, svc):
    async def go():
        tab = await started(app_module)
        await tab.settings(app_module, html_preview=False)
        await tab.send(app_module, "a landing page")
        return tab

    tab = run(go())
    files = tab.elements(tab.last_answer()["id"])
    assert [e["type"] for e in files] == ["file"]
    assert files[0]["mime"] == DOWNLOAD_MIME and files[0]["name"].endswith(".html")


def test_qa_question_with_context(app_module, svc, recorder):
    async def go():
        tab = await started(app_module)
        await tab.settings(app_module, model="demo-qa")
        await tab.send(app_module, "Question: Who baked the bread?\nContext: Ana baked the bread at dawn.")
        return tab

    tab = run(go())
    assert recorder.prompts[-1] == "question: Who baked the bread? context: Ana baked the bread at dawn."
    text = state_of(tab).chat.messages[-1]["content"]
    assert tab.last_answer()["output"].startswith(format_answer("qa", text))
    assert tab.last_answer()["name"] == "demo-qa"


def test_email_from_labelled_lines(app_module, models_dir, recorder):
    service = ChatService(
        Catalog.load(REPO_ROOT / "configs" / "models.yaml"), ModelCache(), stream_fn=recorder
    )
    runtime.reset_service(service)
    try:

        async def go():
            tab = await started(app_module)
            await tab.settings(app_module, model="demo-email")
            await tab.send(
                app_module, "From: Ana\nTo: the team\nKey points: server update on Friday, save your work"
            )
            return tab

        tab = run(go())
    finally:
        runtime.reset_service(None)
    assert (
        recorder.prompts[-1]
        == "write email: server update on Friday, save your work\nfrom: Ana\nto: the team"
    )
    text = state_of(tab).chat.messages[-1]["content"]
    assert tab.last_answer()["output"].startswith(format_answer("email", text))


def test_compare_with_base_shows_the_base_answer_after_the_adapters(
    app_module, svc, models_dir, html_adapters
):
    install_adapter(html_adapters["ad-a"], models_dir)

    async def go():
        tab = await started(app_module)
        await tab.settings(app_module, model="ad-a")
        await tab.send(app_module, "a contact form")
        actions = [data for event, data in tab.events if event == "action"]
        assert actions and actions[-1]["name"] == "compare_with_base"
        import chainlit as cl

        tab.enter()
        await app_module.compare_with_base(
            cl.Action(**{k: actions[-1][k] for k in ("name", "payload", "id")})
        )
        return tab

    tab = run(go())
    adapter_answer, base_answer = tab.answers()[-2:]
    assert adapter_answer["name"] == "ad-a"
    assert base_answer["name"] == "demo-html"  # the base model by its name (also a valid avatar name)
    assert base_answer["output"].startswith(
        "**The same prompt on the base model, demo-html, without the adapter:**"
    )
    adapter_text = state_of(tab).chat.messages[-1]["content"]
    assert adapter_text[:40] not in base_answer["output"]  # the adapter changes the greedy answer
    assert any(event == "remove_action" for event, _ in tab.events)
    assert len(state_of(tab).chat.messages) == 2  # the comparison is not part of the conversation


def test_new_adapters_appear_at_the_next_message_and_at_once_in_new_chats(
    app_module, svc, models_dir, html_adapters
):
    async def go():
        tab = await started(app_module)
        before = [item["value"] for item in tab.widget(ui.MODEL)["items"]]
        install_adapter(html_adapters["ad-b"], models_dir)
        await tab.send(app_module, "hello")
        after = [item["value"] for item in tab.widget(ui.MODEL)["items"]]
        fresh = await started(app_module)
        return before, after, [item["value"] for item in fresh.widget(ui.MODEL)["items"]], tab

    before, after, fresh, tab = run(go())
    assert "ad-b" not in before and "ad-b" in after and "ad-b" in fresh
    assert tab.widget(ui.MODEL)["initial"] == "demo-html"  # the re-sent widgets keep the choice


def test_status_command_shows_loaded_models(app_module, svc):
    async def go():
        tab = await started(app_module)
        await tab.send(app_module, "hello")
        await tab.send(app_module, "", command="status")
        return tab

    tab = run(go())
    table = tab.last_answer()["output"]
    assert "**Answers running:** 0 · **waiting:** 0" in table and "| demo-html | — | 0 | 0 |" in table
    assert "- **demo-html**: ready, float32 on cpu" in table
    assert "batch: 0 of 16 rows decoding" in table  # the answer went through the base's batch scheduler
    assert str(REPO_ROOT) not in table and "/models/" not in table  # ids, not folders
    assert len(state_of(tab).chat.messages) == 2  # not a turn
    # Picked from the menu, the command's message is empty: it now says which command it was.
    assert [s["output"] for s in tab.screen() if s["type"] == "user_message"][-1] == "/status"


def test_tunnel_refusal_is_printed_at_startup(app_module, monkeypatch, capsys, tmp_path):
    monkeypatch.setenv("BABL_TUNNEL", "1")
    monkeypatch.delenv("BABL_ALLOW_ANONYMOUS_TUNNEL", raising=False)
    monkeypatch.setenv("BABL_DATA_DIR", str(tmp_path))
    run(app_module.open_public_tunnel())
    assert "Tunnel not opened" in capsys.readouterr().out
    run(app_module.close_public_tunnel())  # nothing open: a no-op


def test_tunnel_url_is_printed_and_shown_to_users(app_module, svc, monkeypatch, capsys, tmp_path):
    import sys

    from babl_core.web import tunnel

    fake = REPO_ROOT / "tests" / "assets" / "fake_ngrok.py"
    binary = tmp_path / "bin" / "ngrok"
    binary.parent.mkdir()
    binary.write_text(f"#!{sys.executable}\n" + fake.read_text().split("\n", 1)[1])
    binary.chmod(0o755)
    for name, value in {
        "BABL_TUNNEL": "1", "BABL_AUTH": "alice:pw", "BABL_API_KEY": "key", "NGROK_AUTHTOKEN": "2babl_FAKE_token",
        "BABL_NGROK_PATH": str(binary), "BABL_DATA_DIR": str(tmp_path / "data"),
        "FAKE_NGROK_URL": "https://babl-app-test.ngrok.example",
    }.items():  # fmt: skip
        monkeypatch.setenv(name, value)
    try:
        run(app_module.open_public_tunnel())
        assert "Babl public URL (ngrok): https://babl-app-test.ngrok.example" in capsys.readouterr().out
        tab = run(started(app_module))
        assert "https://babl-app-test.ngrok.example" in tab.answers()[0]["output"]
    finally:
        run(app_module.close_public_tunnel())
    assert tunnel.tunnel_url() is None


# --- history hooks (the stored flows against a real server: tests/test_history_e2e.py) ---------


def test_each_answer_carries_its_turn_record(app_module, svc):
    from babl_core.storage import conversations

    async def go():
        tab = await started(app_module)
        question = await tab.send(app_module, "a page about tea")
        return tab, question

    tab, question = run(go())
    record = tab.last_answer()["metadata"][conversations.TURN_KEY]
    answer = state_of(tab).chat.messages[-1]
    assert record["question"] == "a page about tea" and record["question_id"] == question.id
    assert record["answer"] == answer["content"] and record["model"] == "demo-html"


def test_resume_restores_the_conversation_model_and_settings(app_module, svc, recorder):
    from babl_core.storage import conversations

    def turn(question_id, question, answer, model):
        record = {"question_id": question_id, "question": question, "answer": answer, "model": model}
        return {
            "id": uuid.uuid4().hex,
            "type": "assistant_message",
            "metadata": {conversations.TURN_KEY: record},
        }

    thread = {
        "id": "thread-1",
        "metadata": {
            conversations.SESSION_KEY: {
                "model": "demo-python",
                "temperature": 0.4,
                "top_p": 0.9,
                "max_new_tokens": 32,
                "system_prompt": "",
                "html_preview": False,
            }
        },
        "steps": [
            turn("q1", "first stored question", "first stored answer", "demo-html"),
            turn("q2", "second stored question", "second stored answer", "demo-python"),
        ],
    }

    async def go():
        tab = FakeBrowser()
        tab.enter()
        await app_module.resume_chat(thread)
        await tab.send(app_module, "a new question")
        return tab

    tab = run(go())
    assert tab.widget(ui.MODEL)["initial"] == "demo-python"
    assert tab.widget(ui.TEMPERATURE)["initial"] == 0.4 and tab.widget(ui.HTML_PREVIEW)["initial"] is False
    assert any(event == "set_commands" for event, _ in tab.events)
    session = state_of(tab).chat
    assert [m["content"] for m in session.messages[:4]] == [
        "first stored question", "first stored answer", "second stored question", "second stored answer",
    ]  # fmt: skip
    assert session.messages[-1]["model"] == "demo-python" and len(session.messages) == 6
    prompt = recorder.prompts[-1]
    assert (
        prompt.index("first stored answer")
        < prompt.index("second stored question")
        < prompt.index("a new question")
    )
    assert not [s for s in tab.answers() if "cannot be used" in s["output"]]  # no fallback note


def test_export_command_offers_markdown_and_json_downloads(app_module, svc):
    async def go():
        tab = await started(app_module)
        await tab.send(app_module, "", command="export")
        await tab.send(app_module, "a page about tea")
        await tab.send(app_module, "/export")
        return tab

    tab = run(go())
    notes = [s["output"] for s in tab.answers() if s["name"] == "Babl"]
    assert any("Nothing to export yet" in note for note in notes)
    files = [e for e in tab.elements(tab.last_answer()["id"]) if e["type"] == "file"]
    assert sorted(f["name"] for f in files) == ["babl-a-page-about-tea.json", "babl-a-page-about-tea.md"]
    assert {f["mime"] for f in files} == {DOWNLOAD_MIME}
    content = {f["name"]: Path(tab.session.files[f["chainlitKey"]]["path"]).read_text() for f in files}
    exported = json.loads(content["babl-a-page-about-tea.json"])
    markdown = content["babl-a-page-about-tea.md"]
    assert exported["messages"] == state_of(tab).chat.messages
    assert "### You\n\na page about tea" in markdown
    assert len(state_of(tab).chat.messages) == 2  # /export is not a turn


def test_downloads_survive_another_instance_from_this_folder_stopping(app_module, svc):
    """Chainlit's shutdown removes `<app root>/.files/` (what a second `chainlit run` from this checkout
    does when it stops): this instance's session files are elsewhere, so its downloads keep working."""
    import shutil

    import chainlit.server

    from babl_core.web import session_files

    async def go():
        tab = await started(app_module)
        await tab.send(app_module, "a landing page for a bakery")
        return tab

    tab = run(go())
    # The preview is the answer's one download control: its stored content is what it downloads.
    download = [e for e in tab.elements(tab.last_answer()["id"]) if e["type"] == "custom"][-1]
    path = Path(tab.session.files[download["chainlitKey"]]["path"])
    assert path.is_file()
    shutil.rmtree(chainlit.server.FILES_DIRECTORY, ignore_errors=True)
    assert path.is_file()
    assert path.is_relative_to(session_files.root_dir())


def test_train_and_jobs_commands_answer_in_the_chat(app_module, svc, monkeypatch, tmp_path):
    from babl_core.web import jobs

    monkeypatch.setenv("BABL_DATA_DIR", str(tmp_path / "data"))
    monkeypatch.setattr(jobs, "_runner", None)  # a runner on this test's (empty) data dir
    monkeypatch.delenv("BABL_TUNNEL", raising=False)

    async def go():
        tab = await started(app_module)
        await tab.send(app_module, "", command="jobs")  # picked from the command menu
        jobs_text = tab.last_answer()["output"]
        await tab.send(app_module, "/train no-such-recipe")
        unknown = tab.last_answer()["output"]
        monkeypatch.setenv("BABL_TUNNEL", "1")
        await tab.send(app_module, "/train")
        return tab, jobs_text, unknown, tab.last_answer()["output"]

    tab, jobs_text, unknown, shared = run(go())
    assert "No training runs yet" in jobs_text
    assert next(s["output"] for s in tab.screen() if s["type"] == "user_message") == "/jobs"
    assert "No recipe 'no-such-recipe' here" in unknown and "`demo-python`" in unknown
    assert "off while the app is shared through a public tunnel" in shared
    assert not (tmp_path / "data" / "jobs").exists()  # nothing started
    assert any(
        event == "set_commands" and [c["id"] for c in data] == ["status", "export", "train", "jobs"]
        for event, data in tab.events
    )
