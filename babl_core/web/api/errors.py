"""API errors in OpenAI's shape (`{"error": {"message", "type", "param", "code"}}`): the engine's
exceptions mapped to them, and a request that does not match its schema turned into one 422."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel

from babl_core.engine.admission import RequestTooLarge, ServerBusy
from babl_core.engine.cache import ModelBusy
from babl_core.engine.catalog import UnknownModel
from babl_core.engine.generation import GenerationError
from babl_core.engine.loaded import ModelUnavailable
from babl_core.engine.prompts import PromptTooLong
from babl_core.engine.service import BadMessage

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


@contextmanager
def as_api_errors(text_param: str) -> Iterator[None]:
    """Raise the API error for a known exception from the block (`api_error`); others go on as they are."""
    try:
        yield
    except Exception as exc:
        error = api_error(exc, text_param)
        if error is None:
            raise
        raise error from exc
