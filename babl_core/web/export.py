"""A conversation exported as Markdown and JSON (the `/export` command): two downloads, never with an
HTML type."""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from datetime import UTC, datetime
from typing import Any

from babl_core.engine.service import ChatSession
from babl_core.storage.conversations import title_of
from babl_core.web.render import DOWNLOAD_MIME, download_name, format_answer


def conversation_title(chat: ChatSession) -> str:
    """The first line of the first question, shortened (Chainlit names threads by it too)."""
    return title_of(next((m["content"] for m in chat.messages if m["role"] == "user"), ""))


def _now() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def export_json(chat: ChatSession, *, preview: bool | None = None, exported_at: str | None = None) -> str:
    """The conversation as JSON: settings, then each message (assistant ones with their model)."""
    document = {
        "format": "babl-conversation",
        "version": 1,
        "title": conversation_title(chat),
        "thread_id": chat.id,
        "exported_at": exported_at or _now(),
        "model": chat.model_id,
        "settings": dict(chat.settings),
        "system_prompt": chat.system_prompt,
        "messages": [
            {k: v for k, v in m.items() if k in ("role", "content", "model", "stopped")}
            for m in chat.messages
        ],
    }
    if preview is not None:
        document["html_preview"] = preview
    return json.dumps(document, ensure_ascii=False, indent=2) + "\n"


def export_markdown(
    chat: ChatSession, *, tasks: Mapping[str, str] | None = None, exported_at: str | None = None
) -> str:
    """The conversation as Markdown: a header with the settings, then each turn.

    Args:
        chat: The conversation.
        tasks: model id -> task, so code answers are fenced as the chat shows them (unknown models:
            the raw text).
        exported_at: The timestamp written in the header (now when None).
    """
    tasks = tasks or {}
    lines = [f"# {conversation_title(chat)}", ""]
    setting_text = " · ".join(f"{k.replace('_', ' ')} {v}" for k, v in chat.settings.items())
    lines.append(f"*Exported from Babl {exported_at or _now()} · model `{chat.model_id}` · {setting_text}*")
    if chat.system_prompt.strip():
        lines += ["", f"**System prompt:** {chat.system_prompt.strip()}"]
    for message in chat.messages:
        if message["role"] == "user":
            lines += ["", "---", "", "### You", "", message["content"]]
        else:
            model = message.get("model") or chat.model_id
            task = tasks.get(model)
            body = format_answer(task, message["content"]) if task else message["content"]
            lines += ["", f"### `{model}`", "", body]
            if message.get("stopped"):
                lines += ["", "*(stopped)*"]
    return "\n".join(lines).rstrip() + "\n"


def export_attachments(
    chat: ChatSession, *, preview: bool | None = None, tasks: Mapping[str, str] | None = None
) -> list[dict]:
    """Keyword arguments for two `cl.File` downloads (Markdown and JSON), never with an HTML type."""
    stamp = _now()
    base = f"babl {conversation_title(chat)}"
    return [
        {
            "name": download_name(base, suffix=".md"),
            "content": export_markdown(chat, tasks=tasks, exported_at=stamp).encode("utf-8"),
            "mime": DOWNLOAD_MIME,
        },
        {
            "name": download_name(base, suffix=".json"),
            "content": export_json(chat, preview=preview, exported_at=stamp).encode("utf-8"),
            "mime": DOWNLOAD_MIME,
        },
    ]


def model_tasks(specs: Iterable[Any]) -> dict[str, str]:
    """model id -> task for `export_markdown`, from catalog entries."""
    return {spec.id: spec.task for spec in specs}
