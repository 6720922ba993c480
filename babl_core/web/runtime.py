"""The process-wide ChatService shared by the Chainlit hooks and the API routes (one cache)."""

from __future__ import annotations

import threading

from babl_core.engine.service import ChatService

_lock = threading.Lock()
_service: ChatService | None = None


def service() -> ChatService:
    """The one ChatService of this process, created on first use (models load lazily)."""
    global _service
    with _lock:
        if _service is None:
            _service = ChatService()
        return _service


def reset_service(new: ChatService | None = None) -> None:
    """Replace the shared service (tests)."""
    global _service
    with _lock:
        _service = new
