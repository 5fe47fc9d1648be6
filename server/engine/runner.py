"""Turns a scheduled step into one forward over the flat mixed batch, then samples.

The runner alone builds the ForwardBatch (token ids, positions, KV rows, attention groups,
LoRA segments); the model only reads it. The model computes logits at the last token of each
sequence that samples and, for sequences that asked for prompt logprobs, at the prefill positions
that score a prompt token (``Sequence.prompt_scoring_positions``): those rows alone get a
log_softmax, so scoring costs nothing to the requests beside them, and a prompt prefilled in
several chunks is scored chunk by chunk.
"""

from __future__ import annotations

import contextlib
import itertools
import logging
from dataclasses import dataclass
from typing import Protocol, TypedDict

import torch

from server.engine.grammar import Grammars
from server.engine.kv_cache import KVCache
from server.engine.sampler import SampleOutput, Sampler, TokenLogprobs, TopLogprobs, token_logprobs
from server.engine.scheduler import ScheduledSeq, SchedulerOutput
from server.engine.sequence import Sequence
from server.model.forward_batch import ForwardBatch, PrefillChunk
from server.model.llama import LlamaForServing
from server.ops.lora_torch import LoRASegments

log = logging.getLogger(__name__)


class MergedWeights(Protocol):
    def applied(self, copy: int | None) -> contextlib.AbstractContextManager[None]:
        """Inside: the model computes with merged copy ``copy``'s weights (None: the base weights)."""


class DecodeFields(TypedDict):
    """The decode group's fields of a ForwardBatch (all None and False without decodes)."""

    decode_token_index: torch.Tensor | None  # [Bd]
    decode_kv_index: torch.Tensor | None  # [Bd, Lmax]
    decode_kv_bias: torch.Tensor | None  # [Bd, 1, 1, Lmax]
    decode_kv_lens: torch.Tensor | None  # [Bd]
    decode_is_all_tokens: bool


@dataclass(frozen=True)
class StepOutput:
    """What one step's forwards computed."""

    sampled: SampleOutput  # one row per scheduled sequence that samples, in scheduled order
    prompt_logprobs: dict[Sequence, TokenLogprobs]  # the prompt tokens each one scored this step


ScoringPlan = list[tuple[ScheduledSeq, range]]  # per scheduled sequence that scores: its positions


class ModelRunner:
    def __init__(
        self,
        model: LlamaForServing,
        kv_cache: KVCache,
        sampler: Sampler,
        slot_ranks: list[int] | None = None,
        grammars: Grammars | None = None,
    ) -> None:
        self.model = model
        self.grammars = grammars  # masks the rows with a grammar (None: no request may carry one)
        self.slot_ranks = slot_ranks  # rank of the adapter in each slot (kept up to date by the writer)
        self.kv_cache = kv_cache
        self.sampler = sampler
        self.device = model.embed_tokens.device
        self.dtype = model.embed_tokens.dtype

    def run(self, out: SchedulerOutput, copies: MergedWeights | None = None) -> StepOutput:
        """Tokens for the scheduled sequences that sample, in order, and the prompt tokens scored.

        One forward for the side-path batch (base model + LoRA slots) and one per merged copy in
        the step, with that copy's weights applied (``out.scheduled`` is sorted by route).
        """
        token_ids: list[int] = []
        logprobs: list[float | None] = []
        top_logprobs: list[TopLogprobs] = []
        scored: dict[Sequence, TokenLogprobs] = {}
        for copy, group in itertools.groupby(out.scheduled, key=lambda item: item.route.forward_copy):
            with copies.applied(copy) if copies is not None else contextlib.nullcontext():
                step = self._forward_and_sample(list(group))
            token_ids += step.sampled.token_ids
            logprobs += step.sampled.logprobs
            top_logprobs += step.sampled.top_logprobs
            scored.update(step.prompt_logprobs)
        return StepOutput(SampleOutput(token_ids, logprobs, top_logprobs), scored)

    def _forward_and_sample(self, scheduled: list[ScheduledSeq]) -> StepOutput:
        """One forward; the grammar rows' masks are filled on a worker thread meanwhile, applied to
        those rows alone before sampling, and each grammar then advances by its row's token."""
        plan = scoring_plan(scheduled)
        batch = self.build_batch(scheduled, plan)
        rows = [item.seq for item in scheduled if item.samples]
        masks = self.grammars.start_masks(rows) if self.grammars is not None else None
        logits = self.model(batch, self.kv_cache.layers)  # [B_sample + P, V]
        sampled = self.sampler.sample(logits[: len(rows)], rows, masks.apply if masks else None)
        if masks is not None:
            for i in Grammars.accept(rows, sampled.token_ids):  # none: each was sampled under its mask
                log.warning("%s: its grammar refused token %d", rows[i].request_id, sampled.token_ids[i])
        return StepOutput(sampled, self._score_prompts(logits[len(rows) :], plan))

    def _score_prompts(self, logits: torch.Tensor, plan: ScoringPlan) -> dict[Sequence, TokenLogprobs]:
        """The prompt tokens ``plan`` scores, from their rows of ``logits`` [P, V] (in plan order)."""
        if not plan:
            return {}
        targets = [item.seq.prompt_token_ids[p + 1] for item, positions in plan for p in positions]
        num_top = [item.seq.sampling.prompt_logprobs or 0 for item, positions in plan for _ in positions]
        scores = token_logprobs(logits, self._tensor(targets), num_top)  # one pass over all P rows
        by_seq: dict[Sequence, TokenLogprobs] = {}
        start = 0
        for item, positions in plan:
            end = start + len(positions)
            by_seq[item.seq] = TokenLogprobs(scores.logprobs[start:end], scores.top_logprobs[start:end])
            start = end
        return by_seq

    def build_batch(self, scheduled: list[ScheduledSeq], plan: ScoringPlan | None = None) -> ForwardBatch:
        """The step's ForwardBatch; its logits rows are the sampling rows, then ``plan``'s positions."""
        input_ids: list[int] = []
        positions: list[int] = []
        kv_rows: list[int] = []
        token_slots: list[int] = []
        decodes: list[tuple[int, Sequence, int]] = []  # (token index, seq, ctx_len)
        prefills: list[PrefillChunk] = []
        logits_index: list[int] = []
        starts: dict[Sequence, int] = {}
        for item in scheduled:
            seq, start = item.seq, item.seq.num_computed_tokens
            end = start + item.num_new_tokens
            first = len(input_ids)
            input_ids.extend(seq.token_at(i) for i in range(start, end))
            positions.extend(range(start, end))
            kv_rows.extend(self._kv_rows(seq.block_table, start, end))
            token_slots.extend([item.route.token_slot] * item.num_new_tokens)
            if item.num_new_tokens == 1:
                decodes.append((first, seq, end))
            else:
                prefills.append(
                    PrefillChunk(first, len(input_ids), self._tensor(self._kv_rows(seq.block_table, 0, end)))
                )
            if item.samples:
                logits_index.append(len(input_ids) - 1)
            starts[item.seq] = first - start  # flat index of position 0, were it in the batch
        for item, scored in plan or ():
            logits_index.extend(starts[item.seq] + p for p in scored)
        return ForwardBatch(
            input_ids=self._tensor(input_ids),
            positions=self._tensor(positions),
            kv_write_index=self._tensor(kv_rows),
            **self._decode_fields(decodes),
            prefills=tuple(prefills),
            logits_index=self._tensor(logits_index),
            lora=LoRASegments.build(token_slots, self.device, self.slot_ranks),
        )

    def _decode_fields(self, decodes: list[tuple[int, Sequence, int]]) -> DecodeFields:
        """Padded KV rows, mask and lengths for the decode group: [Bd, Lmax], [Bd, 1, 1, Lmax], [Bd]."""
        if not decodes:
            return {"decode_token_index": None, "decode_kv_index": None, "decode_kv_bias": None,
                    "decode_kv_lens": None, "decode_is_all_tokens": False}  # fmt: skip
        bs = self.kv_cache.block_size
        max_blocks = -(-max(ctx for _, _, ctx in decodes) // bs)
        # Padded to whole blocks, so the attention products keep one shape for a block's worth of
        # steps: oneDNN builds a kernel per new shape (that cost 3 ms a step when Lmax grew by 1).
        max_len = max_blocks * bs
        tables = [
            seq.block_table[:max_blocks] + [0] * (max_blocks - len(seq.block_table[:max_blocks]))
            for _, seq, _ in decodes
        ]
        table = self._tensor(tables)  # [Bd, max_blocks]
        pos = torch.arange(max_len, device=self.device)  # [Lmax]
        kv_index = table[:, pos // bs] * bs + pos % bs  # [Bd, Lmax]
        ctx = self._tensor([ctx for _, _, ctx in decodes])  # [Bd]
        pads = (pos[None, :] >= ctx[:, None])[:, None, None, :]  # [Bd, 1, 1, Lmax]
        bias = torch.zeros(pads.shape, device=self.device).masked_fill_(pads, float("-inf"))
        token_index = [i for i, _, _ in decodes]
        return {
            "decode_token_index": self._tensor(token_index),
            "decode_kv_index": kv_index,
            "decode_kv_bias": bias,
            "decode_kv_lens": ctx,
            "decode_is_all_tokens": token_index == list(range(len(token_index))),
        }

    def _kv_rows(self, block_table: list[int], start: int, end: int) -> list[int]:
        bs = self.kv_cache.block_size
        return [block_table[i // bs] * bs + i % bs for i in range(start, end)]

    def _tensor(self, values: list[int] | list[list[int]]) -> torch.Tensor:
        return torch.tensor(values, dtype=torch.int64, device=self.device)


def scoring_plan(scheduled: list[ScheduledSeq]) -> ScoringPlan:
    """The positions of this step's prefill chunks whose logits score a prompt token, per sequence."""
    plan = []
    for item in scheduled:
        start = item.seq.num_computed_tokens
        positions = item.seq.prompt_scoring_positions(start, start + item.num_new_tokens)
        if positions:
            plan.append((item, positions))
    return plan
