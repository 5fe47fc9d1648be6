"""Prefix caching: outputs with the cache equal outputs without it, for the base model and real peft
adapters in mixed batches, across re-registrations, removals, eviction and preemption; hits only
where the weights' content, the tenant and the cache salt agree.

Every test runs the same requests, in the same arrival order, on an engine with the cache and on
one with ``prefix_caching="off"``, and compares tokens exactly and logprobs within float tolerance.
"""

from __future__ import annotations

import random
import time
from dataclasses import dataclass

import pytest
import torch

from server.engine.kv_cache import BlockAllocator
from server.engine.prefix_cache import block_hash, cache_root
from server.engine.sampler import SamplingParams
from server.engine.sequence import FinishReason
from tests.engine.test_engine_parity import save_peft_adapter
from tests.engine.test_scheduler import add, fed, make_scheduler, make_seq, step
from tests.engine.tiny import make_core, run_to_completion

ALL_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
GREEDY = dict(temperature=0.0, ignore_eos=True, logprobs=True, top_logprobs=2)
SEEDED = dict(temperature=0.9, top_p=0.9, seed=5, ignore_eos=True, logprobs=True)
SYSTEM = [256, *range(1, 70)]  # a shared "system prompt": 4 full blocks of 16, and 6 tokens


@pytest.fixture(scope="module")
def adapter_dirs(tiny_llama, tmp_path_factory):
    root = tmp_path_factory.mktemp("prefix-adapters")
    return {
        "a1": save_peft_adapter(
            tiny_llama, root / "a1", seed=1, r=8, lora_alpha=16, target_modules=ALL_TARGETS
        ),
        "a2": save_peft_adapter(
            tiny_llama, root / "a2", seed=2, r=4, lora_alpha=8, target_modules=["q_proj"]
        ),
    }


@dataclass(frozen=True)
class Req:
    request_id: str
    prompt: list[int]
    adapter: str | None = None
    sampling: tuple[tuple[str, object], ...] = tuple(GREEDY.items())
    max_tokens: int = 6
    tenant: str = "default"
    cache_salt: str | None = None


@dataclass
class Output:
    tokens: list[int]
    logprobs: list[float | None]
    prompt_logprobs: list[float | None] | None


def new_core(tiny_llama, adapter_dirs, **overrides):
    core = make_core(tiny_llama, **overrides)
    for name, path in adapter_dirs.items():
        core.add_adapter(name, path)
    return core


def submit(core, req: Req) -> None:
    sampling = SamplingParams(max_tokens=req.max_tokens, **dict(req.sampling))
    core.add_request(
        req.request_id, req.prompt, sampling, req.adapter, tenant=req.tenant, cache_salt=req.cache_salt
    )


def collect(outputs: dict[str, Output], deltas) -> None:
    for delta in deltas:
        out = outputs.setdefault(delta.request_id, Output([], [], None))
        out.tokens += delta.token_ids
        out.logprobs += delta.logprobs
        if delta.prompt_logprobs is not None:
            out.prompt_logprobs = delta.prompt_logprobs.logprobs


def run_waves(core, waves: list[list[Req]]) -> dict[str, Output]:
    """Each wave submitted at once and run to completion before the next (so later waves can hit)."""
    outputs: dict[str, Output] = {}
    for wave in waves:
        for req in wave:
            submit(core, req)
        for deltas in run_to_completion(core).values():
            collect(outputs, deltas)
    return outputs


def assert_same(cached: dict[str, Output], uncached: dict[str, Output]) -> None:
    assert cached.keys() == uncached.keys()
    for request_id, want in uncached.items():
        got = cached[request_id]
        assert got.tokens == want.tokens, request_id
        for ours, theirs in ((got.logprobs, want.logprobs), (got.prompt_logprobs, want.prompt_logprobs)):
            if theirs is None:
                assert ours is None, request_id
                continue
            assert [x is None for x in ours] == [x is None for x in theirs], request_id
            pairs = [(a, b) for a, b in zip(ours, theirs, strict=True) if b is not None]
            if pairs:
                ours_t, theirs_t = torch.tensor([a for a, _ in pairs]), torch.tensor([b for _, b in pairs])
                torch.testing.assert_close(ours_t, theirs_t, rtol=1e-4, atol=1e-4, msg=request_id)


def compare(tiny_llama, adapter_dirs, waves, **overrides):
    """(cached core, its outputs) after checking them against a cache-less run of the same waves."""
    uncached = run_waves(new_core(tiny_llama, adapter_dirs, prefix_caching="off", **overrides), waves)
    core = new_core(tiny_llama, adapter_dirs, **overrides)
    cached = run_waves(core, waves)
    assert_same(cached, uncached)
    return core, cached


def hits(core) -> int:
    return core.stats().prefix_cache_hits


def test_block_allocator_shares_caches_and_evicts_least_recently_released_first():
    blocks = BlockAllocator(4)
    first, second = blocks.allocate(2)
    blocks.publish(first, b"h0")
    blocks.publish(second, b"h1")
    blocks.publish(second, b"other")  # a block caches one content only
    assert blocks.cached_block(b"h1") == second and blocks.cached_block(b"other") is None
    blocks.take(first)  # a second sequence shares it
    blocks.free([first, second])
    assert blocks.num_free == 3 and blocks.usage == 0.25  # ``second`` idle: free for allocation
    blocks.free([first])
    assert blocks.num_free == 4 and blocks.num_cached == 2
    fresh = blocks.allocate(2)
    assert first not in fresh and second not in fresh, "free blocks go before cached ones"
    (evicted,) = blocks.allocate(1)
    assert evicted == second, "the tail block was released first, so it is evicted first"
    assert blocks.cached_block(b"h1") is None and blocks.cached_block(b"h0") == first
    assert blocks.num_evictions == 1
    with pytest.raises(MemoryError):
        blocks.allocate(2)


def test_block_hashes_chain_on_tokens_weights_tenant_and_salt():
    roots = {cache_root(w, t, s) for w in (None, "k1", "k2") for t in (None, "t1") for s in (None, "s")}
    assert len(roots) == 12
    root = cache_root(None, None, None)
    assert block_hash(root, [1, 2]) == block_hash(root, [1, 2]) != block_hash(root, [2, 1])
    assert block_hash(block_hash(root, [1]), [2]) != block_hash(block_hash(root, [3]), [2])


def test_shared_system_prompt_hits_in_mixed_batches_and_outputs_are_unchanged(tiny_llama, adapter_dirs):
    turns = [[*SYSTEM, 100 + i, 101 + i] for i in range(3)]
    seeded = tuple(SEEDED.items())
    waves = [
        [Req("base-0", turns[0]), Req("a1-0", turns[0], "a1"), Req("a2-0", turns[0], "a2", seeded)],
        [Req("base-1", turns[1]), Req("a1-1", turns[1], "a1"), Req("a2-1", turns[1], "a2", seeded),
         Req("base-long", [*turns[0], *range(120, 160)], max_tokens=20)],
        [Req("base-2", turns[2]), Req("a1-2", [*turns[0], *range(120, 160)], "a1")],
    ]  # fmt: skip
    core, _ = compare(tiny_llama, adapter_dirs, waves)
    stats = core.stats()
    # wave 2: base, a1, a2 and base-long each reuse the 4 blocks of SYSTEM; wave 3: base-2 the same,
    # a1-2 only SYSTEM's (base-long's blocks were computed by the base model's weights)
    assert stats.prefix_cache_hits == 6 * 64
    assert stats.prefix_cache_queries == sum(len(r.prompt) for wave in waves for r in wave)
    assert (
        stats.prefix_cache_blocks > 0
        and stats.prefix_cache_bytes == stats.prefix_cache_blocks * core.kv_cache.block_bytes
    )
    assert core.kv_cache.allocator.num_free == core.kv_cache.allocator.num_blocks, "every reference dropped"


def test_a_repeated_prompt_keeps_its_last_token_to_sample_from(tiny_llama, adapter_dirs):
    prompt = SYSTEM[:64]  # exactly 4 blocks: the 4th is recomputed, so there are logits to sample
    waves = [[Req("first", prompt)], [Req("again", prompt)], [Req("longer", [*prompt, 7])]]
    core, out = compare(tiny_llama, adapter_dirs, waves)
    assert hits(core) == 48 + 64
    assert out["again"].tokens == out["first"].tokens


def test_prompt_scoring_is_exact_after_a_cached_prefix(tiny_llama, adapter_dirs):
    scoring = tuple({**GREEDY, "prompt_logprobs": 3}.items())
    prompt = [*SYSTEM, 5, 6, 7]
    waves = [
        [Req("plain", prompt, "a1")],
        [Req("echo", prompt, "a1", scoring, max_tokens=0), Req("echo-gen", prompt, "a1", scoring)],
        [Req("after-echo", [*SYSTEM, 9], "a1")],
    ]
    core, out = compare(tiny_llama, adapter_dirs, waves)
    assert out["echo"].prompt_logprobs is not None and len(out["echo"].prompt_logprobs) == len(prompt)
    assert hits(core) == 64, "scoring requests compute every position; the request after them hits"


def test_reregistered_adapter_never_hits_the_old_weights_and_equal_content_shares(tiny_llama, adapter_dirs):
    prompt = [*SYSTEM, 11]
    core = new_core(tiny_llama, {"a": adapter_dirs["a1"]})
    first = run_waves(core, [[Req("v1", prompt, "a")]])
    core.remove_adapter("a")  # the old version's blocks stay cached, unreachable
    core.add_adapter("a", adapter_dirs["a2"])  # same id, other content
    second = run_waves(core, [[Req("v2", prompt, "a")]])
    assert hits(core) == 0, "a new content never reads the old content's blocks"
    core.add_adapter("copy-of-a1", adapter_dirs["a1"])  # another name, the first content
    third = run_waves(core, [[Req("same-content", prompt, "copy-of-a1")]])
    assert hits(core) == 64
    reference = run_waves(new_core(tiny_llama, adapter_dirs, prefix_caching="off"),
                          [[Req("v1", prompt, "a1")], [Req("v2", prompt, "a2")]])  # fmt: skip
    assert first["v1"].tokens == reference["v1"].tokens == third["same-content"].tokens
    assert second["v2"].tokens == reference["v2"].tokens != first["v1"].tokens


def test_merged_copy_and_side_path_share_blocks(tiny_llama, adapter_dirs):
    prompt = [*SYSTEM, 12]
    core = new_core(tiny_llama, adapter_dirs)
    side = run_waves(core, [[Req("side", prompt, "a1")]])
    copy = core.merges.merge("a1")
    deadline = time.monotonic() + 30
    while copy.state.value == "building":
        assert time.monotonic() < deadline
        core.merges.poll()
        time.sleep(0.01)
    merged_before = core.merges.stats.tokens_merged
    merged = run_waves(core, [[Req("merged", prompt, "a1")]])
    assert core.merges.stats.tokens_merged > merged_before, "it ran on the merged copy"
    assert hits(core) == 64 and merged["merged"].tokens == side["side"].tokens


def test_tenants_and_salts_are_isolated_unless_the_base_model_is_shared(tiny_llama, adapter_dirs):
    prompt = [*SYSTEM, 13]
    waves = [
        [Req("t1-base", prompt, tenant="t1"), Req("t1-a1", prompt, "a1", tenant="t1")],
        [Req("t2-base", prompt, tenant="t2"), Req("t2-a1", prompt, "a1", tenant="t2"),
         Req("t1-salted", prompt, tenant="t1", cache_salt="s")],
        [Req("t1-base-again", prompt, tenant="t1"),
         Req("t1-salted-again", prompt, tenant="t1", cache_salt="s")],
    ]  # fmt: skip
    core, _ = compare(tiny_llama, adapter_dirs, waves)
    assert hits(core) == 2 * 64, "only the third wave's requests find their own tenant's and salt's blocks"
    shared, _ = compare(tiny_llama, adapter_dirs, waves, prefix_cache_sharing="base")
    # base requests share across tenants (t2-base and t1-base-again hit), adapters never do, and a
    # salt still splits (t1-salted misses, t1-salted-again hits)
    assert hits(shared) == 3 * 64


def test_eviction_under_memory_pressure_keeps_outputs(tiny_llama, adapter_dirs):
    block_bytes = make_core(tiny_llama).kv_cache.block_bytes
    prompts = [[256, *range(10 * i + 1, 10 * i + 40)] for i in range(6)]
    waves = [[Req(f"p{i}", p, ("a1", None)[i % 2])] for i, p in enumerate(prompts)]
    waves += [[Req(f"again{i}", prompts[i], ("a1", None)[i % 2])] for i in (5, 0)]
    core, _ = compare(tiny_llama, adapter_dirs, waves, kv_cache_bytes=8 * block_bytes)
    assert core.kv_cache.allocator.num_evictions > 0
    assert hits(core) == 32, "the latest prompt is still cached, the first was evicted"


def test_preemption_releases_and_reuses_cached_blocks(tiny_llama, adapter_dirs):
    block_bytes = make_core(tiny_llama).kv_cache.block_bytes
    wave = [Req(f"r{i}", [*SYSTEM[:40], i], ("a1", None, "a2")[i % 3], max_tokens=40) for i in range(4)]
    core, _ = compare(tiny_llama, adapter_dirs, [wave], kv_cache_bytes=10 * block_bytes)
    assert core.scheduler.num_preemptions > 0
    assert hits(core) > 0, "a sequence readmitted after its preemption finds its own blocks"


def test_abort_releases_references(tiny_llama, adapter_dirs):
    core = new_core(tiny_llama, adapter_dirs)
    run_waves(core, [[Req("warm", [*SYSTEM, 1])]])
    submit(core, Req("aborted", [*SYSTEM, 2], max_tokens=50))
    core.step()
    core.abort("aborted")
    assert not core.has_work
    allocator = core.kv_cache.allocator
    assert allocator.num_free == allocator.num_blocks and allocator.num_cached >= 4


def test_off_never_caches(tiny_llama, adapter_dirs):
    core = new_core(tiny_llama, adapter_dirs, prefix_caching="off")
    run_waves(core, [[Req("a", [*SYSTEM, 1])], [Req("b", [*SYSTEM, 1])]])
    stats = core.stats()
    assert (stats.prefix_cache_queries, stats.prefix_cache_hits, stats.prefix_cache_blocks) == (0, 0, 0)


def random_requests(rng: random.Random, num: int) -> list[tuple[int, Req]]:
    """(arrival step, request) over a tree of shared and forked prefixes, adapters and tenants."""
    trunks = [[256, *rng.choices(range(1, 250), k=rng.randint(20, 50))] for _ in range(3)]
    requests = []
    for i in range(num):
        prompt = list(rng.choice(trunks))
        if rng.random() < 0.7:  # fork: a shared trunk, then a branch of its own
            prompt = prompt[: rng.randint(1, len(prompt))] + rng.choices(range(1, 250), k=rng.randint(0, 30))
        sampling = GREEDY if rng.random() < 0.7 else {**SEEDED, "seed": i}
        if rng.random() < 0.15:
            sampling = {**GREEDY, "prompt_logprobs": 1}
        req = Req(f"r{i}", prompt, rng.choice([None, "a1", "a2"]), tuple(sampling.items()),
                  rng.randint(1, 12), rng.choice([None, "t1"]), rng.choice([None, None, "s"]))  # fmt: skip
        requests.append((rng.randint(0, 60), req))
    return sorted(requests, key=lambda pair: pair[0])


def run_schedule(core, schedule: list[tuple[int, Req]]) -> dict[str, Output]:
    outputs: dict[str, Output] = {}
    pending, step = list(schedule), 0
    while pending or core.has_work:
        while pending and pending[0][0] <= step:
            submit(core, pending.pop(0)[1])
        collect(outputs, core.step() if core.has_work else [])
        step += 1
        assert step < 5000
    return outputs


@pytest.mark.parametrize("seed", [0, 1])
def test_random_requests_over_shared_and_forked_prefixes_equal_a_cacheless_run(
    tiny_llama, adapter_dirs, seed
):
    schedule = random_requests(random.Random(seed), 24)
    block_bytes = make_core(tiny_llama).kv_cache.block_bytes
    settings = dict(
        kv_cache_bytes=24 * block_bytes, max_num_batched_tokens=64
    )  # chunks, eviction, preemption
    uncached = run_schedule(new_core(tiny_llama, adapter_dirs, prefix_caching="off", **settings), schedule)
    core = new_core(tiny_llama, adapter_dirs, **settings)
    assert_same(run_schedule(core, schedule), uncached)
    assert hits(core) > 0


# --- the scheduler alone (test_scheduler's fakes: no model, blocks of 2 tokens) ---------------------


def cached_seq(name: str, arrival: int, prompt: list[int], **sampling: object):
    seq = make_seq(name, arrival, **sampling)
    seq.prompt_token_ids = list(prompt)
    seq.cache_root = cache_root(None, "t", None)
    return seq


def test_admission_shares_the_cached_blocks_and_feeds_only_the_rest():
    sched = make_scheduler(num_blocks=16)
    first = cached_seq("A", 0, list(range(9)), max_tokens=1)
    add(sched, first)
    assert fed(step(sched)) == [("A", 9)] and first.is_finished
    second = cached_seq("B", 1, [*range(9), 50])
    add(sched, second)
    assert fed(step(sched)) == [("B", 2)], "8 tokens (4 blocks) come from the cache"
    assert sched.prefix.num_hits == 8 and sched.prefix.num_queries == 19
    third = cached_seq("C", 2, [*range(9), 60])
    add(sched, third)
    step(sched)
    assert third.block_table[:4] == second.block_table[:4], "both hold A's blocks"
    allocator = sched.kv_cache.allocator
    sched.finish(second, FinishReason.ABORT)
    assert third.block_table[:4] == [allocator.cached_block(h) for h in third.block_hashes[:4]]
    sched.finish(third, FinishReason.ABORT)
    assert allocator.num_free == allocator.num_blocks


def test_a_sequence_that_does_not_fit_gives_its_cached_blocks_back():
    sched = make_scheduler(num_blocks=6)
    add(sched, cached_seq("A", 0, list(range(8)), max_tokens=1))
    step(sched)  # A's 4 blocks stay cached, idle
    holder = cached_seq("H", 1, [90, 91, 92], max_tokens=20)
    add(sched, holder)
    step(sched)  # H takes the 2 free blocks: none of A's is evicted
    wanted = cached_seq("B", 2, [*range(8), 1, 2])
    add(sched, wanted)  # A's 4 blocks + 1 new one: nothing left for the new one
    assert fed(step(sched)) == [("H", 1)]
    assert not wanted.block_table and wanted.num_computed_tokens == 0
    allocator = sched.kv_cache.allocator
    assert allocator.num_free == 4 and sched.prefix.num_queries == 8 + 3, "B's lookup did not count"
    sched.finish(holder, FinishReason.ABORT)
    assert fed(step(sched)) == [("B", 2)], "admitted once H's blocks are free, after A's 4 cached blocks"
    assert sched.prefix.num_hits == 8 and allocator.num_evictions == 1
