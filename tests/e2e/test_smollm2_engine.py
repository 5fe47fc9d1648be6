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


@pytest.fixture(scope="module")
def chat_prompts(smollm2_core) -> list[list[int]]:
    tok = smollm2_core.tokenizer
    rendered = [
        tok.apply_chat_template([{"role": "user", "content": q}], add_generation_prompt=True, tokenize=True)
        for q in QUESTIONS
    ]
    return [list(p["input_ids"] if hasattr(p, "keys") else p) for p in rendered]


@pytest.fixture(scope="module")
def hf_greedy(smollm2_core, chat_prompts) -> list[list[int]]:
    hf = AutoModelForCausalLM.from_pretrained(smollm2_core.loaded.checkpoint.path, dtype=torch.float32).eval()
    return [
        hf.generate(torch.tensor([prompt]), max_new_tokens=24, do_sample=False)[0, len(prompt) :].tolist()
        for prompt in chat_prompts
    ]


def test_greedy_matches_hf_generate_batched(smollm2_core, chat_prompts, hf_greedy):
    for i, prompt in enumerate(chat_prompts):
        smollm2_core.add_request(str(i), prompt, SamplingParams(max_tokens=24, temperature=0), None)
    results = run_to_completion(smollm2_core)
    for i in range(len(chat_prompts)):
        assert [t for d in results[str(i)] for t in d.token_ids] == hf_greedy[i], QUESTIONS[i]
    answer = "".join(d.text for d in results["0"])
    assert "Paris" in answer


def test_chats_sharing_the_template_system_prompt_reuse_it_and_still_match_hf(
    smollm2_core, chat_prompts, hf_greedy
):
    """SmolLM2's chat template adds one system prompt to every chat: sent one after another, each
    chat after the first reuses its cached blocks (and the same chat again its whole prompt)."""
    for i, prompt in enumerate([*chat_prompts, chat_prompts[0]]):
        hits = smollm2_core.stats().prefix_cache_hits
        smollm2_core.add_request(f"turn-{i}", prompt, SamplingParams(max_tokens=24, temperature=0), None)
        tokens = [t for d in run_to_completion(smollm2_core)[f"turn-{i}"] for t in d.token_ids]
        assert tokens == hf_greedy[i % len(chat_prompts)], QUESTIONS[i % len(chat_prompts)]
        if i > 0:  # the first may find its blocks cached too, when the batched test ran before
            assert smollm2_core.stats().prefix_cache_hits - hits >= 16, (
                "at least the system prompt's first block"
            )
