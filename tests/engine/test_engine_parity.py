"""Our engine against the real libraries: HF transformers `generate` and peft `PeftModel`."""

from __future__ import annotations

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from transformers import AutoModelForCausalLM

from server.engine.route import Route
from server.engine.sampler import SamplingParams
from server.engine.scheduler import ScheduledSeq
from server.engine.sequence import Sequence
from tests.engine.tiny import make_core, run_to_completion, write_tiny_llama

GREEDY = dict(temperature=0.0, ignore_eos=True)
PROMPTS = [
    [256, 72, 101, 108, 108, 111],
    [256, 1, 2, 3],
    [256, *range(30, 110)],
    [256, 200],
]


def hf_greedy(model, prompt: list[int], max_new_tokens: int) -> list[int]:
    out = model.generate(
        torch.tensor([prompt]), max_new_tokens=max_new_tokens, min_new_tokens=max_new_tokens, do_sample=False
    )
    return out[0, len(prompt) :].tolist()


def tokens_of(deltas) -> list[int]:
    return [t for d in deltas for t in d.token_ids]


def save_peft_adapter(base_dir, out_dir, seed: int, **lora_kwargs):
    """A peft LoRA with random non-zero A and B, saved with save_pretrained (safetensors)."""
    torch.manual_seed(seed)
    base = AutoModelForCausalLM.from_pretrained(base_dir)
    peft_model = get_peft_model(base, LoraConfig(init_lora_weights=False, **lora_kwargs))
    with torch.no_grad():  # init_lora_weights=False draws B small; make the adapter matter
        for name, param in peft_model.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.2)
    peft_model.save_pretrained(out_dir)
    return out_dir


def our_last_logits(core, prompt: list[int], adapter_id: str | None) -> torch.Tensor:
    """Next-token logits of one prefill through our runner and model (no sampling)."""
    route = Route.base() if adapter_id is None else Route.side(core.adapters.try_activate(adapter_id))
    seq = Sequence("probe", prompt, SamplingParams(max_tokens=1), adapter_id, 0)
    seq.block_table = core.kv_cache.allocator.allocate(core.kv_cache.blocks_for(len(prompt)))
    try:
        batch = core.runner.build_batch([ScheduledSeq.of(seq, len(prompt), route)])
        return core.loaded.model(batch, core.kv_cache.layers)[0]
    finally:
        core.kv_cache.allocator.free(seq.block_table)


def assert_greedy_matches_hf(core, model_dir, max_tokens: int) -> None:
    """PROMPTS decoded together by ``core`` give HF generate's greedy tokens, each prompt alone."""
    hf = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    for i, prompt in enumerate(PROMPTS):
        core.add_request(f"r{i}", prompt, SamplingParams(max_tokens=max_tokens, **GREEDY), None)
    results = run_to_completion(core)
    for i, prompt in enumerate(PROMPTS):
        assert tokens_of(results[f"r{i}"]) == hf_greedy(hf, prompt, max_tokens), f"prompt {i}"


def test_greedy_tokens_equal_hf_generate(tiny_llama):
    assert_greedy_matches_hf(make_core(tiny_llama), tiny_llama, 24)


@pytest.mark.parametrize("family", ["mistral", "qwen2"])
def test_other_llama_family_architectures_match_hf(tmp_path, family):
    model_dir = write_tiny_llama(tmp_path / family, seed=3, family=family, sliding_window=None)
    core = make_core(model_dir)
    hf = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    assert type(hf).__name__.lower().startswith(family)
    for i, prompt in enumerate(PROMPTS[:3]):
        core.add_request(f"r{i}", prompt, SamplingParams(max_tokens=12, **GREEDY), None)
    results = run_to_completion(core)
    for i, prompt in enumerate(PROMPTS[:3]):
        assert tokens_of(results[f"r{i}"]) == hf_greedy(hf, prompt, 12)


ADAPTER_CASES = [
    dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]),
    dict(r=8, lora_alpha=16, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"]),
    dict(r=16, lora_alpha=32, target_modules=["gate_proj", "up_proj", "down_proj"], use_rslora=True),
    dict(
        r=12,
        lora_alpha=6,
        target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
    ),
]


@pytest.mark.parametrize("case", ADAPTER_CASES, ids=lambda c: f"r{c['r']}-{len(c['target_modules'])}mods")
def test_peft_adapter_matches_peft_model(tiny_llama, tmp_path, case):
    adapter_dir = save_peft_adapter(tiny_llama, tmp_path / "adapter", seed=case["r"], **case)
    reference = PeftModel.from_pretrained(
        AutoModelForCausalLM.from_pretrained(tiny_llama), adapter_dir
    ).eval()
    base_only = AutoModelForCausalLM.from_pretrained(tiny_llama).eval()
    core = make_core(tiny_llama)
    core.add_adapter("a", adapter_dir)
    for prompt in PROMPTS[:3]:
        with torch.no_grad():
            expected = reference(torch.tensor([prompt])).logits[0, -1]
            base = base_only(torch.tensor([prompt])).logits[0, -1]
        got = our_last_logits(core, prompt, "a")
        assert (expected - base).abs().max() > 1e-2, "the adapter must change the logits"
        torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)
    core.add_request("g", PROMPTS[0], SamplingParams(max_tokens=16, **GREEDY), "a")
    with torch.no_grad():
        expected_tokens = hf_greedy(reference, PROMPTS[0], 16)
    assert tokens_of(run_to_completion(core)["g"]) == expected_tokens


@pytest.fixture
def native_cpu_kernels(monkeypatch, tmp_path):
    """The start-up choice as a CPU that picks the compiled kernels would make it, fp32 GEMMs.

    Tiny test models are never tuned (their timings are noise), so the choice is put in place
    of the measurement; everything after it (the factory's wiring, the kernels) is the real path.
    """
    from server.model import factory
    from server.model.cpu_tuning import CpuKernelChoice
    from server.ops import attention_native, lora_native

    if attention_native.load(tmp_path) is None or lora_native.load(tmp_path) is None:
        pytest.skip("no C compiler here: the torch path is used")
    choice = CpuKernelChoice(
        dtype="float32", gemm="x_wt", lora_dtype="float32", lora_kernel="native", num_threads=1,
        cpu="test", attention_kernel="native",
    )  # fmt: skip
    monkeypatch.setattr(factory, "pick_cpu_kernels", lambda model_config, checkpoint: choice)
    monkeypatch.setattr(factory, "_cache_dir", lambda model_config: tmp_path)


def test_native_cpu_kernels_keep_parity_with_hf_and_peft(tiny_llama, tmp_path, native_cpu_kernels):
    from server.ops.attention_native import NativeAttention

    core = make_core(tiny_llama)
    assert isinstance(core.loaded.model.layers[0].attention_ops, NativeAttention)
    hf = AutoModelForCausalLM.from_pretrained(tiny_llama).eval()
    for i, prompt in enumerate(PROMPTS):
        core.add_request(f"r{i}", prompt, SamplingParams(max_tokens=24, **GREEDY), None)
    results = run_to_completion(core)
    for i, prompt in enumerate(PROMPTS):  # 4 sequences of different lengths decode in one batch
        assert tokens_of(results[f"r{i}"]) == hf_greedy(hf, prompt, 24), f"prompt {i}"
    case = ADAPTER_CASES[-1]
    adapter_dir = save_peft_adapter(tiny_llama, tmp_path / "adapter", seed=5, **case)
    reference = PeftModel.from_pretrained(
        AutoModelForCausalLM.from_pretrained(tiny_llama), adapter_dir
    ).eval()
    core.add_adapter("a", adapter_dir)
    for i, prompt in enumerate(PROMPTS[:3]):
        core.add_request(f"g{i}", prompt, SamplingParams(max_tokens=16, **GREEDY), "a" if i != 1 else None)
    results = run_to_completion(core)
    with torch.no_grad():
        assert tokens_of(results["g0"]) == hf_greedy(reference, PROMPTS[0], 16)
        assert tokens_of(results["g2"]) == hf_greedy(reference, PROMPTS[2], 16)
    assert tokens_of(results["g1"]) == hf_greedy(hf, PROMPTS[1], 16)  # a base request in the same batch


def test_triton_decode_attention_keeps_parity_with_hf(tiny_llama, monkeypatch):
    """The CUDA attention kernel in the model (Triton interpreter on CPU without a GPU): a
    batch of 4 sequences of different lengths decodes HF's greedy tokens."""
    pytest.importorskip("triton")
    from server.model import factory
    from server.ops import attention_triton

    monkeypatch.setattr(factory, "pick_attention_ops", lambda kernels, model_config, device: attention_triton)
    core = make_core(tiny_llama)
    assert core.loaded.model.layers[0].attention_ops is attention_triton
    assert_greedy_matches_hf(core, tiny_llama, 12)
