"""What the chat UI shows and how it reacts, without importing Chainlit.

`app.py` is the Chainlit glue: it turns the widget specs built here into `cl.input_widget` objects,
implements `AnswerView` with `cl.Message` / `cl.CustomElement` / `cl.File`, and calls these
functions from its hooks. Everything that can be decided without a browser lives here so it can be
unit-tested: the settings widgets (model dropdown with availability, sampling, system prompt, HTML
preview switch), reading a settings submit, the per-session UI state (stop event, edit rewind), the
answer's label, and the stream → message/preview loop.
"""

from __future__ import annotations

import asyncio
import math
import os
import threading
from collections.abc import Awaitable, Callable, Coroutine, Iterable
from dataclasses import dataclass, field
from typing import Any, Protocol

from babl_core.cache import ModelBusy
from babl_core.catalog import Availability, GenerationDefaults, ModelSpec, UnknownModel, availability
from babl_core.chat import BadMessage, ChatReply, ChatSession, coalesce
from babl_core.generation import GenerationError
from babl_core.loading import ModelUnavailable
from babl_core.render import (
    PreviewThrottle,
    document_title,
    download_attachment,
    extract_html,
    format_answer,
    preview_props,
)

# Widget ids: the keys of the dict Chainlit passes to on_settings_update.
MODEL = "model"
TEMPERATURE = "temperature"
TOP_P = "top_p"
MAX_NEW_TOKENS = "max_new_tokens"
SYSTEM_PROMPT = "system_prompt"
HTML_PREVIEW = "html_preview"

GENERATION_KEYS = (TEMPERATURE, TOP_P, MAX_NEW_TOKENS)
MAX_NEW_TOKENS_LIMIT = 4096  # above every catalog entry's default; the context check still applies
TEMPERATURE_MAX = 2.0
TOP_P_MIN = 0.05
UI_UPDATES_PER_SECOND = 30.0  # DESIGN.md "Streaming"
DEFAULT_HOST = "127.0.0.1"  # Chainlit's defaults (chainlit.config.DEFAULT_HOST/PORT)
DEFAULT_PORT = 8000

STATUS_COMMAND = "status"
EXPORT_COMMAND = "export"
COMMANDS = [
    {
        "id": STATUS_COMMAND,
        "icon": "activity",
        "description": "Loaded models, memory and running answers",
        "button": False,
        "persistent": False,
    },
    {
        "id": EXPORT_COMMAND,
        "icon": "download",
        "description": "Download this conversation as Markdown and JSON",
        "button": False,
        "persistent": False,
    },
]

TASK_HINTS = {
    "html": "Describe a page (e.g. *a landing page for a bakery with a menu and opening hours*); the HTML "
    "is shown as code with a sandboxed live preview.",
    "python": "Describe a function or a script (e.g. *a function that checks whether a string is a "
    "palindrome*).",
    "code": "Describe the Python function to write (e.g. *write a function to find the minimum of three "
    "numbers*).",
    "email": "Give labelled lines: `From: Ana`, `To: the team`, `Key points: server update on Friday, "
    "save your work` — the model writes the email.",
    "qa": "Ask a question; add a passage on a line starting with `Context:` to answer from it "
    "(without one the model answers from what it learned).",
    "chat": "Type a message.",
}


# --------------------------------------------------------------------------------------------------
# Where the app listens


def listen_address() -> tuple[str, int]:
    """The host and port Chainlit binds to: `CHAINLIT_HOST` / `CHAINLIT_PORT`, which `chainlit run
    --host H --port P` exports before it imports app.py (defaults 127.0.0.1 and 8000, as Chainlit's).
    Reading Chainlit's own variables means the host policy checks the address actually bound,
    whatever started the app.

    Raises:
        ValueError: CHAINLIT_PORT is not a port number.
    """
    host = os.environ.get("CHAINLIT_HOST", "").strip() or DEFAULT_HOST
    raw_port = os.environ.get("CHAINLIT_PORT", "").strip() or str(DEFAULT_PORT)
    try:
        port = int(raw_port)
    except ValueError:
        port = -1
    if not 0 < port < 65536:
        raise ValueError(
            f"CHAINLIT_PORT={raw_port!r} is not a port number; use e.g. --port 8000 (PORT=8000 with make)"
        )
    return host, port


# --------------------------------------------------------------------------------------------------
# The model dropdown


@dataclass(frozen=True)
class ModelChoice:
    """One dropdown entry: the catalog entry, whether it can be served here, and its label."""

    spec: ModelSpec
    availability: Availability
    label: str

    @property
    def id(self) -> str:
        return self.spec.id

    @property
    def servable(self) -> bool:
        return self.availability.servable


def _short_reason(reason: str, limit: int = 60) -> str:
    first = reason.split(";")[0].strip()
    return first if len(first) <= limit else first[: limit - 1] + "…"


def model_choices(specs: Iterable[ModelSpec]) -> list[ModelChoice]:
    """Dropdown entries for `specs` (a `Catalog.list()`), in catalog order.

    Servable entries are labelled with `display_label` (task, quantization, "demo — random weights");
    the others add their availability word and the start of the reason, so nobody picks one
    unknowingly. Labels are made unique (Chainlit's Select maps label → value).
    """
    choices: list[ModelChoice] = []
    seen: set[str] = set()
    for spec in specs:
        avail = availability(spec)
        label = spec.display_label
        if not avail.servable:
            label = f"{label} — {avail.word}: {_short_reason(avail.reason)}"
        if label in seen:
            label = f"{label} [{spec.id}]"
        seen.add(label)
        choices.append(ModelChoice(spec, avail, label))
    return choices


def listing_key(choices: Iterable[ModelChoice]) -> tuple:
    """What the dropdown shows; when it changes (a new adapter, a model became servable) the
    session's widgets are sent again."""
    return tuple((c.id, c.label, c.availability.word) for c in choices)


def find_choice(choices: Iterable[ModelChoice], model_id: str) -> ModelChoice | None:
    """The dropdown entry with this id, or None when the listing does not hold it."""
    return next((c for c in choices if c.id == model_id), None)


def default_choice(choices: list[ModelChoice], default: ModelSpec | None) -> ModelChoice | None:
    """The session's first model: the catalog's default (DESIGN.md), if it is in the listing."""
    return find_choice(choices, default.id) if default is not None else None


# --------------------------------------------------------------------------------------------------
# Per-session state


def entry_settings(spec: ModelSpec) -> dict[str, Any]:
    """The entry's generation defaults, as the settings widgets hold them."""
    gen = spec.generation
    return {
        TEMPERATURE: float(gen.temperature),
        TOP_P: float(gen.top_p),
        MAX_NEW_TOKENS: int(gen.max_new_tokens),
    }


@dataclass
class UiState:
    """One browser session: the conversation plus what only the UI needs.

    Attributes:
        chat: The conversation (model id, messages, generation settings, system prompt).
        preview: Show the sandboxed HTML preview for html answers.
        listing: `listing_key` of the dropdown last sent to this session.
        marks: Chainlit id of each user message → how many messages `chat` held before it; an
            edit of that message rewinds the conversation to there.
        stop_event: Set by the stop button; a fresh one per answer.
        compare_action: The "Compare with base" button on the latest answer (a Chainlit object).
    """

    chat: ChatSession
    preview: bool = True
    listing: tuple = ()
    marks: dict[str, int] = field(default_factory=dict)
    stop_event: threading.Event = field(default_factory=threading.Event)
    compare_action: Any = None

    @classmethod
    def for_model(cls, spec: ModelSpec) -> UiState:
        return cls(chat=ChatSession(model_id=spec.id, settings=entry_settings(spec)))

    def new_stop_event(self) -> threading.Event:
        """A fresh event for the next answer (the previous one may still be set)."""
        self.stop_event = threading.Event()
        return self.stop_event

    def stop(self) -> None:
        """The stop button: the running answer ends within one decoding step."""
        self.stop_event.set()

    def begin_turn(self, message_id: str) -> bool:
        """Note where user message `message_id` starts. If it was seen before, the user edited it:
        the conversation is rewound to just before it (its answer and everything later dropped, as
        Chainlit drops them from the screen). Returns True for an edit."""
        edited = message_id in self.marks
        if edited:
            start = self.marks[message_id]
            del self.chat.messages[start:]
            ids = list(self.marks)
            for later in ids[ids.index(message_id) :]:
                del self.marks[later]
        self.marks[message_id] = len(self.chat.messages)
        return edited

    @property
    def answers(self) -> int:
        """Assistant messages recorded so far (identifies the latest answer)."""
        return sum(1 for m in self.chat.messages if m["role"] == "assistant")


# --------------------------------------------------------------------------------------------------
# Settings widgets and reading a submit


def settings_widgets(choices: list[ModelChoice], state: UiState) -> list[dict[str, Any]]:
    """Widget specs for the settings dialog, holding the session's current values.

    Each is a dict with `kind` (select | slider | number | text | switch) and the keyword arguments
    of the matching `chainlit.input_widget` class (Select uses `items` + `initial_value`: an
    `initial` with `values` is silently dropped by Chainlit 2.12).
    """
    current = {**entry_settings_fallback(), **state.chat.settings}
    unservable = [c for c in choices if not c.servable]
    model_help = "The model that writes the next answer; the conversation is kept when you switch."
    if unservable:
        model_help += " Entries showing an availability word cannot be served here; pick one to see why."
    return [
        {
            "kind": "select",
            "id": MODEL,
            "label": "Model",
            "items": {c.label: c.id for c in choices},
            "initial_value": state.chat.model_id if find_choice(choices, state.chat.model_id) else None,
            "description": model_help,
        },
        {
            "kind": "slider",
            "id": TEMPERATURE,
            "label": "Temperature",
            "initial": float(current[TEMPERATURE]),
            "min": 0.0,
            "max": TEMPERATURE_MAX,
            "step": 0.05,
            "description": "0 = greedy (always the most likely token); higher = more varied.",
        },
        {
            "kind": "slider",
            "id": TOP_P,
            "label": "Top p",
            "initial": float(current[TOP_P]),
            "min": TOP_P_MIN,
            "max": 1.0,
            "step": 0.05,
            "description": "Sample only from the most likely tokens covering this probability.",
        },
        {
            "kind": "number",
            "id": MAX_NEW_TOKENS,
            "label": "Max new tokens",
            "initial": int(current[MAX_NEW_TOKENS]),
            "placeholder": f"1 to {MAX_NEW_TOKENS_LIMIT}",
            "description": f"The longest answer, in tokens (1 to {MAX_NEW_TOKENS_LIMIT}); on a model whose "
            "context is smaller, an answer gets the room left (a note says so).",
        },
        {
            "kind": "text",
            "id": SYSTEM_PROMPT,
            "label": "System prompt",
            "initial": state.chat.system_prompt,
            "placeholder": "e.g. You write concise, commented code.",
            "multiline": True,
            "description": "Sent first by models whose prompt style has one; others ignore it (with a note).",
        },
        {
            "kind": "switch",
            "id": HTML_PREVIEW,
            "label": "HTML preview",
            "initial": state.preview,
            "description": "Render generated HTML in a sandboxed frame (no scripts, no network).",
        },
    ]


def entry_settings_fallback() -> dict[str, Any]:
    """Values for a session whose settings lack a key (the generation defaults of an empty entry)."""
    gen = GenerationDefaults()
    return {TEMPERATURE: gen.temperature, TOP_P: gen.top_p, MAX_NEW_TOKENS: gen.max_new_tokens}


@dataclass
class SettingsChange:
    """A settings submit, checked.

    Attributes:
        model_id: A different, servable model to switch to (None: keep the current one).
        refused: Why the picked model cannot be used (not servable here, or gone); None otherwise.
        settings: The valid generation settings (invalid ones keep their previous value).
        touched: Generation keys whose value the user changed in this submit.
        system_prompt: The system prompt.
        preview: The HTML preview switch.
        problems: One line per invalid value, naming the setting and the fix.
    """

    model_id: str | None
    refused: str | None
    settings: dict[str, Any]
    touched: set[str]
    system_prompt: str
    preview: bool
    problems: list[str]


def _number(value: Any) -> float | None:
    if isinstance(value, bool):
        return None
    if isinstance(value, int | float):
        number = float(value)
    elif isinstance(value, str) and value.strip():
        try:
            number = float(value.strip())
        except ValueError:
            return None
    else:
        return None
    return number if math.isfinite(number) else None


def read_settings(values: dict[str, Any], state: UiState, choices: list[ModelChoice]) -> SettingsChange:
    """Check a settings submit against the session and the dropdown.

    A model that is not servable is refused with its availability word and reason (the session
    keeps its model); a value out of range keeps the previous value and adds a problem line.
    """
    current = {**entry_settings_fallback(), **state.chat.settings}
    problems: list[str] = []
    settings: dict[str, Any] = {}

    temperature = _number(values.get(TEMPERATURE, current[TEMPERATURE]))
    if temperature is None or not 0 <= temperature <= TEMPERATURE_MAX:
        problems.append(
            f"Temperature {values.get(TEMPERATURE)!r} is not valid: use a number from 0 to {TEMPERATURE_MAX:g}."
        )
        temperature = float(current[TEMPERATURE])
    settings[TEMPERATURE] = round(temperature, 4)

    top_p = _number(values.get(TOP_P, current[TOP_P]))
    if top_p is None or not 0 < top_p <= 1:
        problems.append(f"Top p {values.get(TOP_P)!r} is not valid: use a number above 0 and at most 1.")
        top_p = float(current[TOP_P])
    settings[TOP_P] = round(top_p, 4)

    raw_tokens = values.get(MAX_NEW_TOKENS, current[MAX_NEW_TOKENS])
    tokens = _number(raw_tokens)
    if tokens is None or tokens != int(tokens) or not 1 <= tokens <= MAX_NEW_TOKENS_LIMIT:
        problems.append(
            f"Max new tokens {raw_tokens!r} is not valid: use a whole number from 1 to {MAX_NEW_TOKENS_LIMIT}."
        )
        tokens = current[MAX_NEW_TOKENS]
    settings[MAX_NEW_TOKENS] = int(tokens)

    touched = {key for key in GENERATION_KEYS if settings[key] != current[key]}

    system_prompt = values.get(SYSTEM_PROMPT, state.chat.system_prompt)
    system_prompt = system_prompt if isinstance(system_prompt, str) else state.chat.system_prompt
    preview = values.get(HTML_PREVIEW, state.preview)
    preview = preview if isinstance(preview, bool) else state.preview

    model_id, refused = None, None
    picked = values.get(MODEL)
    if isinstance(picked, str) and picked and picked != state.chat.model_id:
        choice = find_choice(choices, picked)
        if choice is None:
            refused = (
                f"`{picked}` is not in the catalog any more; still answering with `{state.chat.model_id}`."
            )
        elif not choice.servable:
            refused = (
                f"**{choice.spec.display_label}** cannot be used here ({choice.availability.word}): "
                f"{choice.availability.reason}. Still answering with `{state.chat.model_id}`."
            )
        else:
            model_id = picked
    return SettingsChange(model_id, refused, settings, touched, system_prompt, preview, problems)


def apply_settings(state: UiState, change: SettingsChange) -> None:
    """Store the checked values in the session (the model switch is done separately)."""
    state.chat.settings.update(change.settings)
    state.chat.system_prompt = change.system_prompt
    state.preview = change.preview


def settings_for_new_model(state: UiState, spec: ModelSpec, touched: set[str]) -> None:
    """After a switch, the new entry's defaults apply, except for values the user set in the same
    submit (DESIGN.md: defaults come from the entry)."""
    defaults = entry_settings(spec)
    for key in GENERATION_KEYS:
        if key not in touched:
            state.chat.settings[key] = defaults[key]


# --------------------------------------------------------------------------------------------------
# Texts


def task_hint(task: str) -> str:
    """One line on how to ask a model of this task (shown when a chat starts or the task changes)."""
    return TASK_HINTS.get(task, TASK_HINTS["chat"])


def model_line(spec: ModelSpec) -> str:
    """The model as messages name it: its dropdown label in bold, then its id."""
    return f"**{spec.display_label}** (`{spec.id}`)"


def welcome_text(choice: ModelChoice | None, choices: list[ModelChoice], *, public_url: str | None) -> str:
    """The first message of a chat: the model, how to ask it, where the settings are."""
    if choice is None:
        lines = ["No model can be served here, so there is nothing to chat with yet:"]
        lines += [f"- `{c.id}` — {c.availability.word}: {c.availability.reason}" for c in choices]
        lines.append("\nBuild the offline demo models with `python -m babl_core demo` and start a new chat.")
        return "\n".join(lines)
    spec = choice.spec
    lines = [
        f"Answering with {model_line(spec)}. {task_hint(spec.task)}",
        "",
        "Open the settings (the gear icon in the message box) to switch models — the conversation "
        "is kept — or to change sampling, the system prompt and the HTML preview. "
        "Type `/status` to see loaded models and running answers, `/export` to download this "
        "conversation. Past chats are in the sidebar.",
    ]
    if spec.demo:
        lines += [
            "",
            "*Demo models have random weights: their answers are noise. They show the whole flow offline.*",
        ]
    if public_url:
        lines += ["", f"Public URL of this app (ngrok tunnel): {public_url}"]
    return "\n".join(lines)


def switched_text(spec: ModelSpec, description: str, *, task_changed: bool) -> str:
    """The message after a switch: the new model, what was loaded (`describe()`), the task's hint."""
    text = f"Now answering with {model_line(spec)} — {description}. The conversation is kept."
    if task_changed:
        text += f"\n\n{task_hint(spec.task)}"
    return text


def answer_footer(reply: ChatReply) -> str:
    """The small label under an answer: which model wrote it, its speed, how it ended, and notes
    (history trimmed, system prompt ignored)."""
    stats = reply.stats
    parts = [
        f"`{reply.model_id}`",
        f"{stats.completion_tokens} tokens",
        f"{stats.tokens_per_second:.0f} tokens/s",
    ]
    if stats.finish_reason == "cancelled":
        parts.append("stopped")
    elif stats.finish_reason == "length":
        parts.append(f"reached max new tokens ({reply.params.max_new_tokens})")
    notes = "".join(f"\n\n> Note: {note}." for note in reply.notes)
    return f"{notes}\n\n*{' · '.join(parts)}*"


USER_ERRORS = (BadMessage, ModelUnavailable, ModelBusy, UnknownModel, GenerationError, ValueError)


def error_text(exc: BaseException) -> str:
    """What the user reads when an answer cannot be given; the session stays usable."""
    if isinstance(exc, BadMessage):
        return str(exc)
    if isinstance(exc, ModelUnavailable | UnknownModel):
        return f"{exc}. Pick another model in the settings."
    if isinstance(exc, ModelBusy):
        return str(exc)
    if isinstance(exc, GenerationError):
        cause = exc.__cause__ or exc
        return f"The model failed while answering ({type(cause).__name__}: {cause}). Try again or pick another model."
    return f"A setting is not valid: {exc}. Change it in the settings."


def status_markdown(status: dict) -> str:
    """`/status`: `ChatService.status()` (loaded bases, adapters, memory, batches, running answers and
    the queue) as a small table; `chat.format_status` is the same for a terminal."""
    running = status.get("active_generations", 0)
    remote = status.get("remote_active_generations", 0)
    queue = status.get("queue", 0)
    lines = [
        f"**Running answers:** {running}"
        + (f" ({remote} remote)" if remote else "")
        + f" · **waiting:** {queue}"
        + (
            f" ({status.get('waiting_for_load', 0)} for a model, {status.get('waiting_to_join', 0)} for a batch row)"
            if queue
            else ""
        )
        + f" · **models loaded:** {len(status.get('bases', []))} of {status.get('max_models')} · "
        f"**memory:** {status.get('memory_mb', 0):.0f} MB"
        + (f" of {status['memory_budget_mb']:.0f} MB" if status.get("memory_budget_mb") else "")
        + (f" + {status['kv_cache_mb']:.1f} MB KV cache" if status.get("kv_cache_mb") else ""),
    ]
    bases = status.get("bases", [])
    if not bases:
        lines.append("\nNo model is loaded yet; the first answer loads one.")
        return "\n".join(lines)
    lines += [
        "",
        "| base | state | memory | adapters | running | batch | idle | loaded as |",
        "|---|---|---:|---|---:|---|---:|---|",
    ]
    for base in bases:
        adapters = ", ".join(base.get("adapters", [])) or "—"
        batch = base.get("batch")
        rows = (
            f"{batch['active_rows']} of {batch['max_rows']} rows, {batch['waiting']} waiting"
            if batch
            else "—"
        )
        lines.append(
            f"| {_cell(base['base'])} | {base['state']} | {base['memory_mb']:.0f} MB | {_cell(adapters)} | "
            f"{base['active_generations']} | {rows} | {base['idle_s']:.0f} s | {_cell(base.get('description', ''))} |"
        )
    return "\n".join(lines)


def _cell(text: str) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


def is_command(name: str, command: str | None, text: str) -> bool:
    """Command `name` (`status`, `export`): picked from Chainlit's command menu, or typed as `/name`."""
    return command == name or text.strip().lower() == f"/{name}"


def is_status_command(command: str | None, text: str) -> bool:
    """The `/status` command: picked from Chainlit's command menu, or typed as text."""
    return is_command(STATUS_COMMAND, command, text)


def export_text(message_count: int) -> str:
    """The message that carries the `/export` downloads (or says there is nothing yet)."""
    if not message_count:
        return "Nothing to export yet: ask something first, then type `/export`."
    return (
        f"This conversation ({message_count} messages) as Markdown and as JSON. Both are also kept with "
        "the chat, so they are here when you come back to it."
    )


# --------------------------------------------------------------------------------------------------
# Streaming an answer into a view


class AnswerView(Protocol):
    """Where an answer is shown (app.py: a Chainlit message with its preview element and file)."""

    async def show(self, markdown: str, *, final: bool) -> None:
        """Replace the message text; `final` on the last call."""

    async def show_preview(self, props: dict, *, final: bool) -> None:
        """Create or update the HtmlPreview element with these props."""

    async def offer_download(self, attachment: dict) -> None:
        """Attach a file (`render.download_attachment`'s keyword arguments)."""


@dataclass
class AnswerOutcome:
    text: str
    finish_reason: str | None
    html: str | None


def page_of_answer(text: str, *, partial: bool) -> str | None:
    """The page an html-task answer shows in its preview and download.

    The HTML document in the answer (`render.extract_html`); else a fragment, which `format_answer`
    fences as HTML (`<div>...` without `<html>`); else the whole answer: an html model is asked for
    a page, so what it wrote is shown as one, even when it is only text (the demo models' noise).
    """
    return (
        extract_html(text, partial=partial)
        or extract_html(format_answer("html", text, partial=partial), partial=partial)
        or (text.strip() or None)
    )


def _preview_title(html: str, fallback: str) -> str:
    return document_title(html) or fallback


async def stream_answer(
    reply: ChatReply,
    view: AnswerView,
    *,
    task: str,
    preview: bool = True,
    header: str = "",
    preview_id: str | None = None,
    max_rate_hz: float = UI_UPDATES_PER_SECOND,
    throttle: PreviewThrottle | None = None,
) -> AnswerOutcome:
    """Stream `reply` into `view`: text coalesced to at most `max_rate_hz` updates a second and
    formatted for the task at each update; for html answers a throttled live preview (when
    `preview`), then the final preview and a download. The last `show` carries the footer.

    Raises what iterating the reply raises (BadMessage for a prompt too long, GenerationError ...);
    text already shown is finalised first, marked as failed.
    """
    throttle = throttle or PreviewThrottle()
    fallback_title = f"{reply.model_id} answer"
    text = ""
    try:
        async for chunk in coalesce(reply, max_rate_hz):
            text += chunk
            shown = format_answer(task, text, partial=True)
            if shown:
                await view.show(header + shown, final=False)
            if task == "html" and preview:
                html = page_of_answer(text, partial=True)
                if html and throttle.due(html):
                    props = preview_props(
                        html, final=False, title=_preview_title(html, fallback_title), preview_id=preview_id
                    )
                    await view.show_preview(props, final=False)
    except BaseException as exc:
        if text and not isinstance(exc, asyncio.CancelledError):
            await view.show(header + format_answer(task, text) + "\n\n*The answer failed here.*", final=True)
        raise
    cut = reply.stats.finish_reason in ("cancelled", "length")
    body = format_answer(task, text) or "*(the model returned no text)*"
    await view.show(header + body + answer_footer(reply), final=True)
    html = page_of_answer(text, partial=cut) if task == "html" else None
    if html:
        title = _preview_title(html, fallback_title)
        if preview:
            throttle.due(html, final=True)
            await view.show_preview(
                preview_props(html, final=True, title=title, preview_id=preview_id), final=True
            )
        await view.offer_download(download_attachment(html, title=title))
    return AnswerOutcome(text, reply.stats.finish_reason, html)


# --------------------------------------------------------------------------------------------------
# Asyncio glue that does not need Chainlit


def status_callback(show: Callable[[str], Awaitable[Any]]) -> Callable[[str], None]:
    """A plain callback for `on_status` (called on the event loop) that runs the coroutine
    `show(text)`; tasks are kept referenced until done so none is garbage-collected early."""
    tasks: set[asyncio.Task] = set()

    def on_status(text: str) -> None:
        task = asyncio.ensure_future(show(text))
        tasks.add(task)
        task.add_done_callback(tasks.discard)

    return on_status


async def finish_even_if_cancelled(coro: Coroutine[Any, Any, Any], on_cancel: Callable[[], None]) -> Any:
    """Run `coro` in its own task and wait for it. If the caller is cancelled (Chainlit's stop
    button cancels the on_message task), call `on_cancel` (set the generation's stop event) and
    still wait until `coro` ends, so the partial answer is finalised and recorded; then the
    cancellation propagates.
    """
    task = asyncio.ensure_future(coro)
    try:
        return await asyncio.shield(task)
    except asyncio.CancelledError:
        on_cancel()
        # asyncio.wait never cancels the task it waits on, even if this wait is cancelled again.
        await asyncio.wait({task})
        raise
