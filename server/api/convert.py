"""From a validated request body to what the engine takes: prompt token ids, SamplingParams, adapter.

Every refusal is an ``ApiError`` (or an ``EngineError`` from the engine's own checks later), raised
before anything is submitted, so a refused request never costs engine work.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

from jinja2.exceptions import TemplateError

from adapters.errors import UnknownAdapterError
from adapters.registry import AdapterRegistry
from adapters.tenants import Principal, parse_model_name
from server.api.errors import ApiError, from_sampling_error, model_not_found
from server.api.schemas import ChatCompletionRequest, CompletionRequest, SamplingFields
from server.engine.sampler import SamplingParams
from server.engine.views import EngineLimits

# request field → predicate that is true when its value is one this server cannot honour yet
_UNSUPPORTED_COMPLETION: dict[str, Callable[[Any], bool]] = {
    "echo": bool,
    "suffix": lambda v: v is not None,
    "best_of": lambda v: v not in (None, 1),
    "logit_bias": bool,
}
_UNSUPPORTED_CHAT: dict[str, Callable[[Any], bool]] = {
    "top_logprobs": bool,
    "tools": bool,
    "logit_bias": bool,
    "response_format": lambda v: v is not None and v.get("type", "text") != "text",
}
# request fields passed to SamplingParams unchanged when not None
_SAMPLING_FIELDS = (
    "temperature", "top_p", "top_k", "seed", "presence_penalty", "frequency_penalty",
    "repetition_penalty", "ignore_eos",
)  # fmt: skip


class EngineLike(Protocol):
    """What conversion needs of the engine (``server.engine.engine.Engine`` fits)."""

    @property
    def limits(self) -> EngineLimits: ...

    def encode(self, text: str) -> list[int]: ...
    def encode_chat(self, messages: list[dict]) -> list[int]: ...


MAX_CHOICES = 16


@dataclass(frozen=True)
class GenerationInput:
    prompt_token_ids: list[int]
    choices: list[SamplingParams]  # one per choice (``n``); a given seed becomes seed + index
    adapter: str | None  # None: the base model

    @property
    def sampling(self) -> SamplingParams:
        return self.choices[0]


def resolve_adapter(model: str, served_model_name: str, registry: AdapterRegistry | None,
                    principal: Principal) -> str | None:  # fmt: skip
    """None for the base model's served name, else the engine id of the newest version of the
    adapter ``model`` names in the caller's tenant (admins: ``tenant/name`` too), else 404.

    An unknown name never falls back to the base model; another tenant's adapter looks unknown.
    """
    if model == served_model_name:
        return None
    try:
        if registry is None:
            raise UnknownAdapterError(model)
        return registry.resolve(*parse_model_name(principal, model)).adapter_id
    except UnknownAdapterError:
        raise model_not_found(model) from None


def completion_input(req: CompletionRequest, engine: EngineLike, adapter: str | None) -> GenerationInput:
    """Check a /v1/completions body and turn it into engine input (ApiError when refused)."""
    _refuse_unsupported(req, _UNSUPPORTED_COMPLETION)
    prompt_ids = _completion_prompt_ids(req.prompt, engine)
    sampling = _sampling(req, req.max_tokens, req.logprobs is not None, prompt_ids, engine)
    return GenerationInput(prompt_ids, _choices(sampling, req.n or 1), adapter)


def chat_input(req: ChatCompletionRequest, engine: EngineLike, adapter: str | None) -> GenerationInput:
    """Check a /v1/chat/completions body and turn it into engine input (ApiError when refused)."""
    _refuse_unsupported(req, _UNSUPPORTED_CHAT)
    prompt_ids = _chat_prompt_ids(req, engine)
    max_tokens = req.max_completion_tokens if req.max_completion_tokens is not None else req.max_tokens
    sampling = _sampling(req, max_tokens, bool(req.logprobs), prompt_ids, engine)
    return GenerationInput(prompt_ids, _choices(sampling, req.n or 1), adapter)


def _choices(sampling: SamplingParams, n: int) -> list[SamplingParams]:
    """``n`` independent samples: each choice draws from its own seed (seed + index) when seeded."""
    if sampling.seed is None:
        return [sampling] * n
    try:
        return [dataclasses.replace(sampling, seed=sampling.seed + i) for i in range(n)]
    except ValueError as exc:  # seed + index past the seed range
        raise from_sampling_error(exc) from exc


def _refuse_unsupported(req: SamplingFields, unsupported: dict[str, Callable[[Any], bool]]) -> None:
    if req.n is not None and not 1 <= req.n <= MAX_CHOICES:
        raise ApiError(400, f"n must be in [1, {MAX_CHOICES}], got {req.n}", param="n")
    for name, refused in unsupported.items():
        if refused(getattr(req, name)):
            raise ApiError(400, f"{name} is not supported by this server yet", param=name)


def _completion_prompt_ids(prompt: str | list, engine: EngineLike) -> list[int]:
    """Token ids of the one prompt: text is encoded, ids are taken as they are."""
    if isinstance(prompt, list) and prompt and not isinstance(prompt[0], int):
        if len(prompt) != 1:
            raise ApiError(
                400, f"one prompt per request is supported for now, got {len(prompt)}", param="prompt"
            )
        prompt = prompt[0]
    if not isinstance(prompt, str):
        return list(prompt)
    try:
        return engine.encode(prompt)
    except (TypeError, UnicodeError) as exc:  # e.g. a lone surrogate the tokenizer cannot encode
        raise ApiError(400, f"the prompt cannot be tokenized: {exc}", param="prompt") from exc


def _chat_prompt_ids(req: ChatCompletionRequest, engine: EngineLike) -> list[int]:
    """The messages rendered with the model's chat template (add_generation_prompt) and tokenized."""
    messages = [{"role": m.role, "content": m.text} for m in req.messages]
    try:
        return engine.encode_chat(messages)
    except (TemplateError, ValueError, TypeError, UnicodeError) as exc:  # refused, no template, bad text
        raise ApiError(
            400, f"the chat template cannot render these messages: {exc}", param="messages"
        ) from exc


def _sampling(
    req: SamplingFields, max_tokens: int | None, logprobs: bool, prompt_ids: list[int], engine: EngineLike
) -> SamplingParams:
    """SamplingParams from the request; max_tokens None means up to the end of the context."""
    if max_tokens is None:  # at least 1, so an over-long prompt gets the engine's context-length error
        max_tokens = max(1, engine.limits.max_model_len - len(prompt_ids))
    if max_tokens < 1:  # the engine's 0 (run the prompt only) is not offered here yet
        raise ApiError(400, f"max_tokens must be >= 1, got {max_tokens}", param="max_tokens")
    kwargs = {name: getattr(req, name) for name in _SAMPLING_FIELDS if getattr(req, name) is not None}
    if req.stop is not None:
        kwargs["stop"] = req.stop
    try:
        return SamplingParams(max_tokens=max_tokens, logprobs=logprobs, **kwargs)
    except ValueError as exc:
        raise from_sampling_error(exc) from exc
