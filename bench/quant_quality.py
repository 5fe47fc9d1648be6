"""Quality and memory of each --quantization scheme on the embedded SmolLM2 (issue 16).

Run:  .venv/bin/python bench/quant_quality.py                      (none, int4, int8; 8 prompts x 32 tokens)
      .venv/bin/python bench/quant_quality.py --schemes int4 --dtype float32

For each scheme, in a fresh process (so RSS is the scheme's own): load the model as
``loraplex serve`` would (``--dtype`` unset: the measured dtype, unless --dtype), then
- greedy agreement with HF transformers (fp32, the same GGUF dequantized by transformers, i.e.
  the reference of the embedded model): for 8 chat prompts (up to --new-tokens, both stopping at
  EOS), the tokens generated before the first difference, and how many of the 8 are equal;
- perplexity of a fixed English text (``TEXT`` below, 200-odd tokens) from one prefill whose
  logits are taken at every position;
- resident memory (VmRSS, not the peak) after loading, and the bytes of linear weights one decode step reads.
HF's own perplexity and greedy tokens are computed once in the parent. No figure is asserted on.
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import math
import multiprocessing
import resource
from pathlib import Path

QUESTIONS = [
    "What is the capital of France?", "Write a haiku about the sea.", "List three prime numbers.",
    "Explain in one sentence what a LoRA adapter is.", "Give me a synonym for happy.",
    "How many legs does a spider have?", "Name a famous painting by Leonardo da Vinci.",
    "What does a thermometer measure?",
]  # fmt: skip
TEXT = (
    "The history of the printing press begins in the fifteenth century, when Johannes Gutenberg "
    "combined movable metal type, oil-based ink and a wooden press adapted from those used to make "
    "wine. Before his invention, books were copied by hand, a slow and costly process that kept "
    "written knowledge in the hands of a few. Within fifty years of the first printed Bible, presses "
    "had spread to more than two hundred cities across Europe, and millions of books were in "
    "circulation. Printing made it possible to share scientific results quickly and accurately, it "
    "helped standardise spelling and grammar, and it allowed new ideas to reach readers far from the "
    "places where they were written. Historians often describe the press as one of the inventions "
    "that shaped the modern world, alongside the steam engine and the electric telegraph."
)


def prompts(tokenizer) -> list[list[int]]:
    out = []
    for question in QUESTIONS:
        ids = tokenizer.apply_chat_template(
            [{"role": "user", "content": question}], add_generation_prompt=True
        )
        out.append(list(ids["input_ids"] if hasattr(ids, "keys") else ids))
    return out


def hf_reference(new_tokens: int) -> tuple[list[list[int]], float]:
    """HF fp32 greedy tokens of each prompt and its perplexity of TEXT, on the converted checkpoint."""
    import torch
    from transformers import AutoModelForCausalLM

    from server.config import ModelConfig
    from server.model.loader import resolve_checkpoint

    checkpoint = resolve_checkpoint(ModelConfig())
    model = AutoModelForCausalLM.from_pretrained(checkpoint.path, dtype=torch.float32).eval()
    greedy = []
    with torch.inference_mode():
        for ids in prompts(checkpoint.tokenizer):
            out = model.generate(torch.tensor([ids]), max_new_tokens=new_tokens, do_sample=False)
            greedy.append(out[0, len(ids) :].tolist())
        text = torch.tensor([checkpoint.tokenizer.encode(TEXT)])
        loss = model(text, labels=text).loss.item()
    return greedy, math.exp(loss)


def measure_scheme(scheme: str, dtype: str | None, new_tokens: int, queue) -> None:
    """In a fresh process: greedy tokens, perplexity, RSS and linear bytes of ``scheme``."""
    import torch

    from server.config import EngineConfig, ModelConfig
    from server.engine.core import EngineCore
    from server.engine.route import Route
    from server.engine.sampler import SamplingParams
    from server.engine.scheduler import ScheduledSeq
    from server.engine.sequence import Sequence
    from server.model.factory import load_model

    config = EngineConfig(max_num_seqs=8)
    loaded = load_model(ModelConfig(dtype=dtype, quantization=scheme), config)
    gc.collect()
    rss_mb = _rss_mb()
    core = EngineCore(loaded, config)
    greedy: dict[str, list[int]] = {}
    for n, ids in enumerate(prompts(core.tokenizer)):
        core.add_request(str(n), ids, SamplingParams(max_tokens=new_tokens, temperature=0), None)
    while core.has_work:
        for delta in core.step():
            greedy.setdefault(delta.request_id, []).extend(delta.token_ids)
    text = core.tokenizer.encode(TEXT)
    seq = Sequence("ppl", text, SamplingParams(max_tokens=1), None, 0)
    seq.block_table = core.kv_cache.allocator.allocate(core.kv_cache.blocks_for(len(text)))
    batch = core.runner.build_batch([ScheduledSeq.of(seq, len(text), Route.base())])
    batch = dataclasses.replace(batch, logits_index=torch.arange(len(text)))
    logits = loaded.model(batch, core.kv_cache.layers)  # [T, V] fp32
    nll = torch.nn.functional.cross_entropy(logits[:-1], torch.tensor(text[1:]))
    linear = sum(
        m.quantized.num_bytes if m.quantized is not None else m.weight.numel() * m.weight.element_size()
        for m in loaded.model.modules()
        if hasattr(m, "quantized")
    )
    dtype_name = str(loaded.dtype).removeprefix("torch.")
    tokens = [greedy[str(n)] for n in range(len(QUESTIONS))]
    queue.put({"greedy": tokens, "ppl": math.exp(nll.item()), "rss_mb": rss_mb, "linear_mb": linear / 2**20,
               "dtype": dtype_name})  # fmt: skip


def _agreeing(ours: list[int], theirs: list[int]) -> int:
    """Tokens before the first difference (both stop at EOS, so a shorter answer can be all equal)."""
    return next(
        (i for i, (a, b) in enumerate(zip(ours, theirs, strict=False)) if a != b), min(len(ours), len(theirs))
    )


def _rss_mb() -> float:
    """Resident memory now (VmRSS), not the peak: loading passes through the dense weights."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--schemes", nargs="+", default=["none", "int4", "int8"])
    parser.add_argument("--dtype", default=None, help="serving dtype (default: measured, as loraplex serve)")
    parser.add_argument("--new-tokens", type=int, default=32)
    args = parser.parse_args()
    from server.ops.cpu_info import cpu_identity

    reference, hf_ppl = hf_reference(args.new_tokens)
    print(f"machine: {cpu_identity()}; HF fp32 reference perplexity {hf_ppl:.3f}")
    columns = ["scheme", "dtype", "perplexity", "tokens agreeing with HF before the first difference",
               "prompts fully equal", "linear MiB per step", "RSS after load MB"]  # fmt: skip
    print("| " + " | ".join(columns) + " |")
    print("| --- | --- | ---: | --- | ---: | ---: | ---: |")
    context = multiprocessing.get_context("spawn")
    for scheme in args.schemes:
        queue = context.Queue()
        process = context.Process(target=measure_scheme, args=(scheme, args.dtype, args.new_tokens, queue))
        process.start()
        result = queue.get()
        process.join()
        agree = [_agreeing(x, y) for x, y in zip(result["greedy"], reference, strict=True)]
        full = sum(x == y for x, y in zip(result["greedy"], reference, strict=True))
        cells = [scheme, result["dtype"], f"{result['ppl']:.3f}", ", ".join(map(str, agree)),
                 f"{full}/{len(agree)}", f"{result['linear_mb']:.0f}", f"{result['rss_mb']:.0f}"]  # fmt: skip
        print("| " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
