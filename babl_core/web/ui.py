"""What the chat UI shows and how it reacts, without importing Chainlit.

`app.py` is the Chainlit glue: it turns the widget specs built here into `cl.input_widget` objects,
implements `AnswerView` with `cl.Message` / `cl.CustomElement` / `cl.File`, and calls these
functions from its hooks. Everything that can be decided without a browser lives here so it can be
unit-tested: the settings widgets (model dropdown with availability, sampling, system prompt, HTML
preview switch), reading a settings submit, the per-session UI state (stop event, edit rewind), the
answer's label, the stream → message/preview loop, and what a session keeps in the history and gets
back from it on resume (`turn_record`, `settings_snapshot`, `resumed_state`).
"""

from __future__ import annotations

import asyncio
import math
import os
import re
import threading
from collections.abc import Awaitable, Callable, Coroutine, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol

from babl_core.engine import words
from babl_core.engine.admission import ServerBusy
from babl_core.engine.availability import availability
from babl_core.engine.cache import ModelBusy, base_ref
from babl_core.engine.catalog import Availability, GenerationDefaults, ModelSpec, UnknownModel
from babl_core.engine.generation import GenerationError
from babl_core.engine.generation_settings import SETTINGS, Setting
from babl_core.engine.loaded import ModelUnavailable
from babl_core.engine.service import BadMessage, ChatReply, ChatSession, coalesce
from babl_core.storage.conversations import record_prompts, stored_conversation
from babl_core.web.render import (
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

GENERATION_KEYS = (TEMPERATURE, TOP_P, MAX_NEW_TOKENS)  # the settings the chat shows, in this order
# Bounds and help come from the one definition of each setting (`generation_settings.SETTINGS`).
MAX_NEW_TOKENS_LIMIT = SETTINGS[MAX_NEW_TOKENS].maximum
TEMPERATURE_MAX = SETTINGS[TEMPERATURE].maximum
TOP_P_MIN = SETTINGS[TOP_P].step  # the slider's lowest stop: top p must stay above 0
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
COMMAND_IDS = tuple(command["id"] for command in COMMANDS)

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


UNUSABLE_MARK = "\n"  # an unusable entry's label: its name, then this, then "<word>: <reason>"


def model_choices(specs: Iterable[ModelSpec]) -> list[ModelChoice]:
    """Dropdown entries for `specs` (a `Catalog.list()`), in catalog order.

    Servable entries are labelled with `display_label` (task, quantization, "demo — random weights").
    The others add, on a second line (`UNUSABLE_MARK`), their availability word and the whole
    reason, so nobody picks one unknowingly; `public/babl.js` shows those entries disabled, with the
    reason wrapped inside the dialog. Entries whose labels would be the same (several runs of one
    recipe) each name their id, so every label is unique: Chainlit's Select maps label → value.
    """
    specs = list(specs)
    counts: dict[str, int] = {}
    for spec in specs:
        counts[spec.display_label] = counts.get(spec.display_label, 0) + 1
    choices: list[ModelChoice] = []
    seen: set[str] = set()
    for spec in specs:
        avail = availability(spec)
        label = spec.display_label
        if counts[label] > 1:
            label = f"{label} · {spec.id}"
        if label in seen:  # two entries with one id cannot both be listed; keep the labels unique anyway
            label = f"{label} ({len(seen)})"
        seen.add(label)
        if not avail.servable:
            label = f"{label}{UNUSABLE_MARK}{avail.word}: {avail.reason}"
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
        user_set: Generation settings the user changed in this chat: a model switch keeps them,
            while the others take the new model's defaults.
        named_by: What named the chat's thread: "" (no message yet), "command" (Chainlit named
            it after a command, so the first question renames it) or "question".
        model_lock: Held while the session switches model, and while a message picks the model
            that answers it: Chainlit runs a settings change and a message concurrently, and a
            message sent during a switch is answered by the model switched to.
    """

    chat: ChatSession
    preview: bool = True
    listing: tuple = ()
    marks: dict[str, int] = field(default_factory=dict)
    stop_event: threading.Event = field(default_factory=threading.Event)
    compare_action: Any = None
    user_set: set[str] = field(default_factory=set)
    named_by: str = ""
    model_lock: asyncio.Lock = field(default_factory=asyncio.Lock)

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
        model_help += " Greyed-out entries cannot be used on this machine; each one says why."
    return [
        {
            "kind": "select",
            "id": MODEL,
            "label": "Model",
            "items": {c.label: c.id for c in choices},
            "initial_value": state.chat.model_id if find_choice(choices, state.chat.model_id) else None,
            "description": model_help,
        },
        *(setting_widget(SETTINGS[key], current[key]) for key in GENERATION_KEYS),
        {
            "kind": "text",
            "id": SYSTEM_PROMPT,
            "label": "System prompt",
            "initial": state.chat.system_prompt,
            "placeholder": "e.g. You write concise, commented code.",
            "multiline": True,
            "description": "Sent first to models that take one; others ignore it (with a note).",
        },
        {
            "kind": "switch",
            "id": HTML_PREVIEW,
            "label": "HTML preview",
            "initial": state.preview,
            "description": "Render generated HTML in a sandboxed frame (no scripts, no network).",
        },
    ]


def setting_widget(setting: Setting, value: Any) -> dict[str, Any]:
    """The widget spec of one generation setting, from its definition (bounds, label, help)."""
    if setting.widget == "slider":
        low = setting.minimum + (setting.step if setting.above_minimum else 0)
        return {"kind": "slider", "id": setting.name, "label": setting.label, "initial": float(value),
                "min": low, "max": setting.maximum, "step": setting.step, "description": setting.help}  # fmt: skip
    bounds = f"{setting.minimum:g} to {setting.maximum:g}"
    return {"kind": "number", "id": setting.name, "label": setting.label, "initial": int(value),
            "placeholder": bounds, "description": f"{setting.help} ({bounds})"}  # fmt: skip


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

    for key in GENERATION_KEYS:
        setting = SETTINGS[key]
        raw = values.get(key, current[key])
        number = _number(raw)
        value, problem = setting.parse(number) if number is not None else (None, "not a number")
        if problem:
            problems.append(f"{setting.label} {raw!r} is not valid: use {setting.bounds_text()}.")
            value = current[key]
        settings[key] = round(float(value), 4) if setting.kind == "float" else int(value)

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
    state.user_set |= change.touched
    state.chat.system_prompt = change.system_prompt
    state.preview = change.preview


@dataclass(frozen=True)
class SettingChange:
    """One generation setting as a model switch left it."""

    key: str
    before: Any
    after: Any

    @property
    def name(self) -> str:
        return self.key.replace("_", " ")


def settings_for_new_model(
    state: UiState, spec: ModelSpec
) -> tuple[list[SettingChange], list[SettingChange]]:
    """After a switch to `spec`: settings the user changed in this chat (`state.user_set`) keep their
    value; every other one takes the new entry's default (DESIGN.md: defaults come from the entry).

    Returns:
        (changed, kept): the settings whose value changed to the new default, and the user's values
        that were kept although the new entry's default differs — for the switch message.
    """
    changed: list[SettingChange] = []
    kept: list[SettingChange] = []
    for key, default in entry_settings(spec).items():
        current = state.chat.settings.get(key)
        if key in state.user_set:
            if current != default:
                kept.append(SettingChange(key, current, default))
        elif current != default:
            state.chat.settings[key] = default
            changed.append(SettingChange(key, current, default))
    return changed, kept


def _value(value: Any) -> str:
    return f"{value:g}" if isinstance(value, float) else str(value)


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


def switched_text(
    spec: ModelSpec,
    description: str,
    *,
    task_changed: bool,
    changed: Iterable[SettingChange] = (),
    kept: Iterable[SettingChange] = (),
) -> str:
    """The message after a switch: the new model, what was loaded (`describe()`), each setting the
    switch changed (to the new model's default) or kept (the user's value), and the task's hint."""
    text = f"Now answering with {model_line(spec)} — {description}. The conversation is kept."
    lines = [f"- {c.name} {_value(c.before)} → {_value(c.after)}, the new model's default" for c in changed]
    lines += [
        f"- {c.name} stays {_value(c.before)}, your setting (the new model's default is {_value(c.after)})"
        for c in kept
    ]
    if lines:
        text += "\n\n" + "\n".join(lines)
    if task_changed:
        text += f"\n\n{task_hint(spec.task)}"
    return text


_NOT_IN_AVATAR_NAMES = re.compile(r"[^A-Za-z0-9_ .-]+")


def message_author(name: str) -> str:
    """A message's author as Chainlit can show it: the browser fetches `/avatars/<author>`, which
    answers 400 for any character outside letters, digits, `_`, space, `.` and `-`."""
    return _NOT_IN_AVATAR_NAMES.sub("-", name).strip() or "Babl"


def answer_footer(reply: ChatReply) -> str:
    """The small label under an answer: which model wrote it, its speed, how it ended, and notes
    (history trimmed, system prompt ignored)."""
    stats = reply.stats
    parts = [
        f"`{reply.model_id}`",
        words.count(stats.completion_tokens, "token"),
        f"{stats.tokens_per_second:.0f} tokens/s",
    ]
    if stats.finish_reason == "cancelled":
        parts.append("stopped")
    elif stats.finish_reason == "length":
        parts.append(f"reached max new tokens ({reply.params.max_new_tokens})")
    notes = "".join(f"\n\n> Note: {note}." for note in reply.notes)
    return f"{notes}\n\n*{' · '.join(parts)}*"


USER_ERRORS = (BadMessage, ModelUnavailable, ModelBusy, ServerBusy, UnknownModel, GenerationError, ValueError)


def error_text(exc: BaseException) -> str:
    """What the user reads when an answer cannot be given; the session stays usable."""
    if isinstance(exc, BadMessage):
        return str(exc)
    if isinstance(exc, ModelUnavailable | UnknownModel):
        return f"{exc}. Pick another model in the settings."
    if isinstance(exc, ModelBusy | ServerBusy):
        return str(exc)
    if isinstance(exc, GenerationError):
        cause = exc.__cause__ or exc
        return f"The model failed while answering ({type(cause).__name__}: {cause}). Try again or pick another model."
    return f"A setting is not valid: {exc}. Change it in the settings."


def status_names(specs: Iterable[ModelSpec]) -> dict[str, list[str]]:
    """What `/status` calls each loaded base and adapter: the ids of the catalog entries that serve
    it (a base shared by several entries lists them all), keyed as `ChatService.status()` names
    them (the base's hub id or absolute folder, the adapter's reference)."""
    names: dict[str, list[str]] = {}
    for spec in specs:
        if spec.backend != "local":
            continue
        key = spec.adapter if spec.adapter else base_ref(spec)
        names.setdefault(key, []).append(spec.id)
    return names


def _model_name(ref: str, names: dict[str, list[str]]) -> str:
    # Never an absolute path: an unknown base or adapter shows the last part of its name.
    return ", ".join(names.get(ref) or [ref.rstrip("/").rsplit("/", 1)[-1] or ref])


def status_markdown(status: dict, names: dict[str, list[str]] | None = None) -> str:
    """`/status`: `ChatService.status()` for the chat. Models by their ids (`status_names`), a narrow
    table that fits the message column (model, adapters, answers running and waiting, memory), then
    one wrapped line per model with how it is loaded and its batch. Counts only: nobody's name or
    question. `engine.service.format_status` is the same for a terminal."""
    names = names or {}
    running = status.get("active_generations", 0)
    remote = status.get("remote_active_generations", 0)
    queue = status.get("queue", 0)
    lines = [
        f"**Answers running:** {running}"
        + (f" ({remote} remote)" if remote else "")
        + f" · **waiting:** {queue}"
        + (
            f" ({status.get('waiting_for_load', 0)} for a model to load, "
            f"{status.get('waiting_to_join', 0)} for a place in a batch)"
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
    lines += ["", "| model | adapters | running | waiting | memory |", "|---|---|---:|---:|---:|"]
    details = []
    for base in bases:
        model = _model_name(base["base"], names)
        adapters = ", ".join(_model_name(ref, names) for ref in base.get("adapters", [])) or "—"
        batch = base.get("batch")
        waiting = batch["waiting"] if batch else 0
        lines.append(
            f"| {_cell(model)} | {_cell(adapters)} | {base['active_generations']} | {waiting} | "
            f"{base['memory_mb']:.0f} MB |"
        )
        detail = f"- **{_cell(model)}**: {base['state']}"
        if base.get("description"):
            detail += f", {base['description']}"
        if batch:
            detail += f" · batch: {batch['active_rows']} of {batch['max_rows']} rows decoding"
        detail += f" · idle {base['idle_s']:.0f} s"
        details.append(detail)
    return "\n".join([*lines, "", *details])


def _cell(text: str) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


def is_command(name: str, command: str | None, text: str) -> bool:
    """Command `name` (`status`, `export`): picked from Chainlit's command menu, or typed as `/name`."""
    return command == name or text.strip().lower() == f"/{name}"


def command_of(command: str | None, text: str) -> str | None:
    """The Babl command a message runs (`status`, `export`), or None for a question."""
    return next((c["id"] for c in COMMANDS if is_command(c["id"], command, text)), None)


def is_status_command(command: str | None, text: str) -> bool:
    """The `/status` command: picked from Chainlit's command menu, or typed as text."""
    return is_command(STATUS_COMMAND, command, text)


def export_text(message_count: int) -> str:
    """The message that carries the `/export` downloads (or says there is nothing yet)."""
    if not message_count:
        return "Nothing to export yet: ask something first, then type `/export`."
    return (
        f"This conversation ({words.count(message_count, 'message')}) as Markdown and as JSON. Both are also kept with "
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
    `preview`), then the final preview with its download button, or without a preview a download
    file. The last `show` carries the footer.

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
        # One download control per answer: the preview's own button when the preview is shown (it
        # is stored with the chat, so a resumed chat has it too), else a file.
        if preview:
            throttle.due(html, final=True)
            await view.show_preview(
                preview_props(html, final=True, title=title, preview_id=preview_id), final=True
            )
        else:
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


# --------------------------------------------------------------------------------------------------
# What a session stores in the history, and a session rebuilt from it


def turn_record(chat: ChatSession, reply: ChatReply, *, question_id: str) -> dict | None:
    """The turn `reply` just added to `chat`, as kept in the answer step's metadata (`TURN_KEY`).

    Holds what the next prompt needs (the question, the model's raw answer rather than the formatted
    message, the model id), so a resumed chat rebuilds its history from these alone; with
    `BABL_RECORD_PROMPTS=1` also the prompt the model was given.

    Returns:
        None when the reply was not recorded in `chat` (it failed, or it is a comparison).
    """
    if (
        reply.session is not chat
        or not reply.record
        or not reply.finished
        or reply.stats.finish_reason == "error"
    ):
        return None
    if len(chat.messages) < 2 or chat.messages[-1]["role"] != "assistant":
        return None
    question, answer = chat.messages[-2], chat.messages[-1]
    record = {
        "question_id": question_id,
        "question": question["content"],
        "answer": answer["content"],
        "model": answer.get("model", reply.spec.id),
        "stopped": bool(answer.get("stopped")),
        "prompt_tokens": reply.stats.prompt_tokens,
        "completion_tokens": reply.stats.completion_tokens,
    }
    if record_prompts() and reply.prompt is not None:
        record["prompt"] = reply.prompt.text
    return record


def settings_snapshot(state: UiState) -> dict:
    """The session's settings under the settings widgets' ids (the shape of Chainlit's
    `chat_settings`), kept in the thread's metadata under `SESSION_KEY`."""
    snapshot = {MODEL: state.chat.model_id}
    snapshot.update({key: state.chat.settings[key] for key in GENERATION_KEYS if key in state.chat.settings})
    snapshot[SYSTEM_PROMPT] = state.chat.system_prompt
    snapshot[HTML_PREVIEW] = state.preview
    return snapshot


def resumed_state(
    thread: Mapping[str, Any], choices: list[ModelChoice], default: ModelChoice | None
) -> tuple[UiState | None, list[str]]:
    """The session state of a resumed thread: its messages, model and settings.

    A stored model that is gone or cannot be served here any more is replaced by `default` (the
    conversation is kept and the note says so); invalid stored values keep the entry's defaults.

    Returns:
        (state, notes for the user). state is None when no model at all can be served.
    """
    conversation = stored_conversation(thread)
    values = conversation.settings
    last_model = next((m.get("model") for m in reversed(conversation.messages) if m.get("model")), None)
    wanted = values.get(MODEL) or last_model
    choice = find_choice(choices, wanted) if isinstance(wanted, str) else None
    notes: list[str] = []
    if choice is None or not choice.servable:
        if default is None:
            return None, [welcome_text(None, choices, public_url=None)]
        why = (
            f"{choice.availability.word}: {choice.availability.reason}"
            if choice
            else "it is not in the catalog"
        )
        notes.append(
            f"This chat was using `{wanted}`, which cannot be used here now ({why}). The conversation is "
            f"kept; answering with {model_line(default.spec)}. Pick another model in the settings."
        )
        choice = default
    state = UiState.for_model(choice.spec)
    change = read_settings({k: v for k, v in values.items() if k != MODEL}, state, choices)
    apply_settings(state, change)
    notes += [f"Stored setting not restored: {problem}" for problem in change.problems]
    state.chat.messages = conversation.messages
    state.marks = conversation.marks
    state.named_by = "question"  # a listed thread has its name
    if thread.get("id"):
        state.chat.id = str(thread["id"])
    return state, notes
