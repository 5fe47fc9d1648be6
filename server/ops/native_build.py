"""Compile a C kernel of ``server/ops`` for the CPU it runs on and load it with ctypes, cached on disk.

A ``NativeSource`` names one C file and its compiler flags. ``build(source, cache_dir)`` compiles it
on first use (``-O3 -march=native``: AVX2, AVX-512 or NEON, whatever this CPU has) into
``<cache_dir>/kernels/<name>-<hash>.so``; the hash covers the source, the compiler's version, the
flags and the CPU identity, so a cache dir shared between machines never loads a library built for
another CPU. ``load_library`` returns None (one warning logged per library and cache dir) where that
is not possible: an unsupported platform, no C compiler, a failed compile, an unwritable cache dir
or a library that does not load. Callers then keep their torch path.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import logging
import os
import platform
import shutil
import struct
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path

from server.config import default_cache_dir
from server.ops.cpu_info import cpu_identity, cpuinfo_flags_line

log = logging.getLogger(__name__)

BASE_CFLAGS = ("-O3", "-march=native", "-shared", "-fPIC", "-pthread")  # no -fopenmp: torch has its own
SUPPORTED_PLATFORMS = {("Linux", "x86_64"), ("Linux", "aarch64")}
COMPILE_TIMEOUT_S = 120


class NativeUnavailable(Exception):
    """Why a kernel cannot be built or loaded here (logged once by ``load_library``)."""


@dataclass(frozen=True)
class NativeSource:
    """One C file of server/ops and how to compile it."""

    name: str  # stem of the cached library's file name
    path: Path
    cflags: tuple[str, ...] = BASE_CFLAGS
    headers: tuple[str, ...] = ("native_common.h",)  # next to ``path``; part of the build key

    def text(self) -> bytes:
        """The source and its headers, as the build key hashes them (OSError if one is missing)."""
        return b"\0".join(
            p.read_bytes() for p in (self.path, *(self.path.with_name(h) for h in self.headers))
        )


def load_library(source: NativeSource, cache_dir: Path | str | None = None) -> ctypes.CDLL | None:
    """The shared library for this CPU under ``cache_dir`` (default: loraplex's cache dir; compiled
    at most once per process), or None with one warning line saying why. Never raises for the
    reasons listed in the module doc."""
    if cache_dir is None:
        cache_dir = default_cache_dir()
    return _load_library(source, Path(cache_dir).expanduser().resolve())


@functools.cache
def _load_library(source: NativeSource, cache_dir: Path) -> ctypes.CDLL | None:
    try:
        return ctypes.CDLL(str(build(source, cache_dir)))  # CDLL: the GIL is released during calls
    except (NativeUnavailable, OSError) as e:
        log.warning("native %s kernel unavailable, keeping the torch path: %s", source.name, e)
        return None


def build(source: NativeSource, cache_dir: Path) -> Path:
    """Path of the library built for this machine, compiling it first when it is not cached."""
    if (platform.system(), platform.machine()) not in SUPPORTED_PLATFORMS:
        raise NativeUnavailable(f"unsupported platform {platform.system()} {platform.machine()}")
    compiler = shutil.which("cc") or shutil.which("gcc")
    if compiler is None:
        raise NativeUnavailable("no C compiler (cc or gcc) on PATH")
    try:
        text = source.text()
    except OSError as e:
        raise NativeUnavailable(f"kernel source missing: {e}") from e
    target = cache_dir / "kernels" / f"{source.name}-{build_key(source, compiler, text)}.so"
    if not target.exists():
        _compile(source, compiler, target)
    return target


def build_key(source: NativeSource, compiler: str, text: bytes) -> str:
    """Hash of everything the built library depends on: source, compiler, flags and the CPU."""
    version = _run([compiler, "--version"], "compiler --version").stdout
    parts = [text, version.encode(), " ".join(source.cflags).encode(), cpu_identity().encode()]
    parts.append(cpuinfo_flags_line().encode())
    return hashlib.sha256(b"\0".join(parts)).hexdigest()[:16]


def _compile(source: NativeSource, compiler: str, target: Path) -> None:
    """Compile into ``target`` via a temp file and os.replace (safe for concurrent processes)."""
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=target.name + ".", suffix=".tmp", dir=target.parent)
        os.close(fd)
    except OSError as e:
        raise NativeUnavailable(f"cannot write to {target.parent}: {e}") from e
    try:
        _run([compiler, *source.cflags, "-o", tmp, str(source.path), "-lm"], "compile")
        os.replace(tmp, target)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    log.info("compiled the native %s kernel into %s", source.name, target)


def _run(command: list[str], what: str) -> subprocess.CompletedProcess[str]:
    """Run a compiler command; NativeUnavailable (with its stderr tail) when it fails."""
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=COMPILE_TIMEOUT_S)
    except (OSError, subprocess.TimeoutExpired) as e:
        raise NativeUnavailable(f"{what} failed: {e}") from e
    if done.returncode != 0:
        tail = " | ".join(done.stderr.strip().splitlines()[-3:])
        raise NativeUnavailable(f"{what} failed (exit {done.returncode}): {tail}")
    return done


def float_bits(value: float) -> int:
    """The fp32 bit pattern of ``value``, as an int64 argument the kernels read back as a float."""
    bits: int = struct.unpack("=I", struct.pack("=f", value))[0]
    return bits
