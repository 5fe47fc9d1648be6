"""Token sampling for one engine step: penalties, temperature, top-k/top-p, then one draw per row.

Per row, in this order (each step matches the transformers processor named, so HF is the reference):

   -1. a grammar's mask (structured outputs, server/engine/grammar.py): the tokens the row's grammar
       does not allow next get -inf; rows without a grammar are not touched
    0. logit_bias added to the logits (OpenAI's; vLLM applies it before the penalties too)
    1. repetition penalty over prompt + output tokens   (RepetitionPenaltyLogitsProcessor)
    2. presence / frequency penalties over output tokens (OpenAI: l -= presence*(c>0) + frequency*c)
    3. greedy rows (temperature 0): argmax of the processed logits, no randomness consumed
    4. sampling rows: temperature (TemperatureLogitsWarper), top-k (TopKLogitsWarper), top-p
       (TopPLogitsWarper), both with min_tokens_to_keep=1, then one categorical draw

Logprobs, where a row asks for them, are of the distribution the model produced: log_softmax of the
raw logits, before the bias, penalties and temperature (vLLM's default ``logprobs_mode``,
``raw_logprobs``), for the chosen token and the row's ``top_logprobs`` most likely ones.

The draw uses the exponential race (argmax of p / E with E ~ Exp(1), as vLLM does), which is exactly
categorical sampling and lets all rows share one argmax. A row with its own generator (a seeded
request) draws its noise from that generator alone, so its tokens depend only on its seed and its own
logits, never on the other rows of the batch or their order. Other rows use the sampler's shared one.

Everything runs in fp32 on the logits' device; the only host syncs are the final ``tolist`` calls.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Protocol

import torch

from server.engine.grammar import GrammarSpec

MAX_STOP_STRINGS = 16
MAX_LOGIT_BIAS = 100.0  # a logit_bias value lies in [-MAX_LOGIT_BIAS, MAX_LOGIT_BIAS] (OpenAI range)
MAX_PENALTY = 2.0  # presence/frequency penalties lie in [-MAX_PENALTY, MAX_PENALTY] (OpenAI range)
GREEDY_TEMPERATURE = 1e-5  # below this a temperature is treated as 0 (greedy), as vLLM does
_SEED_RANGE = (-(2**63), 2**64)  # what torch.Generator.manual_seed accepts
_FLOAT_RANGES: dict[str, tuple[Callable[[float], bool], str]] = {  # field: (accepts, range in words)
    "temperature": (lambda v: v >= 0, ">= 0"),
    "top_p": (lambda v: 0 < v <= 1, "in (0, 1]"),
    "repetition_penalty": (lambda v: v > 0, "> 0"),
    "presence_penalty": (lambda v: abs(v) <= MAX_PENALTY, f"in [-{MAX_PENALTY}, {MAX_PENALTY}]"),
    "frequency_penalty": (lambda v: abs(v) <= MAX_PENALTY, f"in [-{MAX_PENALTY}, {MAX_PENALTY}]"),
}


def _check_int(name: str, value: object, low: int, high: int | None = None, bound: str = "") -> None:
    """Raise ValueError unless ``value`` is an int (bool excluded) with low <= value (< high)."""
    if not isinstance(value, numbers.Integral) or isinstance(value, bool):
        raise ValueError(f"{name} must be an integer, got {value!r}")
    number = int(value)  # the same integer, typed: typeshed gives Integral "<" and "<=" but no ">="
    if number < low or (high is not None and number >= high):
        bound = bound or (f">= {low}" if high is None else f"in [{low}, {high})")
        raise ValueError(f"{name} must be {bound}, got {value}")


def _check_real(name: str, value: object, ok: Callable[[float], bool], bound: str) -> float:
    """``value`` as a float if it is a finite real (bool excluded) with ``ok(value)``, else ValueError."""
    if not isinstance(value, numbers.Real) or isinstance(value, bool) or not math.isfinite(value):
        raise ValueError(f"{name} must be a finite number {bound}, got {value!r}")
    if not ok(float(value)):
        raise ValueError(f"{name} must be {bound}, got {value}")
    return float(value)


def _as_tuple(name: str, value: object) -> tuple[object, ...]:
    """Lists and tuples as a tuple (a bare string counts as one item); anything else is a ValueError."""
    if isinstance(value, str):
        return (value,)
    if not isinstance(value, (list, tuple)):
        raise ValueError(f"{name} must be a tuple or list, got {type(value).__name__}")
    return tuple(value)


TopLogprobs = tuple[tuple[int, float], ...]  # (token id, raw logprob) pairs, the most likely first


@dataclass(frozen=True)
class SamplingParams:
    """Per-request sampling settings, validated on construction (ValueError names the bad field).

    ``temperature`` 0 (or below GREEDY_TEMPERATURE) means greedy. ``top_k`` 0 or -1 and ``top_p`` 1
    disable those filters. ``stop`` is only validated here; the engine's detokenizer applies it.
    Lists given for ``stop`` / ``stop_token_ids`` are stored as tuples; ints given for float fields
    are stored as floats.

    ``max_tokens`` 0 runs the prompt only (to score it with ``prompt_logprobs``): no token is made.
    ``logprobs``: each generated token's logprob, with its ``top_logprobs`` most likely alternatives.
    ``prompt_logprobs`` (None: off): each prompt token's logprob given the tokens before it, with
    that many alternatives. ``logit_bias``: (token id, bias) pairs, given as a mapping or pairs,
    stored as pairs sorted by id (a repeated id keeps its last bias); ids are checked against the
    vocabulary by the engine, which alone knows it. ``grammar``: the structured output the tokens
    must form (server/engine/grammar.py); the engine compiles it and refuses what it cannot compile.
    """

    max_tokens: int = 16
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int | None = None
    stop: tuple[str, ...] = ()
    stop_token_ids: tuple[int, ...] = ()
    ignore_eos: bool = False
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    logprobs: bool = False
    top_logprobs: int = 0
    prompt_logprobs: int | None = None
    logit_bias: tuple[tuple[int, float], ...] = ()
    grammar: GrammarSpec | None = None

    def __post_init__(self) -> None:
        _check_int("max_tokens", self.max_tokens, 0)
        _check_int("top_k", self.top_k, -1, bound=">= 1, or 0 / -1 to disable")
        _check_int("top_logprobs", self.top_logprobs, 0)
        if self.prompt_logprobs is not None:
            _check_int("prompt_logprobs", self.prompt_logprobs, 0)
        if self.seed is not None:
            _check_int("seed", self.seed, *_SEED_RANGE)
        for name in ("ignore_eos", "logprobs"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name} must be a bool, got {getattr(self, name)!r}")
        if self.grammar is not None and not isinstance(self.grammar, GrammarSpec):
            raise ValueError(f"grammar must be a GrammarSpec, got {type(self.grammar).__name__}")
        self._validate_floats()
        self._validate_stops()
        object.__setattr__(self, "logit_bias", _logit_bias_pairs(self.logit_bias))

    def _validate_floats(self) -> None:
        """Check every float field against _FLOAT_RANGES and store it as a float."""
        for name, (ok, bound) in _FLOAT_RANGES.items():
            object.__setattr__(self, name, _check_real(name, getattr(self, name), ok, bound))

    def _validate_stops(self) -> None:
        stop = _as_tuple("stop", self.stop)
        if len(stop) > MAX_STOP_STRINGS:
            raise ValueError(f"stop must have at most {MAX_STOP_STRINGS} strings, got {len(stop)}")
        if not all(isinstance(s, str) and s for s in stop):
            raise ValueError(f"stop must hold non-empty strings only, got {stop!r}")
        stop_ids = _as_tuple("stop_token_ids", self.stop_token_ids)
        for token_id in stop_ids:
            _check_int("stop_token_ids", token_id, 0)
        object.__setattr__(self, "stop", stop)
        object.__setattr__(self, "stop_token_ids", stop_ids)

    @property
    def num_top_logprobs(self) -> int:
        """Alternatives per generated token: ``top_logprobs`` when logprobs are asked for, else 0."""
        return self.top_logprobs if self.logprobs else 0

    @property
    def is_greedy(self) -> bool:
        return self.temperature < GREEDY_TEMPERATURE

    @property
    def has_penalties(self) -> bool:
        return self.repetition_penalty != 1.0 or self.presence_penalty != 0.0 or self.frequency_penalty != 0.0


def _logit_bias_pairs(value: object) -> tuple[tuple[int, float], ...]:
    """``logit_bias`` (a mapping or (id, bias) pairs) as pairs sorted by id; ValueError if malformed."""
    items = value.items() if isinstance(value, Mapping) else value
    if not isinstance(items, Iterable) or isinstance(items, str):
        raise ValueError(f"logit_bias must map token ids to biases, got {type(value).__name__}")
    in_range = f"in [-{MAX_LOGIT_BIAS:g}, {MAX_LOGIT_BIAS:g}]"
    bias: dict[int, float] = {}
    for item in items:
        if not isinstance(item, (tuple, list)) or len(item) != 2:
            raise ValueError(f"logit_bias must map token ids to biases, got the item {item!r}")
        token_id, amount = item
        _check_int("logit_bias", token_id, 0, bound="keyed by token ids >= 0")
        bias[int(token_id)] = _check_real("logit_bias", amount, lambda v: abs(v) <= MAX_LOGIT_BIAS, in_range)
    return tuple(sorted(bias.items()))


class SamplingRow(Protocol):
    """What the sampler reads of each sequence in the batch."""

    sampling: SamplingParams
    generator: torch.Generator | None  # on the logits' device when set (seeded request), else None
    prompt_token_ids: list[int]
    output_token_ids: list[int]


@dataclass(frozen=True)
class TokenLogprobs:
    """Raw logprobs of some tokens, one row of logits each."""

    logprobs: list[float]  # log_softmax of the row's raw logits at its token
    top_logprobs: list[TopLogprobs]  # the row's k most likely tokens; () where k is 0


@dataclass(frozen=True)
class SampleOutput:
    token_ids: list[int]  # one per row
    logprobs: list[float | None]  # raw log_softmax of the chosen token; None where not requested
    top_logprobs: list[TopLogprobs]  # one per row: its num_top_logprobs alternatives, () where none


def make_generator(seed: int, device: torch.device | str) -> torch.Generator:
    """A generator on ``device`` seeded with ``seed``: what the engine gives a seeded request."""
    return torch.Generator(device=device).manual_seed(seed)


def _padded_ids(id_lists: list[list[int]], vocab: int, device: torch.device) -> torch.Tensor:
    """[R, L] int64 of the lists padded with ``vocab``; ids outside [0, vocab) also become ``vocab``."""
    width = max(1, *(len(ids) for ids in id_lists))
    rows = [ids + [vocab] * (width - len(ids)) for ids in id_lists]
    ids = torch.tensor(rows, dtype=torch.int64, device=device)  # [R, L]
    return ids.masked_fill((ids < 0) | (ids >= vocab), vocab)


def apply_logit_bias(logits: torch.Tensor, rows: Sequence[SamplingRow]) -> None:
    """Add each row's ``logit_bias`` in place to ``logits`` [B, V] fp32, contiguous: one index_add_
    over the flattened batch for every (row, token) pair at once. Ids outside the vocabulary are
    ignored (the engine refuses them before they get here)."""
    vocab = logits.shape[1]
    pairs = [
        (i * vocab + token_id, bias)
        for i, row in enumerate(rows)
        for token_id, bias in row.sampling.logit_bias
        if token_id < vocab
    ]
    if not pairs:
        return
    index = torch.tensor([p[0] for p in pairs], dtype=torch.int64, device=logits.device)  # [P]
    values = torch.tensor([p[1] for p in pairs], dtype=logits.dtype, device=logits.device)  # [P]
    logits.view(-1).index_add_(0, index, values)


def apply_penalties(logits: torch.Tensor, rows: Sequence[SamplingRow]) -> None:
    """Apply repetition, then presence/frequency penalties in place to ``logits`` [B, V] fp32.

    Only rows with penalties are touched, all of them in one batched gather/scatter. Token ids outside
    the vocabulary are ignored, as in transformers.
    """
    idx = [i for i, row in enumerate(rows) if row.sampling.has_penalties]
    if not idx:
        return
    vocab, device = logits.shape[1], logits.device
    params = [rows[i].sampling for i in idx]
    sub = torch.nn.functional.pad(logits[idx], (0, 1))  # [R, V + 1]; column V absorbs padding
    if any(p.repetition_penalty != 1.0 for p in params):
        seen = _padded_ids([rows[i].prompt_token_ids + rows[i].output_token_ids for i in idx], vocab, device)
        penalty = torch.tensor(
            [p.repetition_penalty for p in params], dtype=torch.float32, device=device
        ).unsqueeze(1)  # [R, 1]
        picked = sub.gather(1, seen)  # [R, L]
        sub.scatter_(1, seen, torch.where(picked < 0, picked * penalty, picked / penalty))
    if any(p.presence_penalty != 0.0 or p.frequency_penalty != 0.0 for p in params):
        out = _padded_ids([rows[i].output_token_ids for i in idx], vocab, device)  # [R, L]
        counts = torch.zeros_like(sub).scatter_add_(1, out, torch.ones_like(out, dtype=sub.dtype))  # [R, V+1]
        presence = torch.tensor(
            [p.presence_penalty for p in params], dtype=torch.float32, device=device
        ).unsqueeze(1)  # [R, 1]
        frequency = torch.tensor(
            [p.frequency_penalty for p in params], dtype=torch.float32, device=device
        ).unsqueeze(1)
        sub -= frequency * counts + presence * (counts > 0)
    logits[idx] = sub[:, :vocab]


def apply_top_k_top_p(logits: torch.Tensor, top_k: torch.Tensor, top_p_cut: torch.Tensor) -> torch.Tensor:
    """Set to -inf what HF's TopKLogitsWarper then TopPLogitsWarper (min_tokens_to_keep=1) remove.

    logits [B, V] fp32 (temperature already applied); top_k [B] int64 in [1, V], V = disabled;
    top_p_cut [B] fp32, 1 - top_p computed in float64 then rounded as HF's comparison does, -1 = disabled.
    One ascending sort serves both filters: top-k only masks the lowest entries of the sorted row, so the
    sorted, masked row is exactly what HF's top-p sorts again. Returns a new [B, V] tensor.
    """
    vocab = logits.shape[1]
    sorted_logits, sorted_idx = logits.sort(dim=-1)  # [B, V] ascending
    kth_largest = sorted_logits.gather(1, (vocab - top_k).unsqueeze(1))  # [B, 1]
    remove = sorted_logits < kth_largest  # [B, V], sorted order
    sorted_logits = sorted_logits.masked_fill(remove, -math.inf)
    cum_probs = sorted_logits.softmax(dim=-1).cumsum(dim=-1)  # [B, V]
    remove |= cum_probs <= top_p_cut.unsqueeze(1)
    remove[:, -1] = False  # the most likely token always survives
    remove = remove.scatter(1, sorted_idx, remove)  # [B, V], vocabulary order
    return logits.masked_fill(remove, -math.inf)


Constrain = Callable[[torch.Tensor], None]  # masks some rows of fp32 logits [B, V] in place


def process_logits(
    logits: torch.Tensor, rows: Sequence[SamplingRow], constrain: Constrain | None = None
) -> torch.Tensor:
    """The logits each row's token is chosen from: [B, V] fp32, a new tensor on the logits' device.

    ``constrain`` (grammar rows' masks) runs first, on the fp32 copy. Greedy rows get the biased,
    penalised logits (their token is the argmax); sampling rows get them divided by the temperature
    and with what top-k/top-p removes set to -inf (softmax gives the draw distribution).
    """
    if logits.dim() != 2 or logits.shape[0] != len(rows):
        raise ValueError(f"logits must be [num_rows={len(rows)}, vocab], got {tuple(logits.shape)}")
    out = logits.to(torch.float32, copy=True).contiguous()  # [B, V]
    if constrain is not None:
        constrain(out)
    apply_logit_bias(out, rows)
    apply_penalties(out, rows)
    params = [row.sampling for row in rows]
    if all(p.is_greedy for p in params):
        return out
    device, vocab = out.device, out.shape[1]
    temperature = [1.0 if p.is_greedy else p.temperature for p in params]
    out /= torch.tensor(temperature, dtype=torch.float32, device=device).unsqueeze(1)
    top_k = [vocab if p.is_greedy or p.top_k <= 0 else min(p.top_k, vocab) for p in params]
    top_p_cut = [-1.0 if p.is_greedy or p.top_p >= 1.0 else 1.0 - p.top_p for p in params]
    if any(k < vocab for k in top_k) or any(c >= 0 for c in top_p_cut):
        k = torch.tensor(top_k, dtype=torch.int64, device=device)
        out = apply_top_k_top_p(out, k, torch.tensor(top_p_cut, dtype=torch.float32, device=device))
    return out


class Sampler:
    """Chooses one token per row; owns the shared generator(s) that unseeded requests draw from."""

    def __init__(self, seed: int = 0):
        self.seed = seed
        self._shared: dict[torch.device, torch.Generator] = {}  # one per logits device, made on first use

    def shared_generator(self, device: torch.device) -> torch.Generator:
        if device not in self._shared:
            self._shared[device] = make_generator(self.seed, device)
        return self._shared[device]

    def sample(
        self, logits: torch.Tensor, rows: Sequence[SamplingRow], constrain: Constrain | None = None
    ) -> SampleOutput:
        """One token per row of ``logits`` [B, V] (any float dtype, any device), and logprobs if asked
        (of the raw logits: a grammar's mask does not change them)."""
        processed = process_logits(logits, rows, constrain)  # [B, V] fp32
        tokens = processed.max(dim=-1).indices  # [B]; final for greedy rows (argmax: 3x slower on CPU)
        sampling = [i for i, row in enumerate(rows) if not row.sampling.is_greedy]
        if sampling:
            probs = processed[sampling].softmax(dim=-1)  # [S, V]
            noise = self._exponential_noise(probs, [rows[i] for i in sampling])  # [S, V]
            tokens[sampling] = probs.div_(noise).max(dim=-1).indices
        logprobs, top = _chosen_logprobs(logits, tokens, rows)
        return SampleOutput(token_ids=tokens.tolist(), logprobs=logprobs, top_logprobs=top)

    def _exponential_noise(self, probs: torch.Tensor, rows: Sequence[SamplingRow]) -> torch.Tensor:
        """Exp(1) noise shaped like ``probs`` [S, V]: seeded rows from their own generator, one row each,
        the others in one call to the shared generator."""
        noise = torch.empty_like(probs)  # [S, V]
        shared = [i for i, row in enumerate(rows) if row.generator is None]
        if shared:
            gen = self.shared_generator(probs.device)
            noise[shared] = probs.new_empty(len(shared), probs.shape[1]).exponential_(generator=gen)
        for i, row in enumerate(rows):
            if row.generator is not None:  # torch itself rejects a generator of another device type
                noise[i].exponential_(generator=row.generator)
        # Exp(1) can round to 0 in fp32; p / 0 would be inf (or NaN for p = 0, which argmax would pick).
        return noise.clamp_min_(torch.finfo(noise.dtype).tiny)


# Rows log-softmaxed at once when scoring: a prompt chunk of P rows would otherwise hold float32
# copies of all [P, V] logits (2 x 384 MiB at P = 2048 on a 49k vocabulary); 256 rows cap it at
# 2 x 48 MiB, at one host copy per 256 rows.
SCORING_ROWS = 256


def token_logprobs(logits: torch.Tensor, token_ids: torch.Tensor, num_top: Sequence[int]) -> TokenLogprobs:
    """Raw logprobs of ``token_ids`` [N] under ``logits`` [N, V], with row i's ``num_top[i]`` most
    likely tokens (at most V), ``SCORING_ROWS`` rows at a time (one log_softmax and one topk each)."""
    chosen: list[float] = []
    top: list[TopLogprobs] = []
    for start in range(0, logits.shape[0], SCORING_ROWS):
        end = start + SCORING_ROWS
        part = _rows_logprobs(logits[start:end], token_ids[start:end], num_top[start:end])
        chosen += part.logprobs
        top += part.top_logprobs
    return TokenLogprobs(chosen, top)


def _rows_logprobs(logits: torch.Tensor, token_ids: torch.Tensor, num_top: Sequence[int]) -> TokenLogprobs:
    """``token_logprobs`` of a few rows: one log_softmax and one topk for all, one host copy each."""
    raw = torch.log_softmax(logits.float(), dim=-1)  # [n, V]
    chosen = raw.gather(1, token_ids.unsqueeze(1)).squeeze(1).tolist()  # [n]
    k = min(max(num_top, default=0), raw.shape[1])
    if k == 0:
        return TokenLogprobs(chosen, [()] * len(chosen))
    values, ids = raw.topk(k, dim=-1)  # [n, k], the most likely first
    value_rows, id_rows = values.tolist(), ids.tolist()
    top = [tuple(zip(id_rows[i][:n], value_rows[i][:n], strict=True)) for i, n in enumerate(num_top)]
    return TokenLogprobs(chosen, top)


def _chosen_logprobs(
    logits: torch.Tensor, tokens: torch.Tensor, rows: Sequence[SamplingRow]
) -> tuple[list[float | None], list[TopLogprobs]]:
    """Logprobs of ``tokens`` [B] under the raw ``logits`` [B, V] and each row's alternatives, for the
    rows that asked (log_softmax runs over those rows only); None and () for the rest."""
    wanted = [i for i, row in enumerate(rows) if row.sampling.logprobs]
    chosen: list[float | None] = [None] * len(rows)
    top: list[TopLogprobs] = [()] * len(rows)
    if wanted:
        num_top = [rows[i].sampling.num_top_logprobs for i in wanted]
        scored = token_logprobs(logits[wanted], tokens[wanted], num_top)
        for i, value, alternatives in zip(wanted, scored.logprobs, scored.top_logprobs, strict=True):
            chosen[i], top[i] = value, alternatives
    return chosen, top
