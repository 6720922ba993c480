"""babl_core.web.ui: the chat UI's decisions without Chainlit (widgets, settings, labels, streaming)."""

from __future__ import annotations

import asyncio
import threading
from dataclasses import replace

import pytest

from babl_core.engine.cache import ModelBusy
from babl_core.engine.catalog import Catalog, UnknownModel
from babl_core.engine.generation import GenerationError, GenerationParams, GenerationStats
from babl_core.engine.loaded import ModelUnavailable
from babl_core.engine.service import BadMessage, ChatSession
from babl_core.web import ui
from babl_core.web.render import DOWNLOAD_MIME, PreviewThrottle
from tests.conftest import REPO_ROOT, install_adapter


@pytest.fixture
def catalog(models_dir):
    return Catalog.load(REPO_ROOT / "configs" / "models.yaml")


@pytest.fixture
def choices(catalog):
    return ui.model_choices(catalog.list())


def state_on(catalog, model_id: str) -> ui.UiState:
    return ui.UiState.for_model(catalog.get(model_id))


# --- the dropdown ---------------------------------------------------------------------------------


def test_labels_say_what_each_entry_is_and_why_some_cannot_be_used(choices):
    by_id = {c.id: c for c in choices}
    assert (
        by_id["demo-html"].servable
        and by_id["demo-html"].label == "HTML — demo Llama (html, demo — random weights)"
    )
    email = by_id["email-t5"]
    assert not email.servable
    assert email.label.startswith("Email — T5-base + email LoRA (email)\nneeds-training: no adapter at")
    real = by_id["html-codellama"]
    assert real.label == (
        f"HTML — CodeLlama-7B 4-bit + LoRA (html, nf4)\nunavailable: {real.availability.reason}"
    )  # the whole reason: public/babl.css wraps it inside the dialog
    assert "\n" not in by_id["demo-html"].label  # a second line marks an entry that cannot be used
    assert len({c.label for c in choices}) == len(choices)


def test_entries_with_one_label_each_name_their_id(catalog):
    spec = catalog.get("demo-qa")
    runs = [replace(spec, id=run) for run in ("squad", "no-context")]  # e.g. two runs of one recipe
    labels = [c.label for c in ui.model_choices([catalog.get("demo-email"), spec, *runs])]
    assert labels == [
        catalog.get("demo-email").display_label,  # its label is its own: no id
        *(f"{spec.display_label} · {id_}" for id_ in ("demo-qa", "squad", "no-context")),
    ]


def test_listing_key_changes_when_an_adapter_appears(catalog, models_dir, html_adapters):
    before = ui.listing_key(ui.model_choices(catalog.list()))
    assert before == ui.listing_key(ui.model_choices(catalog.list()))
    install_adapter(html_adapters["ad-a"], models_dir)
    after = ui.listing_key(ui.model_choices(catalog.list()))
    assert after != before and any(entry[0] == "ad-a" for entry in after)


def test_widgets_hold_the_session_values(catalog, choices):
    state = state_on(catalog, "demo-python")
    state.chat.system_prompt = "Be brief."
    state.preview = False
    widgets = {w["id"]: w for w in ui.settings_widgets(choices, state)}
    assert [w["kind"] for w in widgets.values()] == ["select", "slider", "slider", "number", "text", "switch"]
    assert widgets["model"]["initial_value"] == "demo-python"
    assert widgets["model"]["items"]["Python — demo CodeGen (python, demo — random weights)"] == "demo-python"
    assert widgets["max_new_tokens"]["initial"] == 200 and widgets["temperature"]["initial"] == 0.0
    assert widgets["top_p"]["initial"] == 0.95
    assert widgets["system_prompt"]["initial"] == "Be brief." and widgets["html_preview"]["initial"] is False


def test_widgets_for_a_model_that_is_gone_select_nothing(catalog, choices):
    state = state_on(catalog, "demo-python")
    state.chat.model_id = "deleted-adapter"
    assert ui.settings_widgets(choices, state)[0]["initial_value"] is None


# --- reading a settings submit -----------------------------------------------------------------------


def submit(state, **changes):
    values = {
        "model": state.chat.model_id,
        **{k: state.chat.settings[k] for k in ui.GENERATION_KEYS},
        "system_prompt": state.chat.system_prompt,
        "html_preview": state.preview,
    }
    return {**values, **changes}


def test_read_settings_accepts_valid_values(catalog, choices):
    state = state_on(catalog, "demo-html")
    change = ui.read_settings(
        submit(state, temperature=0.8, max_new_tokens="64", system_prompt="Hi", html_preview=False),
        state,
        choices,
    )
    assert change.problems == [] and change.model_id is None and change.refused is None
    assert change.settings == {"temperature": 0.8, "top_p": 0.95, "max_new_tokens": 64}
    assert change.touched == {"temperature", "max_new_tokens"}
    ui.apply_settings(state, change)
    assert (
        state.chat.settings["max_new_tokens"] == 64 and state.chat.system_prompt == "Hi" and not state.preview
    )


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("temperature", -0.1, "Temperature -0.1 is not valid"),
        ("temperature", "hot", "Temperature 'hot' is not valid"),
        ("top_p", 0, "Top p 0 is not valid"),
        ("top_p", 1.5, "Top p 1.5 is not valid"),
        ("max_new_tokens", 0, "Max new tokens 0 is not valid"),
        ("max_new_tokens", 2.5, "Max new tokens 2.5 is not valid"),
        ("max_new_tokens", 10**6, "use a whole number from 1 to 4096"),
        ("max_new_tokens", True, "Max new tokens True is not valid"),
        ("max_new_tokens", "", "Max new tokens '' is not valid"),
    ],
)
def test_read_settings_names_each_bad_value_and_keeps_the_old_one(catalog, choices, field, value, message):
    state = state_on(catalog, "demo-html")
    change = ui.read_settings(submit(state, **{field: value}), state, choices)
    assert len(change.problems) == 1 and message in change.problems[0]
    assert change.settings[field] == state.chat.settings[field]
    assert field not in change.touched


def test_read_settings_refuses_models_that_cannot_be_served(catalog, choices):
    state = state_on(catalog, "demo-html")
    change = ui.read_settings(submit(state, model="qa-t5"), state, choices)
    assert change.model_id is None
    assert "needs-training" in change.refused and "configs/finetune/qa-t5-squad.yaml" in change.refused
    assert "Still answering with `demo-html`" in change.refused
    gone = ui.read_settings(submit(state, model="no-such-model"), state, choices)
    assert gone.model_id is None and "not in the catalog" in gone.refused
    picked = ui.read_settings(submit(state, model="demo-qa"), state, choices)
    assert picked.model_id == "demo-qa" and picked.refused is None


def test_a_switch_keeps_what_the_user_changed_and_takes_the_new_defaults_for_the_rest(catalog, choices):
    state = state_on(catalog, "demo-html")  # temperature 0, max new tokens 200
    # The user changes max new tokens in one submit, and switches model in a later one.
    ui.apply_settings(state, ui.read_settings(submit(state, max_new_tokens=50), state, choices))
    change = ui.read_settings(submit(state, model="demo-qa"), state, choices)
    ui.apply_settings(state, change)
    assert change.model_id == "demo-qa" and change.touched == set()
    changed, kept = ui.settings_for_new_model(state, catalog.get("demo-qa"))
    assert state.chat.settings == {"temperature": 0.9, "top_p": 0.95, "max_new_tokens": 50}
    assert [(c.key, c.before, c.after) for c in changed] == [("temperature", 0.0, 0.9)]
    assert [(c.key, c.before, c.after) for c in kept] == [("max_new_tokens", 50, 60)]
    text = ui.switched_text(catalog.get("demo-qa"), "float32 on cpu", task_changed=False, changed=changed,
                                 kept=kept)  # fmt: skip
    assert "- temperature 0 → 0.9, the new model's default" in text
    assert "- max new tokens stays 50, your setting (the new model's default is 60)" in text
    # Switching back: the user's value still stays; the untouched temperature follows the model again.
    changed, kept = ui.settings_for_new_model(state, catalog.get("demo-html"))
    assert state.chat.settings["temperature"] == 0.0 and state.chat.settings["max_new_tokens"] == 50
    assert [c.key for c in changed] == ["temperature"] and [c.key for c in kept] == ["max_new_tokens"]


# --- per-session state ---------------------------------------------------------------------------------


def test_begin_turn_rewinds_to_an_edited_message(catalog):
    state = state_on(catalog, "demo-html")
    for i, message_id in enumerate(["m1", "m2", "m3"]):
        assert state.begin_turn(message_id) is False
        state.chat.messages += [
            {"role": "user", "content": f"q{i}"},
            {"role": "assistant", "content": f"a{i}"},
        ]
    assert state.answers == 3
    assert state.begin_turn("m2") is True
    assert [m["content"] for m in state.chat.messages] == ["q0", "a0"]
    assert list(state.marks) == ["m1", "m2"]
    assert state.begin_turn("m3") is False  # m3 was dropped with the rewind: now a new message


def test_a_failed_turn_is_rewound_too(catalog):
    state = state_on(catalog, "demo-html")
    state.begin_turn("bad")  # e.g. an empty message: nothing recorded
    state.begin_turn("ok")
    state.chat.messages += [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]
    assert state.begin_turn("bad") is True
    assert state.chat.messages == [] and list(state.marks) == ["bad"]


def test_each_answer_gets_its_own_stop_event(catalog):
    state = state_on(catalog, "demo-html")
    first = state.new_stop_event()
    state.stop()
    assert first.is_set()
    second = state.new_stop_event()
    assert not second.is_set() and second is not first


# --- texts --------------------------------------------------------------------------------------------


class FakeReply:
    """What stream_answer and answer_footer read from a ChatReply, with scripted chunks."""

    def __init__(self, spec, chunks, *, finish="stop", notes=(), fail_after=None, tokens=None):
        self.spec = spec
        self.model_id = spec.id
        self.chunks = list(chunks)
        self.notes = list(notes)
        self.params = GenerationParams(max_new_tokens=120)
        self.stats = GenerationStats(completion_tokens=tokens if tokens is not None else len(self.chunks))
        self.finish = finish
        self.fail_after = fail_after

    def __aiter__(self):
        return self._run()

    async def _run(self):
        for i, chunk in enumerate(self.chunks):
            if self.fail_after is not None and i == self.fail_after:
                raise GenerationError("the model crashed")
            yield chunk
        self.stats.finish_reason = self.finish
        self.stats.finished_at = self.stats.started + 0.5


def test_footer_names_the_model_speed_and_how_it_ended(catalog):
    spec = catalog.get("demo-python")
    reply = FakeReply(
        spec, [], finish="length", notes=["dropped 2 oldest turns to fit the 2048-token context"], tokens=60
    )
    asyncio.run(_drain(reply))
    footer = ui.answer_footer(reply)
    assert footer.endswith("*`demo-python` · 60 tokens · 120 tokens/s · reached max new tokens (120)*")
    assert "> Note: dropped 2 oldest turns to fit the 2048-token context." in footer
    stopped = FakeReply(spec, [], finish="cancelled")
    asyncio.run(_drain(stopped))
    assert ui.answer_footer(stopped).endswith("· stopped*")


async def _drain(reply):
    return [chunk async for chunk in reply]


def test_welcome_names_the_model_and_shows_the_public_url(catalog, choices):
    choice = ui.find_choice(choices, "demo-qa")
    text = ui.welcome_text(choice, choices, public_url="https://babl.ngrok.example")
    assert "`demo-qa`" in text and "Context:" in text and "random weights" in text
    assert "https://babl.ngrok.example" in text
    assert "ngrok" not in ui.welcome_text(choice, choices, public_url=None)
    nothing = ui.welcome_text(None, [c for c in choices if not c.servable], public_url=None)
    assert "python -m babl_core demo" in nothing and "`email-t5` — needs-training" in nothing


@pytest.mark.parametrize(
    ("error", "expected"),
    [
        (BadMessage("The message is empty: type a question."), "The message is empty: type a question."),
        (ModelUnavailable("x", "offline"), "x is unavailable: offline. Pick another model in the settings."),
        (UnknownModel("gone", ["a"]), "'gone' is not a model in the catalog."),
        (ModelBusy("no room"), "no room"),
        (ValueError("temperature: must be ≥ 0"), "A setting is not valid: temperature: must be ≥ 0."),
    ],
)
def test_error_texts(error, expected):
    assert expected in ui.error_text(error)


def test_generation_error_text_names_the_cause():
    try:
        try:
            raise RuntimeError("CUDA out of memory")
        except RuntimeError as cause:
            raise GenerationError("generate failed") from cause
    except GenerationError as exc:
        assert "RuntimeError: CUDA out of memory" in ui.error_text(exc)


def test_status_table(catalog, models_dir, html_adapters):
    from babl_core.engine.cache import base_ref

    install_adapter(html_adapters["ad-a"], models_dir)
    specs = catalog.list()
    ad_a = next(s for s in specs if s.id == "ad-a")
    t5 = base_ref(catalog.get("demo-qa"))
    status = {
        "bases": [
            {"base": base_ref(catalog.get("demo-html")), "state": "ready", "memory_mb": 2.4,
             "adapters": [ad_a.adapter, "/elsewhere/old|run"], "active_generations": 1, "idle_s": 0.0,
             "description": "float32 on cpu, 2 MB"},
            {"base": t5, "state": "loading", "memory_mb": 0, "adapters": [], "active_generations": 0,
             "idle_s": 3.0, "description": ""},
        ],
        "max_models": 2, "memory_budget_mb": None, "memory_mb": 2.4, "active_generations": 1, "queue": 0,
    }  # fmt: skip
    text = ui.status_markdown(status, ui.status_names(specs))
    assert "**Answers running:** 1" in text and "**models loaded:** 2 of 2" in text
    # Models by their ids (a base shared by two entries names both), never by a folder path.
    assert "| demo-html | ad-a, old\\|run | 1 | 0 | 2 MB |" in text
    assert "| demo-email, demo-qa | — | 0 | 0 | 0 MB |" in text
    assert str(models_dir) not in text and "/elsewhere" not in text
    assert "- **demo-html**: ready, float32 on cpu, 2 MB · idle 0 s" in text
    table = [line for line in text.splitlines() if line.startswith("| ")]
    assert {line.count(" | ") for line in table} == {4}  # five columns: narrow enough for the chat
    status["bases"][0]["batch"] = {"active_rows": 3, "max_rows": 16, "waiting": 2, "kv_cache_mb": 1.5}
    status |= {"queue": 2, "waiting_for_load": 0, "waiting_to_join": 2, "kv_cache_mb": 1.5,
               "active_generations": 3, "remote_active_generations": 1}  # fmt: skip
    busy = ui.status_markdown(status, ui.status_names(specs))
    assert "**Answers running:** 3 (1 remote) · **waiting:** 2 (0 for a model to load, 2 for a place" in busy
    assert "| demo-html | ad-a, old\\|run | 1 | 2 | 2 MB |" in busy
    assert "batch: 3 of 16 rows decoding" in busy and "+ 1.5 MB KV cache" in busy
    empty = ui.status_markdown({"bases": [], "max_models": 2, "memory_mb": 0, "queue": 0})
    assert "No model is loaded yet" in empty


def test_status_command_is_recognised():
    assert ui.is_status_command("status", "")
    assert ui.is_status_command(None, "  /STATUS ")
    assert not ui.is_status_command(None, "status of my order?")
    assert ui.command_of("export", "") == "export" and ui.command_of(None, "/status") == "status"
    assert ui.command_of(None, "/statusx") is None


def test_message_authors_are_names_chainlit_can_fetch_an_avatar_for():
    assert ui.message_author("demo-html") == "demo-html"
    assert ui.message_author("codegen-350M-mono v1.2") == "codegen-350M-mono v1.2"
    assert ui.message_author("org/model (base)") == "org-model -base-"
    assert ui.message_author("()") == "-"


def test_listen_address_follows_chainlit(monkeypatch):
    monkeypatch.delenv("CHAINLIT_HOST", raising=False)
    monkeypatch.delenv("CHAINLIT_PORT", raising=False)
    assert ui.listen_address() == ("127.0.0.1", 8000)
    monkeypatch.setenv("CHAINLIT_HOST", "0.0.0.0")
    monkeypatch.setenv("CHAINLIT_PORT", "9001")
    assert ui.listen_address() == ("0.0.0.0", 9001)
    monkeypatch.setenv("CHAINLIT_PORT", "http")
    with pytest.raises(ValueError, match="CHAINLIT_PORT='http' is not a port number"):
        ui.listen_address()


# --- the page of an html answer ------------------------------------------------------------------


def test_page_of_answer():
    doc = "<!DOCTYPE html><html><body><h1>Hi</h1></body></html>"
    assert ui.page_of_answer(f"Here:\n```html\n{doc}\n```\nEnjoy.", partial=False) == doc
    assert ui.page_of_answer("<div><p>a card</p></div>", partial=False) == "<div><p>a card</p></div>"
    assert ui.page_of_answer("just words", partial=False) == "just words"
    assert ui.page_of_answer("  \n", partial=False) is None


# --- streaming into a view -----------------------------------------------------------------------


class RecordingView:
    def __init__(self) -> None:
        self.texts: list[tuple[str, bool]] = []
        self.previews: list[dict] = []
        self.downloads: list[dict] = []

    async def show(self, markdown, *, final):
        self.texts.append((markdown, final))

    async def show_preview(self, props, *, final):
        assert props["final"] is final
        self.previews.append(props)

    async def offer_download(self, attachment):
        self.downloads.append(attachment)


class FakeClock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        self.now += 0.2  # each preview decision is 0.2 s after the last
        return self.now


PAGE_CHUNKS = ["Sure:\n```html\n<!DOCTYPE html>", "<html><head><title>Bakery</title></head>", "<body><h1>Bread</h1>",
               "<p>Fresh</p>", "</body></html>\n```\n"]  # fmt: skip


def stream(reply, view, **kwargs):
    return asyncio.run(ui.stream_answer(reply, view, **kwargs))


def test_html_answer_streams_text_a_throttled_preview_then_the_final_page(catalog):
    reply = FakeReply(catalog.get("demo-html"), PAGE_CHUNKS)
    view = RecordingView()
    outcome = stream(
        reply,
        view,
        task="html",
        preview_id="m1",
        max_rate_hz=1e6,
        throttle=PreviewThrottle(0.5, clock=FakeClock()),
    )
    assert (
        outcome.html
        == "<!DOCTYPE html><html><head><title>Bakery</title></head><body><h1>Bread</h1><p>Fresh</p></body></html>"
    )
    assert [final for _, final in view.texts] == [False] * 5 + [True]
    assert view.texts[0][0].startswith("Sure:\n```html\n<!DOCTYPE html>")
    assert view.texts[-1][0].startswith("Sure:\n```html\n" + outcome.html + "\n```")
    assert "*`demo-html` · 5 tokens" in view.texts[-1][0]
    streaming = [p for p in view.previews if not p["final"]]
    assert 1 <= len(streaming) < 5  # throttled: not one per chunk
    final = view.previews[-1]
    assert final["final"] and final["html"] == outcome.html and final["title"] == "Bakery"
    assert final["preview_id"] == "m1" and "allow-same-origin" not in final["sandbox"]
    # One download control: the preview's own button (it carries the page and its file name).
    assert final["filename"] == "bakery.html" and view.downloads == []


def test_preview_off_offers_the_page_as_a_file_instead(catalog):
    view = RecordingView()
    stream(FakeReply(catalog.get("demo-html"), PAGE_CHUNKS), view, task="html", preview=False)
    assert view.previews == []
    assert [d["name"] for d in view.downloads] == ["bakery.html"] and view.downloads[0][
        "mime"
    ] == DOWNLOAD_MIME


def test_python_answer_is_fenced_and_has_no_preview(catalog):
    view = RecordingView()
    stream(FakeReply(catalog.get("demo-python"), ["def f(x):\n", "    return x\n"]), view, task="python")
    assert view.texts[-1][0].startswith("```python\ndef f(x):\n    return x\n```")
    assert view.previews == [] and view.downloads == []


def test_a_stopped_html_answer_previews_its_unfinished_page(catalog):
    view = RecordingView()
    reply = FakeReply(catalog.get("demo-html"), PAGE_CHUNKS[:3], finish="cancelled")
    outcome = stream(reply, view, task="html")
    assert outcome.html.endswith("<h1>Bread</h1>") and view.previews[-1]["final"]
    assert view.texts[-1][0].rstrip().endswith("· stopped*")


def test_an_empty_answer_says_so(catalog):
    view = RecordingView()
    stream(FakeReply(catalog.get("demo-qa"), []), view, task="qa")
    assert view.texts == [(view.texts[0][0], True)]
    assert view.texts[0][0].startswith("*(the model returned no text)*")


def test_a_failure_mid_answer_finalises_the_text_and_raises(catalog):
    view = RecordingView()
    reply = FakeReply(catalog.get("demo-python"), ["print(1)\n", "print(2)\n"], fail_after=1)
    with pytest.raises(GenerationError):
        stream(reply, view, task="python")
    assert view.texts[-1] == ("```python\nprint(1)\n```\n\n*The answer failed here.*", True)


def test_header_goes_first(catalog):
    view = RecordingView()
    stream(FakeReply(catalog.get("demo-qa"), ["Paris"]), view, task="qa", header="**Base:**\n\n")
    assert all(text.startswith("**Base:**\n\nParis") for text, _ in view.texts)


# --- asyncio glue -----------------------------------------------------------------------------------


def test_finish_even_if_cancelled_waits_for_the_work_and_then_propagates():
    async def go():
        stop = threading.Event()
        finished = []

        async def work():
            while not stop.is_set():
                await asyncio.sleep(0.01)
            await asyncio.sleep(0.05)  # finalising the message after the stop
            finished.append(True)

        caller = asyncio.create_task(ui.finish_even_if_cancelled(work(), stop.set))
        await asyncio.sleep(0.05)
        caller.cancel()
        with pytest.raises(asyncio.CancelledError):
            await caller
        return stop.is_set(), finished

    assert asyncio.run(go()) == (True, [True])


def test_finish_even_if_cancelled_returns_the_result():
    async def work():
        return 42

    assert asyncio.run(ui.finish_even_if_cancelled(work(), lambda: None)) == 42


def test_status_callback_runs_the_coroutine_on_the_loop():
    async def go():
        seen = []

        async def show(text):
            seen.append(text)

        callback = ui.status_callback(show)
        loop = asyncio.get_running_loop()
        await asyncio.to_thread(lambda: loop.call_soon_threadsafe(callback, "waiting for a slot"))
        for _ in range(50):
            if seen:
                break
            await asyncio.sleep(0.01)
        return seen

    assert asyncio.run(go()) == ["waiting for a slot"]


def test_ui_state_for_model_uses_the_entry_defaults(catalog):
    state = state_on(catalog, "demo-qa")
    assert isinstance(state.chat, ChatSession) and state.chat.model_id == "demo-qa"
    assert state.chat.settings == {"temperature": 0.9, "top_p": 0.95, "max_new_tokens": 60}


# --- chainlit.md ------------------------------------------------------------------------------------


def welcome_page_examples() -> dict[str, str]:
    """The fenced examples of chainlit.md, by the bold title before each."""
    import re

    text = (REPO_ROOT / "chainlit.md").read_text()
    pattern = re.compile(r"\*\*(?P<title>[^*]+)\*\*(?:(?!\*\*|```).)*```text\n(?P<body>.*?)\n```", re.DOTALL)
    return {m["title"]: m["body"] for m in pattern.finditer(text)}


def test_the_welcome_pages_examples_parse_as_their_tasks_expect():
    from babl_core.engine.prompts import parse_email_request, parse_qa_request

    examples = welcome_page_examples()
    assert {"HTML", "Python", "Email", "Code (T5)"} <= set(examples)
    email = parse_email_request(examples["Email"])
    assert email["sender"] == "Ana Ruiz" and email["recipient"] == "the support team"
    assert "Friday at 18:00" in email["key_points"] and "Monday" in email["key_points"]
    with_passage = parse_qa_request(examples["Question answering with a passage"])
    assert with_passage["question"] == "When did the bakery open?" and "1998" in with_passage["context"]
    without = parse_qa_request(examples["Question answering without a passage"])
    assert without == {"question": "Who wrote the novel Frankenstein?", "context": None}
