"""The engine's logprobs in OpenAI's two shapes: completions' legacy lists and chat's content entries.

Every value is the raw log_softmax the engine reports (server/engine/sampler.py); -inf, which
JSON cannot carry, becomes -9999.0 as in OpenAI's and vLLM's responses. Token texts are decoded
one token at a time (a byte of a multi-byte character decodes to U+FFFD, as in vLLM) and
memoised per response: a prompt scored with its alternatives names the same tokens many times.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from server.api import schemas
from server.api.convert import Echo
from server.engine.sampler import TopLogprobs
from server.engine.views import PromptLogprobs

MIN_LOGPROB = -9999.0  # stands in for -inf


def clamped(value: float | None) -> float:
    """A logprob JSON can carry: None or -inf (or below) as MIN_LOGPROB."""
    return MIN_LOGPROB if value is None or not math.isfinite(value) else max(value, MIN_LOGPROB)


@dataclass
class TokenTexts:
    """Each token id's own text, decoded once per response."""

    tokenizer: Any
    _texts: dict[int, str] = field(default_factory=dict)

    def __call__(self, token_id: int) -> str:
        text = self._texts.get(token_id)
        if text is None:
            text = self._texts[token_id] = self.tokenizer.decode([token_id])
        return text


@dataclass(frozen=True)
class ScoredTokens:
    """Tokens with the engine's logprobs, in order (a generation's, or a prompt's)."""

    token_ids: Sequence[int]
    logprobs: Sequence[float | None]  # None: not scored (the first prompt token)
    top_logprobs: Sequence[TopLogprobs | None]
    text_offsets: Sequence[int]  # where each token's text starts in the choice's text

    @classmethod
    def of_prompt(cls, echo: Echo, scores: PromptLogprobs | None) -> ScoredTokens:
        """The echoed prompt; unscored (all None) if the engine sent no scores."""
        none = [None] * len(echo.token_ids)
        logprobs, top = (scores.logprobs, scores.top_logprobs) if scores is not None else (none, none)
        return cls(echo.token_ids, logprobs, top, echo.text_offsets)


def completion_logprobs(parts: Sequence[ScoredTokens], token_text: TokenTexts) -> schemas.CompletionLogprobs:
    """The legacy ``logprobs`` object of ``parts``, one after the other (the echoed prompt, then the
    completion). ``top_logprobs[i]`` maps token text → logprob: the chosen token first, then its
    alternatives (vLLM's shape); a token with the text of an earlier entry keeps the earlier one."""
    tokens: list[str] = []
    values: list[float | None] = []
    tops: list[dict[str, float] | None] = []
    offsets: list[int] = []
    for part in parts:
        for token_id, value, top in zip(part.token_ids, part.logprobs, part.top_logprobs, strict=True):
            tokens.append(token_text(token_id))
            values.append(None if value is None else clamped(value))
            tops.append(None if value is None else _top_dict(token_id, value, top or (), token_text))
        offsets.extend(part.text_offsets)
    return schemas.CompletionLogprobs(
        tokens=tokens, token_logprobs=values, top_logprobs=tops, text_offset=offsets
    )


def _top_dict(token_id: int, value: float, top: TopLogprobs, token_text: TokenTexts) -> dict[str, float]:
    entries: dict[str, float] = {token_text(token_id): clamped(value)}
    for other_id, other in top:
        entries.setdefault(token_text(other_id), clamped(other))
    return entries


def chat_logprobs(tokens: ScoredTokens, token_text: TokenTexts) -> schemas.ChatLogprobs:
    """Chat's ``logprobs.content``: one entry per token, with its ``top_logprobs`` alternatives."""
    content = [
        schemas.TokenLogprob(
            **_chat_entry(token_id, value, token_text),
            top_logprobs=[schemas.TopLogprob(**_chat_entry(i, v, token_text)) for i, v in top or ()],
        )
        for token_id, value, top in zip(tokens.token_ids, tokens.logprobs, tokens.top_logprobs, strict=True)
    ]
    return schemas.ChatLogprobs(content=content)


def _chat_entry(token_id: int, value: float | None, token_text: TokenTexts) -> dict[str, Any]:
    text = token_text(token_id)
    return {"token": text, "logprob": clamped(value), "bytes": list(text.encode())}
