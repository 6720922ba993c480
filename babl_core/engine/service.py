"""Chat sessions and the one generation path shared by the app, the API and the CLI.

`ChatSession` is plain data (the model id, the messages, settings, the system prompt). `ChatService`
turns a session plus a new message into a stream of text chunks: catalog → cache → prompt style →
generator. It knows nothing about Chainlit or HTTP.
"""

from __future__ import annotations

import asyncio
import threading
import time
import uuid
import weakref
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field, replace
from typing import Any

from babl_core.engine import generation_settings, words
from babl_core.engine.admission import Admission, Ticket
from babl_core.engine.availability import availability
from babl_core.engine.batching import stream as default_stream
from babl_core.engine.cache import ModelCache, base_ref
from babl_core.engine.catalog import Catalog, ModelSpec
from babl_core.engine.generation import GenerationParams, GenerationStats
from babl_core.engine.loaded import LoadedModel, ModelUnavailable
from babl_core.engine.prompts import (
    Prompt,
    PromptTooLong,
    build_prompt,
    count_tokens,
    get_style,
    with_default_system,
)
from babl_core.engine.remote import RemoteStream

MAX_MESSAGE_CHARS = 100_000  # ~25k tokens: more than any catalog model's context; stops 1 MB pastes early
SETTING_NAMES = generation_settings.NAMES


@dataclass(frozen=True)
class ChatTurn:
    """A chat message `ChatService.check_turn` checked, with the catalog entry that answers it."""

    text: str
    spec: ModelSpec


class BadMessage(ValueError):
    """The user's message cannot be sent (empty, too long for the model's context)."""


def check_text(text: str, what: str) -> str:
    """`text` unless it cannot be encoded: a lone surrogate (`"\\ud800"`, which JSON allows) makes the
    tokenizer raise deep inside generation; refuse it up front with a message users can act on.

    Raises:
        BadMessage: the text holds a lone surrogate.
    """
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise BadMessage(
            f"{what} contains an invalid character at position {exc.start} (a lone UTF-16 surrogate such as "
            "\\ud800, which is not text). Remove it or send the text as valid UTF-8."
        ) from None
    return text


@dataclass
class ChatSession:
    """One conversation. Assistant messages carry the id of the model that wrote them."""

    model_id: str
    messages: list[dict] = field(default_factory=list)
    settings: dict[str, Any] = field(default_factory=dict)
    system_prompt: str = ""
    id: str = field(default_factory=lambda: uuid.uuid4().hex)

    def history(self) -> list[dict]:
        """Role/content dicts for prompt rendering (the system prompt first when set)."""
        out = [{"role": "system", "content": self.system_prompt}] if self.system_prompt.strip() else []
        out += [{"role": m["role"], "content": m["content"]} for m in self.messages]
        return out

    def to_dict(self) -> dict:
        return {
            "id": self.id,
            "model_id": self.model_id,
            "messages": [dict(m) for m in self.messages],
            "settings": dict(self.settings),
            "system_prompt": self.system_prompt,
        }

    @classmethod
    def from_dict(cls, data: dict) -> ChatSession:
        return cls(
            model_id=data["model_id"],
            messages=[dict(m) for m in data.get("messages", [])],
            settings=dict(data.get("settings", {})),
            system_prompt=data.get("system_prompt", ""),
            id=data.get("id") or uuid.uuid4().hex,
        )


class ChatReply:
    """An async iterator of text chunks for one answer, plus what is known about it.

    `notes` (trimmed history, ignored system prompt) and `model` are set before the first chunk;
    `stats` and `text` are complete when iteration ends. `stop()` ends it early; the partial answer
    is kept.
    """

    def __init__(self, service: ChatService, session: ChatSession | None, spec: ModelSpec, messages: list[dict],
                 params: GenerationParams, *, record: bool, use_adapter: bool = True,
                 stop_event: threading.Event | None = None, on_status: Callable[[str], None] | None = None,
                 raw: bool = False):  # fmt: skip
        self.service = service
        self.session = session
        self.spec = spec
        self.messages = messages
        self.params = params
        self.record = record
        self.use_adapter = use_adapter
        self.stop_event = stop_event or threading.Event()
        self.on_status = on_status
        self.raw = raw  # True: the last message's content is the prompt as is (no prompt style)
        self.notes: list[str] = []
        self.prompt: Prompt | None = None
        self.text = ""
        self.stats = GenerationStats()
        self.description = ""
        self.finished = False
        self.ticket: Ticket | None = None  # its place in the admission queue (None: not gated)
        self._iterated = False

    def hold(self, ticket: Ticket) -> None:
        """Gate this reply on `ticket`: it waits for a running slot when first iterated, and gives the
        slot back when it ends, or when it is dropped without ever being iterated."""
        self.ticket = ticket
        weakref.finalize(self, ticket.release)

    def _show_position(self, ahead: int) -> None:
        if self.on_status is not None:
            where = "you are next" if ahead == 0 else f"{ahead} ahead of you"
            self.on_status(f"Busy: {where}")

    @property
    def model_id(self) -> str:
        """The model that writes this answer: the entry's id, or for a comparison without the
        adapter the base model's name (`ChatService.base_name`)."""
        return self.spec.id if self.use_adapter else self.service.base_name(self.spec)

    def stop(self) -> None:
        self.stop_event.set()

    @property
    def stopped(self) -> bool:
        return self.stats.finish_reason == "cancelled"

    def __aiter__(self) -> AsyncIterator[str]:
        if self._iterated:
            raise RuntimeError("a ChatReply can be iterated once")
        self._iterated = True
        return self._run()

    async def _run(self) -> AsyncIterator[str]:
        try:
            if self.ticket is not None:  # wait for a running slot (the chat shows the place in line)
                await self.ticket.wait(self._show_position)
            service = self.service
            remote = self.spec.backend == "openai"
            loaded: LoadedModel | None = None
            if not remote:
                loop = asyncio.get_running_loop()
                status = self.on_status
                loaded = await _acquire(
                    service.cache,
                    self.spec,
                    use_adapter=self.use_adapter,
                    on_wait=(lambda msg: loop.call_soon_threadsafe(status, msg)) if status else None,
                )
            restarted = None
            if loaded is not None and loaded.plan.engine == "llama.cpp":
                try:  # a llama-server that died is started again (seconds: not on the event loop)
                    restarted = await asyncio.to_thread(loaded.model.ensure_running)
                except BaseException:
                    await asyncio.to_thread(service.cache.release, loaded)
                    raise
            service._generation_started(remote=remote)
            try:
                if remote:
                    gen = self._start_remote()
                else:
                    # Rendering and trimming tokenize the conversation: a worker thread, never the event loop.
                    await asyncio.to_thread(self._prepare_local, loaded)
                    gen = self._start_local(loaded)
                if restarted:
                    self.notes.insert(0, restarted)
                self.stats = gen.stats
                async for chunk in _pump(gen, self.stop_event):
                    self.text += chunk
                    yield chunk
            except (asyncio.CancelledError, GeneratorExit):
                self.stats.finish_reason = self.stats.finish_reason or "cancelled"
                raise
            except BaseException:
                self.stats.finish_reason = "error"
                raise
            finally:
                service._generation_finished(remote=remote)
                if loaded is not None:
                    await asyncio.to_thread(service.cache.release, loaded)
                self.finished = True
                if self.stats.finish_reason is None:  # cancelled from outside (task cancelled, disconnect)
                    self.stats.finish_reason = "cancelled"
                if self.stats.finished_at is None:
                    self.stats.finished_at = time.perf_counter()
                if self.record and self.session is not None and self.stats.finish_reason != "error":
                    self.service._record(self)
        finally:
            if self.ticket is not None:  # the slot goes to the next in line
                self.ticket.release()

    def _prepare_local(self, loaded: LoadedModel) -> None:
        """The prompt, rendered and trimmed to the context (tokenizes: call it off the event loop)."""
        self.description = loaded.describe()
        if self.raw:
            self.prompt = raw_prompt(loaded, self.messages[-1]["content"], self.params)
        elif self.session is not None:
            # A chat's max new tokens is a standing setting, kept across models: on a model whose
            # context it does not fit, it is lowered for this answer (with a note) instead of failing.
            self.prompt, self.params = fit_prompt(self.spec, loaded, self.messages, self.params)
        else:
            self.prompt = render_prompt(self.spec, loaded, self.messages, self.params)
        self.notes = list(self.prompt.notes)

    def _start_local(self, loaded: LoadedModel):
        if self.prompt is None:
            self._prepare_local(loaded)
        if loaded.plan.engine == "llama.cpp":  # the entry's prompt, streamed from its llama-server
            return loaded.model.stream(
                self.spec.id, self.prompt.text, self.params, self.stop_event, adapter=loaded.adapter_name
            )
        return self.service.stream_fn(
            loaded, self.prompt.text, self.params, self.stop_event,
            add_special_tokens=self.prompt.add_special_tokens,
        )  # fmt: skip

    def _start_remote(self):
        """An OpenAI-compatible server answers: the messages go as they are (its chat template renders
        them, so `prompt` stays None) and nothing is loaded here."""
        self.description = remote_description(self.spec)
        # A raw prompt (the API's text completions) is continued as is through the server's /completions.
        prompt = self.messages[-1]["content"] if self.raw else None
        gen = self.service.remote_stream_fn(
            self.spec, self.messages, self.params, self.stop_event, prompt=prompt
        )
        self.notes = list(getattr(gen, "notes", []))
        return gen


def remote_description(spec: ModelSpec) -> str:
    """What a remote (`backend: openai`) entry is, where `describe()` tells a local model's load."""
    return f"remote: {spec.remote_model} at {spec.base_url}"


async def _acquire(cache: ModelCache, spec: ModelSpec, **kwargs) -> LoadedModel:
    """`cache.acquire` in a worker thread, safe to cancel.

    Cancelling the awaiting task does not stop the thread: without care, a load that finishes after
    the caller went away (stop button, closed HTTP connection) would keep its base marked busy forever.
    The lease is handed back as soon as the abandoned acquire returns.
    """
    future = asyncio.ensure_future(asyncio.to_thread(cache.acquire, spec, **kwargs))
    try:
        return await asyncio.shield(future)
    except asyncio.CancelledError:

        def give_back(done: asyncio.Future) -> None:
            if not done.cancelled() and done.exception() is None:
                cache.release(done.result())

        future.add_done_callback(give_back)
        raise


async def _pump(gen, stop_event: threading.Event) -> AsyncIterator[str]:
    """Bridge a blocking chunk iterator (run in a worker thread) to async, chunk by chunk.

    One thread pumps into an asyncio queue, so the event loop never blocks on the model and there is
    no thread hop per token (at ~1,000 tokens/s a hop per token costs more than the token).
    """
    loop = asyncio.get_running_loop()
    q: asyncio.Queue = asyncio.Queue()
    done = object()

    def run() -> None:
        try:
            for chunk in gen:
                loop.call_soon_threadsafe(q.put_nowait, chunk)
        except BaseException as exc:
            loop.call_soon_threadsafe(q.put_nowait, exc)
        finally:
            loop.call_soon_threadsafe(q.put_nowait, done)

    worker = threading.Thread(target=run, name="babl-pump", daemon=True)
    worker.start()
    try:
        while True:
            item = await q.get()
            if item is done:
                break
            if isinstance(item, BaseException):
                raise item
            yield item
    finally:
        if worker.is_alive():
            stop_event.set()  # the consumer went away (stop button, disconnect): end generate()
            await asyncio.to_thread(worker.join, 30)


def render_prompt(
    spec: ModelSpec, loaded: LoadedModel, messages: list[dict], params: GenerationParams
) -> Prompt:
    """The entry's prompt style over the messages (with the entry's system prompt unless they bring
    their own), trimmed to the model's context."""
    style = get_style(spec.prompt_style)
    try:
        return build_prompt(
            style,
            with_default_system(messages, spec.system_prompt),
            loaded.tokenizer,
            context_length=loaded.context_length,
            max_new_tokens=params.max_new_tokens,
            seq2seq=loaded.kind == "seq2seq",
        )
    except ValueError as exc:  # PromptTooLong is a ValueError
        raise BadMessage(str(exc)) from exc


def fit_prompt(
    spec: ModelSpec, loaded: LoadedModel, messages: list[dict], params: GenerationParams
) -> tuple[Prompt, GenerationParams]:
    """`render_prompt`, with max new tokens lowered to what the context leaves when it is too large.

    A causal model reads the prompt and writes the answer in one context: when even the newest
    message alone leaves no room for `params.max_new_tokens`, the answer gets the room that is left
    (the context minus that message) and the prompt's notes say so; older turns are then dropped as
    usual. Only a message that does not fit by itself is still an error.

    Returns:
        The prompt and the settings to generate with (the same object when nothing was lowered).

    Raises:
        BadMessage: the newest message (with the system prompt) does not fit the context.
    """
    try:
        return render_prompt(spec, loaded, messages, params), params
    except BadMessage as exc:
        if loaded.kind == "seq2seq" or not isinstance(exc.__cause__, PromptTooLong):
            raise
        failure = exc
    newest = [*(m for m in messages if m["role"] == "system"), messages[-1]]
    alone = render_prompt(spec, loaded, newest, replace(params, max_new_tokens=0))
    room = loaded.context_length - alone.token_count
    if room < 1:
        raise failure
    fitted = replace(params, max_new_tokens=room)
    prompt = render_prompt(spec, loaded, messages, fitted)
    prompt.notes.insert(
        0,
        f"max new tokens lowered from {params.max_new_tokens} to {room} for this answer: this model reads "
        f"at most {loaded.context_length} tokens, your message included",
    )
    return prompt, fitted


def raw_prompt(loaded: LoadedModel, text: str, params: GenerationParams) -> Prompt:
    """`text` as the model's whole input (no prompt style), checked against the context.

    Raises:
        BadMessage: the prompt (plus max_new_tokens for causal models) does not fit the context.
    """
    count = count_tokens(loaded.tokenizer, text, add_special_tokens=True)
    context = loaded.context_length
    seq2seq = loaded.kind == "seq2seq"
    available = context if seq2seq else context - params.max_new_tokens
    if count > available:
        if seq2seq:
            detail = f"the model reads at most {context}. To fix it, shorten the prompt."
        else:
            room = context - count
            fix = (
                f"or lower max new tokens to {room} or less"
                if room > 0
                else "(lowering max new tokens alone cannot help)"
            )
            detail = (
                f"only {max(available, 0)} are available (a {context}-token context minus "
                f"{params.max_new_tokens} max new tokens). To fix it, shorten the prompt {fix}."
            )
        too_long = PromptTooLong(
            f"The prompt is too long: it needs {words.count(count, 'token')} but {detail}",
            needed_tokens=count,
            available_tokens=max(available, 0),
        )
        raise BadMessage(str(too_long)) from too_long
    return Prompt(text, add_special_tokens=True, token_count=count)


def params_for(spec: ModelSpec, settings: dict | None = None, **overrides) -> GenerationParams:
    """An entry's generation settings for one answer: entry defaults < session settings < per-call
    overrides, plus the prompt style's stop strings. `finetune eval` measures with the same merge.

    Raises:
        ValueError: an invalid setting (the message names it).
    """
    merged = {k: v for k, v in (settings or {}).items() if k in SETTING_NAMES}
    merged.update({k: v for k, v in overrides.items() if v is not None})
    # Checked before the style's own stop strings join: the bounds (at most 4 stops) are the user's.
    params = GenerationParams.from_defaults(spec.generation, **merged).validate()
    extra = tuple(s for s in get_style(spec.prompt_style).stop_strings() if s not in params.stop)
    return replace(params, stop=params.stop + extra) if extra else params


class ChatService:
    """Sessions in, text chunks out: the one path used by the app, the API and the CLI."""

    def __init__(
        self,
        catalog: Catalog | None = None,
        cache: ModelCache | None = None,
        stream_fn=None,
        remote_stream_fn=None,
        admission: Admission | None = None,
    ):
        self.catalog = catalog or Catalog.load()
        self.cache = cache or ModelCache()
        self.admission = admission or Admission()
        self.stream_fn = stream_fn or default_stream
        self.remote_stream_fn = remote_stream_fn or RemoteStream
        self._active = 0
        self._active_remote = 0
        self._lock = threading.Lock()

    # -- bookkeeping -------------------------------------------------------------------------------
    @property
    def active_generations(self) -> int:
        with self._lock:
            return self._active

    def _generation_started(self, remote: bool = False) -> None:
        with self._lock:
            self._active += 1
            self._active_remote += remote

    def _generation_finished(self, remote: bool = False) -> None:
        with self._lock:
            self._active -= 1
            self._active_remote -= remote

    def status(self) -> dict:
        """What `/v1/status`, `python -m babl_core status` and the chat's `/status` show: loaded bases
        (adapters, memory, each base's batch: active rows, waiting, KV cache), active generations
        (local and remote) and the queue (requests waiting for a load or for a row in a batch)."""
        data = self.cache.status()
        with self._lock:
            data["active_generations"] = self._active
            data["remote_active_generations"] = self._active_remote
        data["admission"] = self.admission.status()
        return data

    def admit(self, replies: list[ChatReply], client: str | None) -> list[ChatReply]:
        """Gate a request's replies on the admission queue, all or none (see `babl_core.engine.admission`);
        `client` (a chat user, an API caller) gets its share, None none (a caller in this process).

        Raises:
            ServerBusy: the queue is full, or `client` holds its share already.
        """
        for reply, ticket in zip(replies, self.admission.admit(client, len(replies)), strict=True):
            reply.hold(ticket)
        return replies

    def _record(self, reply: ChatReply) -> None:
        session = reply.session
        session.messages.append(dict(reply.messages[-1]))
        session.messages.append(
            {
                "role": "assistant",
                "content": reply.text,
                "model": reply.spec.id,
                "stopped": reply.stats.finish_reason == "cancelled",
            }
        )

    # -- the API -------------------------------------------------------------------------------------
    def spec(self, model_id: str) -> ModelSpec:
        return self.catalog.get(model_id)

    def params_for(self, spec: ModelSpec, settings: dict | None = None, **overrides) -> GenerationParams:
        """Entry defaults < session settings < per-call overrides; the style's stop strings added."""
        return params_for(spec, settings, **overrides)

    def check_message(self, text: str) -> str:
        if not isinstance(text, str) or not text.strip():
            raise BadMessage("The message is empty: type a question or an instruction.")
        if len(text) > MAX_MESSAGE_CHARS:
            raise BadMessage(
                f"The message has {len(text):,} characters; the limit is {MAX_MESSAGE_CHARS:,}. "
                "Send a shorter excerpt."
            )
        check_text(text, "The message")
        return text

    def servable_spec(self, model_id: str, listing: list[ModelSpec] | None = None) -> ModelSpec:
        """`model_id`'s entry, if it can be served here. Found in `listing` (a `Catalog.list()` this
        request read already) when given, else in a new listing, which reads every adapter's babl.json.

        Raises:
            UnknownModel: no entry has this id.
            ModelUnavailable: the entry cannot be served here (the reason names the fix).
        """
        spec = self.catalog.get(model_id, listing)
        avail = availability(spec)
        if not avail.servable:
            raise ModelUnavailable(spec.id, avail.reason)
        return spec

    def _entry(self, model: str | ModelSpec) -> ModelSpec:
        """`model`'s catalog entry: looked up (`servable_spec`: the listing reads every adapter's
        babl.json) for an id, taken as it is for an entry this request resolved already."""
        return model if isinstance(model, ModelSpec) else self.servable_spec(model)

    def check_turn(self, session: ChatSession, text: str, listing: list[ModelSpec] | None = None) -> ChatTurn:
        """Check a chat message and its system prompt, and resolve the session's model, before anything
        loads: an empty or huge message, or a model gone from the catalog, fails at once. Hand the
        result to `respond`, which then checks nothing twice.

        Raises:
            BadMessage, UnknownModel, ModelUnavailable: as `respond`.
        """
        self.check_message(text)
        check_text(session.system_prompt, "The system prompt")
        return ChatTurn(text, self.servable_spec(session.model_id, listing))

    def respond(
        self,
        session: ChatSession,
        text: str | ChatTurn,
        *,
        stop_event: threading.Event | None = None,
        on_status: Callable[[str], None] | None = None,
        client: str | None = None,
        **overrides,
    ) -> ChatReply:
        """Answer `text` in `session`; iterate the reply for chunks. The turn is recorded at the end
        (a stopped answer too, with `stopped: True`).

        The answer holds a place in the admission queue, within `client`'s share (the chat's user; None:
        no share, for callers in this process): it waits for a running slot when iterated, reporting its
        place through `on_status` ("Busy: 2 ahead of you").

        `text` is the message, or what `check_turn` made of it for this session. A checked turn whose
        model is no longer the session's (switched since) is checked again.

        Raises:
            BadMessage, UnknownModel, ModelUnavailable, ValueError: as `complete`.
            ServerBusy: the queue is full, or `client` holds its share already.
        """
        if isinstance(text, ChatTurn) and text.spec.id == session.model_id:
            turn = text
        else:
            turn = self.check_turn(session, text.text if isinstance(text, ChatTurn) else text)
        spec = turn.spec
        params = self.params_for(spec, session.settings, **overrides)
        messages = [*session.history(), {"role": "user", "content": turn.text}]
        reply = ChatReply(
            self, session, spec, messages, params, record=True, stop_event=stop_event, on_status=on_status
        )
        return self.admit([reply], client)[0]

    def complete(
        self, model_id: str | ModelSpec, messages: list[dict], *, stop_event=None, **overrides
    ) -> ChatReply:
        """A stateless answer to a message list (the API's chat completions); nothing is recorded.

        `model_id` is a catalog id, or the entry an earlier reply of the same request has (`reply.spec`):
        a request's choices then read the catalog listing once."""
        if not messages or messages[-1].get("role") != "user":
            raise BadMessage("messages must end with a user message")
        self.check_message(messages[-1].get("content", ""))
        for index, message in enumerate(messages[:-1]):
            check_text(message.get("content", ""), f"Message {index}")
        spec = self._entry(model_id)
        params = self.params_for(spec, None, **overrides)
        return ChatReply(self, None, spec, list(messages), params, record=False, stop_event=stop_event)

    def complete_text(
        self, model_id: str | ModelSpec, prompt: str, *, stop_event=None, **overrides
    ) -> ChatReply:
        """A stateless continuation of a raw prompt (the API's text completions); nothing is recorded.

        The prompt goes to the model as is: no prompt style, so no system prompt, no template and none
        of the style's stop strings (only the `stop` given here). Same cache, generator and stop event
        as `complete`.

        Args:
            model_id: a catalog id, or the entry of an earlier reply of the same request (as `complete`).
            prompt: the text to continue (encoder input for seq2seq models).
            stop_event: set it to end the generation early.
            **overrides: generation settings (max_new_tokens, temperature, top_p, top_k,
                repetition_penalty, seed, stop); unset ones come from the entry's defaults.

        Raises:
            BadMessage: empty or oversized prompt (a prompt too long for the context is found when
                the reply is first iterated).
            UnknownModel, ModelUnavailable: the model cannot be served.
            ValueError: an invalid generation setting (the message names it).
        """
        self.check_message(prompt)
        spec = self._entry(model_id)
        merged = {k: v for k, v in overrides.items() if v is not None}
        merged.setdefault("stop", ())  # the entry's default stops belong to its prompt style
        params = GenerationParams.from_defaults(spec.generation, **merged).validate()
        messages = [{"role": "user", "content": prompt}]
        return ChatReply(self, None, spec, messages, params, record=False, stop_event=stop_event, raw=True)

    def base_name(self, spec: ModelSpec) -> str:
        """How people know the base of an adapter entry: the id of the catalog entry that serves that
        base without an adapter (`demo-html`), else the base's own name (the last part of its hub
        id or folder, e.g. `codegen-350M-mono`)."""
        base = base_ref(spec)
        for entry in self.catalog.entries:  # bases are catalog entries; discovered ones are adapters
            if not entry.adapter and entry.backend == spec.backend and base_ref(entry) == base:
                return entry.id
        return base.rstrip("/").rsplit("/", 1)[-1] or base

    def compare_with_base(
        self, session: ChatSession, *, stop_event=None, client: str | None = None
    ) -> ChatReply:
        """The last question again on the base model without the adapter (weights shared); it holds a
        place in the admission queue for `client` like `respond`."""
        last_user = max((i for i, m in enumerate(session.messages) if m["role"] == "user"), default=None)
        if last_user is None:
            raise BadMessage("Nothing to compare yet: ask something first.")
        spec = self.servable_spec(session.model_id)
        if not spec.adapter:
            raise BadMessage(f"{spec.id} has no adapter, so there is no base to compare with.")
        params = self.params_for(spec, session.settings)
        head = session.history()[: len(session.history()) - (len(session.messages) - last_user)]
        messages = [*head, {"role": "user", "content": session.messages[last_user]["content"]}]
        reply = ChatReply(
            self, session, spec, messages, params, record=False, use_adapter=False, stop_event=stop_event
        )
        return self.admit([reply], client)[0]

    def is_ready(self, spec: ModelSpec) -> bool:
        """Whether `spec` answers without a load first: loaded here, or served remotely."""
        return spec.backend == "openai" or self.cache.is_loaded(spec)

    async def switch_model(
        self, session: ChatSession, model_id: str, *, on_status=None, listing: list[ModelSpec] | None = None
    ) -> str:
        """Load `model_id` for the session (history kept); returns `describe()`. On failure the
        session keeps its previous model and the error propagates. A remote entry loads nothing
        here: the session just uses it (its server's availability was checked by `servable_spec`).
        `listing`: the catalog listing the caller read already (see `servable_spec`)."""
        spec = self.servable_spec(model_id, listing)
        if spec.backend == "openai":
            session.model_id = spec.id
            return remote_description(spec)
        loop = asyncio.get_running_loop()
        loaded = await asyncio.to_thread(
            self.cache.acquire,
            spec,
            on_wait=(lambda msg: loop.call_soon_threadsafe(on_status, msg)) if on_status else None,
        )
        try:
            description = loaded.describe()
        finally:
            await asyncio.to_thread(self.cache.release, loaded)
        session.model_id = spec.id
        return description


def format_status(status: dict) -> str:
    """`ChatService.status()` as a few lines of text (the CLI's `status`; the chat's `/status` shows the
    same as a table, `web.ui.status_markdown`)."""
    bases = status.get("bases", [])
    budget = f", budget {status['memory_budget_mb']:.0f} MB" if status.get("memory_budget_mb") else ""
    lines = [f"Loaded bases: {len(bases)} of {status.get('max_models', '?')} slots, "
             f"{status.get('memory_mb', 0):.0f} MB of weights{budget}"]  # fmt: skip
    for base in bases:
        lines.append(f"- {base['base']}: {base.get('description') or base['state']} ({base['state']})")
        if base.get("adapters"):
            lines.append(f"  adapters: {', '.join(base['adapters'])}")
        batch = base.get("batch")
        if batch:
            lines.append(f"  batch: {batch['active_rows']} of {batch['max_rows']} rows decoding, "
                         f"{batch['waiting']} waiting, KV cache {batch['kv_cache_mb']:.1f} MB")  # fmt: skip
    remote = status.get("remote_active_generations", 0)
    lines.append(
        f"Active generations: {status.get('active_generations', 0)}"
        + (f" ({remote} remote)" if remote else "")
    )
    lines.append(f"Queue: {status.get('queue', 0)} ({status.get('waiting_for_load', 0)} waiting for a model to load, "
                 f"{status.get('waiting_to_join', 0)} waiting to join a batch)")  # fmt: skip
    line = status.get("admission")
    if line:
        refused = sum(line.get("refused", {}).values())
        lines.append(f"Admission: {line['running']} running of {line['limits']['max_running']}, {line['waiting']} "
                     f"waiting of {line['limits']['max_queued']}, {refused} refused since start")  # fmt: skip
    return "\n".join(lines)


async def coalesce(chunks: AsyncIterator[str], max_rate_hz: float = 30.0) -> AsyncIterator[str]:
    """Merge chunks so a UI gets at most `max_rate_hz` updates a second (DESIGN.md "Streaming").

    The first chunk goes out at once; later ones are held until the interval has passed — by a timer,
    so a slow model's last token never waits for the next one. Nothing is dropped.
    """
    interval = 1.0 / max_rate_hz
    source = chunks.__aiter__()
    buffer: list[str] = []
    last = float("-inf")
    pending: asyncio.Future | None = None
    try:
        while True:
            if pending is None:
                pending = asyncio.ensure_future(source.__anext__())
            timeout = max(0.0, last + interval - time.monotonic()) if buffer else None
            done, _ = await asyncio.wait({pending}, timeout=timeout)
            if pending in done:
                try:
                    buffer.append(pending.result())
                except StopAsyncIteration:
                    pending = None
                    break
                pending = None
            if buffer and time.monotonic() - last >= interval:
                yield "".join(buffer)
                buffer.clear()
                last = time.monotonic()
        if buffer:
            yield "".join(buffer)
    finally:
        if pending is not None:
            pending.cancel()
