"""The synchronous engine: requests in, one continuously batched step at a time, token deltas out.

One thread owns an EngineCore (the async ``Engine`` runs it in its loop thread). A step:

    scheduled = scheduler.schedule()           # which sequences, how many tokens, which slots
    sampled = runner.run(scheduled)            # one forward for the whole mixed batch
    scheduler.postprocess(scheduled, sampled)  # append tokens, stop checks, free finished ones
    deltas = [self._emit(s) for s in sampled]  # detokenize, stop strings, one delta per request
"""

from __future__ import annotations

import itertools
import logging
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import torch

from adapters.cache import AdapterCache, AdapterState
from adapters.errors import StoreUnavailableError, UnknownAdapterError
from adapters.format import WEIGHTS_FILE, content_key, read_peft_dir
from adapters.store import file_sha256
from server.config import EngineConfig
from server.engine.detokenizer import IncrementalDetokenizer
from server.engine.errors import ContextLengthError, EngineError
from server.engine.grammar import Grammars
from server.engine.kv_cache import DEFAULT_CPU_KV_BYTES_CAP, KVCache, kv_bytes_per_token
from server.engine.merging import MergeManager, MergePolicyConfig
from server.engine.prefix_cache import cache_root
from server.engine.route import RouteKind
from server.engine.runner import ModelRunner
from server.engine.sampler import Sampler, SamplingParams, TopLogprobs
from server.engine.scheduler import Scheduler, SchedulerOutput
from server.engine.sequence import FinishReason, Sequence
from server.engine.views import EngineStats, PromptLogprobs, StepStats, TokenDelta
from server.model.factory import LoadedModel
from server.model.loader import Checkpoint
from server.model.lora_binding import LoRASlotWriter

log = logging.getLogger(__name__)


class EngineCore:
    def __init__(self, loaded: LoadedModel, config: EngineConfig) -> None:
        self.config = config
        self.loaded = loaded
        self.tokenizer = loaded.checkpoint.tokenizer
        self.max_model_len = loaded.max_model_len
        self.vocab_size = loaded.model.embed_tokens.shape[0]
        self.kv_cache = KVCache.sized(
            loaded.checkpoint.config, self._kv_budget(), config.kv_block_size, loaded.dtype, loaded.device
        )
        self.slot_writer = LoRASlotWriter(loaded.model, config.max_lora_rank)
        read = lambda path: read_peft_dir(path, config.max_lora_rank)  # noqa: E731
        self.adapters = AdapterCache(
            self.slot_writer,
            config.max_loras,
            read,
            max_host_bytes=config.max_cpu_adapters_bytes,
            pin_host_memory=loaded.device.type == "cuda",
        )
        eos = _eos_token_ids(loaded.checkpoint)
        self.merges = MergeManager(
            _merge_policy_config(config, self.slot_writer.quantization),
            self.slot_writer.merged_weights,
            self.slot_writer.merged_bytes,
            self.adapters.host_weights,
            self.adapters.is_registered,
        )
        self.scheduler = Scheduler(config, self.kv_cache, self.adapters, self.max_model_len, eos, self.merges)
        self.grammars = Grammars(self.tokenizer, self.vocab_size, eos)  # xgrammar loads on first use
        self.runner = ModelRunner(
            loaded.model, self.kv_cache, Sampler(config.seed), self.slot_writer.slot_ranks, self.grammars
        )
        self._seqs: dict[str, Sequence] = {}
        self._detok: dict[str, IncrementalDetokenizer] = {}
        self._arrivals = itertools.count()
        self.last_step_was_idle = False
        # Called in the engine thread after every non-empty step (metrics); must be quick.
        self.on_step: Callable[[StepStats], None] | None = None

    def _kv_budget(self) -> int:
        if self.config.kv_cache_bytes is not None:
            return self.config.kv_cache_bytes
        per_token = kv_bytes_per_token(self.loaded.checkpoint.config, self.loaded.dtype)
        wanted = per_token * self.config.max_num_seqs * self.max_model_len
        return min(wanted, DEFAULT_CPU_KV_BYTES_CAP) if self.loaded.device.type == "cpu" else wanted

    # ---- requests ----
    def validate(self, prompt_token_ids: list[int], sampling: SamplingParams, adapter_id: str | None) -> None:
        """Raise one of ``errors.REQUEST_ERRORS`` for a request that cannot be served; touches no
        engine state."""
        if adapter_id is not None and not self.adapters.is_registered(adapter_id):
            raise UnknownAdapterError(adapter_id)
        if not prompt_token_ids:
            raise EngineError("the prompt is empty")
        self.check_token_ids(prompt_token_ids)
        self._validate_logprobs(sampling)
        if sampling.grammar is not None:
            self.grammars.compile(sampling.grammar)  # a cache hit once the facade compiled it
        total = len(prompt_token_ids) + sampling.max_tokens
        if total > self.max_model_len:
            raise ContextLengthError(
                f"this model's maximum context length is {self.max_model_len} tokens; the request asks "
                f"for {total} ({len(prompt_token_ids)} in the prompt + {sampling.max_tokens} max_tokens)"
            )

    def check_token_ids(self, token_ids: list[int]) -> None:
        """EngineError unless every id is an int in the vocabulary."""
        if any(not isinstance(t, int) or not 0 <= t < self.vocab_size for t in token_ids):
            raise EngineError(f"prompt token ids must be integers in [0, {self.vocab_size})")

    def _validate_logprobs(self, sampling: SamplingParams) -> None:
        """Alternatives within ``max_logprobs``, biased tokens within the vocabulary (EngineError)."""
        limit = self.config.max_logprobs
        for name in ("top_logprobs", "prompt_logprobs"):
            asked = getattr(sampling, name)
            if asked is not None and asked > limit:
                raise EngineError(f"{name} must be at most {limit} (--max-logprobs), got {asked}", param=name)
        outside = [token_id for token_id, _ in sampling.logit_bias if token_id >= self.vocab_size]
        if outside:
            raise EngineError(
                f"logit_bias names token ids outside the vocabulary [0, {self.vocab_size}): {outside[:5]}",
                param="logit_bias",
            )

    def add_request(self, request_id: str, prompt_token_ids: list[int], sampling: SamplingParams,
                    adapter_id: str | None, *, tenant: str = "default", cache_salt: str | None = None,
                    priority: int = 0) -> None:  # fmt: skip
        """Queue a request of ``tenant`` (its share of the engine under fair scheduling); ``priority``
        orders it among that tenant's waiting requests, lower first. ``tenant`` and ``cache_salt`` also
        scope its prefix-cache hits: it reuses only blocks computed for requests with equal ones (see
        server/engine/prefix_cache.py)."""
        self.validate(prompt_token_ids, sampling, adapter_id)
        if request_id in self._seqs:
            raise EngineError(f"request id {request_id!r} is already running")
        generator = None
        if sampling.seed is not None:
            generator = torch.Generator(device=self.loaded.device).manual_seed(sampling.seed)
        seq = Sequence(
            request_id, list(prompt_token_ids), sampling, adapter_id, next(self._arrivals), generator,
            tenant=tenant, priority=priority,
        )  # fmt: skip
        seq.cache_root = self._cache_root(adapter_id, tenant, cache_salt)
        if sampling.grammar is not None:
            seq.grammar = self.grammars.matcher(sampling.grammar)
        self._seqs[request_id] = seq
        self._detok[request_id] = IncrementalDetokenizer(self.tokenizer, sampling.stop)
        if adapter_id is not None:
            self.adapters.prefetch(adapter_id)
        self.scheduler.add(seq)

    def _cache_root(self, adapter_id: str | None, tenant: str | None, cache_salt: str | None) -> bytes | None:
        """The prefix-cache root of a request's blocks: its weights' content, its tenant (none for
        the base model when ``prefix_cache_sharing`` is ``base``) and its salt; None when caching is off."""
        if self.config.prefix_caching == "off":
            return None
        if adapter_id is None:
            shared = self.config.prefix_cache_sharing == "base"
            return cache_root(None, None if shared else tenant, cache_salt)
        return cache_root(self.adapters.content_key(adapter_id), tenant, cache_salt)

    def abort(self, request_id: str) -> TokenDelta | None:
        seq = self._seqs.get(request_id)
        if seq is None:
            return None
        self.scheduler.finish(seq, FinishReason.ABORT)
        return self._delta(seq, [], [], "")

    @property
    def has_work(self) -> bool:
        return self.scheduler.has_work

    # ---- adapters ----
    def add_adapter(self, adapter_id: str, path: str | Path) -> None:
        """Read and validate a peft adapter directory now; it stays readable from ``path`` later."""
        weights = read_peft_dir(Path(path), self.config.max_lora_rank)
        config = weights.config
        key = content_key(
            file_sha256(Path(path) / WEIGHTS_FILE), config.rank, config.alpha, config.use_rslora
        )
        self.adapters.register(adapter_id, Path(path), weights, key)

    def remove_adapter(self, adapter_id: str) -> None:
        self.adapters.unregister(adapter_id)
        self.merges.poll()  # its merged copy, if any, takes no new requests from now on

    # ---- the step ----
    def step(self) -> list[TokenDelta]:
        started_s = time.perf_counter()
        failed = self._fail_unloadable()
        out = self.scheduler.schedule()
        self.last_step_was_idle = out.is_empty  # e.g. every waiting request's adapter is loading
        if out.is_empty:
            self.merges.poll()
            return failed
        computed = self.runner.run(out, self.merges)
        self.scheduler.postprocess(out, computed.sampled, computed.prompt_logprobs)
        self._observe_traffic(out)
        deltas = failed + [self._emit(item.seq) for item in out.scheduled if item.samples]
        self._observe_step(out, time.perf_counter() - started_s)
        return deltas

    def _observe_traffic(self, out: SchedulerOutput) -> None:
        """Feed the merge policy: tokens per (route kind, adapter) this step, requests per adapter."""
        tokens: Counter[tuple[RouteKind, str | None]] = Counter()
        for item in out.scheduled:
            tokens[item.route.kind, item.seq.adapter_id] += item.num_new_tokens
        running, waiting = self.scheduler.running, self.scheduler.waiting
        self.merges.after_step(tokens, lambda: Counter(s.adapter_id for s in (*running, *waiting)))

    def _observe_step(self, out: SchedulerOutput, duration_s: float) -> None:
        """Tell ``on_step`` what the step did; a failing observer is logged and never fails the step."""
        if self.on_step is None:
            return
        try:
            self.on_step(self._step_stats(out, duration_s))
        except Exception:
            log.exception("the step observer failed")

    def _step_stats(self, out: SchedulerOutput, duration_s: float) -> StepStats:
        """Read after ``postprocess``: a first chunk is one that starts where the prefix cache left it."""
        items = out.scheduled
        first = [
            i.seq for i in items if i.seq.num_computed_tokens - i.num_new_tokens == i.seq.num_cached_tokens
        ]
        return StepStats(
            num_seqs=len(items),
            num_tokens=sum(i.num_new_tokens for i in items),
            num_prompt_tokens=sum(len(seq.prompt_token_ids) for seq in first if not seq.num_preemptions),
            num_generated_tokens=sum(i.samples and i.seq.sampling.max_tokens > 0 for i in items),
            num_adapters=len({i.seq.adapter_id for i in items} - {None}),
            duration_s=duration_s,
            num_waiting=len(self.scheduler.waiting),
            num_running=len(self.scheduler.running),
            kv_cache_usage=self.kv_cache.allocator.usage,
            num_merged_copies=len(self.merges.copies),
        )

    def stats(self) -> EngineStats:
        """A snapshot for metrics, safe to call from any thread: the queues are copied (``list`` of a
        list is atomic under the GIL), so it may straddle a step but never raises or blocks it."""
        waiting, running = list(self.scheduler.waiting), list(self.scheduler.running)
        prefix, blocks = self.scheduler.prefix, self.kv_cache.allocator
        return EngineStats(
            num_waiting=len(waiting),
            num_running=len(running),
            kv_cache_usage=self.kv_cache.allocator.usage,
            running_adapter_ids=_adapter_ids(running),
            waiting_adapter_ids=_adapter_ids(waiting),
            max_loras=self.config.max_loras,
            num_preemptions=self.scheduler.num_preemptions,
            prefix_cache_queries=prefix.num_queries, prefix_cache_hits=prefix.num_hits,
            prefix_cache_blocks=blocks.num_cached,
            prefix_cache_bytes=blocks.num_cached * self.kv_cache.block_bytes,
            prefix_cache_evictions=blocks.num_evictions,
        )  # fmt: skip

    def _emit(self, seq: Sequence) -> TokenDelta:
        """The delta of a step that sampled for ``seq``: its new token (none when it asked for none,
        max_tokens 0) and, in its first delta, its prompt's logprobs if it asked for them."""
        detok = self._detok[seq.request_id]
        tokens = seq.output_token_ids[-1:]
        text = detok.push(tokens[0]) if tokens else ""
        if detok.stopped and not seq.is_finished:
            self.scheduler.finish(seq, FinishReason.STOP)
        if seq.is_finished:
            text += detok.flush()
        return self._delta(
            seq, tokens, seq.output_logprobs[-1:], text, top_logprobs=seq.output_top_logprobs[-1:],
            prompt_logprobs=_prompt_logprobs(seq) if len(seq.output_token_ids) <= 1 else None,
        )  # fmt: skip

    def _delta(
        self, seq: Sequence, tokens: list[int], logprobs: list[float | None], text: str,
        error: str | None = None, code: str | None = None, *, top_logprobs: list[TopLogprobs] | None = None,
        prompt_logprobs: PromptLogprobs | None = None,
    ) -> TokenDelta:  # fmt: skip
        reason = seq.finish_reason.value if seq.finish_reason else None
        if seq.is_finished:
            self._seqs.pop(seq.request_id, None)
            self._detok.pop(seq.request_id, None)
        return TokenDelta(seq.request_id, tokens, text, logprobs, reason, len(seq.prompt_token_ids),
                          len(seq.output_token_ids), error, code, top_logprobs or [],
                          prompt_logprobs)  # fmt: skip

    def _fail_unloadable(self) -> list[TokenDelta]:
        """Waiting requests whose adapter failed to load (or vanished) end with an error."""
        deltas = []
        for seq in list(self.scheduler.waiting):
            if seq.adapter_id is None:
                continue
            if self.adapters.is_registered(seq.adapter_id):
                if self.adapters.state(seq.adapter_id) is not AdapterState.FAILED:
                    continue
                cause = self.adapters.error(seq.adapter_id)
                error = f"adapter {seq.adapter_id!r} failed to load: {cause}"
                transient = isinstance(cause, StoreUnavailableError)  # the shared bucket: retried later
                code = "store_unavailable" if transient else "adapter_load_failed"
            else:
                error, code = f"adapter {seq.adapter_id!r} was removed", "adapter_removed"
            self.scheduler.finish(seq, FinishReason.ERROR)
            deltas.append(self._delta(seq, [], [], "", error, code))
        return deltas

    def fail_all(self, error: str, code: str = "internal_error") -> list[TokenDelta]:
        """End every request with an error (after an unexpected failure of the step, or at shutdown)."""
        deltas = []
        for seq in list(self._seqs.values()):
            self.scheduler.finish(seq, FinishReason.ERROR)
            deltas.append(self._delta(seq, [], [], "", error, code))
        return deltas


def _merge_policy_config(config: EngineConfig, quantization: str | None) -> MergePolicyConfig:
    """The merge policy's settings; none at all over a quantized base (a copy starts from dense W)."""
    if quantization is not None:
        reason = f"the base model is quantized ({quantization}): merged copies are not made over it"
        return MergePolicyConfig(enabled=False, max_merged_copies=0, unavailable=reason)
    return MergePolicyConfig(
        enabled=config.merge_policy == "auto", max_merged_copies=config.max_merged_copies,
        max_merged_bytes=config.max_merged_bytes, merge_share=config.merge_share,
        unmerge_share=config.unmerge_share,
    )  # fmt: skip


def _prompt_logprobs(seq: Sequence) -> PromptLogprobs | None:
    """The prompt's logprobs, if ``seq`` asked for them: None for its first token, then each scored
    token's (every one, once the prompt is computed)."""
    if seq.sampling.prompt_logprobs is None:
        return None
    return PromptLogprobs([None, *seq.prompt_logprobs], [None, *seq.prompt_top_logprobs])


def _adapter_ids(seqs: list[Sequence]) -> tuple[str, ...]:
    return tuple(sorted({seq.adapter_id for seq in seqs if seq.adapter_id is not None}))


def _eos_token_ids(checkpoint: Checkpoint) -> frozenset[int]:
    ids: set[int] = set()
    for source in (checkpoint.config, getattr(checkpoint, "generation_config", None), checkpoint.tokenizer):
        value = getattr(source, "eos_token_id", None)
        if isinstance(value, int):
            ids.add(value)
        elif isinstance(value, list | tuple):
            ids.update(v for v in value if isinstance(v, int))
    return frozenset(ids)
