"""The adapter tier state machine, driven through every transition on a real tiny model.

Adapters are real peft directories; slots are the model's real MultiLoRALinear buffers (written
through the engine's LoRASlotWriter), so "in a slot" is checked against the buffers themselves.
"""

from __future__ import annotations

import threading
import time
from pathlib import Path

import pytest
import torch

from adapters import cache as cache_module
from adapters.cache import AdapterCache, AdapterState, Tier, Transition
from adapters.errors import PinError, StoreUnavailableError
from adapters.format import read_peft_dir
from tests.engine.test_engine_parity import save_peft_adapter
from tests.engine.tiny import make_core

TARGETS = ["q_proj", "v_proj", "down_proj"]


@pytest.fixture(scope="module")
def adapter_dirs(tiny_llama_dir: Path, tmp_path_factory) -> list[Path]:
    root = tmp_path_factory.mktemp("cache-adapters")
    return [
        save_peft_adapter(tiny_llama_dir, root / f"a{i}", seed=i, r=4, lora_alpha=8, target_modules=TARGETS)
        for i in range(5)
    ]


class CountingRead:
    """read_peft_dir that counts disk reads and can be held back until released."""

    def __init__(self) -> None:
        self.num_reads = 0
        self.gate = threading.Event()
        self.gate.set()

    def __call__(self, path: Path):
        self.num_reads += 1
        assert self.gate.wait(timeout=30)
        return read_peft_dir(path, 64)


def new_cache(tiny_llama_dir: Path, num_slots: int = 2, **kwargs) -> tuple[AdapterCache, CountingRead, list]:
    core = make_core(tiny_llama_dir, max_loras=num_slots)
    read, seen = CountingRead(), []
    cache = AdapterCache(core.slot_writer, num_slots, read, on_transition=seen.append, **kwargs)
    cache.writer_modules = core.slot_writer.modules  # for slot content checks
    return cache, read, seen


def activate(cache: AdapterCache, adapter_id: str, timeout_s: float = 30) -> int | None:
    """try_activate until the background load lands (or the slot can't be had)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        slot = cache.try_activate(adapter_id)
        if slot is not None or cache.state(adapter_id) not in (AdapterState.LOADING, AdapterState.ON_DISK):
            return slot
        time.sleep(0.005)
    raise TimeoutError(adapter_id)


def slot_holds(cache: AdapterCache, slot: int, adapter_dir: Path) -> bool:
    """Whether slot's q_proj A buffer of layer 0 equals the adapter's lora_A."""
    lora_a, _ = read_peft_dir(adapter_dir, 64).tensors[(0, "q_proj")]
    module = cache.writer_modules[(0, "q_proj")]
    index = module.lora_names.index("q_proj")
    held = module.lora_a[slot, : lora_a.shape[0], index]  # lora_a is [S, R, N, in]
    return torch.equal(held, lora_a.to(module.lora_a.dtype))


def test_every_transition_in_order(tiny_llama_dir, adapter_dirs, tmp_path, monkeypatch):
    one_adapter = read_peft_dir(adapter_dirs[0], 64).num_bytes
    cache, _, seen = new_cache(tiny_llama_dir, num_slots=1, max_host_bytes=one_adapter)
    cache.register("a0", adapter_dirs[0])
    assert cache.state("a0") is AdapterState.ON_DISK
    assert cache.try_activate("a0") is None  # cold: the read starts, the caller never waits
    assert cache.state("a0") is AdapterState.LOADING
    slot = activate(cache, "a0")
    assert cache.state("a0") is AdapterState.IN_SLOT and slot_holds(cache, slot, adapter_dirs[0])
    cache.register("a1", adapter_dirs[1])
    assert activate(cache, "a1") == slot  # takes a0's slot: a0 back to host, then out of host (budget)
    assert cache.state("a0") is AdapterState.ON_DISK and slot_holds(cache, slot, adapter_dirs[1])
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "adapter_config.json").write_text('{"peft_type": "LORA", "r": 4, "target_modules": ["q_proj"]}')
    (broken / "adapter_model.safetensors").write_bytes(b"\x00" * 3)
    cache.register("broken", broken)
    assert activate(cache, "broken") is None
    assert cache.state("broken") is AdapterState.FAILED and "safetensors" in str(cache.error("broken"))
    assert activate(cache, "broken") is None and cache.state("broken") is AdapterState.FAILED, "stays failed"
    bucket_down = [True]

    def fetch(path):  # the tier below disk (a shared bucket), down for the first read
        if bucket_down and bucket_down.pop():
            raise StoreUnavailableError("the adapter bucket is unreachable")

    cache.set_fetch(fetch)
    monkeypatch.setattr(cache_module, "RETRY_AFTER_S", 0.3)
    cache.register("remote", adapter_dirs[0])
    assert activate(cache, "remote") is None and cache.state("remote") is AdapterState.FAILED
    assert cache.try_activate("remote") is None and cache.state("remote") is AdapterState.FAILED, "not yet"
    time.sleep(0.35)
    assert activate(cache, "remote") == slot, "a transient failure is retried by the next use"
    T = Transition
    assert seen == [T.LOAD_START, T.LOAD_DONE, T.ACTIVATE,  # a0
                    T.LOAD_START, T.LOAD_DONE, T.EVICT_SLOT, T.ACTIVATE, T.EVICT_HOST,  # a1 in, a0 out
                    T.LOAD_START, T.LOAD_FAIL,  # broken
                    T.LOAD_START, T.LOAD_FAIL, T.RETRY, T.LOAD_START, T.LOAD_DONE,  # bucket down, back
                    T.EVICT_SLOT, T.ACTIVATE, T.EVICT_HOST]  # fmt: skip
    assert set(cache.stats.transitions) == set(Transition), "every transition was counted"
    assert cache.stats.num_loads == 3 and len(cache.stats.load_seconds) == 3


def test_lookups_count_slot_host_and_disk_tiers(tiny_llama_dir, adapter_dirs):
    cache, read, _ = new_cache(tiny_llama_dir)
    cache.register("a0", adapter_dirs[0], read_peft_dir(adapter_dirs[0], 64))
    cache.register("a1", adapter_dirs[1])
    assert cache.try_activate("a0") is not None  # host hit
    assert cache.try_activate("a0") is not None  # slot hit
    assert cache.try_activate("a1") is None  # disk miss
    assert activate(cache, "a1") is not None
    assert cache.stats.lookups == {Tier.HOST: 2, Tier.SLOT: 1, Tier.DISK: 1}
    assert read.num_reads == 1, "a0 came with its weights; only a1 was read"


def test_twenty_concurrent_requests_for_one_cold_adapter_read_the_disk_once(tiny_llama_dir, adapter_dirs):
    cache, read, _ = new_cache(tiny_llama_dir)
    cache.register("cold", adapter_dirs[2])
    read.gate.clear()  # hold the read until every caller has asked
    barrier = threading.Barrier(20)

    def ask() -> None:
        barrier.wait()
        cache.prefetch("cold")
        cache.try_activate("cold")

    threads = [threading.Thread(target=ask) for _ in range(20)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    read.gate.set()
    assert activate(cache, "cold") is not None
    assert read.num_reads == 1


def test_leased_adapters_are_never_evicted(tiny_llama_dir, adapter_dirs):
    cache, _, _ = new_cache(tiny_llama_dir, num_slots=2)
    for i in range(3):
        cache.register(f"a{i}", adapter_dirs[i])
    leases = [cache.acquire(f"a{i}") for i in range(2) if activate(cache, f"a{i}") is not None]
    assert len(leases) == 2
    assert activate(cache, "a2") is None, "both slots are leased: a2 waits, nothing is evicted"
    assert cache.state("a2") is AdapterState.IN_HOST
    assert all(cache.state(f"a{i}") is AdapterState.IN_SLOT for i in range(2))
    a1_slot = cache.lease_slot(leases[1])
    cache.release(leases[1])
    slot = cache.try_activate("a2")
    assert slot == a1_slot and slot_holds(cache, slot, adapter_dirs[2])
    assert cache.state("a0") is AdapterState.IN_SLOT, "a0 is still leased and keeps its slot"


def test_unregister_while_leased_keeps_the_version_until_the_last_release(tiny_llama_dir, adapter_dirs):
    cache, _, _ = new_cache(tiny_llama_dir)
    cache.register("bot@1", adapter_dirs[0])
    slot = activate(cache, "bot@1")
    lease = cache.acquire("bot@1")
    cache.unregister("bot@1")
    cache.register("bot@2", adapter_dirs[1])  # a new version while the old one is in use
    assert not cache.is_registered("bot@1") and cache.registered_ids() == ["bot@2"]
    assert slot_holds(cache, slot, adapter_dirs[0]), "the running request still sees version 1"
    assert cache.try_activate("bot@1") is None
    new_slot = activate(cache, "bot@2")
    assert new_slot != slot
    host_before = cache.host_bytes()
    cache.release(lease)
    assert cache.slot_usage() == 1 and cache.host_bytes() < host_before, "slot and host copy freed"
    assert not slot_holds(cache, slot, adapter_dirs[0]), "the freed slot was cleared"


def test_pinned_adapter_keeps_its_slot_and_host_copy(tiny_llama_dir, adapter_dirs):
    one_adapter = read_peft_dir(adapter_dirs[0], 64).num_bytes
    cache, _, _ = new_cache(tiny_llama_dir, num_slots=2, max_host_bytes=one_adapter)
    for i in range(4):
        cache.register(f"a{i}", adapter_dirs[i])
    cache.pin("a0")
    pinned_slot = activate(cache, "a0")
    with pytest.raises(PinError, match="one must stay free"):
        cache.pin("a1")
    for i in (1, 2, 3, 1, 2):
        assert activate(cache, f"a{i}") not in (None, pinned_slot)
    assert cache.status("a0").slot == pinned_slot and cache.status("a0").is_pinned
    assert slot_holds(cache, pinned_slot, adapter_dirs[0])
    cache.unpin("a0")
    assert activate(cache, "a3") == pinned_slot, "unpinned, a0 is the least recently used slot"


def test_host_memory_is_bounded_by_the_budget_not_the_count(tiny_llama_dir, adapter_dirs):
    one_adapter = read_peft_dir(adapter_dirs[0], 64).num_bytes
    cache, read, _ = new_cache(tiny_llama_dir, num_slots=1, max_host_bytes=2 * one_adapter)
    for round_ in range(2):
        for i in range(5):
            if round_ == 0:
                cache.register(f"a{i}", adapter_dirs[i])
            assert activate(cache, f"a{i}") == 0
            assert cache.host_bytes() <= 2 * one_adapter
    in_host = [i for i in range(5) if cache.status(f"a{i}").host_bytes]
    assert in_host == [3, 4], "the two most recently used copies stay"
    assert read.num_reads == 10, "evicted copies were read from disk again"


def test_weights_given_without_a_source_are_never_dropped(tiny_llama_dir, adapter_dirs):
    one_adapter = read_peft_dir(adapter_dirs[0], 64).num_bytes
    cache, _, _ = new_cache(tiny_llama_dir, num_slots=1, max_host_bytes=one_adapter)
    cache.register("mem", None, read_peft_dir(adapter_dirs[0], 64))
    cache.register("disk", adapter_dirs[1])
    activate(cache, "disk")
    activate(cache, "mem")
    assert cache.status("mem").host_bytes == one_adapter
    with pytest.raises(ValueError, match="source path"):
        cache.register("nothing", None)
    with pytest.raises(KeyError, match="already registered"):
        cache.register("mem", adapter_dirs[0])
    with pytest.raises(KeyError, match="not registered"):
        cache.unregister("ghost")
