"""Adapter files in an S3-compatible bucket: the shared tier below each replica's disk (issue 17).

One adapter version is a key prefix (``<prefix>/<tenant>/<name>/v<N>/``) holding its files and,
written last, a ``COMMITTED`` marker listing each file's size and sha256. A version is visible only
once its marker exists, so an upload cut short (a replica killed mid-upload) is never seen; a
download checks every file against the marker and lands in the target directory atomically
(a temporary sibling, then a rename). Works against any S3 endpoint: boto3 reads the endpoint and
credentials from the usual AWS environment (``AWS_ENDPOINT_URL``, ``AWS_ACCESS_KEY_ID``, ...).

Every failure to reach the bucket is a ``StoreUnavailableError`` (HTTP 503); a version whose files
do not match its marker is a ``StoreError``. boto3 is the ``shared`` extra.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from adapters.errors import StoreError, StoreUnavailableError

MARKER = "COMMITTED"


def _boto3() -> Any:
    try:
        import boto3
    except ImportError:
        raise StoreError("an s3:// adapter store needs boto3: pip install 'loraplex[shared]'") from None
    return boto3


class S3Blobs:
    """Adapter versions under ``s3://bucket/prefix`` (``client``: a boto3 S3 client; None: from the env)."""

    def __init__(self, url: str, client: Any = None) -> None:
        parsed = urlparse(url)
        if parsed.scheme != "s3" or not parsed.netloc:
            raise StoreError(f"the adapter blob store must be s3://bucket[/prefix], got {url!r}")
        self.bucket, self.prefix = parsed.netloc, parsed.path.strip("/")
        self._client = client or _boto3().client("s3")

    def key(self, tenant: str, name: str, version: int) -> str:
        return "/".join(p for p in (self.prefix, tenant, name, f"v{version}") if p)

    def put_dir(self, key: str, directory: Path) -> None:
        """Upload every file of ``directory``, then the marker; durable when this returns."""
        files = sorted(p for p in directory.iterdir() if p.is_file())
        manifest = {p.name: {"size": p.stat().st_size, "sha256": _sha256(p)} for p in files}
        for path in files:
            self._call("put_object", Bucket=self.bucket, Key=f"{key}/{path.name}", Body=path.read_bytes())
        body = json.dumps(manifest, sort_keys=True).encode()
        self._call("put_object", Bucket=self.bucket, Key=f"{key}/{MARKER}", Body=body)

    def exists(self, key: str) -> bool:
        """Whether the version is committed (its marker exists)."""
        return self._manifest(key) is not None

    def get_dir(self, key: str, target: Path) -> Path:
        """Download a committed version into ``target`` (atomically), checking every file."""
        manifest = self._manifest(key)
        if manifest is None:
            raise StoreError(f"no committed adapter version at s3://{self.bucket}/{key}")
        target.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
        try:
            for name, expected in manifest.items():
                body = self._call("get_object", Bucket=self.bucket, Key=f"{key}/{name}")["Body"].read()
                if len(body) != expected["size"] or hashlib.sha256(body).hexdigest() != expected["sha256"]:
                    raise StoreError(f"s3://{self.bucket}/{key}/{name} does not match its recorded sha256")
                (staging / name).write_bytes(body)
            if not target.exists():  # else another download of the same version won: keep it
                os.replace(staging, target)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
        return target

    def delete(self, key: str) -> None:
        """Remove the marker first (the version vanishes at once), then its files."""
        manifest = self._manifest(key) or {}
        self._call("delete_object", Bucket=self.bucket, Key=f"{key}/{MARKER}")
        for name in manifest:
            self._call("delete_object", Bucket=self.bucket, Key=f"{key}/{name}")

    def _manifest(self, key: str) -> dict[str, dict[str, Any]] | None:
        from botocore.exceptions import ClientError

        try:
            body = self._client.get_object(Bucket=self.bucket, Key=f"{key}/{MARKER}")["Body"].read()
        except ClientError as exc:
            if exc.response.get("Error", {}).get("Code") in ("NoSuchKey", "404"):
                return None
            raise StoreUnavailableError(
                f"the adapter bucket s3://{self.bucket} refused a read: {exc}"
            ) from exc
        except Exception as exc:  # connection refused, timeouts, DNS: the bucket is unreachable
            raise StoreUnavailableError(
                f"the adapter bucket s3://{self.bucket} is unreachable: {exc}"
            ) from exc
        manifest: dict[str, dict[str, Any]] = json.loads(body)
        return manifest

    def _call(self, operation: str, **kwargs: Any) -> Any:
        try:
            return getattr(self._client, operation)(**kwargs)
        except Exception as exc:
            raise StoreUnavailableError(
                f"the adapter bucket s3://{self.bucket} failed {operation}: {exc}"
            ) from exc


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()
