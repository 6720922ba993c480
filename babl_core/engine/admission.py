"""Admission control: how much work one request may bring, and how many generations may wait.

A review found that one 18 KB request (2,000 prompts × n 8) became 16,000 generations, each with a
task and a thread, and froze the server for minutes. So every request is measured before any work
(`check_request`: body size, prompts, n × prompts, characters across all messages), and every
generation holds a `Ticket` from the process's `Admission`:

- at most `max_running` generations run at once; the others wait in a first-come queue (the chat
  shows "Busy: N ahead of you"), without a thread or a task of their own doing anything;
- at most `max_queued` generations wait: a request that would make the queue longer is refused at
  once (`ServerBusy`: 429 with Retry-After in the API, a plain message in the chat);
- one client (a chat user, or an API caller's address) holds at most `max_per_client` generations,
  running or waiting, so one client cannot fill the queue. A client with nothing in flight may still
  send one request with up to `max_generations` choices (seed 003's `n_gen` 6, say).

Every limit has an environment variable (read when the service starts; README "Settings"). The
engine never imports this module's callers: it knows nothing of HTTP or Chainlit.
"""

from __future__ import annotations

import asyncio
import threading
from collections import Counter, deque
from collections.abc import Callable
from dataclasses import dataclass

from babl_core.settings import env_int

POSITION_POLL_S = 0.5  # how often a waiting generation re-reads its place in the queue


@dataclass(frozen=True)
class Limits:
    """What one request may bring and how many generations may run and wait.

    Attributes:
        max_body_bytes: an API request's body (`BABL_MAX_BODY_BYTES`, 413 above it).
        max_prompts: prompts in one `/v1/completions` request (`BABL_MAX_PROMPTS`).
        max_generations: n × prompts of one request (`BABL_MAX_GENERATIONS`).
        max_request_chars: characters across all messages (or prompts) of one request
            (`BABL_MAX_REQUEST_CHARS`).
        max_running: generations running at once (`BABL_MAX_RUNNING`, default `BABL_MAX_BATCH`).
        max_queued: generations waiting for a running slot (`BABL_MAX_QUEUED`, 429 above it).
        max_per_client: generations one user or API client holds, running or waiting
            (`BABL_MAX_PER_CLIENT`).
    """

    max_body_bytes: int = 2_000_000
    max_prompts: int = 16
    max_generations: int = 16
    max_request_chars: int = 400_000
    max_running: int = 16
    max_queued: int = 64
    max_per_client: int = 4

    @classmethod
    def from_env(cls) -> Limits:
        """The limits from the environment; unset variables keep the defaults.

        Raises:
            ValueError: a variable that is not a whole number of at least 1 (the message names it).
        """
        default = cls()
        values = {
            "max_body_bytes": env_int("BABL_MAX_BODY_BYTES", default.max_body_bytes),
            "max_prompts": env_int("BABL_MAX_PROMPTS", default.max_prompts),
            "max_generations": env_int("BABL_MAX_GENERATIONS", default.max_generations),
            "max_request_chars": env_int("BABL_MAX_REQUEST_CHARS", default.max_request_chars),
            "max_running": env_int("BABL_MAX_RUNNING", env_int("BABL_MAX_BATCH", default.max_running)),
            "max_queued": env_int("BABL_MAX_QUEUED", default.max_queued),
            "max_per_client": env_int("BABL_MAX_PER_CLIENT", default.max_per_client),
        }
        for name, value in values.items():
            if value < 1:
                raise ValueError(f"BABL_{name.upper()}={value} must be at least 1")
        return cls(**values)


class RequestTooLarge(ValueError):
    """A request that brings more than the limits allow; `param` names the field, `status` is the HTTP
    status (413 for the body, 400 otherwise)."""

    def __init__(self, message: str, param: str | None, status: int = 400, code: str = "request_too_large"):
        super().__init__(message)
        self.param = param
        self.status = status
        self.code = code


class ServerBusy(RuntimeError):
    """No room for the request's generations now; retry after `retry_after` seconds."""

    def __init__(self, message: str, retry_after: int, code: str):
        super().__init__(message)
        self.retry_after = retry_after
        self.code = code


def check_request(
    limits: Limits, *, prompts: int = 1, n: int = 1, chars: int = 0, param: str = "messages"
) -> None:
    """Refuse a request that brings more work than the limits allow, before any work.

    Args:
        limits: the limits in force.
        prompts: prompts in the request (a `/v1/completions` list; 1 otherwise).
        n: choices per prompt.
        chars: characters across all its messages or prompts.
        param: the request field that holds the text.

    Raises:
        RequestTooLarge: the first limit exceeded, with the numbers and what to send instead.
    """
    if prompts > limits.max_prompts:
        raise RequestTooLarge(
            f"The request has {prompts:,} prompts; at most {limits.max_prompts} are allowed in one request "
            "(BABL_MAX_PROMPTS). Send them in several requests.",
            "prompt",
        )
    if prompts * n > limits.max_generations:
        raise RequestTooLarge(
            f"The request asks for {prompts * n:,} generations ({prompts} prompt(s) × n {n}); at most "
            f"{limits.max_generations} are allowed in one request (BABL_MAX_GENERATIONS). Lower n or send "
            "fewer prompts.",
            "n",
        )
    if chars > limits.max_request_chars:
        raise RequestTooLarge(
            f"The request's text has {chars:,} characters; at most {limits.max_request_chars:,} are allowed "
            "across all messages (BABL_MAX_REQUEST_CHARS). Send a shorter history or excerpt.",
            param,
        )


class Ticket:
    """One generation's place: waiting for a running slot, running, or released.

    `release()` may be called any number of times, from any thread; the generation gives its slot (or
    its place in the queue) back the first time.
    """

    def __init__(self, admission: Admission, client: str | None):
        self.admission = admission
        self.client = client
        self.running = False
        self.released = False
        self._granted: asyncio.Future | None = None

    async def wait(self, on_position: Callable[[int], None] | None = None) -> None:
        """Until this generation may run. `on_position(n)` is called when it has to wait, and again
        whenever the number ahead of it changes. Cancelling the wait gives the place back."""
        admission = self.admission
        loop = asyncio.get_running_loop()
        with admission._lock:
            if self.released:
                raise RuntimeError("this generation's ticket was already given back")
            if self.running:
                return
            if admission._running < admission.limits.max_running and not admission._waiting:
                admission._running += 1
                self.running = True
                return
            self._granted = loop.create_future()
            admission._waiting.append(self)
        shown = None
        try:
            while True:
                with admission._lock:
                    if self.running:
                        return
                    ahead = admission._ahead_of(self)
                if on_position is not None and ahead != shown:
                    on_position(ahead)
                    shown = ahead
                try:
                    await asyncio.wait_for(asyncio.shield(self._granted), POSITION_POLL_S)
                except TimeoutError:
                    continue
        except BaseException:
            self.release()
            raise

    def release(self) -> None:
        self.admission._release(self)


class Admission:
    """The process's running slots, waiting queue and per-client shares (see the module docstring)."""

    def __init__(self, limits: Limits | None = None):
        self.limits = limits or Limits.from_env()
        self._lock = threading.Lock()
        self._running = 0
        self._held = 0  # running + waiting + admitted but not started yet
        self._waiting: deque[Ticket] = deque()
        self._per_client: Counter[str] = Counter()
        self.refused: Counter[str] = Counter()  # code -> requests refused since start

    def admit(self, client: str | None, count: int = 1) -> list[Ticket]:
        """Tickets for a request's `count` generations, all or none. `client` None: a caller in this
        process that answers for itself (the CLI, a benchmark): the line and its bound apply, the
        per-client share does not.

        Raises:
            ServerBusy: the queue would be longer than `max_queued`, or `client` would hold more than
                `max_per_client` generations (unless it holds none: one request is always considered).
        """
        limits = self.limits
        with self._lock:
            held = self._per_client[client] if client is not None else 0
            if held and held + count > limits.max_per_client:
                self.refused["client_limit"] += 1
                raise ServerBusy(
                    f"You already have {held} answer(s) running or waiting; at most {limits.max_per_client} "
                    "per user (BABL_MAX_PER_CLIENT). Wait for one to finish, then try again.",
                    retry_after=2,
                    code="client_limit",
                )
            queued_after = self._held + count - limits.max_running
            if queued_after > limits.max_queued:
                self.refused["queue_full"] += 1
                waiting = max(self._held - limits.max_running, 0)
                raise ServerBusy(
                    f"The server is busy: {waiting} answer(s) are waiting already, the most it queues "
                    f"(BABL_MAX_QUEUED={limits.max_queued}). Try again in a few seconds.",
                    retry_after=5,
                    code="queue_full",
                )
            self._held += count
            if client is not None:
                self._per_client[client] += count
        return [Ticket(self, client) for _ in range(count)]

    def _ahead_of(self, ticket: Ticket) -> int:
        try:
            return self._waiting.index(ticket)
        except ValueError:
            return 0

    def _release(self, ticket: Ticket) -> None:
        with self._lock:
            if ticket.released:
                return
            ticket.released = True
            self._held -= 1
            if ticket.client is not None:
                self._per_client[ticket.client] -= 1
                if self._per_client[ticket.client] <= 0:
                    del self._per_client[ticket.client]
            if ticket.running:
                ticket.running = False
                self._running -= 1
            elif ticket in self._waiting:
                self._waiting.remove(ticket)
            while self._waiting and self._running < self.limits.max_running:
                nxt = self._waiting.popleft()
                nxt.running = True
                self._running += 1
                _wake(nxt._granted)

    def status(self) -> dict:
        """Running, waiting and refused generations, and the limits (shown by `/v1/status`)."""
        with self._lock:
            return {
                "running": self._running,
                "waiting": len(self._waiting),
                "held": self._held,
                "clients": len(self._per_client),
                "refused": dict(self.refused),
                "limits": {
                    "max_running": self.limits.max_running,
                    "max_queued": self.limits.max_queued,
                    "max_per_client": self.limits.max_per_client,
                },
            }


def _wake(future: asyncio.Future | None) -> None:
    """Resolve a waiting ticket's future from whatever thread released a slot."""
    if future is None:
        return

    def resolve() -> None:
        if not future.done():
            future.set_result(None)

    try:
        future.get_loop().call_soon_threadsafe(resolve)
    except RuntimeError:  # its loop is closed: nobody waits on it any more
        pass
