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

from pydantic import BaseModel, ConfigDict, Field, field_validator


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


class ChatMessage(_Request):
    role: Literal["system", "user", "assistant"]
    content: str | list[TextPart]

    @field_validator("content", mode="before")
    @classmethod
    def _content_shape(cls, value: Any) -> Any:
        if isinstance(value, str) or (
            isinstance(value, list) and all(isinstance(p, dict) and p.get("type") == "text" for p in value)
        ):
            return value
        raise ValueError('content must be a string or a list of {"type": "text", "text": ...} parts')

    @property
    def text(self) -> str:
        """The content as one string (text parts are concatenated)."""
        return self.content if isinstance(self.content, str) else "".join(p.text for p in self.content)


class ChatCompletionRequest(SamplingFields):
    """``POST /v1/chat/completions``."""

    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: int | None = None  # null: up to the end of the model's context
    max_completion_tokens: int | None = None  # OpenAI's newer name; wins over max_tokens
    logprobs: bool | None = False
    top_logprobs: int | None = Field(default=None, ge=0)  # alternatives per token; needs logprobs
    tools: list[dict] | None = None  # refused when non-empty
    response_format: dict | None = None  # refused unless {"type": "text"}


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


class AssistantMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str


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


class ChatDelta(BaseModel):
    role: Literal["assistant"] | None = None
    content: str | None = None


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
