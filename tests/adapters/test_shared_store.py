"""Two replicas over one shared catalogue (issue 17): a real PostgreSQL and a real S3 HTTP API.

Each "replica" is its own SharedAdapterStore (own local disk tier), AdapterRegistry and engine
core, exactly what two server processes hold; they share only the database and the bucket.
"""

from __future__ import annotations

import signal
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from adapters.cache import AdapterState
from adapters.errors import StoreError, StoreUnavailableError, UnknownAdapterError
from adapters.registry import AdapterRegistry
from adapters.store import file_sha256
from tests.adapters.hostile import MAX_LORA_RANK, tiny_base_model
from tests.adapters.test_registry import adapter, files_of, generate
from tests.engine.tiny import make_core
from tests.services import MotoS3, Postgres, free_port, postgres_bin_dir

pytest.importorskip("boto3")
pytest.importorskip("psycopg")
pytest.importorskip("moto.server")
shared_store = pytest.importorskip("adapters.shared_store")

BIN_DIR = postgres_bin_dir()
pytestmark = pytest.mark.skipif(BIN_DIR is None, reason="PostgreSQL (initdb, pg_ctl) is not installed")


@pytest.fixture(scope="module")
def postgres():
    server = Postgres(BIN_DIR).init()
    yield server
    server.destroy()


@pytest.fixture(scope="module")
def s3():
    server = MotoS3().start()
    yield server
    server.stop()


@pytest.fixture
def catalogue(postgres, s3, request):
    """(database URL, bucket URL): empty, this test's own."""
    name = request.node.name.replace("_", "-")[:40].lower().strip("-")
    s3.client().create_bucket(Bucket=name)
    return postgres.new_database(name.replace("-", "_")), f"s3://{name}/adapters"


class Replica:
    def __init__(self, catalogue: tuple[str, str], data_dir: Path, s3: MotoS3) -> None:
        blobs = shared_store.S3Blobs(catalogue[1], client=s3.client())
        self.store = shared_store.SharedAdapterStore(catalogue[0], blobs, data_dir)
        self.core = make_core(tiny_base_model(), max_loras=2, max_lora_rank=MAX_LORA_RANK)
        self.registry = AdapterRegistry(self.store, MAX_LORA_RANK, check=self.core.slot_writer.validate)
        self.registry.attach(self.core.adapters)

    def close(self) -> None:
        self.store.close()


@pytest.fixture
def replicas(catalogue, s3, tmp_path):
    pair = [Replica(catalogue, tmp_path / f"replica-{i}", s3) for i in range(2)]
    yield pair
    for replica in pair:
        replica.close()


def test_an_upload_on_one_replica_is_served_by_the_other(replicas, tmp_path):
    a, b = replicas
    source = adapter(tmp_path, "src", seed=1)
    record = a.registry.upload("acme", "bot", files_of(source))
    seen = b.registry.resolve("acme", "bot")
    assert (seen.version, seen.sha256, seen.rank) == (1, record.sha256, 4)
    assert not seen.path.exists(), "replica b has not downloaded it yet: the bucket is its disk's source"
    served_b = generate(b.core, seen.adapter_id)
    assert file_sha256(seen.path / "adapter_model.safetensors") == record.sha256
    assert served_b == generate(a.core, record.adapter_id, "ra"), "both replicas serve the same weights"
    assert served_b != generate(b.core, None, "base")
    assert [r.adapter_id for r in b.registry.list("acme")] == ["acme/bot@1"]


def test_a_reupload_is_the_next_version_everywhere_and_a_delete_is_gone_everywhere(replicas, tmp_path):
    a, b = replicas
    a.registry.upload("acme", "bot", files_of(adapter(tmp_path, "v1", seed=1)))
    assert b.registry.resolve("acme", "bot").version == 1
    second = b.registry.upload("acme", "bot", files_of(adapter(tmp_path, "v2", seed=2)))
    assert second.version == 2
    latest = a.registry.resolve("acme", "bot")
    assert (latest.version, latest.sha256) == (2, second.sha256)
    assert not a.core.adapters.is_registered("acme/bot@1"), "the replaced version takes no new requests"
    assert a.core.adapters.is_registered("acme/bot@2")
    assert [r.version for r in a.registry.versions("acme", "bot")] == [1, 2]

    a.registry.delete("acme", "bot")
    with pytest.raises(UnknownAdapterError):
        b.registry.resolve("acme", "bot")
    assert b.registry.list() == [] and not b.core.adapters.is_registered("acme/bot@2")
    third = b.registry.upload("acme", "bot", files_of(adapter(tmp_path, "v3", seed=3)))
    assert third.version == 3, "a version number is never reused, even after a delete"


def test_tenants_stay_isolated_across_replicas(replicas, tmp_path):
    a, b = replicas
    mine = a.registry.upload("acme", "bot", files_of(adapter(tmp_path, "acme", seed=1)))
    theirs = b.registry.upload("beta", "bot", files_of(adapter(tmp_path, "beta", seed=2)))
    assert b.registry.resolve("acme", "bot").sha256 == mine.sha256
    assert a.registry.resolve("beta", "bot").sha256 == theirs.sha256
    assert [r.tenant for r in a.registry.list("beta")] == ["beta"]
    with pytest.raises(UnknownAdapterError):
        a.registry.resolve("gamma", "bot")


def test_two_replicas_uploading_one_name_at_once_make_two_whole_versions(replicas, tmp_path):
    a, b = replicas
    sources = {0: adapter(tmp_path, "x", seed=4), 1: adapter(tmp_path, "y", seed=5)}
    records, barrier = {}, threading.Barrier(2)

    def upload(i: int) -> None:
        barrier.wait()
        records[i] = replicas[i].registry.upload("acme", "race", files_of(sources[i]))

    threads = [threading.Thread(target=upload, args=(i,)) for i in (0, 1)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert sorted(r.version for r in records.values()) == [1, 2]
    for i, record in records.items():
        stored = a.store.get("acme", "race", record.version)
        assert stored.sha256 == file_sha256(sources[i] / "adapter_model.safetensors"), "no torn version"
    winner = max(records.values(), key=lambda r: r.version)
    seen = {
        (r.adapter_id, r.sha256)
        for r in (a.registry.resolve("acme", "race"), b.registry.resolve("acme", "race"))
    }
    assert seen == {(winner.adapter_id, winner.sha256)}
    generate(a.core, winner.adapter_id), generate(b.core, winner.adapter_id, "rb")  # both load it whole


def test_with_the_database_down_uploads_fail_and_cached_adapters_go_on_serving(
    replicas, postgres, tmp_path, monkeypatch
):
    monkeypatch.setattr(shared_store, "RETRY_AFTER_S", 0.0)
    a, b = replicas
    record = a.registry.upload("acme", "bot", files_of(adapter(tmp_path, "v1", seed=1)))
    before = generate(b.core, b.registry.resolve("acme", "bot").adapter_id)
    postgres.stop()
    try:
        with pytest.raises(StoreUnavailableError, match="database"):
            a.registry.upload("acme", "bot", files_of(adapter(tmp_path, "v2", seed=2)))
        with pytest.raises(StoreUnavailableError):
            b.registry.delete("acme", "bot")
        cached = b.registry.resolve("acme", "bot")
        assert cached.adapter_id == record.adapter_id, "lookups serve what the replica holds"
        assert generate(b.core, cached.adapter_id, "during") == before
        assert [r.adapter_id for r in b.registry.list()] == [record.adapter_id]
    finally:
        postgres.start()
    again = a.registry.upload("acme", "bot", files_of(adapter(tmp_path, "v2b", seed=2)))
    assert again.version == 2 and b.registry.resolve("acme", "bot").version == 2


def test_with_the_bucket_down_uploads_fail_and_nothing_half_made_is_visible(catalogue, tmp_path):
    """Its own S3 server, which this test stops (moto keeps its buckets in memory)."""
    own = MotoS3().start()
    try:
        own.client().create_bucket(Bucket="own")
        replica = Replica((catalogue[0], "s3://own/adapters"), tmp_path / "replica", own)
        first = replica.registry.upload("acme", "bot", files_of(adapter(tmp_path, "v1", seed=1)))
        generate(replica.core, first.adapter_id)  # in host memory now
        own.stop()
        with pytest.raises(StoreUnavailableError, match="bucket"):
            replica.registry.upload("acme", "bot", files_of(adapter(tmp_path, "v2", seed=2)))
        assert [r.version for r in replica.store.versions("acme", "bot")] == [1], "no row without its files"
        assert replica.core.adapters.state(first.adapter_id) in (AdapterState.IN_HOST, AdapterState.IN_SLOT)
        assert generate(replica.core, replica.registry.resolve("acme", "bot").adapter_id, "r2")
        replica.close()
    finally:
        own.stop()


def test_a_replica_killed_mid_upload_leaves_no_half_adapter(replicas, catalogue, s3, tmp_path):
    """A real SIGKILL after the files are in the bucket and before the row commits."""
    a, b = replicas
    source = adapter(tmp_path, "src", seed=1)
    child = subprocess.run(
        [sys.executable, "-c", _KILLED_UPLOAD, catalogue[0], catalogue[1], s3.url, str(tmp_path / "dead"),
         str(source)],
        capture_output=True, text=True, timeout=120, cwd=Path(__file__).parents[2],
    )  # fmt: skip
    assert child.returncode == -signal.SIGKILL, child.stderr[-2000:]
    with pytest.raises(UnknownAdapterError):
        b.registry.resolve("acme", "bot")
    assert a.store.versions("acme", "bot") == []
    record = a.registry.upload("acme", "bot", files_of(source))
    assert record.version == 2, "the dead upload's number is not reused"
    assert generate(b.core, b.registry.resolve("acme", "bot").adapter_id)


_KILLED_UPLOAD = """
import os, signal, sys
from pathlib import Path
from adapters.shared_store import S3Blobs, SharedAdapterStore
from adapters.registry import AdapterRegistry
from tests.adapters.test_registry import files_of
from tests.services import S3_CREDENTIALS
import boto3
database, bucket, endpoint, data_dir, source = sys.argv[1:]
blobs = S3Blobs(bucket, client=boto3.client("s3", endpoint_url=endpoint, **S3_CREDENTIALS))
store = SharedAdapterStore(database, blobs, Path(data_dir))
store._insert = lambda record, key: os.kill(os.getpid(), signal.SIGKILL)
AdapterRegistry(store, 64).upload("acme", "bot", files_of(Path(source)))
"""


def test_replicas_starting_together_create_the_schema_once(catalogue, s3, tmp_path):
    stores, errors = [], []

    def open_one(i: int) -> None:
        try:
            blobs = shared_store.S3Blobs(catalogue[1], client=s3.client())
            stores.append(shared_store.SharedAdapterStore(catalogue[0], blobs, tmp_path / f"r{i}"))
        except Exception as exc:
            errors.append(exc)

    threads = [threading.Thread(target=open_one, args=(i,)) for i in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == [] and len(stores) == 4
    for store in stores:
        store.close()


def test_local_directories_and_bad_urls_are_refused(replicas, tmp_path):
    a, _ = replicas
    with pytest.raises(StoreError, match="upload the adapter"):
        a.registry.register_local("acme", "bot", adapter(tmp_path, "local"))
    with pytest.raises(StoreError, match="postgresql://"):
        shared_store.open_shared_store("mysql://x@y/z", "s3://b", tmp_path / "x")


def test_an_unreachable_database_at_start_is_a_clear_error_without_the_password(tmp_path, s3):
    port = free_port()
    blobs = shared_store.S3Blobs("s3://nowhere", client=s3.client())
    with pytest.raises(StoreUnavailableError, match="unreachable") as caught:
        shared_store.SharedAdapterStore(f"postgresql://u:secret@127.0.0.1:{port}/db", blobs, tmp_path)
    assert "secret" not in str(caught.value) and "u:***@" in str(caught.value)


def test_redact_hides_only_the_password():
    assert shared_store.redact("postgresql://user:pw@host:5432/db") == "postgresql://user:***@host:5432/db"
    assert shared_store.redact("postgresql://user@host/db") == "postgresql://user@host/db"
