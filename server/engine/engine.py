"""The engine facade: the one way in for the HTTP layer, the metrics and the CLI.

``submit`` → an async iterator of token deltas; adapters, merged copies, limits, snapshots and
observers all go through ``Engine``'s methods and the typed values of ``server/engine/views.py``.
Nothing outside server/engine/ touches ``Engine.core`` (tests of the engine itself may).

The EngineCore runs in one dedicated thread (torch releases the GIL inside its kernels, so the
event loop stays responsive). Commands (add, abort, adapter changes) reach that thread through a
queue and are applied between steps; deltas come back through ``call_soon_threadsafe``.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import queue
import threading
import time
import uuid
from collections.abc import Callable, Iterable, Mapping
from concurrent.futures import Future
from pathlib import Path
from typing import Any, TypeVar

import jinja2
import jinja2.meta

from adapters.cache_types import Transition
from adapters.registry import AdapterRegistry
from adapters.store import AdapterStore
from server.config import EngineConfig, ModelConfig
from server.engine.core import EngineCore
from server.engine.detokenizer import IncrementalDetokenizer
from server.engine.errors import REQUEST_ERRORS
from server.engine.fairness import TenantService, check_weights
from server.engine.merging import CopyState
from server.engine.request_stream import RequestStream, deliver
from server.engine.sampler import SamplingParams
from server.engine.views import (
    AdapterRuntime,
    CacheSnapshot,
    EngineLimits,
    EngineStats,
    MergeSnapshot,
    StepStats,
    TokenDelta,
    adapter_runtime,
    cache_lookups,
    cache_snapshot,
    merge_snapshot,
)
from server.model.factory import load_model
from server.stats import CacheCounters

log = logging.getLogger(__name__)
_IDLE_WAIT_S = 0.05  # the loop waits this long for commands when it has nothing to run
_MERGE_POLL_S = 0.02  # how often ``merge`` looks whether its copy is built
T = TypeVar("T")
StepObserver = Callable[[StepStats], None]
LoadObserver = Callable[[float], None]  # seconds one disk → host adapter load took


class Engine:
    def __init__(self, core: EngineCore | Callable[[], EngineCore]) -> None:
        """Run ``core`` in the loop thread; given a builder instead, build the core in that thread.

        Building in the loop thread matters on CPU: with GNU OpenMP (torch's CPU builds) only the
        first thread of the process that runs a parallel region gets the full team of threads;
        any other thread's GEMMs ran at single-thread speed here (147 vs 92 µs for a bf16
        8×576×3072 product on 2 cores). So the thread that steps the model must be the one
        that loads and tunes it, before any other thread touches torch.
        """
        self._commands: queue.SimpleQueue[Callable[[], list[TokenDelta] | None]] = queue.SimpleQueue()
        self._streams: dict[str, tuple[asyncio.AbstractEventLoop, asyncio.Queue[TokenDelta]]] = {}
        self._stopping = threading.Event()
        built: Future[EngineCore] = Future()
        build = core if callable(core) and not isinstance(core, EngineCore) else (lambda: core)
        self._thread = threading.Thread(
            target=self._run, args=(build, built), name="engine-loop", daemon=True
        )
        self._thread.start()
        self.core: EngineCore = built.result()  # re-raises what the build raised
        self.tokenizer = self.core.tokenizer
        self._step_observers: list[StepObserver] = []
        self._load_observers: list[LoadObserver] = []

    @classmethod
    def from_config(cls, model_config: ModelConfig, engine_config: EngineConfig) -> Engine:
        """Load the model (and measure the CPU kernels) in the engine thread, then serve it."""
        return cls(lambda: EngineCore(load_model(model_config, engine_config), engine_config))

    @property
    def is_running(self) -> bool:
        return self._thread.is_alive() and not self._stopping.is_set()

    # ---- requests ----
    async def submit(
        self,
        prompt_token_ids: list[int],
        sampling: SamplingParams,
        adapter: str | None = None,
        request_id: str | None = None,
        *,
        tenant: str = "default",
        cache_salt: str | None = None,
        priority: int = 0,
    ) -> RequestStream:
        """Validate now (raises EngineError; a grammar is compiled first, on a worker thread), then
        yield one delta per generated token until done. ``tenant``, ``cache_salt`` and ``priority``:
        see ``EngineCore.add_request``.

        Closing the iterator early (e.g. the client went away) aborts the request.
        """
        request_id = request_id or uuid.uuid4().hex
        if sampling.grammar is not None:  # compiled off the event loop (a new schema takes milliseconds)
            await asyncio.to_thread(self.core.grammars.compile, sampling.grammar)
        self.core.validate(prompt_token_ids, sampling, adapter)
        stream: asyncio.Queue[TokenDelta] = asyncio.Queue()
        self._streams[request_id] = (asyncio.get_running_loop(), stream)
        who = {"tenant": tenant, "cache_salt": cache_salt, "priority": priority}
        self._commands.put(lambda: self._add(request_id, prompt_token_ids, sampling, adapter, who))
        return RequestStream(request_id, stream, self._close_stream)

    def _add(self, request_id: str, prompt_token_ids: list[int], sampling: SamplingParams,
             adapter: str | None, who: dict[str, Any]) -> list[TokenDelta]:  # fmt: skip
        """In the loop thread; a refusal here (e.g. the adapter was removed meanwhile) ends the stream."""
        try:
            self.core.add_request(request_id, prompt_token_ids, sampling, adapter, **who)
            return []
        except REQUEST_ERRORS as exc:
            return [TokenDelta(request_id, [], "", [], "error", len(prompt_token_ids), 0, str(exc))]

    def abort(self, request_id: str) -> None:
        self._commands.put(lambda: _as_list(self.core.abort(request_id)))

    async def call(self, function: Callable[[], T]) -> T:
        """Run ``function()`` in the engine thread between two steps; return its result or raise."""
        loop = asyncio.get_running_loop()
        future: asyncio.Future[T] = loop.create_future()

        def settle(outcome: T) -> None:
            if not future.done():
                future.set_result(outcome)

        def fail(error: Exception) -> None:
            if not future.done():
                future.set_exception(error)

        def command() -> list[TokenDelta]:
            try:
                loop.call_soon_threadsafe(settle, function())
            except Exception as exc:  # handed back to the caller, never kills the loop
                loop.call_soon_threadsafe(fail, exc)
            return []

        self._commands.put(command)
        return await future

    def fail_all(self, error: str, code: str = "internal_error") -> None:
        """End every request in flight with ``error`` (e.g. the drain timeout ran out at shutdown)."""
        self._commands.put(lambda: self.core.fail_all(error, code))

    def _close_stream(self, request_id: str, finished: bool) -> None:
        """A stream ended: forget it, and abort its request unless the request finished."""
        self._streams.pop(request_id, None)
        if not finished:
            self.abort(request_id)

    @property
    def num_unfinished(self) -> int:
        """Requests submitted and not finished yet: running, waiting, or about to be added."""
        return len(self._streams)

    # ---- limits and snapshots (any thread) ----
    @property
    def limits(self) -> EngineLimits:
        config = self.core.config
        return EngineLimits(
            config.max_num_seqs, self.core.max_model_len, config.max_loras, config.max_lora_rank,
            config.max_logprobs,
        )  # fmt: skip

    def stats(self) -> EngineStats:
        return self.core.stats()

    def tenant_service(self) -> dict[str, TenantService]:
        """Tokens, admissions and queue time per tenant since start (any thread)."""
        return self.core.scheduler.fairness.service()

    def set_tenant_weights(self, weights: Mapping[str, float]) -> None:
        """Each tenant's share under fair scheduling, from the next step on (ValueError: not > 0)."""
        frozen = check_weights(weights)  # raised here, in the caller's thread
        self._commands.put(lambda: self.core.scheduler.fairness.set_weights(frozen))

    def cache_snapshot(self) -> CacheSnapshot:
        return cache_snapshot(self.core.adapters)

    def cache_lookups(self) -> CacheCounters:
        """The adapter cache's lookups and the prefix cache's tokens, cumulative (any thread)."""
        prefix = self.core.scheduler.prefix
        return cache_lookups(self.core.adapters, prefix.num_hits, prefix.num_queries)

    def registered_adapter_ids(self) -> list[str]:
        return self.core.adapters.registered_ids()

    def adapter_runtime(self, adapter_ids: Iterable[str]) -> dict[str, AdapterRuntime]:
        """Tier, pin and merge state of each registered one of ``adapter_ids`` (others left out)."""
        return adapter_runtime(self.core.adapters, self.core.merges, adapter_ids)

    def merge_snapshot(self) -> MergeSnapshot:
        return merge_snapshot(self.core.merges)

    @property
    def makes_merged_copies(self) -> bool:
        """False when no merged copy can ever be made here (a quantized base, max_merged_copies 0)."""
        config = self.core.merges.config
        return config.unavailable is None and config.max_merged_copies > 0

    def is_merged(self, adapter_id: str) -> bool:
        return self.core.merges.is_merged(adapter_id)

    # ---- observers (called in the engine thread; must be quick; a failure is logged) ----
    def add_step_observer(self, observer: StepObserver) -> None:
        """``observer(stats)`` after every non-empty step."""
        self._step_observers.append(observer)
        self.core.on_step = self._notify_step  # only now: without observers no StepStats is built

    def add_load_observer(self, observer: LoadObserver) -> None:
        """``observer(seconds)`` after every adapter load from disk that succeeded."""
        self._load_observers.append(observer)
        self.core.adapters.on_transition = self._notify_transition

    def _notify_step(self, stats: StepStats) -> None:
        for observer in self._step_observers:
            _observe(observer, stats)

    def _notify_transition(self, transition: Transition) -> None:
        """The cache calls this holding its lock, so at ``load_done`` the last load time is this load's."""
        if transition is not Transition.LOAD_DONE or not self._load_observers:
            return
        seconds = self.core.adapters.stats.load_seconds[-1]
        for observer in self._load_observers:
            _observe(observer, seconds)

    # ---- adapters ----
    def open_registry(self, store: AdapterStore) -> AdapterRegistry:
        """A registry over ``store`` whose adapters this engine serves: checked against this model's
        layers and ``max_lora_rank`` at upload, and published to the engine's adapter cache."""
        registry = AdapterRegistry(
            store, self.core.config.max_lora_rank, check=self.core.slot_writer.validate
        )
        registry.attach(self.core.adapters)
        return registry

    async def load_adapter(self, adapter_id: str, path: str | Path) -> None:
        """Read, validate and register a peft adapter directory (raises AdapterFormatError/KeyError)."""
        await asyncio.to_thread(self.core.add_adapter, adapter_id, path)

    def unload_adapter(self, adapter_id: str) -> None:
        """New requests no longer see it; running ones finish on it, then its slot is freed."""
        self.core.remove_adapter(adapter_id)

    async def merge(self, adapter_id: str, timeout_s: float) -> CopyState:
        """Serve ``adapter_id`` from a pinned merged copy; wait until it is built.

        Returns READY, or DRAINING when the built copy could not be kept. Raises ValueError when
        no copy can be had now (e.g. the weights are not in host memory yet) and TimeoutError when
        it is still building after ``timeout_s`` (it goes on building).
        """
        copy = await self.call(lambda: self.core.merges.merge(adapter_id))
        deadline = time.monotonic() + timeout_s
        while copy.state is CopyState.BUILDING:  # builds off the engine thread; poll picks it up
            if time.monotonic() > deadline:
                raise TimeoutError(f"the merged copy of {adapter_id!r} is still being built")
            await asyncio.sleep(_MERGE_POLL_S)
            await self.call(self.core.merges.poll)
        return copy.state

    async def unmerge(self, adapter_id: str) -> None:
        """New requests go back to the side path; running ones finish on the copy. KeyError: not merged."""
        await self.call(lambda: self.core.merges.unmerge(adapter_id))

    # ---- text helpers ----
    def encode_chat(self, messages: list[dict[str, Any]], tools: list[Any] | None = None) -> list[int]:
        """The messages rendered with the chat template (and ``tools``, for a template that renders
        them: see ``chat_template_renders_tools``), tokenized."""
        rendered = self.tokenizer.apply_chat_template(
            messages, tools=tools or None, add_generation_prompt=True, tokenize=True
        )
        return _chat_token_ids(rendered)

    @functools.cached_property
    def chat_template_renders_tools(self) -> bool:
        """Whether the model's chat template reads a ``tools`` variable (it renders tool definitions)."""
        return template_renders_tools(getattr(self.tokenizer, "chat_template", None))

    def encode(self, text: str) -> list[int]:
        ids: list[int] = self.tokenizer.encode(text)  # transformers types encode's result as Any
        return ids

    def detokenize(self, token_ids: list[int]) -> tuple[str, list[int]]:
        """The text of ``token_ids`` as the engine releases it (special tokens skipped), and per token
        where the text it releases starts in it (a token that completes a character another token
        began shares that token's offset): the prompt of completions' ``echo``, with its offsets.
        EngineError for an id outside the vocabulary, as ``submit`` would raise."""
        self.core.check_token_ids(token_ids)
        detok = IncrementalDetokenizer(self.tokenizer, ())
        offsets, text = [], ""
        for token_id in token_ids:
            offsets.append(len(text))
            text += detok.push(token_id)
        return text + detok.flush(), offsets

    async def generate_text(
        self, prompt: str | list[dict[str, str]], sampling: SamplingParams, adapter: str | None = None
    ) -> str:
        """Complete a text prompt (or chat messages, rendered with the chat template)."""
        ids = self.encode(prompt) if isinstance(prompt, str) else self.encode_chat(prompt)
        return "".join([d.text async for d in await self.submit(ids, sampling, adapter)])

    def shutdown(self) -> None:
        self._stopping.set()
        self._thread.join(timeout=10)

    # ---- the loop thread ----
    def _run(self, build: Callable[[], EngineCore], built: Future[EngineCore]) -> None:
        try:
            self.core = build()
        except BaseException as exc:  # handed to the constructor, which raises it
            built.set_exception(exc)
            return
        built.set_result(self.core)
        self._loop()

    def _loop(self) -> None:
        while not self._stopping.is_set():
            idle = not self.core.has_work or self.core.last_step_was_idle
            self._publish(self._apply_commands(block=idle))
            if not self.core.has_work:
                continue
            try:
                deltas = self.core.step()
            except Exception:
                log.exception("engine step failed; failing the requests in flight")
                deltas = self.core.fail_all("internal engine error")
            self._publish(deltas)

    def _apply_commands(self, block: bool) -> list[TokenDelta]:
        deltas: list[TokenDelta] = []
        try:
            command = self._commands.get(timeout=_IDLE_WAIT_S) if block else self._commands.get_nowait()
            while True:
                deltas.extend(self._run_command(command))
                command = self._commands.get_nowait()
        except queue.Empty:
            return deltas

    def _run_command(self, command: Callable[[], list[TokenDelta] | None]) -> list[TokenDelta]:
        try:
            return command() or []
        except Exception:
            log.exception("engine command failed")
            return []

    def _publish(self, deltas: list[TokenDelta]) -> None:
        """Hand a step's deltas to their streams: one wake-up per event loop, not one per delta
        (each ``call_soon_threadsafe`` writes the loop's self-pipe and wakes its thread)."""
        by_loop: dict[asyncio.AbstractEventLoop, list[tuple[asyncio.Queue[TokenDelta], TokenDelta]]] = {}
        for delta in deltas:
            target = self._streams.get(delta.request_id)
            if target is not None:
                loop, stream = target
                by_loop.setdefault(loop, []).append((stream, delta))
        for loop, items in by_loop.items():
            loop.call_soon_threadsafe(deliver, items)


def template_renders_tools(template: object) -> bool:
    """Whether a Jinja chat template reads a ``tools`` variable (False for no template)."""
    if not isinstance(template, str):
        return False
    return "tools" in jinja2.meta.find_undeclared_variables(jinja2.Environment().parse(template))


def _observe(observer: Callable[[T], None], value: T) -> None:
    """One observer's failure is logged and never reaches the step or the other observers."""
    try:
        observer(value)
    except Exception:
        log.exception("an engine observer failed")


def _as_list(delta: TokenDelta | None) -> list[TokenDelta]:
    return [] if delta is None else [delta]


def _chat_token_ids(rendered: object) -> list[int]:
    """The ids of ``apply_chat_template(..., tokenize=True)``: a BatchEncoding (a mapping; the default
    since transformers 5) holds them under ``input_ids``, older versions return the list itself."""
    ids = rendered["input_ids"] if isinstance(rendered, Mapping) else rendered
    if not isinstance(ids, Iterable):
        raise TypeError(f"the chat template gave {type(ids).__name__}, not token ids")
    return list(ids)
