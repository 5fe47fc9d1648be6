"""Token sampling for one engine step: penalties, temperature, top-k/top-p, then one draw per row.

Per row, in this order (each step matches the transformers processor named, so HF is the reference):

    1. repetition penalty over prompt + output tokens   (RepetitionPenaltyLogitsProcessor)
    2. presence / frequency penalties over output tokens (OpenAI: l -= presence*(c>0) + frequency*c)
    3. greedy rows (temperature 0): argmax of the penalised logits, no randomness consumed
    4. sampling rows: temperature (TemperatureLogitsWarper), top-k (TopKLogitsWarper), top-p
       (TopPLogitsWarper), both with min_tokens_to_keep=1, then one categorical draw

The draw uses the exponential race (argmax of p / E with E ~ Exp(1), as vLLM does), which is exactly
categorical sampling and lets all rows share one argmax. A row with its own generator (a seeded
request) draws its noise from that generator alone, so its tokens depend only on its seed and its own
logits, never on the other rows of the batch or their order. Other rows use the sampler's shared one.

Everything runs in fp32 on the logits' device; the only host syncs are the final ``tolist`` calls.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Protocol

import torch

MAX_STOP_STRINGS = 16
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


@dataclass(frozen=True)
class SamplingParams:
    """Per-request sampling settings, validated on construction (ValueError names the bad field).

    ``temperature`` 0 (or below GREEDY_TEMPERATURE) means greedy. ``top_k`` 0 or -1 and ``top_p`` 1
    disable those filters. ``stop`` is only validated here; the engine's detokenizer applies it.
    Lists given for ``stop`` / ``stop_token_ids`` are stored as tuples; ints given for float fields
    are stored as floats.
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

    def __post_init__(self) -> None:
        _check_int("max_tokens", self.max_tokens, 1)
        _check_int("top_k", self.top_k, -1, bound=">= 1, or 0 / -1 to disable")
        if self.seed is not None:
            _check_int("seed", self.seed, *_SEED_RANGE)
        for name in ("ignore_eos", "logprobs"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name} must be a bool, got {getattr(self, name)!r}")
        self._validate_floats()
        self._validate_stops()

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
    def is_greedy(self) -> bool:
        return self.temperature < GREEDY_TEMPERATURE

    @property
    def has_penalties(self) -> bool:
        return self.repetition_penalty != 1.0 or self.presence_penalty != 0.0 or self.frequency_penalty != 0.0


class SamplingRow(Protocol):
    """What the sampler reads of each sequence in the batch."""

    sampling: SamplingParams
    generator: torch.Generator | None  # on the logits' device when set (seeded request), else None
    prompt_token_ids: list[int]
    output_token_ids: list[int]


@dataclass(frozen=True)
class SampleOutput:
    token_ids: list[int]  # one per row
    logprobs: list[float | None]  # raw log_softmax of the chosen token; None where not requested


def make_generator(seed: int, device: torch.device | str) -> torch.Generator:
    """A generator on ``device`` seeded with ``seed``: what the engine gives a seeded request."""
    return torch.Generator(device=device).manual_seed(seed)


def _padded_ids(id_lists: list[list[int]], vocab: int, device: torch.device) -> torch.Tensor:
    """[R, L] int64 of the lists padded with ``vocab``; ids outside [0, vocab) also become ``vocab``."""
    width = max(1, *(len(ids) for ids in id_lists))
    rows = [ids + [vocab] * (width - len(ids)) for ids in id_lists]
    ids = torch.tensor(rows, dtype=torch.int64, device=device)  # [R, L]
    return ids.masked_fill((ids < 0) | (ids >= vocab), vocab)


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


def process_logits(logits: torch.Tensor, rows: Sequence[SamplingRow]) -> torch.Tensor:
    """The logits each row's token is chosen from: [B, V] fp32, a new tensor on the logits' device.

    Greedy rows get the penalised logits (their token is the argmax); sampling rows get them divided by
    the temperature and with what top-k/top-p removes set to -inf (softmax gives the draw distribution).
    """
    if logits.dim() != 2 or logits.shape[0] != len(rows):
        raise ValueError(f"logits must be [num_rows={len(rows)}, vocab], got {tuple(logits.shape)}")
    out = logits.to(torch.float32, copy=True)  # [B, V]
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

    def sample(self, logits: torch.Tensor, rows: Sequence[SamplingRow]) -> SampleOutput:
        """One token per row of ``logits`` [B, V] (any float dtype, any device), and logprobs if asked."""
        processed = process_logits(logits, rows)  # [B, V] fp32
        tokens = processed.argmax(dim=-1)  # [B]; final for greedy rows
        sampling = [i for i, row in enumerate(rows) if not row.sampling.is_greedy]
        if sampling:
            probs = processed[sampling].softmax(dim=-1)  # [S, V]
            noise = self._exponential_noise(probs, [rows[i] for i in sampling])  # [S, V]
            tokens[sampling] = probs.div_(noise).argmax(dim=-1)
        return SampleOutput(token_ids=tokens.tolist(), logprobs=_chosen_logprobs(logits, tokens, rows))

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


def _chosen_logprobs(
    logits: torch.Tensor, tokens: torch.Tensor, rows: Sequence[SamplingRow]
) -> list[float | None]:
    """log_softmax of the raw logits [B, V] at ``tokens`` [B] for rows that asked, None for the rest."""
    wanted = [i for i, row in enumerate(rows) if row.sampling.logprobs]
    result: list[float | None] = [None] * len(rows)
    if wanted:
        raw = torch.log_softmax(logits[wanted].float(), dim=-1)  # [W, V]
        values = raw.gather(1, tokens[wanted].unsqueeze(1)).squeeze(1).tolist()
        for i, value in zip(wanted, values, strict=True):
            result[i] = value
    return result
