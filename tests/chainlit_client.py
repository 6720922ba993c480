"""A small Chainlit 2.12 client for end-to-end tests: HTTP login and routes plus the socket.io
session the browser opens (`/ws/socket.io`), so a test can chat, change settings and resume a thread
against a real `chainlit run` server without a browser.

Not a test module (no `test_` prefix); used by tests/test_history_e2e.py (and `shown_steps` by
tests/test_app.py's in-process tab).
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections.abc import Callable
from datetime import UTC, datetime

import httpx
import socketio

COOKIE = "access_token"


def login(url: str, user: str, password: str) -> str:
    """Log in with the password form; returns the session token (Chainlit's auth cookie)."""
    response = httpx.post(f"{url}/login", data={"username": user, "password": password}, timeout=15)
    response.raise_for_status()
    return response.cookies[COOKIE]


def shown_steps(events: list[tuple[str, dict]]) -> dict[str, dict]:
    """The steps (messages, status steps) a tab shows, by id in the order first shown, with their last
    content: what the UI makes of Chainlit's `new_message`/`update_message`/`stream_*` events."""
    steps: dict[str, dict] = {}
    for name, data in events:
        if name in ("new_message", "update_message", "stream_start"):
            steps[data["id"]] = {**steps.get(data["id"], {}), **data}
        elif name == "stream_token":
            step = steps[data["id"]]
            step["output"] = data["token"] if data["isSequence"] else step["output"] + data["token"]
    return steps


class Http:
    """Chainlit's HTTP routes as one logged-in user."""

    def __init__(self, url: str, token: str) -> None:
        self.client = httpx.Client(base_url=url, cookies={COOKIE: token}, timeout=15)

    def threads(self) -> list[dict]:
        response = self.client.post("/project/threads", json={"pagination": {"first": 50}, "filter": {}})
        response.raise_for_status()
        return response.json()["data"]

    def thread(self, thread_id: str) -> httpx.Response:
        return self.client.get(f"/project/thread/{thread_id}")

    def delete_thread(self, thread_id: str) -> httpx.Response:
        return self.client.request("DELETE", "/project/thread", json={"threadId": thread_id})

    def get(self, path: str) -> httpx.Response:
        return self.client.get(path)

    def close(self) -> None:
        self.client.close()


class Tab:
    """One browser tab: a socket.io session of Chainlit's web app, its received events recorded."""

    def __init__(self, url: str, token: str) -> None:
        self.url = url
        self.token = token
        self.events: list[tuple[str, object]] = []
        self.session_id = str(uuid.uuid4())
        self.thread_id: str | None = None
        self.sio = socketio.AsyncClient(reconnection=False)
        self.sio.on("*", self._record)
        self.refused: str | None = None

    async def _record(self, event: str, data: object = None) -> None:
        self.events.append((event, data))
        if event == "first_interaction" and isinstance(data, dict):
            self.thread_id = data.get("thread_id")

    async def open(self, thread_id: str | None = None, *, wait_ready: bool = True) -> Tab:
        """Connect (resuming `thread_id` when given) and, with `wait_ready`, wait for the settings
        widgets, which both a new chat and a resumed one send."""
        auth = {
            "sessionId": self.session_id,
            "clientType": "webapp",
            "userEnv": "{}",
            "chatProfile": None,
            "threadId": thread_id,
        }
        await self.sio.connect(
            self.url,
            headers={"Cookie": f"{COOKIE}={self.token}"},
            auth=auth,
            socketio_path="/ws/socket.io",
            transports=["websocket"],
            wait_timeout=15,
        )
        await self.sio.emit("connection_successful")
        if wait_ready and thread_id:
            # on_chat_resume runs first, then Chainlit sends the stored thread (or an error).
            await self.wait_for(
                lambda: self.count("resume_thread") + self.count("resume_thread_error") >= 1,
                what="the resumed thread",
            )
        elif wait_ready:
            await self.wait_for(lambda: self.count("chat_settings") >= 1, what="the settings widgets")
        return self

    def count(self, event: str) -> int:
        return sum(1 for name, _ in self.events if name == event)

    def of(self, event: str) -> list:
        return [data for name, data in self.events if name == event]

    async def wait_for(self, condition: Callable[[], bool], *, what: str, timeout: float = 60) -> None:
        deadline = time.monotonic() + timeout
        while not condition():
            if time.monotonic() > deadline:
                names = [name for name, _ in self.events][-30:]
                raise AssertionError(f"timed out waiting for {what}; last events: {names}")
            await asyncio.sleep(0.02)

    async def send(self, text: str, *, command: str | None = None, timeout: float = 90) -> str:
        """Send a user message and wait until the server ends its task; returns the message id."""
        start = len(self.events)
        message_id = str(uuid.uuid4())
        message = {
            "id": message_id,
            "threadId": self.thread_id or "",
            "name": "user",
            "type": "user_message",
            "output": text,
            "createdAt": datetime.now(UTC).isoformat(),
        }
        if command:
            message["command"] = command
        await self.sio.emit("client_message", {"message": message, "fileReferences": []})

        def done() -> bool:
            # Chainlit wraps on_message in task_start ... task_end (sent once the hook returned).
            names = [name for name, _ in self.events[start:]]
            return "task_start" in names and "task_end" in names[names.index("task_start") :]

        await self.wait_for(done, what=f"the answer to {text[:40]!r}", timeout=timeout)
        return message_id

    async def change_settings(self, **values) -> None:
        """Submit the settings dialog: the last widgets' values with `values` applied; wait until the
        server's handler has ended (Chainlit wraps it in task_start ... task_end, and it goes on after
        re-sending the widgets: a message sent before its task_end would take that for its own)."""
        current = {w["id"]: w.get("initial") for w in self.widgets()}
        current.update(values)
        start = len(self.events)
        sent = self.count("chat_settings")
        await self.sio.emit("chat_settings_change", current)

        def done() -> bool:
            names = [name for name, _ in self.events[start:]]
            return (
                self.count("chat_settings") > sent
                and "task_start" in names
                and "task_end" in names[names.index("task_start") :]
            )

        await self.wait_for(done, what="the settings change to end")

    def widgets(self) -> list[dict]:
        return self.of("chat_settings")[-1]

    def widget(self, widget_id: str) -> dict:
        return next(w for w in self.widgets() if w["id"] == widget_id)

    def messages(self) -> dict[str, dict]:
        """Steps shown, by id, with their latest content (streamed tokens applied)."""
        return shown_steps(self.events)

    def answers(self) -> list[dict]:
        return [s for s in self.messages().values() if s.get("type") == "assistant_message"]

    def elements(self) -> list[dict]:
        return self.of("element")

    async def close(self) -> None:
        if self.sio.connected:
            await self.sio.disconnect()


def resumed_thread(tab: Tab) -> dict:
    """The thread the server sent for a resume (`resume_thread` event)."""
    threads = tab.of("resume_thread")
    assert threads, f"no resume_thread event: {[name for name, _ in tab.events]}"
    thread = threads[-1]
    return thread if isinstance(thread, dict) else json.loads(thread)
