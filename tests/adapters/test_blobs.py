"""adapters/blobs.py against a real S3 HTTP API (moto's server in a subprocess, reached over HTTP
by boto3 exactly as any S3-compatible endpoint would be)."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from adapters.blobs import S3Blobs
from adapters.errors import StoreError, StoreUnavailableError
from tests.services import S3_CREDENTIALS, MotoS3, free_port

boto3 = pytest.importorskip("boto3")
pytest.importorskip("moto.server")


@pytest.fixture(scope="module")
def endpoint() -> Iterator[str]:
    server = MotoS3().start()
    yield server.url
    server.stop()


@pytest.fixture
def blobs(endpoint, request) -> S3Blobs:
    client = boto3.client("s3", endpoint_url=endpoint, **S3_CREDENTIALS)
    bucket = f"adapters-{request.node.name.replace('_', '-')[:40].lower()}"
    client.create_bucket(Bucket=bucket)
    return S3Blobs(f"s3://{bucket}/catalogue", client=client)


@pytest.fixture
def adapter_dir(tmp_path):
    directory = tmp_path / "adapter"
    directory.mkdir()
    (directory / "adapter_config.json").write_text('{"r": 8}')
    (directory / "adapter_model.safetensors").write_bytes(bytes(range(256)) * 40)
    return directory


def test_a_version_round_trips_byte_for_byte(blobs, adapter_dir, tmp_path):
    key = blobs.key("acme", "bot", 3)
    assert key == "catalogue/acme/bot/v3" and not blobs.exists(key)
    blobs.put_dir(key, adapter_dir)
    assert blobs.exists(key)
    out = blobs.get_dir(key, tmp_path / "copy")
    assert sorted(p.name for p in out.iterdir()) == ["adapter_config.json", "adapter_model.safetensors"]
    for path in adapter_dir.iterdir():
        assert (out / path.name).read_bytes() == path.read_bytes()


def test_an_upload_cut_short_is_invisible(blobs, adapter_dir, tmp_path):
    """Files without the marker (a replica killed before its last put) are not a version."""
    key = blobs.key("acme", "bot", 1)
    for path in adapter_dir.iterdir():
        blobs._client.put_object(Bucket=blobs.bucket, Key=f"{key}/{path.name}", Body=path.read_bytes())
    assert not blobs.exists(key)
    with pytest.raises(StoreError, match="no committed adapter version"):
        blobs.get_dir(key, tmp_path / "copy")
    assert not (tmp_path / "copy").exists()


def test_a_tampered_file_is_refused_and_leaves_no_directory(blobs, adapter_dir, tmp_path):
    key = blobs.key("acme", "bot", 2)
    blobs.put_dir(key, adapter_dir)
    blobs._client.put_object(Bucket=blobs.bucket, Key=f"{key}/adapter_model.safetensors", Body=b"not it")
    with pytest.raises(StoreError, match="does not match its recorded sha256"):
        blobs.get_dir(key, tmp_path / "copy")
    assert not (tmp_path / "copy").exists() and not list(tmp_path.glob(".copy.tmp-*"))


def test_delete_removes_the_marker_then_the_files(blobs, adapter_dir):
    key = blobs.key("acme", "bot", 4)
    blobs.put_dir(key, adapter_dir)
    blobs.delete(key)
    assert not blobs.exists(key)
    listed = blobs._client.list_objects_v2(Bucket=blobs.bucket, Prefix=key).get("Contents", [])
    assert listed == []


def test_an_unreachable_bucket_is_store_unavailable(adapter_dir, tmp_path):
    quick = boto3.session.Config(connect_timeout=1, retries={"max_attempts": 1})
    client = boto3.client(
        "s3", endpoint_url=f"http://127.0.0.1:{free_port()}", config=quick, **S3_CREDENTIALS
    )
    blobs = S3Blobs("s3://down/catalogue", client=client)
    with pytest.raises(StoreUnavailableError, match="is unreachable"):
        blobs.exists("catalogue/acme/bot/v1")
    with pytest.raises(StoreUnavailableError, match="failed put_object"):
        blobs.put_dir("catalogue/acme/bot/v1", adapter_dir)


def test_urls_are_checked():
    with pytest.raises(StoreError, match=r"s3://bucket\[/prefix\]"):
        S3Blobs("https://example.com/x", client=object())
