"""Typed responses of the loraplex API (OpenAI shapes, plus the adapter administration bodies).

Models accept fields they do not know, so a newer server does not break an older client.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field


class _Body(BaseModel):
    model_config = ConfigDict(extra="allow")


class Usage(_Body):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class CompletionLogprobs(_Body):
    """Per token (with ``echo``, the prompt's first, whose first entry is null): its text, logprob,
    ``{text: logprob}`` of it and its alternatives, and where its text starts."""

    tokens: list[str]
    token_logprobs: list[float | None]
    top_logprobs: list[dict[str, float] | None] | None = None
    text_offset: list[int]


class CompletionChoice(_Body):
    index: int = 0
    text: str
    logprobs: CompletionLogprobs | None = None
    finish_reason: str | None = None


class Completion(_Body):
    """``POST /v1/completions``: the whole completion."""

    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Usage | None = None

    @property
    def text(self) -> str:
        """The first choice's text ("" for a chunk without choices, such as the usage chunk)."""
        return self.choices[0].text if self.choices else ""


class CompletionChunk(Completion):
    """One streamed piece of a completion: choices carry text deltas; the last may carry usage."""


class TokenLogprob(_Body):
    token: str
    logprob: float
    bytes: list[int] = Field(default_factory=list)
    top_logprobs: list[dict] = Field(default_factory=list)


class ChatLogprobs(_Body):
    content: list[TokenLogprob]


class FunctionCall(_Body):
    name: str
    arguments: str  # JSON text


class ToolCall(_Body):
    id: str
    type: Literal["function"] = "function"
    function: FunctionCall


class AssistantMessage(_Body):
    role: Literal["assistant"] = "assistant"
    content: str | None = None  # None: the reply is its tool_calls
    tool_calls: list[ToolCall] = Field(default_factory=list)


class ChatChoice(_Body):
    index: int = 0
    message: AssistantMessage
    logprobs: ChatLogprobs | None = None
    finish_reason: str | None = None


class ChatCompletion(_Body):
    """``POST /v1/chat/completions``: the whole answer."""

    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[ChatChoice]
    usage: Usage | None = None

    @property
    def content(self) -> str:
        """The first choice's message content ("" when it has none, e.g. a reply of tool calls)."""
        return (self.choices[0].message.content or "") if self.choices else ""


class FunctionCallDelta(_Body):
    name: str | None = None
    arguments: str | None = None


class ToolCallDelta(_Body):
    index: int
    id: str | None = None
    type: Literal["function"] | None = None
    function: FunctionCallDelta


class ChatDelta(_Body):
    role: Literal["assistant"] | None = None
    content: str | None = None
    tool_calls: list[ToolCallDelta] | None = None


class ChatChunkChoice(_Body):
    index: int = 0
    delta: ChatDelta
    logprobs: ChatLogprobs | None = None
    finish_reason: str | None = None


class ChatCompletionChunk(_Body):
    """One streamed piece of a chat answer (the first carries the role, the last the finish_reason)."""

    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    choices: list[ChatChunkChoice]
    usage: Usage | None = None

    @property
    def content(self) -> str:
        """The first choice's content delta ("" when it carries none)."""
        return (self.choices[0].delta.content or "") if self.choices else ""


class Model(_Body):
    """A ``/v1/models`` entry: the base model (``root``) or an adapter (``parent`` = the base)."""

    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "loraplex"
    root: str | None = None
    parent: str | None = None


class ModelList(_Body):
    object: Literal["list"] = "list"
    data: list[Model]


class Adapter(_Body):
    """One adapter version as the admin routes show it; ``id`` is what to send as ``model``."""

    id: str
    object: Literal["adapter"] = "adapter"
    name: str
    tenant: str
    version: int
    sha256: str
    rank: int
    alpha: float
    use_rslora: bool
    target_modules: list[str]
    base_model_name_or_path: str | None = None
    size_bytes: int
    created: int
    source: str
    tier: str | None = None  # on_disk, loading, in_host, in_slot, failed; None when not served
    pinned: bool = False
    merged: bool = False  # new requests run on a merged copy of the base weights
    mergeable: bool = True  # False: the server makes no merged copies (a quantized base, none allowed)


class AdapterList(_Body):
    object: Literal["list"] = "list"
    data: list[Adapter]


class AdapterDeleted(_Body):
    id: str
    object: Literal["adapter"] = "adapter"
    deleted: bool = True
    versions: list[int]
