"""Two real ``loraplex serve`` processes over one shared catalogue (issue 17): a real PostgreSQL,
moto's S3 HTTP API, real peft adapters uploaded over HTTP, completions asked of the other replica."""

from __future__ import annotations

import httpx
import pytest

from tests.api.server_process import running_server
from tests.engine.test_engine_parity import save_peft_adapter
from tests.engine.tiny import write_tiny_llama
from tests.services import S3_ENV, MotoS3, Postgres, postgres_bin_dir

pytest.importorskip("boto3")
pytest.importorskip("psycopg")
pytest.importorskip("moto.server")
BIN_DIR = postgres_bin_dir()
pytestmark = pytest.mark.skipif(BIN_DIR is None, reason="PostgreSQL (initdb, pg_ctl) is not installed")
PROMPT = {"prompt": [256, 5, 6, 7], "max_tokens": 6, "temperature": 0}


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    """(replica A, replica B, the PostgreSQL server, the adapter dirs) sharing one catalogue."""
    root = tmp_path_factory.mktemp("shared")
    postgres, s3 = Postgres(BIN_DIR).init(), MotoS3().start()
    try:
        s3.client().create_bucket(Bucket="catalogue")
        database = postgres.new_database("loraplex")
        model = write_tiny_llama(root / "model")
        adapters = [save_peft_adapter(model, root / f"adapter-{seed}", seed=seed, r=4, lora_alpha=8,
                                      target_modules=["q_proj", "v_proj"]) for seed in (1, 2)]  # fmt: skip
        env = {**S3_ENV, "AWS_ENDPOINT_URL": s3.url}
        shared = ["--adapter-store", database, "--adapter-blobs", "s3://catalogue/prod"]
        common = ["--model", str(model), "--served-model-name", "tiny", "--dtype", "float32",
                  "--device", "cpu", *shared]  # fmt: skip
        with (
            running_server([*common, "--data-dir", str(root / "a")], root / "a.log", env) as a,
            running_server([*common, "--data-dir", str(root / "b")], root / "b.log", env) as b,
        ):
            yield a, b, postgres, adapters
    finally:
        s3.stop()
        postgres.destroy()


def _upload(server, name: str, directory) -> httpx.Response:
    names = ("adapter_config.json", "adapter_model.safetensors")
    files = [("files", (name, (directory / name).read_bytes())) for name in names]
    return httpx.post(f"{server.url}/v1/adapters", data={"name": name}, files=files, timeout=60)


def _complete(server, model: str) -> httpx.Response:
    return httpx.post(f"{server.url}/v1/completions", json={"model": model, **PROMPT}, timeout=60)


def test_what_one_replica_acknowledges_every_replica_serves(cluster):
    a, b, _, adapters = cluster
    created = _upload(a, "bot", adapters[0])
    assert created.status_code == 201, created.text
    on_b = httpx.get(f"{b.url}/v1/adapters/bot", timeout=10).json()
    assert (on_b["version"], on_b["sha256"]) == (1, created.json()["sha256"])
    served_b, served_a = _complete(b, "bot"), _complete(a, "bot")
    assert served_b.status_code == 200, served_b.text
    assert served_b.json()["choices"][0]["text"] == served_a.json()["choices"][0]["text"]
    assert served_b.json()["choices"][0]["text"] != _complete(b, "tiny").json()["choices"][0]["text"]

    second = _upload(b, "bot", adapters[1])
    assert second.json()["version"] == 2
    assert httpx.get(f"{a.url}/v1/adapters/bot", timeout=10).json()["version"] == 2
    texts = {_complete(server, "bot").json()["choices"][0]["text"] for server in (a, b)}
    assert len(texts) == 1 and served_a.json()["choices"][0]["text"] not in texts, "both serve version 2"

    assert httpx.delete(f"{a.url}/v1/adapters/bot", timeout=10).status_code == 200
    gone = _complete(b, "bot")
    assert gone.status_code == 404 and gone.json()["error"]["code"] == "model_not_found"
    assert "bot" not in [m["id"] for m in httpx.get(f"{b.url}/v1/models", timeout=10).json()["data"]]


def test_with_the_database_down_uploads_are_503_and_cached_adapters_go_on_serving(cluster):
    a, b, postgres, adapters = cluster
    assert _upload(a, "steady", adapters[0]).status_code == 201
    before = _complete(b, "steady").json()["choices"][0]["text"]
    postgres.stop()
    try:
        refused = _upload(a, "steady", adapters[1])
        assert refused.status_code == 503, refused.text
        assert refused.json()["error"]["code"] == "store_unavailable"
        assert "database" in refused.json()["error"]["message"]
        during = _complete(b, "steady")
        assert during.status_code == 200 and during.json()["choices"][0]["text"] == before
        assert _complete(a, "tiny").status_code == 200, "the base model does not need the store"
    finally:
        postgres.start()
    assert httpx.get(f"{a.url}/health", timeout=10).status_code == 200
    assert httpx.get(f"{b.url}/v1/adapters/steady", timeout=10).json()["version"] == 1, "nothing half made"
    stats = httpx.get(f"{a.url}/v1/stats", timeout=10).json()["config"]
    assert (
        stats["adapter-store"].startswith("postgresql://") and stats["adapter-blobs"] == "s3://catalogue/prod"
    )
