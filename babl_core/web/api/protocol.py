"""The API's request and response schemas (pydantic): what clients send and what they get back."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_serializer

from babl_core.engine.generation_settings import SETTINGS

MAX_TOKENS_CAP = SETTINGS["max_new_tokens"].maximum
"""Largest `max_tokens` / `token_count` one request may ask for."""
MAX_CHOICES = 8
"""Largest `n` / `n_gen`: each choice is a generation of its own on this machine."""
MAX_STOP_SEQUENCES = SETTINGS["stop"].max_items
OWNER = "babl"


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
    """The email endpoint's payload: key points in, `n_gen` emails out."""

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
