"""Request and response bodies of the OpenAI-compatible API (``/v1/completions``, ``/v1/chat/completions``).

Requests are validated strictly (no string → number coercion, no bool → int), and a field this
server does not know is a 400 naming it, at any depth: an unknown option must never silently
change what is served (a misspelt ``max_token``, a vLLM extra like ``min_p``, a per-request
``adapters`` list). The OpenAI fields that never change the output (``user``, ``metadata``,
``store``, ``service_tier``, ``safety_identifier``, ``prompt_cache_key``) are declared, accepted
and ignored. Optional sampling fields default to ``None`` meaning "the engine's default", so
clients that send explicit nulls work. Fields the server knows but cannot honour yet (``suffix``,
``tools``...) are declared so that a non-default value can be refused with a clear 400 (see
``server.api.convert``), never ignored. docs/api.md lists every field and its status.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, field_validator, model_validator


class _Request(BaseModel):
    model_config = ConfigDict(strict=True, extra="forbid")


class StreamOptions(_Request):
    include_usage: bool = False


MAX_COMPONENTS = 16  # adapters in one composition
MAX_CACHE_SALT_CHARS = 256


class AdapterPart(_Request):
    """One component of a composition: an adapter the caller may use, and its weight."""

    name: str
    weight: float = Field(default=1.0, allow_inf_nan=False)


class CompositionFields(_Request):
    """Per-request composition (issue 18): ``adapters`` combined as peft's ``add_weighted_adapter``
    combines them; the other fields are its arguments (``adapters.compose.Recipe``)."""

    adapters: list[AdapterPart] | None = Field(default=None, min_length=1, max_length=MAX_COMPONENTS)
    combination: str | None = None  # None: peft's default, svd
    density: float | None = None
    majority_sign_method: str | None = None
    svd_rank: int | None = None
    svd_clamp: float | None = None
    composition_seed: int | None = None  # DARE's masks; None: 0


class ComposeAdapterRequest(CompositionFields):
    """``POST /v1/adapters/compose``: save a composition as the next version of ``name``."""

    name: str
    tenant: str | None = None  # admins: the tenant to save it in (and to resolve bare names in)


class SamplingFields(CompositionFields):
    """Sampling fields shared by both endpoints (OpenAI names, plus vLLM-style extras)."""

    model: str
    temperature: float | None = None
    top_p: float | None = None
    n: int | None = None
    stream: bool | None = False
    stream_options: StreamOptions | None = None
    stop: str | list[str] | None = None
    seed: int | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    logit_bias: dict[str, float] | None = None  # token id (as a string) → bias in [-100, 100]
    # OpenAI fields that do not change the output: accepted and ignored
    user: str | None = None
    metadata: dict[str, str] | None = None
    store: bool | None = None
    service_tier: str | None = None
    safety_identifier: str | None = None
    prompt_cache_key: str | None = None
    # extras (vLLM names)
    top_k: int | None = None
    repetition_penalty: float | None = None
    ignore_eos: bool | None = None
    # vLLM's: added to the prefix cache's key, so only requests with the same salt share cached blocks
    cache_salt: str | None = Field(default=None, min_length=1, max_length=MAX_CACHE_SALT_CHARS)
    # orders the request among its own tenant's waiting requests, lower first (vLLM's meaning)
    priority: int | None = Field(default=None, ge=-(2**31), le=2**31 - 1)

    @field_validator("stop", mode="before")
    @classmethod
    def _stop_shape(cls, value: Any) -> Any:
        ok = value is None or isinstance(value, str)
        ok = ok or (isinstance(value, list) and all(isinstance(s, str) for s in value))
        if not ok:
            raise ValueError("stop must be a string or a list of strings")
        return value


MAX_PROMPTS = 256  # prompts in one /v1/completions request


class CompletionRequest(SamplingFields):
    """``POST /v1/completions``. ``prompt``: text, token ids, or a list of up to MAX_PROMPTS of them
    (choices come prompt by prompt, ``n`` each)."""

    prompt: str | list[int] | list[str] | list[list[int]]
    max_tokens: int | None = 16  # null: up to the end of the model's context; 0 only with echo
    logprobs: int | None = Field(default=None, ge=0)  # the chosen token's logprob and this many more
    echo: bool | None = False  # the prompt comes back before the completion (with logprobs: scored)
    suffix: str | None = None  # refused when set
    best_of: int | None = None  # refused unless 1

    @field_validator("prompt", mode="before")
    @classmethod
    def _prompt_shape(cls, value: Any) -> Any:
        """One clear message for every malformed prompt (instead of one error per union member)."""
        if not (isinstance(value, str) or (isinstance(value, list) and _is_prompt_list(value))):
            raise ValueError(
                "prompt must be a string, a list of token ids, a list of strings or a list of token-id lists"
            )
        if isinstance(value, list) and not _is_token_ids(value) and len(value) > MAX_PROMPTS:
            raise ValueError(f"prompt must hold at most {MAX_PROMPTS} prompts, got {len(value)}")
        return value


def _is_token_ids(value: Any) -> bool:
    return isinstance(value, list) and all(isinstance(t, int) and not isinstance(t, bool) for t in value)


def _is_prompt_list(items: list) -> bool:
    return (
        _is_token_ids(items)
        or all(isinstance(item, str) for item in items)
        or all(_is_token_ids(item) for item in items)
    )


class TextPart(_Request):
    type: Literal["text"]
    text: str


FUNCTION_NAME = r"^[a-zA-Z0-9_-]{1,64}$"  # OpenAI's rule for function and schema names


class FunctionCallIn(_Request):
    name: str
    arguments: str  # JSON text, as the API returned it


class ToolCallIn(_Request):
    """A tool call of an earlier assistant turn, sent back in ``messages``."""

    id: str
    type: Literal["function"]
    function: FunctionCallIn


class ChatMessage(_Request):
    """One turn. ``content`` may be null only for an assistant turn that made ``tool_calls``; a
    ``tool`` turn answers the call ``tool_call_id`` names."""

    role: Literal["system", "developer", "user", "assistant", "tool"]
    tool_calls: list[ToolCallIn] | None = None  # assistant turns only
    tool_call_id: str | None = None  # tool turns only (required there)
    content: str | list[TextPart] | None = Field(default=None, validate_default=True)  # after the above

    @field_validator("content", mode="before")
    @classmethod
    def _content_shape(cls, value: Any) -> Any:
        if (
            value is None
            or isinstance(value, str)
            or (
                isinstance(value, list)
                and all(isinstance(p, dict) and p.get("type") == "text" for p in value)
            )
        ):
            return value
        raise ValueError('content must be a string or a list of {"type": "text", "text": ...} parts')

    @field_validator("content", mode="after")
    @classmethod
    def _content_present(cls, value: Any, info: ValidationInfo) -> Any:
        if value is None and not (info.data.get("role") == "assistant" and info.data.get("tool_calls")):
            raise ValueError("content is required (null only in an assistant message with tool_calls)")
        return value

    @model_validator(mode="after")
    def _role_fields(self) -> ChatMessage:
        if self.tool_calls is not None and self.role != "assistant":
            raise ValueError(f"tool_calls belong to assistant messages, not {self.role} ones")
        if (self.role == "tool") != (self.tool_call_id is not None):
            raise ValueError("tool_call_id is required in tool messages, and only there")
        return self

    @property
    def text(self) -> str:
        """The content as one string (text parts are concatenated; null is empty)."""
        if self.content is None or isinstance(self.content, str):
            return self.content or ""
        return "".join(p.text for p in self.content)


class JsonSchemaFormat(_Request):
    """``response_format.json_schema``: the schema the reply must follow (``strict``: no properties
    or items beyond it; the reply follows the schema either way)."""

    model_config = ConfigDict(strict=True, extra="forbid", populate_by_name=True)
    name: str = Field(pattern=FUNCTION_NAME)
    description: str | None = None
    schema_: dict[str, Any] | None = Field(default=None, alias="schema")  # None: any JSON object
    strict: bool | None = None


class ResponseFormat(_Request):
    """``response_format``: plain text, any JSON object, or JSON following ``json_schema``."""

    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaFormat | None = None

    @model_validator(mode="after")
    def _schema_with_its_type(self) -> ResponseFormat:
        if (self.type == "json_schema") != (self.json_schema is not None):
            raise ValueError('json_schema is required with type "json_schema", and only there')
        return self


class FunctionDefinition(_Request):
    name: str = Field(pattern=FUNCTION_NAME)
    description: str | None = None
    parameters: dict[str, Any] | None = None  # a JSON Schema of the arguments object; None: any object
    strict: bool | None = None


class Tool(_Request):
    type: Literal["function"]
    function: FunctionDefinition


class NamedFunction(_Request):
    name: str


class NamedToolChoice(_Request):
    """``tool_choice`` naming the function the reply must call."""

    type: Literal["function"]
    function: NamedFunction


class ChatCompletionRequest(SamplingFields):
    """``POST /v1/chat/completions``."""

    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: int | None = None  # null: up to the end of the model's context
    max_completion_tokens: int | None = None  # OpenAI's newer name; wins over max_tokens
    logprobs: bool | None = False
    top_logprobs: int | None = Field(default=None, ge=0)  # alternatives per token; needs logprobs
    response_format: ResponseFormat | None = None
    tools: list[Tool] | None = Field(default=None, max_length=128)
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = None  # None: auto with tools
    parallel_tool_calls: bool | None = None  # None: true

    @field_validator("tool_choice", mode="before")
    @classmethod
    def _tool_choice_shape(cls, value: Any) -> Any:
        """One clear message for every malformed tool_choice (instead of one per union member)."""
        named = (
            isinstance(value, dict) and value.keys() == {"type", "function"} and value["type"] == "function"
            and isinstance(value["function"], dict) and value["function"].keys() == {"name"}
            and isinstance(value["function"]["name"], str)
        )  # fmt: skip
        if value is None or value in ("none", "auto", "required") or named:
            return value
        raise ValueError(
            "tool_choice must be 'none', 'auto' or 'required', or name a function: "
            '{"type": "function", "function": {"name": ...}}'
        )


# ---- responses ----
class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class CompletionLogprobs(BaseModel):
    """OpenAI's legacy completions logprobs, one entry per token (with ``echo``, the prompt's first).

    ``top_logprobs[i]``: token text → logprob of the chosen token, then of the ``logprobs`` most
    likely ones (as vLLM: k + 1 entries, k when the chosen one is among them). The first prompt
    token has no context: its ``token_logprobs`` and ``top_logprobs`` entries are null.
    ``text_offset[i]``: the character offset in the choice's text where the text released with
    token i starts (a token that completes a held-back character shares the offset of that text).
    """

    tokens: list[str]
    token_logprobs: list[float | None]
    top_logprobs: list[dict[str, float] | None]
    text_offset: list[int]


class CompletionChoice(BaseModel):
    index: int = 0
    text: str
    logprobs: CompletionLogprobs | None = None
    finish_reason: str | None = None


class CompletionResponse(BaseModel):
    """A whole completion, or (``stream``) one chunk: same shape, choices carry text deltas."""

    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Usage | None = None


class TopLogprob(BaseModel):
    token: str
    logprob: float
    bytes: list[int]


class TokenLogprob(BaseModel):
    token: str
    logprob: float
    bytes: list[int]
    top_logprobs: list[TopLogprob] = Field(default_factory=list)  # the request's top_logprobs most likely


class ChatLogprobs(BaseModel):
    content: list[TokenLogprob]


class FunctionCall(BaseModel):
    name: str
    arguments: str  # JSON text of the arguments object


class ToolCall(BaseModel):
    id: str
    type: Literal["function"] = "function"
    function: FunctionCall


class AssistantMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str | None
    tool_calls: list[ToolCall] = Field(default_factory=list)


class ChatChoice(BaseModel):
    index: int = 0
    message: AssistantMessage
    logprobs: ChatLogprobs | None = None
    finish_reason: str | None = None


class ChatCompletionResponse(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[ChatChoice]
    usage: Usage


class FunctionCallDelta(BaseModel):
    name: str | None = None  # in a call's first delta
    arguments: str | None = None  # the next piece of the arguments' JSON text


class ToolCallDelta(BaseModel):
    index: int  # the call's place in the message's tool_calls
    id: str | None = None  # in a call's first delta
    type: Literal["function"] | None = None
    function: FunctionCallDelta


class ChatDelta(BaseModel):
    role: Literal["assistant"] | None = None
    content: str | None = None
    tool_calls: list[ToolCallDelta] | None = None


class ChatChunkChoice(BaseModel):
    index: int = 0
    delta: ChatDelta
    logprobs: ChatLogprobs | None = None
    finish_reason: str | None = None


class ChatCompletionChunk(BaseModel):
    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    choices: list[ChatChunkChoice]
    usage: Usage | None = None


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "loraplex"
    root: str | None = None
    parent: str | None = None


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class ErrorDetail(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorResponse(BaseModel):
    """OpenAI's error body: ``{"error": {"message", "type", "param", "code"}}``."""

    error: ErrorDetail


class AdapterInfo(BaseModel):
    """One adapter version as the admin routes show it."""

    id: str  # what to put in a request's ``model`` field
    object: Literal["adapter"] = "adapter"
    name: str
    tenant: str
    version: int
    sha256: str
    rank: int
    alpha: float
    use_rslora: bool
    target_modules: list[str]
    base_model_name_or_path: str | None
    size_bytes: int
    created: int
    source: Literal["upload", "local"]
    tier: str | None  # on_disk, loading, in_host, in_slot, failed; None when not served
    pinned: bool
    merged: bool  # new requests run on a merged copy W + s·B·A (server/engine/merging.py)
    mergeable: bool  # False: this server makes no merged copies (a quantized base, max-merged-copies 0)


class AdapterList(BaseModel):
    object: Literal["list"] = "list"
    data: list[AdapterInfo]


class AdapterDeleted(BaseModel):
    id: str
    object: Literal["adapter"] = "adapter"
    deleted: bool = True
    versions: list[int]


class LoadLoRAAdapterRequest(BaseModel):
    """vLLM's ``POST /v1/load_lora_adapter`` body."""

    model_config = ConfigDict(extra="forbid")
    lora_name: str
    lora_path: str
    load_inplace: bool = False


class UnloadLoRAAdapterRequest(BaseModel):
    """vLLM's ``POST /v1/unload_lora_adapter`` body (``lora_int_id`` is accepted and ignored)."""

    model_config = ConfigDict(extra="forbid")
    lora_name: str
    lora_int_id: int | None = None
