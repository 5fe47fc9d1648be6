"""The async engine the HTTP layer calls: submit → async iterator of token deltas.

The EngineCore runs in one dedicated thread (torch releases the GIL inside its kernels, so the
event loop stays responsive). Commands (add, abort, adapter changes) reach that thread through a
queue and are applied between steps; deltas come back through ``call_soon_threadsafe``.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
import uuid
from collections.abc import Callable
from concurrent.futures import Future
from pathlib import Path

from server.config import EngineConfig, ModelConfig
from server.engine.core import EngineCore, EngineError, TokenDelta
from server.engine.sampler import SamplingParams
from server.model.factory import load_model

log = logging.getLogger(__name__)
_IDLE_WAIT_S = 0.05  # the loop waits this long for commands when it has nothing to run


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
        self._streams: dict[str, tuple[asyncio.AbstractEventLoop, asyncio.Queue]] = {}
        self._stopping = threading.Event()
        built: Future[EngineCore] = Future()
        build = core if callable(core) and not isinstance(core, EngineCore) else (lambda: core)
        self._thread = threading.Thread(
            target=self._run, args=(build, built), name="engine-loop", daemon=True
        )
        self._thread.start()
        self.core: EngineCore = built.result()  # re-raises what the build raised
        self.tokenizer = self.core.tokenizer

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
    ) -> RequestStream:
        """Validate now (raises EngineError), then yield one delta per generated token until done.

        Closing the iterator early (e.g. the client went away) aborts the request.
        """
        request_id = request_id or uuid.uuid4().hex
        self.core.validate(prompt_token_ids, sampling, adapter)
        stream: asyncio.Queue[TokenDelta] = asyncio.Queue()
        self._streams[request_id] = (asyncio.get_running_loop(), stream)
        self._commands.put(lambda: self._add(request_id, prompt_token_ids, sampling, adapter))
        return RequestStream(self, request_id, stream)

    def _add(self, request_id: str, prompt_token_ids, sampling, adapter) -> list[TokenDelta]:
        """In the loop thread; a refusal here (e.g. the adapter was removed meanwhile) ends the stream."""
        try:
            self.core.add_request(request_id, prompt_token_ids, sampling, adapter)
            return []
        except EngineError as exc:
            return [TokenDelta(request_id, [], "", [], "error", len(prompt_token_ids), 0, str(exc))]

    def abort(self, request_id: str) -> None:
        self._commands.put(lambda: _as_list(self.core.abort(request_id)))

    async def call(self, function: Callable[[], object]) -> object:
        """Run ``function()`` in the engine thread between two steps; return its result or raise."""
        loop = asyncio.get_running_loop()
        future = loop.create_future()

        def settle(outcome: object, failed: bool) -> None:
            if not future.done():
                (future.set_exception if failed else future.set_result)(outcome)

        def command() -> list[TokenDelta]:
            try:
                outcome, failed = function(), False
            except Exception as exc:  # handed back to the caller, never kills the loop
                outcome, failed = exc, True
            loop.call_soon_threadsafe(settle, outcome, failed)
            return []

        self._commands.put(command)
        return await future

    def fail_all(self, error: str, code: str = "internal_error") -> None:
        """End every request in flight with ``error`` (e.g. the drain timeout ran out at shutdown)."""
        self._commands.put(lambda: self.core.fail_all(error, code))

    @property
    def num_unfinished(self) -> int:
        """Requests submitted and not finished yet: running, waiting, or about to be added."""
        return len(self._streams)

    # ---- adapters ----
    async def load_adapter(self, adapter_id: str, path: str | Path) -> None:
        """Read, validate and register a peft adapter directory (raises AdapterFormatError/KeyError)."""
        await asyncio.to_thread(self.core.add_adapter, adapter_id, path)

    def unload_adapter(self, adapter_id: str) -> None:
        """New requests no longer see it; running ones finish on it, then its slot is freed."""
        self.core.remove_adapter(adapter_id)

    # ---- text helpers ----
    def encode_chat(self, messages: list[dict]) -> list[int]:
        ids = self.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
        return list(ids["input_ids"] if hasattr(ids, "keys") else ids)

    def encode(self, text: str) -> list[int]:
        return self.tokenizer.encode(text)

    async def generate_text(
        self, prompt: str | list[dict], sampling: SamplingParams, adapter: str | None = None
    ) -> str:
        """Complete a text prompt (or chat messages, rendered with the chat template)."""
        ids = self.encode(prompt) if isinstance(prompt, str) else self.encode_chat(prompt)
        return "".join([d.text async for d in await self.submit(ids, sampling, adapter)])

    def shutdown(self) -> None:
        self._stopping.set()
        self._thread.join(timeout=10)

    # ---- the loop thread ----
    def _run(self, build: Callable[[], EngineCore], built: Future) -> None:
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

    def _run_command(self, command) -> list[TokenDelta]:
        try:
            return command() or []
        except Exception:
            log.exception("engine command failed")
            return []

    def _publish(self, deltas: list[TokenDelta]) -> None:
        """Hand a step's deltas to their streams: one wake-up per event loop, not one per delta
        (each ``call_soon_threadsafe`` writes the loop's self-pipe and wakes its thread)."""
        by_loop: dict[asyncio.AbstractEventLoop, list[tuple[asyncio.Queue, TokenDelta]]] = {}
        for delta in deltas:
            target = self._streams.get(delta.request_id)
            if target is not None:
                loop, stream = target
                by_loop.setdefault(loop, []).append((stream, delta))
        for loop, items in by_loop.items():
            loop.call_soon_threadsafe(_deliver, items)


class RequestStream:
    """Async iterator over one request's deltas; closing it early (even unstarted) aborts the request."""

    def __init__(self, engine: Engine, request_id: str, stream: asyncio.Queue) -> None:
        self.engine = engine
        self.request_id = request_id
        self._stream = stream
        self._finished = False

    def __aiter__(self) -> RequestStream:
        return self

    async def __anext__(self) -> TokenDelta:
        if self._finished:
            raise StopAsyncIteration
        try:
            delta = await self._stream.get()
        except asyncio.CancelledError:
            await self.aclose()
            raise
        if delta.finish_reason is not None:
            self._finished = True
            self.engine._streams.pop(self.request_id, None)
        return delta

    async def aclose(self) -> None:
        if not self._finished:
            self._finished = True
            self.engine.abort(self.request_id)
        self.engine._streams.pop(self.request_id, None)


def _deliver(items: list[tuple[asyncio.Queue, TokenDelta]]) -> None:
    """On the event loop: each delta into its request's stream."""
    for stream, delta in items:
        stream.put_nowait(delta)


def _as_list(delta: TokenDelta | None) -> list[TokenDelta]:
    return [] if delta is None else [delta]
