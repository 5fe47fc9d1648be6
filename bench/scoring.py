"""Memory and time of scoring a prompt chunk's tokens (``echo`` with ``logprobs``), issue 19.

Run:  .venv/bin/python bench/scoring.py [--rows 2048] [--vocab 49152] [--top 5] [--dtype float32]

Calls ``server.engine.sampler.token_logprobs`` on random logits of a prefill chunk's shape (rows =
``--max-num-batched-tokens``' default, SmolLM2's vocabulary) and prints the growth of the peak RSS
beyond the logits themselves, and the time. Nothing is asserted on.
"""

from __future__ import annotations

import argparse
import resource
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.machine import cpu_name
from server.engine.sampler import SCORING_ROWS, token_logprobs


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rows", type=int, default=2048)
    p.add_argument("--vocab", type=int, default=49152)
    p.add_argument("--top", type=int, default=5)
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    args = p.parse_args()
    logits = torch.randn(args.rows, args.vocab, dtype=getattr(torch, args.dtype))  # [P, V]
    targets = torch.randint(0, args.vocab, (args.rows,))  # [P]
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    started = time.perf_counter()
    token_logprobs(logits, targets, [args.top] * args.rows)
    elapsed = time.perf_counter() - started
    grown = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 1024
    size = logits.numel() * logits.element_size() / 2**20
    print(f"machine: {cpu_name()}, {torch.get_num_threads()} torch threads; SCORING_ROWS {SCORING_ROWS}")
    print("| rows | vocab | dtype | logits MiB | peak RSS growth MiB | ms |")
    print("| ---: | ---: | --- | ---: | ---: | ---: |")
    print(f"| {args.rows} | {args.vocab} | {args.dtype} | {size:.0f} | {grown:.0f} | {elapsed * 1e3:.0f} |")


if __name__ == "__main__":
    main()
