"""Grammar-constrained decoding (structured outputs): a request's grammar masks its logits each step.

The grammar engine is xgrammar, in the optional extra ``structured`` (``pip install
'loraplex[structured]'``); without it a request that asks for a grammar is an EngineError naming
the request field it came from, and every other request is served as before.

Contracts:

- ``GrammarSpec`` is what a request asks for (it rides in ``SamplingParams``): plain, hashable data.
- ``Grammars.compile(spec)`` compiles a spec once (kept in a small LRU; thread-safe, so the engine
  facade compiles off the event loop before the request reaches the engine thread) and raises
  EngineError naming ``spec.param`` for a schema the engine cannot compile.
- ``Grammars.matcher(spec)`` is a sequence's own matcher: it advances with every token the
  sequence emits (``accept``) and says which tokens may come next.
- ``Grammars.start_masks(rows)`` fills the next-token bitmask of the rows that carry a matcher on a
  worker thread and returns at once; the engine runs the forward meanwhile, then
  ``PendingMasks.apply(logits)`` waits for the fill and sets the disallowed logits of those rows
  (and only those) to -inf. Rows without a grammar are never touched, so their tokens are exactly
  what they would be in a batch without grammars.

A grammar ends with one of the model's EOS tokens: once the document is complete only EOS is
allowed, and the sequence stops there (also with ``ignore_eos``: a finished grammar admits nothing
more). JSON is generated without free whitespace (``any_whitespace=False``: ", " and ": " as
separators): a small model left free to emit whitespace can loop on it until max_tokens. Tokens
holding a raw control character (bytes 0x00-0x1f) are masked too: JSON never contains one raw
(xgrammar's string rule lets them into strings, and strict JSON parsers such as pydantic's and
Python's ``json.loads`` refuse them).
"""

from __future__ import annotations

import collections
import json
import re
import threading
from collections.abc import Iterable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal, Protocol

import torch

from server.engine.errors import EngineError

if TYPE_CHECKING:
    import xgrammar

INSTALL_HINT = "pip install 'loraplex[structured]'"
MAX_COMPILED = 256  # compiled grammars kept (LRU)
GrammarKind = Literal["json_object", "json_schema"]
_XGRAMMAR_PREFIX = re.compile(r"^\[[0-9:]+\] \S+:[0-9]+: ")  # "[13:01:11] /project/cpp/x.cc:5082: "


@dataclass(frozen=True)
class GrammarSpec:
    """A grammar a request asks for. ``schema``: JSON Schema text (json_schema; canonical JSON so
    equal schemas share one compilation). ``strict``: no properties or items beyond the schema's
    unless it allows them (OpenAI's strict; xgrammar's strict_mode). ``param``: the request field it
    came from, named by every refusal."""

    kind: GrammarKind
    schema: str = ""
    strict: bool = False
    param: str = "response_format"

    @classmethod
    def json_schema(cls, schema: object, strict: bool = False, param: str = "response_format") -> GrammarSpec:
        """A spec for ``schema`` (a JSON-able value), serialised compactly (key order kept: properties
        are generated in the schema's order)."""
        return cls("json_schema", json.dumps(schema, separators=(",", ":")), strict, param)


class GrammarRow(Protocol):
    """What the grammar stage reads of each sampling row (a Sequence)."""

    grammar: GrammarState | None


class GrammarState:
    """One sequence's position in its grammar (an xgrammar GrammarMatcher)."""

    def __init__(self, matcher: xgrammar.GrammarMatcher) -> None:
        self._matcher = matcher

    def accept(self, token_id: int) -> bool:
        """Advance by ``token_id``; False (state unchanged) when the grammar does not allow it."""
        return bool(self._matcher.accept_token(token_id))

    @property
    def is_terminated(self) -> bool:
        """The document is complete and its end token accepted: nothing more may follow."""
        return bool(self._matcher.is_terminated())

    def fill(self, bitmask: torch.Tensor, row: int) -> bool:
        """Write the allowed next tokens into ``bitmask[row]``; False when every token is allowed."""
        return bool(self._matcher.fill_next_token_bitmask(bitmask, row))


class PendingMasks:
    """The bitmask of one step's grammar rows, being filled on the worker thread."""

    def __init__(self, bitmask: torch.Tensor, rows: list[int], filled: Future[None], vocab_size: int):
        self._bitmask = bitmask  # [B, ceil(V / 32)] int32, CPU
        self._rows = rows  # batch rows that carry a grammar
        self._filled = filled
        self._vocab_size = vocab_size

    def apply(self, logits: torch.Tensor) -> None:
        """Wait for the fill, then set the disallowed tokens of the grammar rows of ``logits`` [B, V]
        (fp32, contiguous) to -inf in place; other rows are left as they are."""
        import xgrammar

        self._filled.result()
        bitmask = self._bitmask.to(logits.device, non_blocking=True)
        xgrammar.apply_token_bitmask_inplace(logits, bitmask, vocab_size=self._vocab_size, indices=self._rows)


class Grammars:
    """Compiles grammars for one tokenizer and masks the rows that carry them; xgrammar is imported
    on first use, so an engine without the extra starts and serves everything else."""

    def __init__(self, tokenizer: Any, vocab_size: int, stop_token_ids: Iterable[int]) -> None:
        self.tokenizer = tokenizer
        self.vocab_size = vocab_size  # the model's logits width (may exceed the tokenizer's)
        self.stop_token_ids = sorted(stop_token_ids)
        self._compiler: xgrammar.GrammarCompiler | None = None
        self._compiled: collections.OrderedDict[GrammarSpec, xgrammar.CompiledGrammar] = (
            collections.OrderedDict()
        )
        self._lock = threading.Lock()
        self._worker: ThreadPoolExecutor | None = None
        self._printable: torch.Tensor | None = None  # [ceil(V / 32)] int32: tokens without control bytes

    def compile(self, spec: GrammarSpec) -> xgrammar.CompiledGrammar:
        """``spec`` compiled (cached); EngineError naming ``spec.param`` when it cannot be."""
        with self._lock:
            if spec in self._compiled:
                self._compiled.move_to_end(spec)
                return self._compiled[spec]
            if self._compiler is None:
                info = _tokenizer_info(self, spec.param)
                self._printable = _printable_tokens(info, self.vocab_size)
                self._compiler = xgrammar_module().GrammarCompiler(info, max_threads=1)
            compiler = self._compiler
        compiled = _compile(compiler, spec)  # outside the lock: compilations may run side by side
        with self._lock:
            self._compiled[spec] = compiled
            while len(self._compiled) > MAX_COMPILED:
                self._compiled.popitem(last=False)
        return compiled

    def matcher(self, spec: GrammarSpec) -> GrammarState:
        import xgrammar

        compiled = self.compile(spec)
        stops = self.stop_token_ids or None  # None: the ones xgrammar found in the tokenizer
        return GrammarState(xgrammar.GrammarMatcher(compiled, override_stop_tokens=stops))

    def start_masks(self, rows: Sequence[GrammarRow]) -> PendingMasks | None:
        """Begin filling the bitmask of the rows that carry a grammar (None when none does)."""
        states = [(i, row.grammar) for i, row in enumerate(rows) if row.grammar is not None]
        if not states:
            return None
        import xgrammar

        bitmask = xgrammar.allocate_token_bitmask(len(rows), self.vocab_size)  # [B, ceil(V / 32)]
        printable = self._printable
        assert printable is not None  # set with the compiler, before any matcher exists

        def fill() -> None:
            for i, state in states:
                state.fill(bitmask, i)
                bitmask[i] &= printable

        self._worker = self._worker or ThreadPoolExecutor(1, thread_name_prefix="grammar-masks")
        return PendingMasks(bitmask, [i for i, _ in states], self._worker.submit(fill), self.vocab_size)

    @staticmethod
    def accept(rows: Sequence[GrammarRow], token_ids: Sequence[int]) -> list[int]:
        """Advance each row's matcher by its sampled token; the rows whose token it refused (none,
        when the token was sampled under the row's mask)."""
        refused = []
        for i, (row, token_id) in enumerate(zip(rows, token_ids, strict=True)):
            if row.grammar is not None and not row.grammar.accept(token_id):
                refused.append(i)
        return refused


def xgrammar_module() -> Any:
    """The xgrammar module; ImportError when the extra is not installed."""
    import xgrammar

    return xgrammar


def _tokenizer_info(grammars: Grammars, param: str) -> xgrammar.TokenizerInfo:
    try:
        xgr = xgrammar_module()
    except ImportError:
        raise EngineError(
            f"{param} needs the grammar engine, which is not installed on this server ({INSTALL_HINT})",
            param=param,
        ) from None
    info: xgrammar.TokenizerInfo = xgr.TokenizerInfo.from_huggingface(
        grammars.tokenizer, vocab_size=grammars.vocab_size, stop_token_ids=grammars.stop_token_ids or None
    )
    return info


def _printable_tokens(info: xgrammar.TokenizerInfo, vocab_size: int) -> torch.Tensor:
    """[ceil(V / 32)] int32 bitmask (xgrammar's layout: bit j of word w is token 32w + j) of the
    tokens whose text holds no byte below 0x20; stop tokens are kept."""
    allowed = torch.zeros(-(-vocab_size // 32) * 32, dtype=torch.int64)  # [W * 32]
    clean = [i for i, text in enumerate(info.decoded_vocab[:vocab_size]) if not text or min(text) >= 0x20]
    allowed[clean] = 1
    allowed[[t for t in info.stop_token_ids if t < vocab_size]] = 1
    words = (allowed.view(-1, 32) << torch.arange(32)).sum(dim=1)  # [W] in [0, 2**32)
    return torch.where(words >= 2**31, words - 2**32, words).to(torch.int32)


def _compile(compiler: xgrammar.GrammarCompiler, spec: GrammarSpec) -> xgrammar.CompiledGrammar:
    schema = spec.schema if spec.kind == "json_schema" else '{"type": "object"}'
    strict = spec.strict if spec.kind == "json_schema" else False
    try:
        return compiler.compile_json_schema(schema, any_whitespace=False, strict_mode=strict)
    except Exception as exc:  # xgrammar's RuntimeError, InvalidJSONError...: the schema's fault either way
        reason = _XGRAMMAR_PREFIX.sub("", str(exc).strip().splitlines()[-1]) if str(exc).strip() else ""
        raise EngineError(f"{spec.param}: the schema cannot be compiled to a grammar: {reason}",
                          param=spec.param) from exc  # fmt: skip
