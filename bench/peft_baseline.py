"""In-process HF peft, fp32, as a user runs it: the baseline of bench/serve_vs_peft.py.

One PeftModel holds N adapters (``PeftModel.from_pretrained`` + ``load_adapter``) and generates for a
left-padded batch of N chat prompts with ``adapter_names=[...]`` (request i on adapter i), greedy,
exactly --max-tokens tokens per row. The model, the adapters, the prompts and the timed call are
bench/engine.py's (``hf_systems``, ``adapter_dirs``, ``chat_prompts``, ``run_hf``); this module only
builds them without an engine: the tokenizer is the one ``loraplex serve`` loads for the model
(``resolve_checkpoint``), so the chat template renders the same prompt ids the server does.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.engine import QUESTIONS, Run, chat_prompts, hf_systems


def questions(count: int) -> list[str]:
    """The user messages ``chat_prompts(tokenizer, count)`` renders, as strings (to send over HTTP)."""
    return [QUESTIONS[i % len(QUESTIONS)] + ("" if i < len(QUESTIONS) else f" ({i})") for i in range(count)]


@dataclass(frozen=True)
class PeftBaseline:
    """A loaded PeftModel over ``count`` adapters; ``generate()`` times one batch end to end."""

    generate: Callable[[], Run]
    tokenizer: object
    prompts: list[list[int]]  # chat-templated ids, request i = question i

    def texts(self, run: Run) -> list[str]:
        """Each row's text as the server streams it (special tokens skipped)."""
        return [self.tokenizer.decode(row, skip_special_tokens=True) for row in run.tokens]


def load_peft(model: str, count: int, rank: int, new_tokens: int) -> PeftBaseline:
    """bench/engine.py's peft system for ``count`` distinct rank-``rank`` adapters (adapter_dirs, cached).

    ``hf_systems`` wants an engine only for the checkpoint path and the tokenizer: a stand-in gives
    it the server's; the bare-HF system it also builds is dropped (and freed) here.
    """
    from server.config import ModelConfig
    from server.model.loader import resolve_checkpoint

    checkpoint = resolve_checkpoint(ModelConfig(model=model))
    prompts = chat_prompts(checkpoint.tokenizer, count)
    if prompts != [encode_chat(checkpoint.tokenizer, q) for q in questions(count)]:
        raise AssertionError("questions() no longer matches bench.engine.chat_prompts")
    core = SimpleNamespace(loaded=SimpleNamespace(checkpoint=checkpoint), tokenizer=checkpoint.tokenizer)
    settings = SimpleNamespace(num_adapters=count, rank=rank, batch=count, new_tokens=new_tokens)
    systems = hf_systems(core, prompts, settings)
    generate = next(fn for name, fn in systems.items() if "peft" in name)
    return PeftBaseline(generate, checkpoint.tokenizer, prompts)


def encode_chat(tokenizer, question: str) -> list[int]:
    """The server's rendering of one user message (server/engine/engine.py, ``encode_chat``)."""
    ids = tokenizer.apply_chat_template(
        [{"role": "user", "content": question}], add_generation_prompt=True, tokenize=True
    )
    return list(ids["input_ids"] if hasattr(ids, "keys") else ids)
