"""End to end on the embedded default model: our engine's greedy tokens equal HF `generate`."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM

from server.config import EngineConfig, ModelConfig
from server.engine.core import EngineCore
from server.engine.sampler import SamplingParams
from server.model.factory import load_model
from tests.engine.tiny import run_to_completion

pytestmark = pytest.mark.slow

QUESTIONS = [
    "What is the capital of France?",
    "Write a haiku about the sea.",
    "List three prime numbers.",
    "Explain in one sentence what a LoRA adapter is.",
]


@pytest.fixture(scope="module")
def smollm2_core():
    config = EngineConfig(max_loras=2, max_lora_rank=16, max_num_seqs=8)
    loaded = load_model(ModelConfig(dtype="float32", device="cpu"), config)
    return EngineCore(loaded, config)


def test_greedy_matches_hf_generate_batched(smollm2_core):
    tok = smollm2_core.tokenizer
    rendered = [
        tok.apply_chat_template([{"role": "user", "content": q}], add_generation_prompt=True, tokenize=True)
        for q in QUESTIONS
    ]
    prompts = [list(p["input_ids"] if hasattr(p, "keys") else p) for p in rendered]
    for i, prompt in enumerate(prompts):
        smollm2_core.add_request(str(i), prompt, SamplingParams(max_tokens=24, temperature=0), None)
    results = run_to_completion(smollm2_core)
    hf = AutoModelForCausalLM.from_pretrained(smollm2_core.loaded.checkpoint.path, dtype=torch.float32).eval()
    for i, prompt in enumerate(prompts):
        expected = hf.generate(torch.tensor([prompt]), max_new_tokens=24, do_sample=False)[0, len(prompt) :]
        assert [t for d in results[str(i)] for t in d.token_ids] == expected.tolist(), QUESTIONS[i]
    answer = "".join(d.text for d in results["0"])
    assert "Paris" in answer
