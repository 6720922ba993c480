"""A conversation as the history keeps it, and the writes of a live Chainlit session.

- each answer step carries its turn (`TURN_KEY`: the question, the model's raw answer, the model id;
  with `BABL_RECORD_PROMPTS=1` also the exact prompt, for auditing what a model saw) and the thread's
  metadata the session's settings (`SESSION_KEY`); `stored_conversation` reads a thread back;
- `save_settings`, `name_thread`, `store_message`, `store_elements` write now and wait, where Chainlit's
  own writes are fire-and-forget tasks that a restart can cut short.

Plain data only: turning a session into these records and back is the chat presenter's
(`babl_core.web.ui`).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from babl_core import settings
from babl_core.storage.schema import decode_json

log = logging.getLogger("babl.history")

RECORD_PROMPTS_ENV = "BABL_RECORD_PROMPTS"
TURN_KEY = "babl_turn"  # answer step metadata: one turn of the conversation
SESSION_KEY = "babl_session"  # thread metadata: the settings in effect (widget ids -> values)


def record_prompts() -> bool:
    """`BABL_RECORD_PROMPTS=1`: keep each answer's exact prompt with its turn."""
    return settings.env_flag(RECORD_PROMPTS_ENV)


# --------------------------------------------------------------------------------------------------
# What a thread stores, read back


def only_commands(thread: Mapping[str, Any], commands: Iterable[str]) -> bool:
    """Whether every message the user sent in this thread was one of `commands` (the chat's command
    ids: `status`, `export`; a command picked from the menu is stored with its `/name` or, before Babl
    wrote that, empty)."""
    sent = {"", *(f"/{command}" for command in commands)}
    return all(
        str(step.get("output") or "").strip().lower() in sent
        for step in thread.get("steps") or []
        if step.get("type") == "user_message"
    )


@dataclass
class StoredConversation:
    """The conversation rebuilt from a thread's answer steps.

    Attributes:
        messages: user/assistant messages as `ChatSession.messages` holds them (assistant ones with
            `model` and `stopped`).
        marks: user message id -> how many messages came before it (`UiState.marks`, for edits).
        settings: The stored settings snapshot (widget id -> value); {} when none was stored.
    """

    messages: list[dict] = field(default_factory=list)
    marks: dict[str, int] = field(default_factory=dict)
    settings: dict[str, Any] = field(default_factory=dict)


def stored_conversation(thread: Mapping[str, Any]) -> StoredConversation:
    """Read a Chainlit thread dict (steps in creation order) back into a conversation."""
    metadata = decode_json(thread.get("metadata")) or {}
    snapshot = metadata.get(SESSION_KEY) or metadata.get("chat_settings") or {}
    conversation = StoredConversation(settings=dict(snapshot) if isinstance(snapshot, dict) else {})
    for step in thread.get("steps") or []:
        turn = (decode_json(step.get("metadata")) or {}).get(TURN_KEY)
        if not isinstance(turn, dict) or not isinstance(turn.get("answer"), str):
            continue
        if turn.get("question_id"):
            conversation.marks[turn["question_id"]] = len(conversation.messages)
        conversation.messages.append({"role": "user", "content": str(turn.get("question", ""))})
        conversation.messages.append(
            {
                "role": "assistant",
                "content": turn["answer"],
                "model": turn.get("model"),
                "stopped": bool(turn.get("stopped")),
            }
        )
    return conversation


def title_of(question: str) -> str:
    """A conversation's title from its first question: the first line, shortened."""
    line = question.strip().splitlines()[0] if question.strip() else "conversation"
    return line if len(line) <= 60 else line[:59] + "…"


# --------------------------------------------------------------------------------------------------
# Writing from a live Chainlit session


def _live_session():
    """(session, data layer) when the current Chainlit session has a stored thread (after its first
    message), else (None, None).

    Before the first message Chainlit has not created the thread (its own writes wait in a queue);
    writing then would create a thread without an owner.
    """
    from chainlit.context import context
    from chainlit.data import get_data_layer

    try:
        session = context.session
    except Exception:  # no Chainlit context (a plain script)
        return None, None
    layer = get_data_layer()
    if layer is None or not getattr(session, "has_first_interaction", False):
        return None, None
    return session, layer


async def save_settings(snapshot: dict) -> bool:
    """Store the session's settings (`web.ui.settings_snapshot`) in its thread's metadata now (a
    restart must not lose them; Chainlit itself only stores the session when the tab disconnects).
    Returns True when written."""
    from chainlit.user_session import user_sessions

    session, layer = _live_session()
    if session is None:
        return False
    # Chainlit writes the user session into the same metadata on disconnect: keep its copy current
    # so that write cannot bring back older settings.
    user_sessions.setdefault(session.id, {})[SESSION_KEY] = snapshot
    await layer.update_thread(thread_id=session.thread_id, metadata={SESSION_KEY: snapshot})
    return True


async def name_thread(name: str) -> bool:
    """Give the current session's thread this name (Chainlit names a thread after its first message,
    which is empty when that was a command picked from the menu). Returns True when written."""
    session, layer = _live_session()
    if session is None:
        return False
    await layer.update_thread(thread_id=session.thread_id, name=name)
    return True


async def store_message(step_dict: dict) -> bool:
    """Write a message step now and wait for it (Chainlit's own writes are fire-and-forget tasks),
    so an answer is stored before its turn ends. Returns True when written."""
    session, layer = _live_session()
    if session is None:
        return False
    started = time.perf_counter()
    await layer.update_step(dict(step_dict))
    log.debug("stored step %s in %.3f s", step_dict.get("id"), time.perf_counter() - started)
    return True


async def store_elements(elements: Iterable[Any]) -> int:
    """Write elements (previews, downloads, exports) now and wait for them, like `store_message`:
    Chainlit stores them in background tasks, which a restart can cut short. Returns how many."""
    session, layer = _live_session()
    if session is None:
        return 0
    stored = 0
    for element in elements:
        await layer.create_element(element)
        stored += 1
    return stored
