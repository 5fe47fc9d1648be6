"""Cost of grammar-constrained decoding per engine step: constrained rows against free ones.

Run:  .venv/bin/python bench/structured.py      (smollm2-135m-instruct fp32 on CPU, batch 8,
                                                 48 new tokens, median of 3 repeats)

Three batches of the same 8 chat prompts, stepped synchronously through EngineCore:
  1. free: every request unconstrained (greedy, EOS ignored);
  2. mixed: one request under a JSON Schema grammar, seven free;
  3. constrained: all eight under the grammar.
The schema keeps every request generating (a list of up to 40 free strings), so the batch stays
at 8 rows. Step time = median duration of the decode steps that ran all 8 rows. The grammar
work of a step is also timed on its own: the mask fill (xgrammar, on the worker thread, overlapped
with the forward) and the mask application (on the engine thread, before sampling). No timing
here is asserted on.
"""

from __future__ import annotations

import argparse
import platform
import shlex
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.machine import cpu_name
from server.config import EngineConfig, ModelConfig
from server.engine import grammar
from server.engine.core import EngineCore
from server.engine.grammar import GrammarSpec
from server.engine.sampler import SamplingParams
from server.model.factory import load_model

QUESTIONS = [
    "What is the capital of France?", "Write a haiku about the sea.", "List three prime numbers.",
    "Explain what a LoRA adapter is.", "Name a famous painter.", "What is 12 times 12?",
    "Describe a cat in one sentence.", "Give me a colour.",
]  # fmt: skip
SCHEMA = {
    "type": "object",
    "properties": {"answers": {"type": "array", "items": {"type": "string"}, "maxItems": 40}},
    "required": ["answers"],
}


class Timed:
    """Wraps a function and records how long each call took (seconds)."""

    def __init__(self, owner: Any, name: str) -> None:
        self.owner, self.name, self.seconds = owner, name, []
        self.original: Callable[..., Any] = getattr(owner, name)

        def timed(*args: Any, **kwargs: Any) -> Any:
            start = time.perf_counter()
            try:
                return self.original(*args, **kwargs)
            finally:
                self.seconds.append(time.perf_counter() - start)

        setattr(owner, name, timed)


def prompts(core: EngineCore) -> list[list[int]]:
    out = []
    for question in QUESTIONS:
        ids = core.tokenizer.apply_chat_template(
            [{"role": "user", "content": question}], add_generation_prompt=True, tokenize=True
        )
        out.append(list(ids["input_ids"] if hasattr(ids, "keys") else ids))
    return out


def run(core: EngineCore, num_constrained: int, new_tokens: int) -> list[float]:
    """Durations of the decode steps that ran every request."""
    spec = GrammarSpec.json_schema(SCHEMA)
    for i, prompt in enumerate(prompts(core)):
        constrained = i < num_constrained
        sampling = SamplingParams(max_tokens=new_tokens, temperature=0, ignore_eos=not constrained,
                                  grammar=spec if constrained else None)  # fmt: skip
        core.add_request(f"r{i}", prompt, sampling, None)
    durations = []
    while core.has_work:
        start = time.perf_counter()
        core.step()
        elapsed = time.perf_counter() - start
        running = core.scheduler.running
        if len(running) == len(QUESTIONS) and all(s.num_uncomputed_tokens == 1 for s in running):
            durations.append(elapsed)
    return durations[1:]  # the first of them followed the prefill


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--new-tokens", type=int, default=48)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    config = EngineConfig(max_num_seqs=8, max_loras=1, max_lora_rank=16)
    core = EngineCore(load_model(ModelConfig(dtype="float32", device="cpu"), config), config)
    fill = Timed(grammar.GrammarState, "fill")
    apply = Timed(grammar.PendingMasks, "apply")
    cases = {"free (8 free rows)": 0, "mixed (1 constrained + 7 free)": 1, "constrained (8 rows)": 8}
    run(core, 8, 8)  # warm-up: compiles the schema, tunes the kernels
    steps: dict[str, list[float]] = {name: [] for name in cases}
    work: dict[str, tuple[list[float], list[float]]] = {name: ([], []) for name in cases}
    for _ in range(args.repeats):
        for name, num in cases.items():  # interleaved, so a burst of load does not land on one case
            fill.seconds.clear()
            apply.seconds.clear()
            steps[name] += run(core, num, args.new_tokens)
            work[name][0].extend(fill.seconds)
            work[name][1].extend(apply.seconds)
    free = statistics.median(steps["free (8 free rows)"])
    print(
        f"machine: {cpu_name()}, {torch.get_num_threads()} torch threads, Python {platform.python_version()}"
    )
    print(f"command: {' '.join(shlex.quote(a) for a in sys.argv)}")
    print("| batch | decode step (median) | vs free | mask fill per row (median) | mask apply per step |")
    print("| --- | --- | --- | --- | --- |")
    for name in cases:
        step = statistics.median(steps[name])
        fills, applies = work[name]
        fill_us = f"{statistics.median(fills) * 1e6:.0f} µs" if fills else "-"
        apply_us = f"{statistics.median(applies) * 1e6:.0f} µs" if applies else "-"
        print(f"| {name} | {step * 1e3:.1f} ms | {step / free:.2f}x | {fill_us} | {apply_us} |")


if __name__ == "__main__":
    main()
