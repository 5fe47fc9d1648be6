"""Fair scheduling and per-tenant limits through a real ``loraplex serve`` process.

The flood of issue 21: with ``--max-num-seqs 4``, tenant A queues forty long requests, then tenant
B sends three short ones. Fair scheduling (the default) admits B's requests while A's backlog is
still deep; first come first served makes B wait behind it. The assertions are on the order in
which responses come back, never on their timing. Then each limit of the keys file (max_concurrent,
rpm, tpm) answers 429 with its headers while other tenants are served, and a change of limits
applies without a restart.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack
from pathlib import Path

import httpx
import openai
import pytest
from prometheus_client.parser import text_string_to_metric_families

from adapters.tenants import add_key, set_tenant_limits
from tests.api.conftest import BASE_MODEL
from tests.api.server_process import ServerProcess as Server
from tests.api.server_process import running_server
from tests.api.test_limits_and_shutdown import assert_openai_error, sse_data
from tests.engine.tiny import write_tiny_llama

NUM_SEATS, FLOOD, FLOOD_TOKENS, SMALL, SMALL_TOKENS, HOLD_TOKENS = 4, 40, 64, 3, 4, 8000
GREEDY = {"temperature": 0, "ignore_eos": True}
LIMITS = {"c": {"max_concurrent": 1}, "d": {"rpm": 2}, "e": {"tpm": 60}, "f": {}, "g": {"weight": 4.0}}
STATE_TIMEOUT_S = 60


class Tenants:
    """A keys file with a key per tenant (a, b and the limited ones) and the file's path."""

    def __init__(self, root: Path) -> None:
        self.path = root / "keys.json"
        self.keys = {t: add_key(self.path, t, limits=LIMITS.get(t)) for t in ("a", "b", *LIMITS)}

    def client(self, server: Server, tenant: str) -> httpx.Client:
        headers = {"Authorization": f"Bearer {self.keys[tenant]}"}
        return httpx.Client(base_url=server.url, headers=headers, timeout=120)


def start(root: Path, tenants: Tenants, scheduling: str):
    model_dir = write_tiny_llama(root / "model", max_position_embeddings=HOLD_TOKENS + 64)
    args = [
        "--model", str(model_dir), "--served-model-name", BASE_MODEL, "--data-dir", str(root / "data"),
        "--dtype", "float32", "--device", "cpu", "--max-num-seqs", str(NUM_SEATS),
        "--keys-file", str(tenants.path), "--scheduling", scheduling,
    ]  # fmt: skip
    return running_server(args, root / "server.log")


@pytest.fixture(scope="module")
def tenants(tmp_path_factory: pytest.TempPathFactory) -> Tenants:
    return Tenants(tmp_path_factory.mktemp("tenants"))


@pytest.fixture(scope="module")
def fair(tmp_path_factory: pytest.TempPathFactory, tenants: Tenants) -> Iterator[Server]:
    with start(tmp_path_factory.mktemp("fair"), tenants, "fair") as server:
        yield server


def completion(max_tokens: int, **extra: object) -> dict:
    return {"model": BASE_MODEL, "prompt": "x", "max_tokens": max_tokens, **GREEDY, **extra}


def waiting(http: httpx.Client) -> float:
    text = http.get("/metrics").text
    families = {f.name: f for f in text_string_to_metric_families(text)}
    return families["loraplex_scheduler_waiting_requests"].samples[0].value


def wait_until(condition, what: str) -> None:
    deadline = time.monotonic() + STATE_TIMEOUT_S
    while not condition():
        assert time.monotonic() < deadline, what
        time.sleep(0.05)


def flood(server: Server, tenants: Tenants) -> list[str]:
    """A's flood, then B's requests while A's backlog is queued: the tenants in the order their
    responses came back (each one checked complete).

    A's first NUM_SEATS requests are long streams that hold every seat until all of A's backlog
    and then B's requests are queued; closing them (the server cancels a disconnected request)
    frees the seats at once, so the order depends on the scheduler, not on how fast this machine
    sends requests compared with how fast it serves them."""
    finished: list[str] = []
    lock = threading.Lock()
    clients = {t: tenants.client(server, t) for t in ("a", "b")}

    def send(tenant: str, max_tokens: int) -> None:
        response = clients[tenant].post("/v1/completions", json=completion(max_tokens))
        assert response.status_code == 200, response.text
        assert response.json()["usage"]["completion_tokens"] == max_tokens
        with lock:
            finished.append(tenant)

    backlog, held_streams = FLOOD - NUM_SEATS, []
    with ExitStack() as seats, ThreadPoolExecutor(backlog + SMALL) as pool:
        for _ in range(NUM_SEATS):
            held = seats.enter_context(tenants.client(server, "a"))
            hold = completion(HOLD_TOKENS, stream=True)
            stream = seats.enter_context(held.stream("POST", "/v1/completions", json=hold))
            events = sse_data(stream)
            next(events)  # running: it holds a seat while `events` is open (a closed one disconnects)
            held_streams.append(events)
        futures = [pool.submit(send, "a", FLOOD_TOKENS) for _ in range(backlog)]
        wait_until(lambda: waiting(clients["a"]) >= backlog, "A's flood never queued")
        futures += [pool.submit(send, "b", SMALL_TOKENS) for _ in range(SMALL)]
        wait_until(lambda: waiting(clients["a"]) >= backlog + SMALL, "B's requests never queued")
        seats.close()
        for future in futures:
            future.result()
    for client in clients.values():
        client.close()
    return finished


def a_finished_before_b_was_done(order: list[str]) -> int:
    last_b = max(i for i, tenant in enumerate(order) if tenant == "b")
    return order[:last_b].count("a")


def test_fair_scheduling_serves_the_small_tenant_during_a_flood(fair, tenants, tmp_path):
    """Fair: B is done while most of A's backlog still waits. FCFS (another server, same flood):
    B is done only after nearly all of A's requests."""
    fair_order = flood(fair, tenants)
    with start(tmp_path, tenants, "fcfs") as fcfs:
        fcfs_order = flood(fcfs, tenants)
    backlog = FLOOD - NUM_SEATS
    assert sorted(fair_order) == sorted(fcfs_order) == ["a"] * backlog + ["b"] * SMALL
    assert a_finished_before_b_was_done(fair_order) <= NUM_SEATS, fair_order
    assert a_finished_before_b_was_done(fcfs_order) >= backlog - NUM_SEATS, fcfs_order


def test_max_concurrent_refuses_a_second_request_at_once_and_no_one_else(fair, tenants):
    with tenants.client(fair, "c") as c, tenants.client(fair, "a") as a:
        with c.stream("POST", "/v1/completions", json=completion(400, stream=True)) as running:
            events = sse_data(running)
            next(events)  # c's first request is running
            refused = c.post("/v1/chat/completions", json={"model": BASE_MODEL, "messages": [
                {"role": "user", "content": "Hi"}], "max_tokens": 2})  # fmt: skip
            error = assert_openai_error(refused, 429, "max_concurrent_limit_exceeded")
            assert error["type"] == "rate_limit_error" and "max_concurrent" in error["message"]
            assert refused.headers["retry-after"] == "1"
            assert refused.headers["x-ratelimit-limit-concurrent"] == "1"
            assert refused.headers["x-ratelimit-remaining-concurrent"] == "0"
            assert a.post("/v1/completions", json=completion(2)).status_code == 200  # A is not limited
        # the stream was closed (aborted): its place comes back
        wait_until(
            lambda: c.post("/v1/completions", json=completion(2)).status_code == 200, "c stays refused"
        )


def test_rpm_counts_requests_on_both_endpoints(fair, tenants):
    with tenants.client(fair, "d") as d:
        remaining = [d.post("/v1/completions", json=completion(1)) for _ in range(2)]
        assert [r.status_code for r in remaining] == [200, 200]
        assert [r.headers["x-ratelimit-remaining-requests"] for r in remaining] == ["1", "0"]
        assert remaining[0].headers["x-ratelimit-limit-requests"] == "2"
        chat = {"model": BASE_MODEL, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 1}
        refused = d.post("/v1/chat/completions", json=chat)
        error = assert_openai_error(refused, 429, "rpm_limit_exceeded")
        assert "requests per minute (rpm): limit 2, used 2, requested 1" in error["message"]
        assert 1 <= int(refused.headers["retry-after"]) <= 60
        assert refused.headers["x-ratelimit-remaining-requests"] == "0"


def test_tpm_counts_prompt_and_max_tokens(fair, tenants):
    """The tiny tokenizer makes "x" two tokens (BOS + x): 22 per request of 20 tokens."""
    with tenants.client(fair, "e") as e:
        too_big = assert_openai_error(
            e.post("/v1/completions", json=completion(100)), 429, "tpm_limit_exceeded"
        )
        assert "this request alone is over the limit" in too_big["message"]
        first = e.post("/v1/completions", json=completion(20))
        assert first.status_code == 200 and first.headers["x-ratelimit-limit-tokens"] == "60"
        used = first.json()["usage"]["total_tokens"]
        assert int(first.headers["x-ratelimit-remaining-tokens"]) == 60 - used
        assert e.post("/v1/completions", json=completion(20)).status_code == 200
        refused = e.post("/v1/completions", json=completion(20))
        assert_openai_error(refused, 429, "tpm_limit_exceeded")
        assert refused.headers["x-ratelimit-remaining-tokens"] == str(60 - 2 * used)


def test_the_openai_sdk_sees_a_rate_limit_error(fair, tenants):
    sdk = openai.OpenAI(base_url=f"{fair.url}/v1", api_key=tenants.keys["d"], max_retries=0)
    with pytest.raises(openai.RateLimitError) as caught:
        for _ in range(3):  # d's rpm is 2: at most the third is refused (earlier tests may have used it)
            sdk.completions.create(model=BASE_MODEL, prompt="x", max_tokens=1)
    assert caught.value.code == "rpm_limit_exceeded"
    assert caught.value.response.headers["retry-after"]


def test_limits_change_without_a_restart(fair, tenants):
    """``keys limits`` on the running server's file: f's next requests meet its new rpm."""
    with tenants.client(fair, "f") as f:
        assert f.post("/v1/completions", json=completion(1)).status_code == 200
        set_tenant_limits(tenants.path, "f", {"rpm": 1})
        wait_until(lambda: f.post("/v1/completions", json=completion(1)).status_code == 429, "not reloaded")
        set_tenant_limits(tenants.path, "f", {"rpm": None})
        wait_until(lambda: f.post("/v1/completions", json=completion(1)).status_code == 200, "not lifted")


def test_limit_hits_and_tenant_figures_are_in_the_metrics(fair, tenants):
    with tenants.client(fair, "e") as e, tenants.client(fair, "a") as a:
        assert e.post("/v1/completions", json=completion(100)).status_code == 429  # over e's tpm alone
        assert a.post("/v1/completions", json=completion(3)).status_code == 200
        families = {f.name: f for f in text_string_to_metric_families(a.get("/metrics").text)}
    samples = {
        (s.name, tuple(sorted(s.labels.items()))): s.value for f in families.values() for s in f.samples
    }
    assert samples["loraplex_tenant_limit_hits_total", (("limit", "tpm"), ("tenant", "e"))] >= 1
    assert samples["loraplex_tenant_requests_total", (("tenant", "a"),)] >= 1
    assert samples["loraplex_tenant_generated_tokens_total", (("tenant", "a"),)] >= 3
    assert samples["loraplex_tenant_queue_seconds_count", (("tenant", "a"),)] >= 1


def virtual_tokens(http: httpx.Client, tenant: str) -> float:
    families = {f.name: f for f in text_string_to_metric_families(http.get("/metrics").text)}
    samples = families["loraplex_tenant_virtual_tokens"].samples
    return next((s.value for s in samples if s.labels["tenant"] == tenant), 0.0)


def test_weights_reach_the_scheduler_and_follow_the_file(fair, tenants):
    """g's counter grows by its weighted service, (prompt + 2 per generated token) / weight: 4 from
    the file at start, then 1 once the file says so (no other tenant has work meanwhile)."""
    with tenants.client(fair, "g") as g:

        def grows_by(weight: float) -> bool:
            before = virtual_tokens(g, "g")
            usage = g.post("/v1/completions", json=completion(3)).json()["usage"]
            service = usage["prompt_tokens"] + 2 * usage["completion_tokens"]
            return virtual_tokens(g, "g") - before == pytest.approx(service / weight)

        assert grows_by(4.0)
        set_tenant_limits(tenants.path, "g", {"weight": None})
        wait_until(lambda: grows_by(1.0), "the new weight never reached the scheduler")
