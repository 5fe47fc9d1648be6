"""Prefix caching over HTTP with the official openai SDK: the same answers with and without the cache,
vLLM's token counters on ``/metrics``, the hit rate in ``/v1/stats``, tenant isolation, uploads
re-using nothing of an earlier version, ``cache_salt`` and ``--prefix-caching off``.

Two apps run in process (Starlette's TestClient, which the SDK takes as its httpx client) on real
engines over a tiny Llama, one with the cache and one without, with API keys and a SQLite store;
the adapter is saved by peft and uploaded over HTTP.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import openai
import pytest
import torch
from fastapi.testclient import TestClient

from adapters.store import SQLiteAdapterStore
from adapters.tenants import KeyRing, add_key
from server.api.app import create_app
from server.config import EngineConfig, ModelConfig
from server.engine.engine import Engine
from tests.api.test_metrics import scrape, value
from tests.engine.test_engine_parity import save_peft_adapter

BASE = "tiny"
PROMPT = [256, *range(30, 130)]  # 101 tokens: 6 full blocks of 16 can be reused
HIT_TOKENS = 96
FILES = ("adapter_config.json", "adapter_model.safetensors")
WHO = (("acme", "acme", "user"), ("globex", "globex", "user"), ("admin", "ops", "admin"))


@dataclass
class Served:
    clients: dict[str, TestClient]  # "on" / "off"
    keys: dict[str, str]
    dirs: dict[str, Path]

    def sdk(self, who: str, cache: str = "on") -> openai.OpenAI:
        return openai.OpenAI(base_url="http://testserver/v1", api_key=self.keys[who], max_retries=0,
                             http_client=self.clients[cache])  # fmt: skip

    def upload(self, who: str, name: str, adapter: str, cache: str = "on") -> None:
        files = [("files", (f, (self.dirs[adapter] / f).read_bytes())) for f in FILES]
        response = self.clients[cache].post(
            "/v1/adapters", data={"name": name}, files=files, headers=self.auth(who)
        )
        assert response.status_code == 201, response.text

    def auth(self, who: str) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.keys[who]}"}

    def counters(self, cache: str = "on") -> tuple[float, float]:
        samples = scrape(self.clients[cache])
        return tuple(
            value(samples, f"vllm:prefix_cache_{n}_total", model_name=BASE) for n in ("queries", "hits")
        )


@pytest.fixture(scope="module")
def served(tmp_path_factory, tiny_llama_dir) -> Iterator[Served]:
    root = tmp_path_factory.mktemp("prefix-api")
    lora = dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"])
    dirs = {
        f"a{seed}": save_peft_adapter(tiny_llama_dir, root / f"a{seed}", seed=seed, **lora) for seed in (1, 2)
    }
    keys_file = root / "keys.json"
    keys = {who: add_key(keys_file, tenant, role) for who, tenant, role in WHO}
    engines, clients = [], {}
    for cache in ("on", "off"):
        config = EngineConfig(max_loras=2, max_lora_rank=8, max_num_seqs=4, max_num_batched_tokens=256,
                              prefix_caching=cache)  # fmt: skip
        engine = Engine.from_config(
            ModelConfig(model=str(tiny_llama_dir), dtype="float32", device="cpu"), config
        )
        registry = engine.open_registry(SQLiteAdapterStore(root / f"data-{cache}"))
        engines.append(engine)
        clients[cache] = TestClient(create_app(engine, BASE, registry, KeyRing.load(keys_file))).__enter__()
    served = Served(clients, keys, dirs)
    try:
        yield served
    finally:
        for client in clients.values():
            client.__exit__(None, None, None)
        for engine in engines:
            engine.shutdown()


def complete(sdk: openai.OpenAI, model: str = BASE, prompt=PROMPT, **extra):
    response = sdk.completions.create(model=model, prompt=prompt, max_tokens=6, temperature=0, logprobs=1,
                                      extra_body={"ignore_eos": True, **extra})  # fmt: skip
    choice = response.choices[0]
    return choice.text, choice.logprobs.token_logprobs


def assert_same(got, want) -> None:
    assert got[0] == want[0]
    torch.testing.assert_close(torch.tensor(got[1]), torch.tensor(want[1]), rtol=1e-4, atol=1e-4)


def test_a_repeated_prompt_hits_counts_tokens_and_answers_the_same(served):
    reference = complete(served.sdk("acme", "off"))
    queries, hits = served.counters()
    first = complete(served.sdk("acme"), prompt=[*PROMPT, 1])
    second = complete(served.sdk("acme"), prompt=[*PROMPT, 1])
    assert_same(first, second)
    assert_same(complete(served.sdk("acme")), reference)  # the shared part of another prompt
    now = served.counters()
    assert now == (queries + 3 * len(PROMPT) + 2, hits + 2 * HIT_TOKENS)
    stats = served.clients["on"].get("/v1/stats", headers=served.auth("admin")).json()["engine"]
    assert stats["prefix_cache_hit_rate"] == pytest.approx(now[1] / now[0])
    assert stats["prefix_cache_hit_rate_window"] is not None and stats["prefix_cache_blocks"] >= 6
    assert stats["prefix_cache_bytes"] > 0


def test_tenants_do_not_share_and_a_salt_splits(served):
    prompt = [*PROMPT, 2]
    complete(served.sdk("acme"), prompt=prompt)
    _, hits = served.counters()
    reference = complete(served.sdk("globex", "off"), prompt=prompt)
    assert_same(complete(served.sdk("globex"), prompt=prompt), reference)
    assert complete(served.sdk("acme"), prompt=prompt, cache_salt="user-7")[0] == reference[0]
    assert served.counters()[1] == hits, "another tenant and a new salt find nothing cached"
    complete(served.sdk("acme"), prompt=prompt, cache_salt="user-7")
    assert served.counters()[1] == hits + HIT_TOKENS


def test_a_new_upload_reuses_nothing_of_the_old_version(served):
    for cache in ("on", "off"):
        served.upload("acme", "bot", "a1", cache)
    prompt = [*PROMPT, 3]
    v1 = complete(served.sdk("acme"), "bot", prompt)
    _, hits = served.counters()
    for cache in ("on", "off"):
        served.upload("acme", "bot", "a2", cache)
    v2 = complete(served.sdk("acme"), "bot", prompt)
    assert served.counters()[1] == hits
    assert_same(v2, complete(served.sdk("acme", "off"), "bot", prompt))
    assert v2[0] != v1[0]
    assert_same(complete(served.sdk("acme"), "bot", prompt), v2)  # the new version's own blocks
    assert served.counters()[1] == hits + HIT_TOKENS


def test_after_a_delete_the_same_content_uploaded_again_reuses_its_blocks(served):
    for cache in ("on", "off"):
        served.upload("acme", "kept", "a1", cache)
    prompt = [*PROMPT, 5]
    before = complete(served.sdk("acme"), "kept", prompt)
    for cache in ("on", "off"):
        response = served.clients[cache].delete("/v1/adapters/kept", headers=served.auth("acme"))
        assert response.status_code == 200, response.text
        served.upload("acme", "kept", "a1", cache)  # a new version, the same bytes
    _, hits = served.counters()
    again = complete(served.sdk("acme"), "kept", prompt)
    assert served.counters()[1] == hits + HIT_TOKENS, "keyed by content: the blocks outlived the delete"
    assert_same(again, before)
    assert_same(again, complete(served.sdk("acme", "off"), "kept", prompt))


def test_echo_scoring_after_a_cached_prefix_is_exact(served):
    prompt = [*PROMPT, 4]
    complete(served.sdk("acme"), prompt=prompt)

    def scores(cache: str) -> list[float | None]:
        response = served.sdk("acme", cache).completions.create(model=BASE, prompt=prompt, max_tokens=0,
                                                                echo=True, logprobs=2)  # fmt: skip
        return response.choices[0].logprobs.token_logprobs

    got, want = scores("on"), scores("off")
    assert got[0] is None and want[0] is None and len(got) == len(prompt)
    torch.testing.assert_close(torch.tensor(got[1:]), torch.tensor(want[1:]), rtol=1e-4, atol=1e-4)


def test_off_counts_nothing(served):
    complete(served.sdk("acme", "off"))
    complete(served.sdk("acme", "off"), cache_salt="s")  # accepted, nothing to salt
    assert served.counters("off") == (0, 0)
    stats = served.clients["off"].get("/v1/stats", headers=served.auth("admin")).json()["engine"]
    assert stats["prefix_cache_hit_rate"] is None and stats["prefix_cache_blocks"] == 0


@pytest.mark.parametrize("salt", ["", 7, "x" * 257])
def test_a_bad_cache_salt_is_a_400_naming_it(served, salt):
    with pytest.raises(openai.BadRequestError) as caught:
        complete(served.sdk("acme"), cache_salt=salt)
    assert caught.value.body["param"] == "cache_salt"
