"""The HTTP API on the chat server: OpenAI-compatible routes plus seed 003's email endpoint.

Routes (all on Chainlit's own FastAPI app, same port, same `service()` and model cache as the UI):

- `GET /v1/models`, `GET /v1/models/{id}`: the catalog with each entry's availability.
- `POST /v1/chat/completions`: messages in (system first, then user/assistant turns), rendered by the
  entry's prompt style; `stream=true` gives server-sent events ending with `data: [DONE]`.
- `POST /v1/completions`: a raw prompt, continued as is (no prompt style); streamable the same way.
- `GET /v1/status`: loaded models, memory, active generations, the load queue, API counters.
- `POST /api/generate` and `POST /`: seed 003's `{prompt, token_count, temperature, n_gen, model?}`
  → `{generations: [...]}`.

Every generation goes through `ChatService.complete` / `complete_text`, the path the chat UI uses.
With `n` > 1 (or `n_gen`) the choices run concurrently; with a `seed`, choice i uses `seed + i`.

Errors use OpenAI's shape `{"error": {"message", "type", "param", "code"}}`: 401 bad or missing key
(when `BABL_API_KEY` is set), 404 unknown model, 422 a request that does not match the schema (a
value out of range, a wrong type, a missing field; `param` names the field), 400 a request the model
cannot take (empty or too long message: `param` "messages" or "prompt"), 503 a model that cannot be
served here or no room to load it, with the reason.

A client that goes away mid-answer stops its generation: the stream's own cancellation and a watcher
polling `request.is_disconnected()` both set the replies' stop events.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections import Counter
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import contextmanager
from typing import Any, Literal

from fastapi import APIRouter, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from fastapi.routing import APIRoute
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_serializer

from babl_core.admission import RequestTooLarge, ServerBusy, check_request
from babl_core.auth import WWW_AUTHENTICATE, bearer_error
from babl_core.cache import ModelBusy
from babl_core.catalog import ModelSpec, UnknownModel, availability
from babl_core.chat import BadMessage, ChatReply, ChatService
from babl_core.generation import GenerationError
from babl_core.generation_settings import SETTINGS
from babl_core.loading import ModelUnavailable
from babl_core.prompts import PromptTooLong
from babl_core.runtime import service

log = logging.getLogger(__name__)

MAX_TOKENS_CAP = SETTINGS["max_new_tokens"].maximum
"""Largest `max_tokens` / `token_count` one request may ask for."""
MAX_CHOICES = 8
"""Largest `n` / `n_gen`: each choice is a generation of its own on this machine."""
MAX_STOP_SEQUENCES = SETTINGS["stop"].max_items
DISCONNECT_POLL_S = 0.25
OWNER = "babl"


# --------------------------------------------------------------------------------------------------
# Errors in OpenAI's shape


class ErrorDetail(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorResponse(BaseModel):
    error: ErrorDetail


class ApiError(Exception):
    """An error answer: status, OpenAI error fields and extra headers."""

    def __init__(self, status: int, message: str, type_: str, param: str | None = None,
                 code: str | None = None, headers: dict[str, str] | None = None):  # fmt: skip
        super().__init__(message)
        self.status = status
        self.detail = ErrorDetail(message=message, type=type_, param=param, code=code)
        self.headers = headers or {}

    def response(self) -> JSONResponse:
        # A message may quote what the client sent: a lone surrogate in it must not break the answer.
        detail = self.detail.model_copy(update={"message": _printable(self.detail.message)})
        return JSONResponse(
            ErrorResponse(error=detail).model_dump(), status_code=self.status, headers=self.headers
        )


def _printable(text: str) -> str:
    return text.encode("utf-8", "backslashreplace").decode("utf-8")


# The openai client retries 5xx answers twice; an entry that needs training will not heal in a second.
NO_RETRY = {"x-should-retry": "false"}


def api_error(exc: BaseException, text_param: str = "messages") -> ApiError | None:
    """The API error for an exception from the generation path, or None when it is not one of ours.

    Args:
        exc: what `ChatService` or a reply raised.
        text_param: the request field that holds the text (`messages`, `prompt`).
    """
    if isinstance(exc, ApiError):
        return exc
    if isinstance(exc, UnknownModel):
        return ApiError(404, str(exc), "invalid_request_error", "model", "model_not_found")
    if isinstance(exc, ModelUnavailable):
        return ApiError(503, str(exc), "service_unavailable", "model", "model_unavailable", NO_RETRY)
    if isinstance(exc, ModelBusy):
        return ApiError(503, str(exc), "service_unavailable", "model", "model_busy", {"retry-after": "5"})
    if isinstance(exc, RequestTooLarge):
        return ApiError(exc.status, str(exc), "invalid_request_error", exc.param, exc.code)
    if isinstance(exc, ServerBusy):
        return ApiError(
            429, str(exc), "rate_limit_error", None, exc.code, {"retry-after": str(exc.retry_after)}
        )
    if isinstance(exc, BadMessage):
        too_long = isinstance(exc.__cause__, PromptTooLong)
        code = "context_length_exceeded" if too_long else "invalid_value"
        return ApiError(400, str(exc), "invalid_request_error", text_param, code)
    if isinstance(exc, GenerationError):
        return ApiError(500, str(exc), "server_error", None, "generation_failed")
    if isinstance(exc, ValueError):  # GenerationParams.validate: "field: problem; ..."
        name = str(exc).split(":", 1)[0].strip()
        param = {"max_new_tokens": "max_tokens"}.get(name, name if name.isidentifier() else None)
        return ApiError(400, str(exc), "invalid_request_error", param, "invalid_value")
    return None


_TYPE_TAGS = {"str", "int", "float", "bool", "list", "dict", "function-after", "function-before"}


def _loc_to_param(loc: tuple) -> str | None:
    """("body", "messages", 0, "role") -> "messages[0].role"; the body itself (or a position in
    malformed JSON) -> None."""
    # loc[0] says where (body, path, query); pydantic adds the branch of a union it tried ("str",
    # "list[TextPart]"), which names no field.
    parts = [p for p in loc[1:] if not (isinstance(p, str) and ("[" in p or p in _TYPE_TAGS))]
    if parts and isinstance(parts[0], int):
        return None
    out = ""
    for part in parts:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out or None


def validation_error(exc: RequestValidationError) -> ApiError:
    """FastAPI's 422 in OpenAI's shape: `param` is the first bad field, the message lists them all."""
    errors = exc.errors()
    problems = []
    for err in errors:
        param = _loc_to_param(tuple(err.get("loc", ())))
        text = str(err.get("msg", "invalid")).removeprefix("Value error, ")
        value = err.get("input")
        shown = f" (got {value!r:.80})" if isinstance(value, (int, float, str, bool)) else ""
        problems.append(f"{param or 'request body'}: {text}{shown}")
    first = errors[0] if errors else {}
    return ApiError(
        422,
        "; ".join(problems) or "invalid request",
        "invalid_request_error",
        _loc_to_param(tuple(first.get("loc", ()))),
        str(first.get("type", "invalid_value")),
    )


async def _read_body(request: Request, limit: int) -> None:
    """Read the body, refusing it (413) as soon as it is longer than `limit` bytes: a declared length
    is refused before a byte is read, a chunked body once it grows past the limit. The body is kept
    on the request, where FastAPI reads it from."""

    def too_large(size: str) -> ApiError:
        return api_error(RequestTooLarge(
            f"The request body has {size} bytes; at most {limit:,} are allowed (BABL_MAX_BODY_BYTES). "
            "Send a shorter history or fewer prompts.",
            None, status=413,
        ))  # fmt: skip

    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        raise too_large(f"{int(declared):,}")
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > limit:
            raise too_large(f"more than {limit:,}")
    request._body = bytes(body)


def client_id(request: Request) -> str:
    """Who a request comes from, for the admission queue's per-client share: the peer's address, or
    behind a local proxy (the ngrok tunnel's agent on 127.0.0.1) the address that proxy saw, the last
    entry of X-Forwarded-For (a client can prepend to that header, never append)."""
    host = request.client.host if request.client else "unknown"
    forwarded = request.headers.get("x-forwarded-for", "")
    if forwarded and host in ("127.0.0.1", "::1"):
        return "api:" + forwarded.split(",")[-1].strip()
    return f"api:{host}"


class OpenAIRoute(APIRoute):
    """An API route: Bearer check first, then every error answered in OpenAI's shape."""

    def get_route_handler(self) -> Callable:
        handler = super().get_route_handler()

        async def route(request: Request):
            refused = bearer_error(request.headers.get("authorization"))
            if refused:
                return ApiError(
                    401, refused, "invalid_request_error", None, "invalid_api_key",
                    {"WWW-Authenticate": WWW_AUTHENTICATE},
                ).response()  # fmt: skip
            try:
                if request.method == "POST":
                    await _read_body(request, service().admission.limits.max_body_bytes)
                return await handler(request)
            except RequestValidationError as exc:
                return validation_error(exc).response()
            except ApiError as exc:
                return exc.response()

        return route


# --------------------------------------------------------------------------------------------------
# Request models


class ApiRequest(BaseModel):
    # Fields OpenAI defines that change nothing here (user, presence_penalty, ...) are accepted and
    # ignored, as other OpenAI-compatible servers do; ones whose effect we cannot give are refused.
    model_config = ConfigDict(extra="ignore")


class StreamOptions(ApiRequest):
    include_usage: bool = False


def setting_field(name: str, default: Any = None, *, description: str | None = None) -> Any:
    """A request field for generation setting `name`: bounds and help from `generation_settings`."""
    setting = SETTINGS[name]
    bounds: dict[str, Any] = {}
    if setting.minimum is not None:
        bounds["gt" if setting.above_minimum else "ge"] = setting.minimum
    if setting.maximum is not None:
        bounds["le"] = setting.maximum
    if setting.kind == "float":
        bounds["allow_inf_nan"] = False
    return Field(default, description=description or setting.help_with_bounds(), **bounds)


def _check_stop(value: str | list[str] | None) -> str | list[str] | None:
    problem = None if value is None else SETTINGS["stop"].problem(value)
    if problem:
        raise ValueError(problem)
    return value


class SamplingRequest(ApiRequest):
    """Fields shared by chat and text completions."""

    model: str = Field(min_length=1, description="A catalog id (see GET /v1/models).")
    # Generation settings: bounds and help from `generation_settings.SETTINGS` (unset: the entry's).
    max_tokens: int | None = setting_field("max_new_tokens")
    temperature: float | None = setting_field("temperature")
    top_p: float | None = setting_field("top_p")
    n: int = Field(1, ge=1, le=MAX_CHOICES, description="Choices; with a seed, choice i uses seed + i.")
    stop: str | list[str] | None = setting_field("stop")
    seed: int | None = setting_field("seed")
    stream: bool = False
    stream_options: StreamOptions | None = None
    # Extensions (as in vLLM): not in OpenAI's API, used by the catalog's entries.
    top_k: int | None = setting_field("top_k")
    repetition_penalty: float | None = setting_field("repetition_penalty")
    logprobs: Any = None

    @field_validator("stop")
    @classmethod
    def _valid_stop(cls, value: str | list[str] | None) -> str | list[str] | None:
        return _check_stop(value)

    @field_validator("logprobs")
    @classmethod
    def _no_logprobs(cls, value: Any) -> Any:
        if value not in (None, False, 0):
            raise ValueError("logprobs are not supported by this server; leave the field out")
        return value

    def overrides(self, index: int = 0) -> dict[str, Any]:
        """Generation settings for choice `index` (unset ones come from the catalog entry)."""
        return {
            "max_new_tokens": self.max_tokens,
            "temperature": self.temperature,
            "top_p": self.top_p,
            "top_k": self.top_k,
            "repetition_penalty": self.repetition_penalty,
            "stop": self.stop,
            "seed": None if self.seed is None else self.seed + index,
        }

    @property
    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)


class TextPart(ApiRequest):
    type: Literal["text"]
    text: str


class ChatMessage(ApiRequest):
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[TextPart]

    def as_dict(self) -> dict[str, str]:
        text = self.content if isinstance(self.content, str) else "".join(p.text for p in self.content)
        # "developer" is OpenAI's newer name for the system role.
        return {"role": "system" if self.role == "developer" else self.role, "content": text}


class ChatCompletionRequest(SamplingRequest):
    messages: list[ChatMessage] = Field(min_length=1, description="System messages first, ending with user.")
    max_completion_tokens: int | None = setting_field("max_new_tokens", description="Alias of max_tokens.")
    tools: list[Any] | None = None

    @field_validator("tools")
    @classmethod
    def _no_tools(cls, value: list[Any] | None) -> list[Any] | None:
        if value:
            raise ValueError("tool calling is not supported by this server; leave the field out")
        return value

    def overrides(self, index: int = 0) -> dict[str, Any]:
        out = super().overrides(index)
        if out["max_new_tokens"] is None:
            out["max_new_tokens"] = self.max_completion_tokens
        return out


class CompletionRequest(SamplingRequest):
    prompt: str | list[str] = Field(description="The text to continue, as is; a list gives n choices each.")
    echo: bool = False
    suffix: str | None = None

    @field_validator("prompt")
    @classmethod
    def _some_prompt(cls, value: str | list[str]) -> str | list[str]:
        if isinstance(value, list) and not value:
            raise ValueError("the prompt list is empty; send at least one prompt")
        return value

    @field_validator("suffix")
    @classmethod
    def _no_suffix(cls, value: str | None) -> str | None:
        if value:
            raise ValueError("suffix (insertion) is not supported by this server; leave the field out")
        return value

    @property
    def prompts(self) -> list[str]:
        return [self.prompt] if isinstance(self.prompt, str) else list(self.prompt)


class EmailGenerateRequest(ApiRequest):
    """Seed 003's payload."""

    prompt: str = Field(description="Key points of the email (optionally 'From:'/'To:' lines).")
    token_count: int | None = setting_field("max_new_tokens")
    temperature: float | None = setting_field("temperature")
    n_gen: int = Field(1, ge=1, le=MAX_CHOICES, description="How many emails to write.")
    model: str | None = Field(None, description="A catalog id; default the catalog's email entry.")
    seed: int | None = setting_field("seed")


# --------------------------------------------------------------------------------------------------
# Response models


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class AssistantMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str


class ChatChoice(BaseModel):
    index: int
    message: AssistantMessage
    finish_reason: str
    logprobs: None = None


class ChatCompletion(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[ChatChoice]
    usage: Usage
    notes: list[str] = Field(default_factory=list, description="Babl: trimmed history, unsent system prompt.")


class Delta(BaseModel):
    role: str | None = None
    content: str | None = None

    @model_serializer(mode="wrap")
    def _only_set(self, handler):  # OpenAI's deltas carry only what changed ({} at the end)
        return {k: v for k, v in handler(self).items() if v is not None}


class ChatChunkChoice(BaseModel):
    index: int
    delta: Delta
    finish_reason: str | None = None
    logprobs: None = None


class ChatCompletionChunk(BaseModel):
    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    choices: list[ChatChunkChoice]
    usage: Usage | None = None


class CompletionChoice(BaseModel):
    index: int
    text: str
    finish_reason: str | None = None
    logprobs: None = None


class Completion(BaseModel):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Usage | None = None


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int = 0
    owned_by: str = OWNER
    label: str
    task: str
    availability: str = Field(description="local | cached | downloadable | needs-training | unavailable")
    reason: str
    demo: bool


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class EmailGenerateResponse(BaseModel):
    generations: list[str]
    model: str = Field(description="The catalog id that wrote them.")
    notes: list[str] = Field(default_factory=list, description="E.g. the fallback from an untrained entry.")


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


@contextmanager
def _as_api_errors(text_param: str) -> Iterator[None]:
    """Raise the API error for a known exception from the block (`api_error`); others go on as they are."""
    try:
        yield
    except Exception as exc:
        error = api_error(exc, text_param)
        if error is None:
            raise
        raise error from exc


async def _start_replies(make: Callable[[], Any], text_param: str) -> Any:
    """Build the replies in a worker thread (catalog listing and availability touch the disk, and
    online a hub probe can take 2 s), turning known errors into API errors."""
    with _as_api_errors(text_param):
        return await asyncio.to_thread(make)


async def _run_to_end(replies: list[ChatReply], request: Request, text_param: str) -> None:
    with _as_api_errors(text_param):
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
    with _as_api_errors(text_param):
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
# Routes


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
    with _as_api_errors("messages"):
        check_request(svc.admission.limits, n=body.n, chars=sum(len(m["content"]) for m in messages))
    client = client_id(request)

    def make() -> list[ChatReply]:
        return svc.admit(
            [svc.complete(body.model, messages, **body.overrides(i)) for i in range(body.n)], client
        )

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
    with _as_api_errors("prompt"):
        check_request(svc.admission.limits, prompts=len(prompts), n=body.n, chars=sum(map(len, prompts)),
                      param="prompt")  # fmt: skip
    client = client_id(request)

    def make() -> list[ChatReply]:
        replies = [
            svc.complete_text(body.model, p, **body.overrides(i)) for p in prompts for i in range(body.n)
        ]
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
    """The model for a seed-003 request, and a note when it is not the one asked for.

    Without `model`: the catalog's email entry (the first entry of the catalog file with task email,
    `email-t5`). When that cannot be served here (it needs an adapter trained by `finetune`, say),
    the first servable email entry answers instead, trained ones before demo ones, and the response's
    `notes` say so. A `model` given in the request is used as is (503 when it cannot be served).

    Raises:
        ApiError: 503 when no email entry can be served, with the default entry's reason.
    """
    if requested:
        return requested, []
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
        return default.id, []
    servable = sorted((s for s in email if availability(s).servable), key=lambda s: s.demo)
    if not servable:
        raise api_error(ModelUnavailable(default.id, default_avail.reason))
    chosen = servable[0]
    note = (
        f"{default.id} (the catalog's email model) cannot be served here: {default_avail}. "
        f'Answered with {chosen.id} instead; send "model" to choose.'
    )
    return chosen.id, [note]


async def email_generate(body: EmailGenerateRequest, request: Request) -> EmailGenerateResponse:
    """Seed 003's endpoint: `n_gen` emails from key points."""
    svc = service()
    with _as_api_errors("prompt"):
        check_request(svc.admission.limits, n=body.n_gen, chars=len(body.prompt), param="prompt")
    client = client_id(request)

    def make() -> tuple[list[str], list[ChatReply]]:
        model_id, notes = email_model(svc, body.model)
        messages = [{"role": "user", "content": body.prompt}]
        settings = {"max_new_tokens": body.token_count, "temperature": body.temperature}
        replies = [
            svc.complete(model_id, messages, **settings, seed=None if body.seed is None else body.seed + i)
            for i in range(body.n_gen)
        ]
        return notes, svc.admit(replies, client)

    notes, replies = await _start_replies(make, "prompt")
    await _run_to_end(replies, request, "prompt")
    notes += [n for n in replies[0].notes if n not in notes]
    return EmailGenerateResponse(generations=[r.text for r in replies], model=replies[0].spec.id, notes=notes)


ROUTES: list[tuple[str, Callable, list[str], Any]] = [
    ("/v1/models", list_models, ["GET"], ModelList),
    ("/v1/models/{model_id}", get_model, ["GET"], ModelCard),
    ("/v1/status", status, ["GET"], None),
    ("/v1/chat/completions", chat_completions, ["POST"], None),
    ("/v1/completions", completions, ["POST"], None),
    ("/api/generate", email_generate, ["POST"], EmailGenerateResponse),
    ("/", email_generate, ["POST"], EmailGenerateResponse),
]
ERROR_RESPONSES = {code: {"model": ErrorResponse} for code in (400, 401, 404, 413, 422, 429, 503)}


def build_router() -> APIRouter:
    """The API routes (each an `OpenAIRoute`: Bearer check, OpenAI-shaped errors)."""
    router = APIRouter(route_class=OpenAIRoute, tags=["babl API"])
    for path, endpoint, methods, response_model in ROUTES:
        router.add_api_route(path, endpoint, methods=methods, response_model=response_model,
                             responses=ERROR_RESPONSES, name=f"babl_{endpoint.__name__}_{path}")  # fmt: skip
    return router


def register_api(app: FastAPI) -> None:
    """Add the API routes to `app` ahead of every route it already has.

    Chainlit's app ends with a GET catch-all that serves the UI (`/{full_path:path}`); routes added
    after it are never reached for GET, so ours go first. Calling this twice (Chainlit reloads
    app.py with `-w`) adds nothing the second time.
    """
    if getattr(app.state, "babl_api_registered", False):
        return
    app.router.routes[0:0] = build_router().routes
    app.openapi_schema = None  # rebuilt on next request with our routes
    app.state.babl_api_registered = True
