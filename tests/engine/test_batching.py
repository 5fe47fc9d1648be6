"""Continuous batching: a request's tokens never depend on who else is in the batch."""

from __future__ import annotations

import pytest

from adapters.errors import UnknownAdapterError
from server.engine.errors import ContextLengthError, EngineError
from server.engine.sampler import SamplingParams
from tests.engine.test_engine_parity import save_peft_adapter
from tests.engine.tiny import make_core, run_to_completion

ALL_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
REQUESTS = [  # (request id, prompt, adapter, sampling)
    ("base-greedy", [256, 10, 20, 30], None, dict(temperature=0.0)),
    ("a1-greedy", [256, *range(40, 97)], "a1", dict(temperature=0.0)),
    ("a2-seeded", [256, 5, 6], "a2", dict(temperature=0.9, top_p=0.9, seed=7)),
    ("a3-greedy", [256, 99] * 9, "a3", dict(temperature=0.0)),
    ("a1-seeded", [256, 3, 1, 4, 1, 5], "a1", dict(temperature=1.2, top_k=20, seed=3)),
    ("base-seeded", [256, 200, 201], None, dict(temperature=0.7, seed=11, repetition_penalty=1.3)),
]


@pytest.fixture(scope="module")
def adapter_dirs(tiny_llama, tmp_path_factory):
    root = tmp_path_factory.mktemp("adapters")
    return {
        "a1": save_peft_adapter(
            tiny_llama, root / "a1", seed=1, r=8, lora_alpha=16, target_modules=ALL_TARGETS
        ),
        "a2": save_peft_adapter(
            tiny_llama, root / "a2", seed=2, r=4, lora_alpha=4, target_modules=["q_proj"]
        ),
        "a3": save_peft_adapter(
            tiny_llama, root / "a3", seed=3, r=16, lora_alpha=8, target_modules=["down_proj"], use_rslora=True
        ),
    }


def new_core(tiny_llama, adapter_dirs, **overrides):
    core = make_core(tiny_llama, **overrides)
    for name, path in adapter_dirs.items():
        core.add_adapter(name, path)
    return core


def submit(core, request_id, prompt, adapter, sampling, max_tokens=20):
    core.add_request(
        request_id, prompt, SamplingParams(max_tokens=max_tokens, ignore_eos=True, **sampling), adapter
    )


def alone(tiny_llama, adapter_dirs):
    outputs = {}
    for request_id, prompt, adapter, sampling in REQUESTS:
        core = new_core(tiny_llama, adapter_dirs)
        submit(core, request_id, prompt, adapter, sampling)
        outputs[request_id] = [t for d in run_to_completion(core)[request_id] for t in d.token_ids]
    return outputs


@pytest.fixture(scope="module")
def outputs_alone(tiny_llama, adapter_dirs):
    return alone(tiny_llama, adapter_dirs)


def run_mixed(core, join_every: int) -> dict[str, list[int]]:
    """Submit one request every `join_every` steps, so requests join a running batch."""
    pending = list(REQUESTS)
    tokens: dict[str, list[int]] = {}
    steps = 0
    while pending or core.has_work:
        if pending and steps % join_every == 0:
            submit(core, *pending.pop(0))
        for delta in core.step():
            tokens.setdefault(delta.request_id, []).extend(delta.token_ids)
        steps += 1
        assert steps < 5000
    return tokens


def test_mixed_batch_equals_each_request_alone(tiny_llama, adapter_dirs, outputs_alone):
    core = new_core(tiny_llama, adapter_dirs)
    assert run_mixed(core, join_every=3) == outputs_alone
    assert len({len(v) for v in outputs_alone.values()}) == 1  # every request ran to max_tokens


def test_chunked_prefill_and_preemption_do_not_change_tokens(tiny_llama, adapter_dirs, outputs_alone):
    # 16 blocks of 4 tokens cannot hold all six sequences: some are preempted and recomputed;
    # 24 batched tokens force the long prompts through chunked prefill.
    per_token = 2 * 2 * 2 * 16 * 4  # K and V · layers · kv heads · head dim · fp32 bytes
    core = new_core(
        tiny_llama,
        adapter_dirs,
        kv_block_size=4,
        max_num_batched_tokens=24,
        kv_cache_bytes=26 * 4 * per_token,
    )
    assert core.kv_cache.allocator.num_blocks == 26
    assert run_mixed(core, join_every=1) == outputs_alone
    assert core.scheduler.num_preemptions > 0
    assert core.kv_cache.allocator.num_free == 26, "every KV block is returned"


def test_adapter_limit_queues_without_blocking_others(tiny_llama, adapter_dirs, outputs_alone):
    core = new_core(tiny_llama, adapter_dirs, max_loras=1)
    assert run_mixed(core, join_every=1) == outputs_alone


def test_abort_frees_blocks_and_keeps_serving(tiny_llama, adapter_dirs):
    core = new_core(tiny_llama, adapter_dirs)
    submit(core, "x", [256, 1, 2, 3], "a1", dict(temperature=0.0), max_tokens=50)
    submit(core, "y", [256, 4, 5], None, dict(temperature=0.0), max_tokens=5)
    core.step()
    core.step()
    delta = core.abort("x")
    assert delta.finish_reason == "abort"
    results = run_to_completion(core)
    assert "x" not in results and results["y"][-1].finish_reason == "length"
    assert core.kv_cache.allocator.num_free == core.kv_cache.allocator.num_blocks


@pytest.mark.parametrize(
    "prompt,adapter,params,error,match",
    [
        ([256, 1], "nope", dict(max_tokens=4), UnknownAdapterError, "does not exist"),
        ([], None, dict(max_tokens=4), EngineError, "empty"),
        ([256, 99999], None, dict(max_tokens=4), EngineError, "token ids"),
        ([256] * 500, None, dict(max_tokens=20), ContextLengthError, "maximum context length is 512"),
    ],
)
def test_bad_requests_raise_and_engine_keeps_serving(
    tiny_llama, adapter_dirs, prompt, adapter, params, error, match
):
    core = new_core(tiny_llama, adapter_dirs)
    with pytest.raises(error, match=match):
        core.add_request("bad", prompt, SamplingParams(**params), adapter)
    submit(core, "ok", [256, 7], None, dict(temperature=0.0), max_tokens=3)
    assert run_to_completion(core)["ok"][-1].finish_reason == "length"


@pytest.mark.parametrize("max_tokens", [-1, 1.5])
def test_max_tokens_must_be_a_count(max_tokens):
    """0 is allowed: the prompt alone is run (to score it, tests/engine/test_logprobs.py)."""
    with pytest.raises(ValueError, match="max_tokens"):
        SamplingParams(max_tokens=max_tokens)


def test_rank_over_limit_is_refused(tiny_llama, tmp_path):
    path = save_peft_adapter(
        tiny_llama, tmp_path / "big", seed=0, r=32, lora_alpha=32, target_modules=["q_proj"]
    )
    core = make_core(tiny_llama, max_lora_rank=16)
    with pytest.raises(ValueError, match="max_lora_rank=16"):
        core.add_adapter("big", path)


def test_cold_adapter_load_never_stalls_other_requests(tiny_llama, adapter_dirs):
    """While an adapter is read from disk in the background, the base request keeps decoding."""
    import threading
    import time

    from adapters.cache import AdapterState

    core = make_core(tiny_llama)
    release = threading.Event()
    real_read = core.adapters.read

    def slow_read(path):
        release.wait(timeout=30)
        return real_read(path)

    core.adapters.read = slow_read
    core.adapters.register("cold", adapter_dirs["a1"])
    submit(core, "cold-req", [256, 1, 2], "cold", dict(temperature=0.0), max_tokens=4)
    submit(core, "base-req", [256, 3, 4], None, dict(temperature=0.0), max_tokens=6)
    base_tokens = []
    for _ in range(6):
        base_tokens += [t for d in core.step() if d.request_id == "base-req" for t in d.token_ids]
    assert len(base_tokens) == 6, "the base request finished while the adapter was still loading"
    assert core.adapters.state("cold") is AdapterState.LOADING
    release.set()
    results: dict[str, list] = {}
    deadline = time.monotonic() + 60
    while core.has_work and time.monotonic() < deadline:  # the load finishes in the background
        for delta in core.step():
            results.setdefault(delta.request_id, []).append(delta)
        if core.last_step_was_idle:
            time.sleep(0.01)
    assert results["cold-req"][-1].finish_reason == "length"
    assert core.adapters.state("cold") is AdapterState.IN_SLOT


def test_adapter_that_fails_to_load_fails_its_requests_only(tiny_llama, tmp_path):
    core = make_core(tiny_llama)
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "adapter_config.json").write_text('{"peft_type": "LORA", "r": 4, "target_modules": ["q_proj"]}')
    (broken / "adapter_model.safetensors").write_bytes(b"not a safetensors file")
    core.adapters.register("broken", broken)
    submit(core, "bad", [256, 1], "broken", dict(temperature=0.0), max_tokens=3)
    submit(core, "good", [256, 2], None, dict(temperature=0.0), max_tokens=3)
    results = run_to_completion(core)
    assert results["bad"][-1].finish_reason == "error" and "safetensors" in results["bad"][-1].error
    assert results["good"][-1].finish_reason == "length"


def test_unloading_in_use_adapter_lets_running_request_finish(tiny_llama, adapter_dirs, outputs_alone):
    core = new_core(tiny_llama, adapter_dirs)
    submit(core, "a1-greedy", *REQUESTS[1][1:])
    tokens = [t for d in core.step() for t in d.token_ids]
    core.remove_adapter("a1")
    assert not core.adapters.is_registered("a1")
    with pytest.raises(UnknownAdapterError):
        submit(core, "late", [256, 1], "a1", dict(temperature=0.0))
    tokens += [t for d in run_to_completion(core)["a1-greedy"] for t in d.token_ids]
    assert tokens == outputs_alone["a1-greedy"]
    assert core.adapters.slot_usage() == 0, "the slot is freed once its last user finished"
