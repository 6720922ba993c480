"""Remote generation: catalog entries with `backend: openai` stream from an OpenAI-compatible server.

For users who outgrow one machine (DESIGN.md "Scale"): vLLM, TGI, `transformers serve` or any server
with `POST {base_url}/chat/completions` (and `/completions` for raw prompts) and SSE streaming. `RemoteStream` has the interface of a local
generation stream (an iterator of text chunks with `stats`, `text` and `cancel()`), so `ChatService`
serves remote entries through the same path; nothing is loaded here.

The server applies its model's chat template to the messages, so the entry's prompt style is not used.
Only fields of the OpenAI API are sent: strict servers (`transformers serve`) answer 422 to others, so
`top_k` and `repetition_penalty` are not sent (the reply's notes say so). Stop strings are sent (the
first four, OpenAI's limit) and also matched here, so they hold whatever the server does with them.

Errors name the setting to fix: the server unreachable (`base_url`), a refused key (`api_key_env`), an
unknown model (`remote_model`), silence longer than `BABL_REMOTE_TIMEOUT_S` (default 60 s between
chunks). `probe()` tells the catalog whether an entry's server answers (2 s, remembered for 30 s).
"""

from __future__ import annotations

import contextlib
import json
import os
import threading
import time
from collections.abc import Iterator

from babl_core import settings
from babl_core.engine.generation import GenerationError, GenerationParams, GenerationStats, StopMatcher

CONNECT_TIMEOUT_S = 5.0
PROBE_TIMEOUT_S = 2.0
PROBE_TTL_S = 30.0
OPENAI_MAX_STOP = 4


class RemoteBackendError(GenerationError):
    """The remote server could not be used; the message names the catalog field or variable to fix."""


def read_timeout_s() -> float:
    value = settings.env_float("BABL_REMOTE_TIMEOUT_S", 60.0)
    if value <= 0:
        raise ValueError(f"BABL_REMOTE_TIMEOUT_S={value} is not valid; use seconds above 0, e.g. 60")
    return value


def _url(spec, route: str) -> str:
    return spec.base_url.rstrip("/") + route


def headers(spec) -> dict[str, str]:
    """Request headers; the bearer key comes from the variable the entry's `api_key_env` names."""
    out = {"Accept": "text/event-stream"}
    if spec.api_key_env:
        key = os.environ.get(spec.api_key_env, "").strip()
        if not key:
            raise RemoteBackendError(
                f"{spec.id}: the environment variable {spec.api_key_env} (api_key_env in the catalog) is not "
                "set; export it with the server's API key, or remove api_key_env if the server needs none"
            )
        out["Authorization"] = f"Bearer {key}"
    return out


def request_body(
    spec, messages: list[dict], params: GenerationParams, prompt: str | None = None
) -> tuple[dict, list[str]]:
    """The request body for these settings (chat messages, or a raw `prompt` for /completions), and
    notes about settings the OpenAI API cannot carry."""
    body: dict = {"model": spec.remote_model}
    if prompt is None:
        body["messages"] = [{"role": m["role"], "content": m["content"]} for m in messages]
    else:
        body["prompt"] = prompt
    body |= {
        "stream": True,
        "max_tokens": params.max_new_tokens,
        "temperature": params.temperature,
        "top_p": params.top_p,
        "stream_options": {"include_usage": True},  # token counts from servers that send them
    }
    if params.seed is not None:
        body["seed"] = params.seed
    if params.stop:
        body["stop"] = list(params.stop[:OPENAI_MAX_STOP])
    notes = []
    unsent = [
        name
        for name, on in (
            ("top_k", params.top_k > 0),
            ("repetition_penalty", params.repetition_penalty != 1.0),
        )
        if on
    ]
    if unsent:
        notes.append(
            f"{' and '.join(unsent)} are not part of the OpenAI API, so they were not sent to {spec.base_url}"
        )
    return body, notes


def describe_http_error(spec, status: int, body: str) -> str:
    """One sentence per failure kind, naming the catalog field that fixes it."""
    detail = body.strip().replace("\n", " ")[:300]
    where = f"{spec.id}: the server at {spec.base_url}"
    if status in (401, 403):
        fix = (
            f"set {spec.api_key_env} to a valid key" if spec.api_key_env else "set api_key_env in the catalog"
        )
        return f"{where} refused the request ({status}); {fix}. Server said: {detail}"
    if status == 404:
        return (
            f"{where} answered 404: it has no model {spec.remote_model!r} or no such route. "
            f"Set remote_model to a name from GET {_url(spec, '/models')}, and base_url to the address that "
            f"ends in /v1. Server said: {detail}"
        )
    if status in (400, 422):
        return (
            f"{where} rejected the request ({status}): {detail}. Check remote_model "
            f"({spec.remote_model!r}) and the generation settings"
        )
    return f"{where} failed with HTTP {status}: {detail}"


class RemoteStream:
    """Chunks of one answer from the remote server; `stats` is complete once iteration ends.

    With `prompt` the text is continued as is through `POST {base_url}/completions` (the API's raw
    text completions); otherwise `messages` go to `/chat/completions`. `extra_body` adds fields a
    particular server understands (the llama.cpp engine's sampling fields and per-request LoRA).
    `client` is a long-lived `httpx.Client` to reuse (kept open here); without it each answer opens
    its own, which costs a TLS context and a new connection per answer.
    """

    def __init__(
        self,
        spec,
        messages: list[dict],
        params: GenerationParams,
        stop_event=None,
        *,
        prompt: str | None = None,
        extra_body: dict | None = None,
        client=None,
    ):
        self.spec = spec
        self._client = client
        self.params = params.validate()
        self.stop_event = stop_event or threading.Event()
        self.route = "/chat/completions" if prompt is None else "/completions"
        self.body, self.notes = request_body(spec, messages, self.params, prompt)
        if extra_body:  # a server's own fields (llama-server: top_k, repeat_penalty, lora)
            self.body |= extra_body
        self.stats = GenerationStats()
        self.text = ""
        self.completed = False  # the server said the answer ended ([DONE] or a finish_reason)
        self._started = False

    def cancel(self) -> None:
        self.stop_event.set()

    def __iter__(self) -> Iterator[str]:
        if self._started:
            raise RuntimeError("a RemoteStream can be iterated once")
        self._started = True
        try:
            yield from self._stream()
        except GenerationError:
            self.stats.finish_reason = "error"
            raise
        finally:
            self.stats.finished_at = time.perf_counter()

    def _stream(self) -> Iterator[str]:
        import httpx

        spec = self.spec
        timeout = read_timeout_s()
        request_headers = headers(spec)
        matcher = StopMatcher(self.params.stop)
        reason = None
        chunks = 0
        watched = None
        try:
            limits = httpx.Timeout(timeout, connect=CONNECT_TIMEOUT_S)
            own = contextlib.nullcontext(self._client) if self._client else httpx.Client(timeout=limits)
            with (
                own as client,
                client.stream(
                    "POST", _url(spec, self.route), json=self.body, headers=request_headers, timeout=limits
                ) as response,
            ):
                if response.status_code != 200:
                    raise RemoteBackendError(describe_http_error(spec, response.status_code, response.read().decode(errors="replace")))  # fmt: skip
                # The stop button must not wait for the server's next chunk: close the connection.
                watched = _stop_watcher.watch(self.stop_event, response)
                for line in response.iter_lines():
                    if self.stop_event.is_set():
                        break
                    event = _parse_event(spec, line)
                    if event is None:
                        continue
                    if event == "[DONE]":
                        self.completed = True
                        break
                    usage = event.get("usage") or {}
                    if usage:
                        self.stats.prompt_tokens = usage.get("prompt_tokens", self.stats.prompt_tokens)
                        self.stats.completion_tokens = usage.get("completion_tokens", chunks)
                    for choice in event.get("choices") or []:
                        content = choice.get("text") or (choice.get("delta") or {}).get("content") or ""
                        if content:
                            chunks += 1
                            if not usage:
                                self.stats.completion_tokens = chunks
                            text, hit = matcher.feed(content)
                            if text:
                                yield self._emit(text)
                            if hit:
                                reason = "stop"
                                return
                        reason = choice.get("finish_reason") or reason
                        self.completed = self.completed or reason is not None
                tail = matcher.flush()
                if tail:
                    yield self._emit(tail)
                reason = reason or "stop"  # the stream ended without saying why: the model finished
        except httpx.TimeoutException as exc:
            if self.stop_event.is_set():
                return
            kind = "connect within" if isinstance(exc, httpx.ConnectTimeout) else "send anything for"
            limit = CONNECT_TIMEOUT_S if isinstance(exc, httpx.ConnectTimeout) else timeout
            raise RemoteBackendError(
                f"{spec.id}: the server at {spec.base_url} did not {kind} {limit:g} s; check that it is "
                "running and not overloaded, or raise BABL_REMOTE_TIMEOUT_S"
            ) from exc
        except httpx.ConnectError as exc:
            raise RemoteBackendError(
                f"{spec.id}: could not reach {spec.base_url} ({exc}); start the server or fix base_url in the "
                "catalog entry"
            ) from exc
        except (httpx.StreamError, httpx.ReadError, httpx.RemoteProtocolError) as exc:
            if self.stop_event.is_set():
                return  # we closed the connection ourselves
            raise RemoteBackendError(
                f"{spec.id}: the connection to {spec.base_url} broke mid-answer ({exc.__class__.__name__}: "
                f"{exc}); the text so far is kept"
            ) from exc
        finally:
            if watched is not None:
                _stop_watcher.forget(watched)
            if self.stop_event.is_set():
                self.stats.finish_reason = "cancelled"
            elif self.stats.finish_reason is None and reason is not None:
                self.stats.finish_reason = "length" if reason == "length" else "stop"

    def _emit(self, text: str) -> str:
        if self.stats.first_chunk_at is None:
            self.stats.first_chunk_at = time.perf_counter()
        self.text += text
        return text


class _StopWatcher:
    """One thread for every streaming answer: closes an answer's connection when its stop event is set.

    A watcher thread per answer woke 20 times a second each (160 wake-ups a second at 8 answers, each
    taking the GIL); on a 2-core machine that CPU comes from the server's own threads. This one wakes
    20 times a second only while some answer streams, and sleeps otherwise.
    """

    POLL_S = 0.05  # how soon a stopped answer's connection closes

    def __init__(self) -> None:
        self._watched: dict[int, tuple[threading.Event, object]] = {}
        self._cond = threading.Condition()
        self._thread: threading.Thread | None = None
        self._next = 0

    def watch(self, stop_event: threading.Event, response) -> int:
        with self._cond:
            self._next += 1
            self._watched[self._next] = (stop_event, response)
            if self._thread is None or not self._thread.is_alive():
                self._thread = threading.Thread(target=self._loop, name="babl-stop-watcher", daemon=True)
                self._thread.start()
            self._cond.notify()
            return self._next

    def forget(self, key: int) -> None:
        with self._cond:
            self._watched.pop(key, None)

    def _loop(self) -> None:
        while True:
            with self._cond:
                while not self._watched:
                    self._cond.wait()
                stopped = [k for k, (event, _) in self._watched.items() if event.is_set()]
                responses = [self._watched.pop(k)[1] for k in stopped]
            for response in responses:
                response.close()
            time.sleep(self.POLL_S)


_stop_watcher = _StopWatcher()


def _parse_event(spec, line: str):
    """One SSE line: None (comments, blank lines), "[DONE]", or the decoded JSON event."""
    if not line.startswith("data:"):
        return None
    data = line[5:].strip()
    if data == "[DONE]":
        return data
    try:
        event = json.loads(data)
    except ValueError:
        raise RemoteBackendError(
            f"{spec.id}: the server at {spec.base_url} sent something that is not JSON: {data[:200]!r}"
        ) from None
    if isinstance(event, dict) and event.get("error"):
        error = event["error"]
        message = error.get("message") if isinstance(error, dict) else error
        raise RemoteBackendError(f"{spec.id}: the server at {spec.base_url} reported an error: {message}")
    return event


# --------------------------------------------------------------------------------------------------
# Is the server there? (catalog availability)

_probe_lock = threading.Lock()
_probes: dict[tuple[str, str], tuple[float, str | None]] = {}


def probe(spec) -> str | None:
    """None when the server answers `GET {base_url}/models`, else why the entry is unavailable (the key
    is missing or refused, or nothing answers within 2 s); remembered for 30 s."""
    import httpx

    try:
        request_headers = headers(spec)
    except RemoteBackendError as exc:
        return str(exc).split(": ", 1)[1]
    key = (spec.base_url, request_headers.get("Authorization", ""))
    with _probe_lock:
        hit = _probes.get(key)
        if hit and time.monotonic() - hit[0] < PROBE_TTL_S:
            return hit[1]
    try:
        response = httpx.get(_url(spec, "/models"), headers=request_headers, timeout=PROBE_TIMEOUT_S)
        if response.status_code in (401, 403):
            reason = describe_http_error(spec, response.status_code, response.text).split(": ", 1)[1]
        else:
            # Any other answer means the server is up: some serve completions without a working /models
            # (`transformers serve` answers 500 there offline); errors of a real request say more.
            reason = None
    except httpx.HTTPError as exc:
        reason = (
            f"remote server down: {spec.base_url} did not answer ({exc.__class__.__name__}); start it or fix "
            "base_url in the catalog"
        )
    with _probe_lock:
        _probes[key] = (time.monotonic(), reason)
    return reason


def forget_probes() -> None:
    """Drop remembered probe results (tests, and after a server was started)."""
    with _probe_lock:
        _probes.clear()
