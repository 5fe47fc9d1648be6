"""From a validated request body to what the engine takes: prompt token ids, SamplingParams, adapter.

Every refusal is an ``ApiError`` (or an ``EngineError`` from the engine's own checks later), raised
before anything is submitted, so a refused request never costs engine work.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

from jinja2.exceptions import TemplateError

from adapters.errors import UnknownAdapterError
from adapters.registry import AdapterRegistry
from adapters.tenants import Principal, parse_model_name
from server.api.errors import ApiError, from_sampling_error, model_not_found
from server.api.schemas import ChatCompletionRequest, CompletionRequest, ResponseFormat, SamplingFields
from server.api.tools import ToolPlan, template_input, tool_plan
from server.engine.grammar import GrammarSpec
from server.engine.sampler import SamplingParams
from server.engine.views import EngineLimits

# request field → predicate that is true when its value is one this server cannot honour yet
_UNSUPPORTED_COMPLETION: dict[str, Callable[[Any], bool]] = {
    "suffix": lambda v: v is not None,
    "best_of": lambda v: v not in (None, 1),
}
_UNSUPPORTED_CHAT: dict[str, Callable[[Any], bool]] = {}
_ECHO_HINT = " (0 only with echo, which scores the prompt and generates nothing)"
_TOKEN_ID = re.compile(r"-?[0-9]+")  # a logit_bias key: a token id written in decimal
# request fields passed to SamplingParams unchanged when not None
_SAMPLING_FIELDS = (
    "temperature", "top_p", "top_k", "seed", "presence_penalty", "frequency_penalty",
    "repetition_penalty", "ignore_eos",
)  # fmt: skip


class EngineLike(Protocol):
    """What conversion needs of the engine (``server.engine.engine.Engine`` fits)."""

    @property
    def limits(self) -> EngineLimits: ...

    @property
    def chat_template_renders_tools(self) -> bool: ...

    def encode(self, text: str) -> list[int]: ...
    def encode_chat(self, messages: list[dict], tools: list[dict] | None = None) -> list[int]: ...
    def detokenize(self, token_ids: list[int]) -> tuple[str, list[int]]: ...


MAX_CHOICES = 16


@dataclass(frozen=True)
class Echo:
    """The prompt a completions choice starts with (``echo``): its text (as given, else decoded),
    its token ids and where each token's text starts (offsets into the decoded prompt)."""

    text: str
    token_ids: list[int]
    text_offsets: list[int]


@dataclass(frozen=True)
class EngineRequest:
    """One engine request: one choice of one prompt."""

    prompt_token_ids: list[int]
    sampling: SamplingParams  # a given seed becomes seed + the choice's index among its prompt's
    echo: Echo | None = None


@dataclass(frozen=True)
class GenerationInput:
    requests: list[EngineRequest]  # prompt by prompt, ``choices_per_prompt`` choices each
    adapter: str | None  # None: the base model
    choices_per_prompt: int = 1  # ``n``
    tools: ToolPlan | None = None  # chat: how the replies use the request's tools

    @property
    def sampling(self) -> SamplingParams:
        return self.requests[0].sampling


def num_requests(body: SamplingFields) -> int:
    """Engine requests ``body`` makes (its prompts × ``n``), read before it is checked: what the
    admission control reserves."""
    prompts = len(completion_prompts(body.prompt)) if isinstance(body, CompletionRequest) else 1
    return prompts * min(max(body.n or 1, 1), MAX_CHOICES)


def completion_prompts(prompt: str | list) -> list:
    """Each prompt of a completions ``prompt``: one unless it is a list of strings or of id lists."""
    if isinstance(prompt, str) or not prompt or isinstance(prompt[0], int):
        return [prompt]
    return list(prompt)


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
    """Check a /v1/completions body and turn it into engine input (ApiError when refused).

    ``logprobs: k`` asks for each generated token's logprob and k alternatives; with ``echo`` the
    prompt tokens get theirs too (vLLM's ``prompt_logprobs = logprobs``), and ``max_tokens`` may be
    0: the prompt is scored and nothing generated, as lm-evaluation-harness asks.
    """
    _refuse_unsupported(req, _UNSUPPORTED_COMPLETION)
    _check_num_logprobs("logprobs", req.logprobs, engine)
    echo, k = bool(req.echo), req.logprobs
    _check_max_tokens("max_tokens", req.max_tokens, 0 if echo else 1, _ECHO_HINT)
    logprobs = {"logprobs": k is not None, "top_logprobs": k or 0, "prompt_logprobs": k if echo else None}
    requests = []
    for prompt in completion_prompts(req.prompt):
        prompt_ids = _completion_prompt_ids(prompt, engine)
        sampling = _sampling(req, req.max_tokens, prompt_ids, engine, logprobs)
        echoed = _echo(prompt, prompt_ids, engine) if echo else None
        requests += [EngineRequest(prompt_ids, s, echoed) for s in _choices(sampling, req.n or 1)]
    return GenerationInput(requests, adapter, req.n or 1)


def chat_input(req: ChatCompletionRequest, engine: EngineLike, adapter: str | None) -> GenerationInput:
    """Check a /v1/chat/completions body and turn it into engine input (ApiError when refused)."""
    _refuse_unsupported(req, _UNSUPPORTED_CHAT)
    _check_num_logprobs("top_logprobs", req.top_logprobs, engine)
    if req.top_logprobs and not req.logprobs:
        raise ApiError(400, "top_logprobs needs logprobs: true", param="top_logprobs")
    plan = tool_plan(req)
    grammar = _chat_grammar(req, plan)
    prompt_ids = _chat_prompt_ids(req, plan, engine)
    max_tokens = req.max_completion_tokens if req.max_completion_tokens is not None else req.max_tokens
    _check_max_tokens("max_completion_tokens" if req.max_completion_tokens is not None else "max_tokens",
                      max_tokens, 1)  # fmt: skip
    logprobs = {"logprobs": bool(req.logprobs), "top_logprobs": req.top_logprobs or 0}
    sampling = _sampling(req, max_tokens, prompt_ids, engine, logprobs, grammar)
    requests = [EngineRequest(prompt_ids, s) for s in _choices(sampling, req.n or 1)]
    return GenerationInput(requests, adapter, req.n or 1, plan if plan.parses_calls else None)


def _chat_grammar(req: ChatCompletionRequest, plan: ToolPlan) -> GrammarSpec | None:
    """A forced call's grammar, else response_format's; the two together are refused."""
    forced, asked = plan.grammar(), response_grammar(req.response_format)
    if forced is not None and asked is not None:
        raise ApiError(400, f"response_format cannot be combined with tool_choice {plan.mode!r} (the reply "
                       "is then the tool call)", param="response_format")  # fmt: skip
    return forced or asked


def response_grammar(response_format: ResponseFormat | None) -> GrammarSpec | None:
    """The grammar ``response_format`` asks for: None for text, any JSON object for json_object (and
    a json_schema without a schema), else the schema (the engine refuses one it cannot compile)."""
    if response_format is None or response_format.type == "text":
        return None
    spec = response_format.json_schema
    if spec is None or spec.schema_ is None:
        return GrammarSpec("json_object")
    return GrammarSpec.json_schema(spec.schema_, strict=bool(spec.strict))


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


def _check_num_logprobs(name: str, value: int | None, engine: EngineLike) -> None:
    limit = engine.limits.max_logprobs
    if value is not None and value > limit:
        raise ApiError(400, f"{name} must be at most {limit} (this server's --max-logprobs), got {value}",
                       param=name)  # fmt: skip


def _echo(prompt: str | list[int], prompt_ids: list[int], engine: EngineLike) -> Echo:
    text, offsets = engine.detokenize(prompt_ids)
    return Echo(prompt if isinstance(prompt, str) else text, prompt_ids, offsets)


def _logit_bias(value: dict[str, float] | None) -> dict[int, float]:
    """``logit_bias`` keyed by token id (its keys are JSON strings); SamplingParams checks the rest."""
    bias = {}
    for key, amount in (value or {}).items():
        if not _TOKEN_ID.fullmatch(key):
            raise ApiError(400, f"logit_bias keys must be token ids (integers as strings), got {key!r}",
                           param="logit_bias")  # fmt: skip
        bias[int(key)] = amount
    return bias


def _completion_prompt_ids(prompt: str | list[int], engine: EngineLike) -> list[int]:
    """Token ids of one prompt: text is encoded, ids are taken as they are."""
    if not isinstance(prompt, str):
        return list(prompt)
    try:
        return engine.encode(prompt)
    except (TypeError, UnicodeError) as exc:  # e.g. a lone surrogate the tokenizer cannot encode
        raise ApiError(400, f"the prompt cannot be tokenized: {exc}", param="prompt") from exc


def _chat_prompt_ids(req: ChatCompletionRequest, plan: ToolPlan, engine: EngineLike) -> list[int]:
    """The messages (and the tools the model may call) rendered with the model's chat template
    (add_generation_prompt) and tokenized."""
    messages, tools = template_input(req, plan, engine.chat_template_renders_tools)
    try:
        return engine.encode_chat(messages, tools)
    except (TemplateError, ValueError, TypeError, UnicodeError) as exc:  # refused, no template, bad text
        raise ApiError(
            400, f"the chat template cannot render these messages: {exc}", param="messages"
        ) from exc


def _check_max_tokens(name: str, value: int | None, low: int, zero_hint: str = "") -> None:
    """0 is the engine's "run the prompt only": offered by completions with echo alone (as vLLM)."""
    if value is not None and value < low:
        hint = zero_hint if value == 0 else ""
        raise ApiError(400, f"{name} must be >= {low}{hint}, got {value}", param=name)


def _sampling(
    req: SamplingFields, max_tokens: int | None, prompt_ids: list[int], engine: EngineLike,
    logprobs: dict[str, Any], grammar: GrammarSpec | None = None,
) -> SamplingParams:  # fmt: skip
    """SamplingParams from the request (``logprobs``: its logprob fields; ``grammar``: the structured
    output it asks for); max_tokens None means up to the end of the context."""
    if max_tokens is None:  # at least 1, so an over-long prompt gets the engine's context-length error
        max_tokens = max(1, engine.limits.max_model_len - len(prompt_ids))
    kwargs = {name: getattr(req, name) for name in _SAMPLING_FIELDS if getattr(req, name) is not None}
    if req.stop is not None:
        kwargs["stop"] = req.stop
    try:
        return SamplingParams(
            max_tokens=max_tokens,
            logit_bias=_logit_bias(req.logit_bias),
            grammar=grammar,
            **logprobs,
            **kwargs,
        )
    except ValueError as exc:
        raise from_sampling_error(exc) from exc
