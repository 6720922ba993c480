"""The HTTP API on the chat server: OpenAI-compatible routes plus the email endpoint.

Routes (all on Chainlit's own FastAPI app, same port, same `service()` and model cache as the UI):

- `GET /v1/models`, `GET /v1/models/{id}`: the catalog with each entry's availability.
- `POST /v1/chat/completions`: messages in (system first, then user/assistant turns), rendered by the
  entry's prompt style; `stream=true` gives server-sent events ending with `data: [DONE]`.
- `POST /v1/completions`: a raw prompt, continued as is (no prompt style); streamable the same way.
- `GET /v1/status`: loaded models, memory, active generations, the load queue, API counters.
- `POST /api/generate` and `POST /`: the email endpoint's `{prompt, token_count, temperature, n_gen, model?}`
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

import logging
from collections.abc import Callable
from typing import Any

from fastapi import APIRouter, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.routing import APIRoute

from babl_core.engine.admission import RequestTooLarge
from babl_core.web.api.errors import ApiError, ErrorResponse, api_error, validation_error
from babl_core.web.api.protocol import EmailGenerateResponse, ModelCard, ModelList
from babl_core.web.api.serving import (
    chat_completions,
    completions,
    email_generate,
    get_model,
    list_models,
    status,
)
from babl_core.web.auth import WWW_AUTHENTICATE, bearer_error
from babl_core.web.runtime import service

log = logging.getLogger(__name__)


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
# Routes

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
