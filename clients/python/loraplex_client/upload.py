"""The adapter upload body: multipart/form-data streamed from disk, with a known length.

The server takes a form field ``name`` (and optionally ``tenant``) and the two files peft writes,
both under the field ``files``. The body is generated chunk by chunk, so a large adapter is never
held in memory, and each chunk sent is reported (to a tqdm bar) after the transport took it.
Every call of ``iter_bytes`` re-opens the files, so a retried upload sends them again from the start.
"""

from __future__ import annotations

import secrets
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

from tqdm.auto import tqdm

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
ADAPTER_FILES = (CONFIG_FILE, WEIGHTS_FILE)
CHUNK_BYTES = 256 * 1024


def adapter_files(directory: str | Path) -> list[Path]:
    """The two files of a peft adapter directory; FileNotFoundError naming what is missing."""
    directory = Path(directory)
    if not directory.is_dir():
        raise FileNotFoundError(f"{directory} is not a directory (expected a peft adapter directory)")
    paths = [directory / name for name in ADAPTER_FILES]
    missing = [p.name for p in paths if not p.is_file()]
    if missing:
        what = " or ".join(missing)
        raise FileNotFoundError(f"{directory} has no {what} (is it a peft adapter directory?)")
    return paths


def _quote(value: str) -> str:
    """A form-data header parameter value, escaped the way browsers (and httpx) do."""
    return value.replace("\\", "\\\\").replace('"', "%22").replace("\r", "%0D").replace("\n", "%0A")


@dataclass(frozen=True)
class MultipartBody:
    """Text fields then files, as one multipart/form-data body."""

    fields: tuple[tuple[str, str], ...]
    files: tuple[tuple[str, Path], ...]  # (form field, file on disk)
    boundary: str = field(default_factory=lambda: secrets.token_hex(16))

    @classmethod
    def for_adapter(cls, name: str, directory: str | Path, tenant: str | None = None) -> MultipartBody:
        fields = (("name", name),) + ((("tenant", tenant),) if tenant is not None else ())
        return cls(fields, tuple(("files", path) for path in adapter_files(directory)))

    def _part_head(self, name: str, filename: str | None = None) -> bytes:
        disposition = f'form-data; name="{_quote(name)}"'
        if filename is None:
            return f"--{self.boundary}\r\nContent-Disposition: {disposition}\r\n\r\n".encode()
        disposition += f'; filename="{_quote(filename)}"'
        content_type = "Content-Type: application/octet-stream"
        return f"--{self.boundary}\r\nContent-Disposition: {disposition}\r\n{content_type}\r\n\r\n".encode()

    def _segments(self) -> list[bytes | Path]:
        segments: list[bytes | Path] = []
        for name, value in self.fields:
            segments.append(self._part_head(name) + value.encode() + b"\r\n")
        for name, path in self.files:
            segments += [self._part_head(name, path.name), path, b"\r\n"]
        segments.append(f"--{self.boundary}--\r\n".encode())
        return segments

    @property
    def content_length(self) -> int:
        return sum(s.stat().st_size if isinstance(s, Path) else len(s) for s in self._segments())

    @property
    def headers(self) -> dict[str, str]:
        return {
            "Content-Type": f"multipart/form-data; boundary={self.boundary}",
            "Content-Length": str(self.content_length),
        }

    def iter_bytes(self, on_sent: Callable[[int], object] = lambda n: None) -> Iterator[bytes]:
        """The body in chunks; ``on_sent(num_bytes)`` after the consumer took each one."""
        for segment in self._segments():
            for chunk in _chunks(segment):
                yield chunk
                on_sent(len(chunk))

    async def aiter_bytes(self, on_sent: Callable[[int], object] = lambda n: None) -> AsyncIterator[bytes]:
        """``iter_bytes`` for async transports (file reads are small blocking reads)."""
        for chunk in self.iter_bytes(on_sent):
            yield chunk


def _chunks(segment: bytes | Path) -> Iterator[bytes]:
    if isinstance(segment, bytes):
        yield segment
        return
    with segment.open("rb") as file:
        while chunk := file.read(CHUNK_BYTES):
            yield chunk


def progress_bar(total_bytes: int, name: str, enabled: bool) -> tqdm:
    """A bytes progress bar on stderr (a no-op object when not ``enabled``)."""
    return tqdm(
        total=total_bytes, desc=f"upload {name}", unit="B", unit_scale=True, unit_divisor=1024,
        disable=not enabled,
    )  # fmt: skip
