"""Babl's Chainlit hooks. Only UI glue lives here; everything else is in babl_core."""

from __future__ import annotations

import chainlit as cl
from chainlit.server import app as chainlit_app

from babl_core.api import register_api
from babl_core.chat import ChatSession, coalesce
from babl_core.runtime import service

register_api(chainlit_app)  # the HTTP API on the same port, ahead of Chainlit's UI catch-all


@cl.on_chat_start
async def start() -> None:
    svc = service()
    default = svc.catalog.default_model()
    if default is None:
        await cl.Message(
            content="No model is usable here. Run `python -m babl_core models` to see why."
        ).send()
        return
    cl.user_session.set("chat", ChatSession(model_id=default.id))
    await cl.Message(content=f"Model: **{default.display_label}**").send()


@cl.on_message
async def on_message(message: cl.Message) -> None:
    session: ChatSession = cl.user_session.get("chat")
    reply = service().respond(session, message.content)
    out = cl.Message(content="", author=session.model_id)
    async for chunk in coalesce(reply):
        await out.stream_token(chunk)
    await out.send()
