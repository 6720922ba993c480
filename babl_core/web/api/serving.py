"""An API request turned into `ChatService` calls, and its replies into a response or a stream of
server-sent events: one handler per route, run concurrently per choice and stopped together."""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections import Counter
from collections.abc import AsyncIterator, Callable
from typing import Any

from fastapi import Request
from fastapi.responses import StreamingResponse
from pydantic import BaseModel

from babl_core.engine.admission import check_request
from babl_core.engine.availability import availability
from babl_core.engine.catalog import ModelSpec, UnknownModel
from babl_core.engine.loaded import ModelUnavailable
from babl_core.engine.service import ChatReply, ChatService
from babl_core.web.api.errors import NO_RETRY, ApiError, ErrorResponse, api_error, as_api_errors
from babl_core.web.api.protocol import (
    AssistantMessage,
    ChatChoice,
    ChatChunkChoice,
    ChatCompletion,
    ChatCompletionChunk,
    ChatCompletionRequest,
    Completion,
    CompletionChoice,
    CompletionRequest,
    Delta,
    EmailGenerateRequest,
    EmailGenerateResponse,
    ModelCard,
    ModelList,
    Usage,
)
from babl_core.web.runtime import service

log = logging.getLogger(__name__)

DISCONNECT_POLL_S = 0.25


def client_id(request: Request) -> str:
    """Who a request comes from, for the admission queue's per-client share: the peer's address, or
    behind a local proxy (the ngrok tunnel's agent on 127.0.0.1) the address that proxy saw, the last
    entry of X-Forwarded-For (a client can prepend to that header, never append)."""
    host = request.client.host if request.client else "unknown"
    forwarded = request.headers.get("x-forwarded-for", "")
    if forwarded and host in ("127.0.0.1", "::1"):
        return "api:" + forwarded.split(",")[-1].strip()
    return f"api:{host}"


# --------------------------------------------------------------------------------------------------
# Running a request's choices


class ApiCounters:
    """What the API did since start (shown by /v1/status)."""

    def __init__(self) -> None:
        self.finished: Counter[str] = Counter()  # finish_reason -> generations
        self.client_disconnects = 0

    def as_dict(self) -> dict:
        return {"finished": dict(self.finished), "client_disconnects": self.client_disconnects}


counters = ApiCounters()
_background: set[asyncio.Task] = set()  # strong references: the loop keeps only weak ones
_END = object()


def _keep(task: asyncio.Task) -> asyncio.Task:
    _background.add(task)
    task.add_done_callback(_background.discard)
    return task


class Choices:
    """The replies of one request, run concurrently and stopped together.

    Each reply is iterated by a task of its own that puts `(index, chunk)` on a queue, then
    `(index, _END)` or `(index, exception)`. Tasks, not the response body, drive the replies, so a
    generation ends and gives its model back even when the server drops the body iterator. A watcher
    stops everything when the client disconnects.
    """

    def __init__(self, replies: list[ChatReply], request: Request | None):
        self.replies = replies
        self.request = request
        self.queue: asyncio.Queue = asyncio.Queue()
        self.tasks: list[asyncio.Task] = []
        self.open = len(replies)
        self.abandoned = False

    def start(self) -> Choices:
        self.tasks = [_keep(asyncio.create_task(self._drive(i, r))) for i, r in enumerate(self.replies)]
        if self.request is not None:
            _keep(asyncio.create_task(self._watch()))
        return self

    async def _drive(self, index: int, reply: ChatReply) -> None:
        try:
            async for chunk in reply:
                self.queue.put_nowait((index, chunk))
        except Exception as exc:  # handed to the consumer, which answers with it
            self.queue.put_nowait((index, exc))
        else:
            self.queue.put_nowait((index, _END))
        finally:
            if reply.prompt is not None:  # it generated (a refused prompt is a 400, not a generation)
                counters.finished[reply.stats.finish_reason or "cancelled"] += 1

    async def _watch(self) -> None:
        while not self.finished:
            if await self.request.is_disconnected():
                self.abandon()
                return
            await asyncio.sleep(DISCONNECT_POLL_S)

    @property
    def finished(self) -> bool:
        return all(t.done() for t in self.tasks)

    def abandon(self) -> None:
        """The client went away: stop every choice still running (counted once)."""
        if self.finished or self.abandoned:
            return
        self.abandoned = True
        counters.client_disconnects += 1
        log.info("client disconnected: stopping %d generation(s)", len(self.replies))
        self.stop()

    def stop(self) -> None:
        for reply in self.replies:
            reply.stop()

    async def next(self) -> tuple[int, Any]:
        """The next `(index, chunk | _END | exception)`; counts ended choices."""
        index, item = await self.queue.get()
        if item is _END or isinstance(item, BaseException):
            self.open -= 1
        return index, item

    async def first_items(self) -> list[tuple[int, Any]]:
        """Items until every choice produced text or ended, so errors come before any byte is sent.

        Raises:
            Exception: the first choice that failed (all are stopped first).
        """
        waiting = set(range(len(self.replies)))
        buffered = []
        while waiting:
            index, item = await self.next()
            if isinstance(item, BaseException):
                await self.close()
                raise item
            buffered.append((index, item))
            waiting.discard(index)
        return buffered

    async def texts(self) -> None:
        """Run every choice to the end (the replies keep their text and stats)."""
        try:
            while self.open:
                _, item = await self.next()
                if isinstance(item, BaseException):
                    raise item
        finally:
            await self.close()

    async def close(self) -> None:
        """Stop what still runs and wait for it to give its model back."""
        self.stop()
        if self.tasks:
            await asyncio.wait(self.tasks, timeout=30)


def _finish_reason(reply: ChatReply) -> str:
    return "length" if reply.stats.finish_reason == "length" else "stop"


def _usage(groups: list[list[ChatReply]]) -> Usage:
    """Prompt tokens counted once per prompt, completion tokens for every choice."""
    prompt = sum(g[0].stats.prompt_tokens for g in groups if g)
    completion = sum(r.stats.completion_tokens for g in groups for r in g)
    return Usage(prompt_tokens=prompt, completion_tokens=completion, total_tokens=prompt + completion)


async def _start_replies(make: Callable[[], Any], text_param: str) -> Any:
    """Build the replies in a worker thread (catalog listing and availability touch the disk, and
    online a hub probe can take 2 s), turning known errors into API errors."""
    with as_api_errors(text_param):
        return await asyncio.to_thread(make)


async def _run_to_end(replies: list[ChatReply], request: Request, text_param: str) -> None:
    with as_api_errors(text_param):
        await Choices(replies, request).start().texts()


def _sse(payload: BaseModel) -> str:
    return f"data: {payload.model_dump_json()}\n\n"


async def _stream(
    replies: list[ChatReply],
    request: Request,
    text_param: str,
    chunk_for: Callable[[int, str | None, str | None], BaseModel],
    usage_chunk: Callable[[Usage], BaseModel] | None,
    head: list[str] | None = None,
) -> StreamingResponse:
    """An SSE response over `replies`: errors before the first chunk are HTTP errors; later ones are
    an error event. `chunk_for(index, text, finish_reason)` builds one event."""
    choices = Choices(replies, request).start()
    with as_api_errors(text_param):
        first = await choices.first_items()

    def event(index: int, item: Any) -> str:
        if item is _END:
            return _sse(chunk_for(index, None, _finish_reason(replies[index])))
        return _sse(chunk_for(index, item, None))

    async def body() -> AsyncIterator[str]:
        sent_all = False
        try:
            for line in head or []:
                yield line
            for index, item in first:
                yield event(index, item)
            while choices.open:
                index, item = await choices.next()
                if isinstance(item, BaseException):
                    error = api_error(item, text_param) or ApiError(500, str(item), "server_error")
                    log.warning("generation failed mid-stream: %s", item)
                    yield _sse(ErrorResponse(error=error.detail))
                    choices.stop()
                    break
                yield event(index, item)
            if usage_chunk is not None:
                yield _sse(usage_chunk(_usage([replies])))
            yield "data: [DONE]\n\n"
            sent_all = True
        finally:
            # Cancelled or closed before the end: the client is gone, stop at once. No await here: a
            # cancelled anyio scope would cancel it again; the tasks end on their own and give their
            # models back.
            if not sent_all:
                choices.abandon()

    return StreamingResponse(
        body(),
        media_type="text/event-stream",
        headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
    )


# --------------------------------------------------------------------------------------------------
# Handlers


def _card(spec: ModelSpec) -> ModelCard:
    avail = availability(spec)
    return ModelCard(id=spec.id, label=spec.display_label, task=spec.task, availability=avail.word,
                     reason=avail.reason, demo=spec.demo)  # fmt: skip


async def list_models() -> ModelList:
    """Every catalog entry and discovered adapter, with its availability."""
    specs = await asyncio.to_thread(service().catalog.list)
    return ModelList(data=await asyncio.to_thread(lambda: [_card(s) for s in specs]))


async def get_model(model_id: str) -> ModelCard:
    """One entry (404 in OpenAI's shape when unknown)."""
    svc = service()
    try:
        spec = await asyncio.to_thread(svc.catalog.get, model_id)
    except UnknownModel as exc:
        raise api_error(exc) from exc
    return await asyncio.to_thread(_card, spec)


async def status() -> dict:
    """Loaded models, memory, active generations and the load queue (`ModelCache.status()`)."""
    svc = service()
    return {
        "object": "babl.status",
        **svc.cache.status(),
        # Generations running now, whatever started them (chat UI, API, CLI in this process).
        "active_generations": svc.active_generations,
        "admission": svc.admission.status(),
        "api": counters.as_dict(),
    }


def _ids(prefix: str) -> tuple[str, int]:
    return f"{prefix}-{uuid.uuid4().hex}", int(time.time())


async def chat_completions(body: ChatCompletionRequest, request: Request):
    """OpenAI chat completions over the entry's prompt style (stateless: nothing is recorded)."""
    svc = service()
    messages = [m.as_dict() for m in body.messages]
    with as_api_errors("messages"):
        check_request(svc.admission.limits, n=body.n, chars=sum(len(m["content"]) for m in messages))
    client = client_id(request)

    def make() -> list[ChatReply]:
        first = svc.complete(body.model, messages, **body.overrides(0))
        others = [svc.complete(first.spec, messages, **body.overrides(i)) for i in range(1, body.n)]
        return svc.admit([first, *others], client)

    replies = await _start_replies(make, "messages")
    completion_id, created = _ids("chatcmpl")
    model = replies[0].spec.id
    if body.stream:

        def chunk(index: int, text: str | None, finish: str | None) -> ChatCompletionChunk:
            delta = Delta(content=text) if text is not None else Delta()
            return ChatCompletionChunk(id=completion_id, created=created, model=model,
                                       choices=[ChatChunkChoice(index=index, delta=delta, finish_reason=finish)])  # fmt: skip

        roles = [
            _sse(ChatCompletionChunk(id=completion_id, created=created, model=model,
                                     choices=[ChatChunkChoice(index=i, delta=Delta(role="assistant", content=""))]))
            for i in range(body.n)
        ]  # fmt: skip
        usage = (
            (
                lambda u: ChatCompletionChunk(
                    id=completion_id, created=created, model=model, choices=[], usage=u
                )
            )
            if body.include_usage
            else None
        )
        return await _stream(replies, request, "messages", chunk, usage, head=roles)
    await _run_to_end(replies, request, "messages")
    return ChatCompletion(
        id=completion_id,
        created=created,
        model=model,
        choices=[
            ChatChoice(index=i, message=AssistantMessage(content=r.text), finish_reason=_finish_reason(r))
            for i, r in enumerate(replies)
        ],
        usage=_usage([replies]),
        notes=replies[0].notes,
    )


async def completions(body: CompletionRequest, request: Request):
    """OpenAI text completions: each prompt continued as is, `n` choices per prompt."""
    svc = service()
    prompts = body.prompts
    with as_api_errors("prompt"):
        check_request(svc.admission.limits, prompts=len(prompts), n=body.n, chars=sum(map(len, prompts)),
                      param="prompt")  # fmt: skip
    client = client_id(request)

    def make() -> list[ChatReply]:
        replies: list[ChatReply] = []
        for p in prompts:
            for i in range(body.n):  # the first reply's entry serves the others: one catalog listing
                replies.append(
                    svc.complete_text(replies[0].spec if replies else body.model, p, **body.overrides(i))
                )
        return svc.admit(replies, client)

    replies = await _start_replies(make, "prompt")
    groups = [replies[k * body.n : (k + 1) * body.n] for k in range(len(prompts))]
    completion_id, created = _ids("cmpl")
    model = replies[0].spec.id
    if body.stream:
        head = []
        if body.echo:
            head = [
                _sse(Completion(id=completion_id, created=created, model=model,
                                choices=[CompletionChoice(index=i, text=prompts[i // body.n])]))
                for i in range(len(replies))
            ]  # fmt: skip

        def chunk(index: int, text: str | None, finish: str | None) -> Completion:
            return Completion(id=completion_id, created=created, model=model,
                              choices=[CompletionChoice(index=index, text=text or "", finish_reason=finish)])  # fmt: skip

        usage = (
            (lambda u: Completion(id=completion_id, created=created, model=model, choices=[], usage=u))
            if body.include_usage
            else None
        )
        return await _stream(replies, request, "prompt", chunk, usage, head=head)
    await _run_to_end(replies, request, "prompt")
    return Completion(
        id=completion_id,
        created=created,
        model=model,
        choices=[
            CompletionChoice(
                index=i,
                text=(prompts[i // body.n] if body.echo else "") + r.text,
                finish_reason=_finish_reason(r),
            )
            for i, r in enumerate(replies)
        ],
        usage=_usage(groups),
    )


def email_model(svc: ChatService, requested: str | None) -> tuple[str, list[str]]:
    """The id of the model for a seed-003 request, and a note when it is not the one asked for
    (`email_entry`)."""
    model, notes = email_entry(svc, requested)
    return (model if isinstance(model, str) else model.id), notes


def email_entry(svc: ChatService, requested: str | None) -> tuple[str | ModelSpec, list[str]]:
    """The model for a seed-003 request, and a note when it is not the one asked for: the entry itself
    when it was chosen here (the answer then does not read the catalog listing again), else the id the
    request named.

    Without `model`: the catalog's email entry (the first entry of the catalog file with task email,
    `email-t5`). When that cannot be served here (it needs an adapter trained by `finetune`, say),
    the first servable email entry answers instead, trained ones before demo ones, and the response's
    `notes` say so. A `model` given in the request is used as is (503 when it cannot be served).

    Raises:
        ApiError: 503 when no email entry can be served, with the default entry's reason.
    """
    if requested:
        return requested, []  # looked up with the answer
    specs = svc.catalog.list()
    email = [s for s in specs if s.task == "email"]
    if not email:
        raise ApiError(
            503, "No catalog entry has task email: add one to configs/models.yaml or send \"model\".",
            "service_unavailable", "model", "model_unavailable", NO_RETRY,
        )  # fmt: skip
    default = next((s for s in email if s.source == "catalog"), email[0])
    default_avail = availability(default)
    if default_avail.servable:
        return default, []
    servable = sorted((s for s in email if availability(s).servable), key=lambda s: s.demo)
    if not servable:
        raise api_error(ModelUnavailable(default.id, default_avail.reason))
    chosen = servable[0]
    note = (
        f"{default.id} (the catalog's email model) cannot be served here: {default_avail}. "
        f'Answered with {chosen.id} instead; send "model" to choose.'
    )
    return chosen, [note]


async def email_generate(body: EmailGenerateRequest, request: Request) -> EmailGenerateResponse:
    """The email endpoint: `n_gen` emails from key points."""
    svc = service()
    with as_api_errors("prompt"):
        check_request(svc.admission.limits, n=body.n_gen, chars=len(body.prompt), param="prompt")
    client = client_id(request)

    def make() -> tuple[list[str], list[ChatReply]]:
        model, notes = email_entry(svc, body.model)
        messages = [{"role": "user", "content": body.prompt}]
        settings = {"max_new_tokens": body.token_count, "temperature": body.temperature}
        replies: list[ChatReply] = []
        for i in range(body.n_gen):
            seed = None if body.seed is None else body.seed + i
            replies.append(
                svc.complete(replies[0].spec if replies else model, messages, **settings, seed=seed)
            )
        return notes, svc.admit(replies, client)

    notes, replies = await _start_replies(make, "prompt")
    await _run_to_end(replies, request, "prompt")
    notes += [n for n in replies[0].notes if n not in notes]
    return EmailGenerateResponse(generations=[r.text for r in replies], model=replies[0].spec.id, notes=notes)
