"""``loraplex serve-ray`` for real (issue 17): a local Ray cluster, two engine replicas behind Ray
Serve's proxy, a real PostgreSQL and moto's S3 as the shared catalogue, the OpenAI SDK as client."""

from __future__ import annotations

import subprocess
import sys
import time
from collections import Counter

import httpx
import pytest

from tests.api.server_process import REPO_ROOT, running_server
from tests.engine.test_engine_parity import save_peft_adapter
from tests.engine.tiny import write_tiny_llama
from tests.services import S3_ENV, MotoS3, Postgres, postgres_bin_dir

pytest.importorskip("ray.serve")
pytest.importorskip("psycopg")
pytest.importorskip("moto.server")
openai = pytest.importorskip("openai")
BIN_DIR = postgres_bin_dir()
pytestmark = pytest.mark.skipif(BIN_DIR is None, reason="PostgreSQL (initdb, pg_ctl) is not installed")
FILES = ("adapter_config.json", "adapter_model.safetensors")


@pytest.fixture(scope="module")
def ray_server(tmp_path_factory):
    """(the server, its adapter dirs): serve-ray with 2 replicas over a shared catalogue."""
    root = tmp_path_factory.mktemp("ray")
    postgres, s3 = Postgres(BIN_DIR).init(), MotoS3().start()
    try:
        s3.client().create_bucket(Bucket="catalogue")
        model = write_tiny_llama(root / "model")
        adapters = [save_peft_adapter(model, root / f"adapter-{seed}", seed=seed, r=4, lora_alpha=8,
                                      target_modules=["q_proj", "v_proj"]) for seed in (1, 2, 3)]  # fmt: skip
        args = [
            "--model", str(model), "--served-model-name", "tiny", "--dtype", "float32", "--device", "cpu",
            "--adapter-store", postgres.new_database("ray"), "--adapter-blobs", "s3://catalogue/ray",
            "--data-dir", str(root / "data"), "--max-loras", "2",
            "--num-replicas", "2", "--replica-cpus", "0.5",
        ]  # fmt: skip
        env = {**S3_ENV, "AWS_ENDPOINT_URL": s3.url, "RAY_USAGE_STATS_ENABLED": "0"}
        with running_server(
            args, root / "ray.log", env, subcommand="serve-ray", startup_timeout_s=240
        ) as server:
            yield server, adapters
    finally:
        s3.stop()
        postgres.destroy()


def _upload(url: str, name: str, directory) -> httpx.Response:
    files = [("files", (f, (directory / f).read_bytes())) for f in FILES]
    return httpx.post(f"{url}/v1/adapters", data={"name": name}, files=files, timeout=60)


def test_each_adapter_is_routed_to_the_replica_that_holds_it(ray_server):
    server, adapters = ray_server
    for i, directory in enumerate(adapters):
        assert _upload(server.url, f"bot{i}", directory).status_code == 201
    replicas: dict[str, Counter] = {}
    texts: dict[str, set] = {}
    # A replica reports the adapters it loaded every 0.1 s and the proxy learns of it a moment
    # later: requests sent before that are placed as if nothing were loaded anywhere.
    for i in range(len(adapters)):
        body = {"model": f"bot{i}", "prompt": [256, 5, 6], "max_tokens": 4, "temperature": 0}
        assert httpx.post(f"{server.url}/v1/completions", json=body, timeout=60).status_code == 200
    time.sleep(2)
    for _ in range(4):
        for i in range(len(adapters)):
            body = {"model": f"bot{i}", "prompt": [256, 5, 6], "max_tokens": 4, "temperature": 0}
            response = httpx.post(f"{server.url}/v1/completions", json=body, timeout=60)
            assert response.status_code == 200, response.text
            replicas.setdefault(f"bot{i}", Counter())[response.headers["x-loraplex-replica"]] += 1
            texts.setdefault(f"bot{i}", set()).add(response.json()["choices"][0]["text"])
    assert all(len(seen) == 1 for seen in replicas.values()), f"each adapter stays on one replica: {replicas}"
    assert all(len(seen) == 1 for seen in texts.values()), "greedy answers are the same wherever they run"
    assert len({text for seen in texts.values() for text in seen}) == len(adapters), (
        "three adapters, three answers"
    )
    base = {httpx.get(f"{server.url}/v1/models", timeout=30).headers["x-loraplex-replica"] for _ in range(12)}
    assert len(base) == 2, "requests without an adapter go to either replica"


def test_the_openai_api_is_unchanged_for_clients(ray_server):
    server, adapters = ray_server
    assert _upload(server.url, "sdk", adapters[0]).status_code == 201
    client = openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0)
    completion = client.completions.create(model="sdk", prompt="hi", max_tokens=3, temperature=0)
    assert completion.model == "sdk" and completion.usage.completion_tokens == 3
    chunks = list(client.chat.completions.create(
        model="sdk", messages=[{"role": "user", "content": "hi"}], max_tokens=3, temperature=0, stream=True
    ))  # fmt: skip
    assert chunks[-1].choices[0].finish_reason == "length"
    with pytest.raises(openai.NotFoundError) as missing:
        client.completions.create(model="nobody", prompt="hi", max_tokens=2)
    assert missing.value.code == "model_not_found"
    with pytest.raises(openai.BadRequestError) as bad:
        client.completions.create(model="sdk", prompt="hi", max_tokens=2, temperature=-1)
    assert bad.value.body["param"] == "temperature"


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--num-replicas", "2"], "needs a shared adapter catalogue"),
        (["--num-replicas", "0"], "--num-replicas must be at least 1"),
        (["--max-replicas", "3"], "--min-replicas and --max-replicas go together"),
        (["--replica-cpus", "lots"], "--replica-cpus: invalid float value"),
        (["--num-replicas", "1", "--route-by-adapter", "maybe"], "--route-by-adapter must be on or off"),
    ],
)
def test_bad_ray_settings_exit_2_before_anything_starts(flags, message):
    result = subprocess.run([sys.executable, "-m", "server.cli", "serve-ray", *flags], capture_output=True,
                            text=True, timeout=120, cwd=REPO_ROOT)  # fmt: skip
    assert result.returncode == 2 and message in result.stderr, result.stderr[-2000:]
