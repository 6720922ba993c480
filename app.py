"""Babl's Chainlit hooks: UI glue only. What to show and how to react is decided in
`babl_core.web.ui`; answers come from the shared `ChatService` (`babl_core.web.runtime.service()`, the
same one the API uses); login and the tunnel are `babl_core.web.auth` and `babl_core.web.tunnel`; stored
conversations (resume, export, delete) are `babl_core.storage` and `babl_core.web.export`.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Awaitable, Callable

import chainlit as cl
from chainlit.input_widget import NumberInput, Select, Slider, Switch, TextInput
from chainlit.server import app as chainlit_app

from babl_core.engine.admission import Limits
from babl_core.engine.availability import default_model
from babl_core.engine.catalog import ModelSpec
from babl_core.storage import conversations, data_layer, schema
from babl_core.web import (
    auth,
    export,
    local_login,
    page_policy,
    session_files,
    stored_files,
    train_chat,
    train_ui,
    tunnel,
    ui,
)
from babl_core.web.api.routes import register_api
from babl_core.web.runtime import service

log = logging.getLogger("babl.app")

# The API (OpenAI-compatible routes and seed 003's endpoint) on Chainlit's own FastAPI app, ahead of
# its UI catch-all, so it shares this process's cache and generation path.
register_api(chainlit_app)
# The page loads nothing from other origins (an image in an answer cannot carry the chat away).
page_policy.install(chainlit_app)

HOST, PORT = ui.listen_address()
Limits.from_env()  # admission limits (BABL_MAX_*): a bad value stops the start here, with why

# --- login (DESIGN.md "Login"): decided once, at import; Chainlit allows one auth callback ---------
AUTH_MODE = auth.check_host_policy(HOST)  # a non-loopback host without BABL_AUTH stops here, with why
auth.auth_secret()

if AUTH_MODE == auth.AuthMode.PASSWORD:
    _USERS = auth.load_users()

    @cl.password_auth_callback
    async def password_login(username: str, password: str) -> cl.User | None:
        # scrypt costs ~50 ms of CPU per check: keep it off the event loop.
        if await asyncio.to_thread(_USERS.verify, username, password):
            return cl.User(identifier=username, metadata={"login": "password"})
        return None

else:

    def _the_local_user() -> cl.User:
        return cl.User(identifier=auth.LOCAL_USER, metadata={"login": str(AUTH_MODE)})

    @cl.header_auth_callback
    async def local_user(headers) -> cl.User:
        # Loopback (or BABL_ALLOW_ANONYMOUS=1): every visitor is the one local user, so chat
        # history works without a login page.
        return _the_local_user()

    # The pages carry that user's cookie, so a chat's URL opened in a new browser opens that chat.
    local_login.install(chainlit_app, _the_local_user)


# --- history (DESIGN.md "History") -----------------------------------------------------------------
# The schema is created or upgraded before serving: an unusable BABL_DB_URL stops the app here, with why.
schema.prepare_database()
stored_files.register_file_route(chainlit_app)
# Live sessions' files (downloads) in a folder of this instance's own: Chainlit removes `.files/` when
# any instance started from this folder stops.
session_files.use_own_files_dir()


@cl.data_layer
def history_data_layer() -> data_layer.BablDataLayer:
    return data_layer.open_data_layer(commands=ui.COMMAND_IDS)


# --- the tunnel ------------------------------------------------------------------------------------
@cl.on_app_startup
async def open_public_tunnel() -> None:
    result = await asyncio.to_thread(tunnel.open_tunnel, PORT)  # bounded by its own timeout
    for line in (
        f"Babl public URL (ngrok): {result.url}" if result.url else None,
        result.warning,
        result.error,
    ):
        if line:
            print(line, flush=True)


async def close_public_tunnel() -> None:
    await asyncio.to_thread(tunnel.close_tunnel)


@cl.on_app_shutdown
async def shut_down() -> None:
    # Chainlit takes one shutdown callback: the tunnel, then this instance's session files.
    await close_public_tunnel()
    await asyncio.to_thread(session_files.remove_files_dir)


# --- Chainlit glue -----------------------------------------------------------------------------------
STATE = "babl"
COMPARE = "compare_with_base"
WIDGETS = {"select": Select, "slider": Slider, "number": NumberInput, "text": TextInput, "switch": Switch}


class ChainlitAnswer:
    """`ui.AnswerView` on a Chainlit message.

    Streaming updates replace the whole text (`stream_token(..., is_sequence=True)`: the formatted
    Markdown changes as fences open and close, and unlike `update()` it writes nothing to a data
    layer 30 times a second); the last one is an `update()`. The preview element and the download
    are sent on their own, for this message: `Message.update()` would re-send every element in
    `message.elements` at each text update.
    """

    def __init__(self, author: str, turn: Callable[[], dict | None] | None = None) -> None:
        self.message = cl.Message(content="", author=ui.message_author(author))
        self._sent = False
        self._preview: cl.CustomElement | None = None
        self._turn = turn
        self.elements: list[cl.CustomElement | cl.File] = []  # the preview and the download, once sent

    async def show(self, markdown: str, *, final: bool) -> None:
        if final and self._turn is not None and (record := self._turn()) is not None:
            # The turn rides on the final write of this message: a resumed chat is rebuilt from it.
            self.message.metadata = {**(self.message.metadata or {}), conversations.TURN_KEY: record}
        if not self._sent:
            self.message.content = markdown
            await self.message.send()
            self._sent = True
        elif final:
            self.message.content = markdown
            await self.message.update()
        else:
            await self.message.stream_token(markdown, is_sequence=True)

    async def show_preview(self, props: dict, *, final: bool) -> None:
        if not self._sent:
            await self.show("", final=False)
        if self._preview is None:
            self._preview = cl.CustomElement(name="HtmlPreview", props=props, display="inline")
            await self._preview.send(for_id=self.message.id)
            self.elements.append(self._preview)
        else:
            self._preview.props = props
            self._preview.content = json.dumps(props)  # what a data layer stores
            await self._preview.update()

    async def offer_download(self, attachment: dict) -> None:
        download = cl.File(display="inline", **attachment)
        await download.send(for_id=self.message.id)
        self.elements.append(download)


def _state() -> ui.UiState | None:
    return cl.user_session.get(STATE)


def _client() -> str:
    # The admission queue's share is per logged-in user (the one local user without BABL_AUTH).
    user = cl.user_session.get("user")
    return f"user:{user.identifier}" if user is not None else "user:anonymous"


async def _listing() -> list[ui.ModelChoice]:
    # Discovery reads adapters from disk on every listing (new adapters appear without a restart).
    return await asyncio.to_thread(lambda: ui.model_choices(service().catalog.list()))


async def _send_settings(state: ui.UiState, choices: list[ui.ModelChoice]) -> None:
    widgets = []
    for spec in ui.settings_widgets(choices, state):
        kind = spec.pop("kind")
        widgets.append(WIDGETS[kind](**spec))
    await cl.ChatSettings(widgets).send()
    state.listing = ui.listing_key(choices)
    # A restart keeps the model and settings in effect.
    await conversations.save_settings(ui.settings_snapshot(state))


async def _new_state(choices: list[ui.ModelChoice]) -> ui.UiState | None:
    default = await asyncio.to_thread(default_model, service().catalog)
    choice = ui.default_choice(choices, default)
    if choice is None:
        return None
    state = ui.UiState.for_model(choice.spec)
    cl.user_session.set(STATE, state)
    await _send_settings(state, choices)
    return state


async def _error(text: str) -> None:
    await cl.ErrorMessage(content=text, author="Babl").send()


def _specs(choices: list[ui.ModelChoice]) -> list[ModelSpec]:
    return [choice.spec for choice in choices]


async def _load(
    state: ui.UiState, spec: ModelSpec, choices: list[ui.ModelChoice]
) -> tuple[str | None, str | None]:
    """Load `spec` (an entry of `choices`, the listing this request read) for the session inside a
    status step. The caller holds `state.model_lock`.

    Returns:
        (describe(), None) when loaded (the session now uses it), else (None, why not): the session
        keeps its previous model.
    """
    # Chainlit titles a step "Using <name>" while it runs and "Used <name>" when done.
    async with cl.Step(name=f"loader for {spec.id}", type="tool", show_input=False) as step:
        step.output = f"Loading {spec.display_label}…"
        await step.update()
        on_status = ui.status_callback(lambda text: step.stream_token(f"\n{text}"))
        try:
            description = await service().switch_model(
                state.chat, spec.id, on_status=on_status, listing=_specs(choices)
            )
        except Exception as exc:
            # Shown to the user; the traceback goes to the server log.
            log.exception("loading %s failed", spec.id)
            step.is_error = True
            step.output = f"Failed: {exc}"
            return None, str(exc)
        step.output = description
    return description, None


@cl.on_chat_start
async def start_chat() -> None:
    await cl.context.emitter.set_commands(ui.COMMANDS + train_ui.COMMANDS)
    choices = await _listing()
    state = await _new_state(choices)
    choice = ui.find_choice(choices, state.chat.model_id) if state else None
    await cl.Message(content=ui.welcome_text(choice, choices, public_url=tunnel.tunnel_url())).send()
    await train_chat.show_active()  # a run of this user's still training: its progress, here too


@cl.on_chat_resume
async def resume_chat(thread: dict) -> None:
    # Chainlit shows the stored messages; the session gets back its conversation, model and settings.
    await cl.context.emitter.set_commands(ui.COMMANDS + train_ui.COMMANDS)
    choices = await _listing()
    default = await asyncio.to_thread(default_model, service().catalog)
    state, notes = ui.resumed_state(thread, choices, ui.default_choice(choices, default))
    if state is None:
        await _error("\n\n".join(notes))
        return
    cl.user_session.set(STATE, state)
    # Re-sent with the stored values: the widgets' initial values become the session's settings.
    await _send_settings(state, choices)
    if notes:
        await cl.Message(content="\n\n".join(notes), author="Babl").send()


@cl.on_settings_update
async def update_settings(values: dict) -> None:
    state = _state()
    if state is None:
        return
    async with state.model_lock:  # a message sent meanwhile waits, then uses what is set here
        await _update_settings(state, values)


async def _update_settings(state: ui.UiState, values: dict) -> None:
    choices = await _listing()
    change = ui.read_settings(values, state, choices)
    ui.apply_settings(state, change)
    notes = [*change.problems, *([change.refused] if change.refused else [])]
    if change.model_id:
        previous = ui.find_choice(choices, state.chat.model_id)
        new = ui.find_choice(choices, change.model_id).spec
        description, failure = await _load(state, new, choices)
        if failure:
            notes.append(
                f"Could not switch to `{new.id}`: {failure}\n\nStill answering with `{state.chat.model_id}`."
            )
        else:
            changed, kept = ui.settings_for_new_model(state, new)
            task_changed = previous is None or previous.spec.task != new.task
            notes.append(
                ui.switched_text(new, description, task_changed=task_changed, changed=changed, kept=kept)
            )
    # Always re-sent: the widgets then show what is in effect (a refused model, a rejected value,
    # the new model's defaults).
    await _send_settings(state, choices)
    if notes:
        await cl.Message(content="\n\n".join(notes), author="Babl").send()


@cl.on_message
async def answer(message: cl.Message) -> None:
    svc = service()
    training, rest = train_chat.command_of(message.command, message.content)  # /train, /jobs
    command = training or ui.command_of(message.command, message.content)
    if command:
        if not message.content.strip():
            # Picked from the command menu, the message is empty: an empty pill in the chat. Say
            # which command it was (the history stores it so too: BablDataLayer.create_step).
            message.content = f"/{command}"
            await message.update()
        state = _state()
        if state is not None and not state.named_by:
            state.named_by = "command"
        if training == train_ui.TRAIN_COMMAND:
            await train_chat.train(rest, [e for e in message.elements if getattr(e, "path", None)])
        elif training == train_ui.JOBS_COMMAND:
            await train_chat.jobs_list()
        elif command == ui.STATUS_COMMAND:
            status = await asyncio.to_thread(svc.status)
            names = ui.status_names(await asyncio.to_thread(svc.catalog.list))
            await cl.Message(content=ui.status_markdown(status, names), author="Babl").send()
        else:
            await _export(state)
        return
    choices = await _listing()
    state = _state() or await _new_state(choices)
    if state is None:
        await _error(ui.welcome_text(None, choices, public_url=None))
        return
    if state.named_by != "question":
        # Chainlit names a thread after its first message; when that was a command, the first
        # question names it instead.
        if state.named_by == "command":
            await conversations.name_thread(conversations.title_of(message.content))
        state.named_by = "question"
    if ui.listing_key(choices) != state.listing:
        await _send_settings(state, choices)  # a new adapter or model: shown at the next message
    state.begin_turn(message.id)  # an edited message rewinds the conversation to before it
    stop_event = state.new_stop_event()
    await ui.finish_even_if_cancelled(
        _answer_turn(state, message.content, message.id, choices), stop_event.set
    )


def _status_message() -> Callable[[str], Awaitable[None]]:
    message: cl.Message | None = None

    async def show(note: str) -> None:
        nonlocal message
        if message is None:
            message = cl.Message(content=f"*{note}…*", author="Babl")
            await message.send()
        else:
            message.content = f"*{note}…*"
            await message.update()

    return show


async def _export(state: ui.UiState | None) -> None:
    count = len(state.chat.messages) if state else 0
    files = []
    if state and count:
        tasks = export.model_tasks(await asyncio.to_thread(service().catalog.list))
        attachments = export.export_attachments(state.chat, preview=state.preview, tasks=tasks)
        files = [cl.File(display="inline", **attachment) for attachment in attachments]
    await cl.Message(content=ui.export_text(count), author="Babl", elements=files).send()
    await conversations.store_elements(files)


async def _answer_turn(state: ui.UiState, text: str, message_id: str, choices: list[ui.ModelChoice]) -> None:
    """Answer `text` with the session's model, an entry of `choices` (the listing this message read:
    the turn reads the catalog once)."""
    svc = service()
    try:
        # The model is picked after a switch in progress ends, and kept until the answer holds its
        # place: a settings change racing the message cannot swap the model under it.
        async with state.model_lock:
            if ui.find_choice(choices, state.chat.model_id) is None:
                choices = await _listing()  # switched to an adapter newer than this message's listing
            # Before any load: an empty or huge message, or a model gone, fails at once.
            turn = svc.check_turn(state.chat, text, _specs(choices))
            if not await asyncio.to_thread(svc.is_ready, turn.spec):
                _, failure = await _load(state, turn.spec, choices)
                if failure:
                    await _error(f"{failure}\n\nPick another model in the settings.")
                    return
            # Waits are reported (a place in the admission queue, every model slot busy, another
            # request loading this base) in one message that changes, not a new message for each.
            on_status = ui.status_callback(_status_message())
            reply = svc.respond(
                state.chat, turn, stop_event=state.stop_event, on_status=on_status, client=_client()
            )
    except ui.USER_ERRORS as exc:
        await _error(ui.error_text(exc))
        return
    spec = reply.spec
    await _remove_compare_button(state)
    view = ChainlitAnswer(
        author=reply.model_id, turn=lambda: ui.turn_record(state.chat, reply, question_id=message_id)
    )
    try:
        await ui.stream_answer(reply, view, task=spec.task, preview=state.preview, preview_id=view.message.id)
    except ui.USER_ERRORS as exc:
        await _error(ui.error_text(exc))
        return
    # Stored before the turn ends (Chainlit's own writes are background tasks): a restart right
    # after the answer loses nothing.
    await conversations.store_message(view.message.to_dict())
    await conversations.store_elements(view.elements)
    await conversations.save_settings(ui.settings_snapshot(state))
    if spec.adapter:
        action = cl.Action(
            name=COMPARE,
            payload={"answer": state.answers},
            label="Compare with base",
            tooltip="The same prompt on the base model without the adapter",
            icon="git-compare",
        )
        await action.send(for_id=view.message.id)
        state.compare_action = action


async def _remove_compare_button(state: ui.UiState) -> None:
    # Compare always re-asks the latest question, so only the latest answer carries the button.
    if state.compare_action is not None:
        await state.compare_action.remove()
        state.compare_action = None


@cl.action_callback(COMPARE)
async def compare_with_base(action: cl.Action) -> None:
    state = _state()
    if state is None:
        return
    if action.payload.get("answer") != state.answers:
        await _error("Compare works on the latest answer only: ask again to compare a new answer.")
        return
    await _compare(state)


async def _compare(state: ui.UiState) -> None:
    await _remove_compare_button(state)
    stop_event = state.new_stop_event()
    await cl.context.emitter.task_start()  # action callbacks get no stop button by themselves
    try:
        reply = service().compare_with_base(state.chat, stop_event=stop_event, client=_client())
        view = ChainlitAnswer(author=reply.model_id)
        await ui.stream_answer(
            reply,
            view,
            task=reply.spec.task,
            preview=state.preview,
            header=f"**The same prompt on the base model, {reply.model_id}, without the adapter:**\n\n",
            preview_id=view.message.id,
        )
    except ui.USER_ERRORS as exc:
        await _error(ui.error_text(exc))
    finally:
        await cl.context.emitter.task_end()


# --- training from the chat (babl_core.web.train_chat) -------------------------------------------------
@cl.action_callback(train_chat.STOP_ACTION)
async def stop_training(action: cl.Action) -> None:
    await train_chat.stop_job(action)


@cl.action_callback(train_chat.RESUME_ACTION)
async def resume_training(action: cl.Action) -> None:
    await train_chat.resume_job(action)


async def _switch_to(model_id: str) -> tuple[ui.UiState, list[ui.ModelChoice]] | None:
    """Switch this chat to `model_id` as the settings' dropdown would (the listing finds new adapters).
    Returns the session and the listing read, or None when the switch failed (the user was told)."""
    choices = await _listing()
    state = _state() or await _new_state(choices)
    choice = ui.find_choice(choices, model_id)
    if state is None or choice is None:
        await _error(f"`{model_id}` is not in the model list (was its folder removed?).")
        return None
    async with state.model_lock:
        previous = ui.find_choice(choices, state.chat.model_id)
        description, failure = await _load(state, choice.spec, choices)
        if failure:
            await _error(f"Could not switch to `{model_id}`: {failure}")
            return None
        changed, kept = ui.settings_for_new_model(state, choice.spec)
    task_changed = previous is None or previous.spec.task != choice.spec.task
    await _send_settings(state, choices)
    text = ui.switched_text(choice.spec, description, task_changed=task_changed, changed=changed, kept=kept)
    await cl.Message(content=text, author="Babl").send()
    return state, choices


@cl.action_callback(train_chat.CHAT_ACTION)
async def chat_with_adapter(action: cl.Action) -> None:
    await _switch_to(action.payload["model"])


@cl.action_callback(train_chat.COMPARE_ACTION)
async def compare_adapter(action: cl.Action) -> None:
    # The adapter answers the task's example question, then the base the same prompt (Compare with base).
    switched = await _switch_to(action.payload["model"])
    if switched is None:
        return
    state, choices = switched
    question = train_ui.example_question(action.payload.get("task"))
    asked = await cl.Message(content=f"Asking it: *{question}*", author="Babl").send()
    state.begin_turn(asked.id)
    state.new_stop_event()
    await _answer_turn(state, question, asked.id, choices)
    if state.compare_action is not None:
        await _compare(state)


@cl.on_stop
async def stop_answer() -> None:
    # Chainlit cancels the on_message task but not the generation thread: this event ends it.
    state = _state()
    if state is not None:
        state.stop()


@cl.on_chat_end
async def end_chat() -> None:
    state = _state()
    if state is not None:
        state.stop()  # a closed tab stops its answer too
