"""How the CPU serving process keeps freed memory: glibc malloc settings, set once at model load.

With glibc's defaults, a block over the mmap threshold (128 KiB, raised on the fly up to the size
of the largest block freed) is mapped fresh on every allocation, and free memory at the top of the
heap above the trim threshold (twice the mmap threshold) goes back to the kernel at once. A step
allocates the same large tensors every time (the logits, prefill activations), so each step
page-faulted many of them in again, and in a VM a fault costs microseconds: the logits path of a
decode step (SmolLM2's LM head through oneDNN, the fp32 cast, the sampler's copy) faulted 552
pages a step and took 2.7-3.0 ms, against 0 faults and 1.8-2.0 ms with these settings.
``keep_freed_memory`` raises the mmap threshold to its maximum (32 MiB on 64-bit) and the trim
threshold to 256 MiB, so these blocks are reused from the heap. Larger blocks (whole weight
matrices, merged copies of big models) are still mapped and unmapped. Where a large owner lets
go on purpose (a merged copy is dropped), ``release_freed_memory`` hands free heap pages back.

Measured on a 2-core Zen 5 VM, SmolLM2-135M, 8 requests on 8 adapters, in one process with the
two settings interleaved (median of 6): prefill step 427 -> 217 ms, decode step 28.3 -> 25.7 ms.
Elsewhere than glibc (musl, macOS) both functions do nothing.
"""

from __future__ import annotations

import ctypes
import logging
import platform
from contextlib import suppress

log = logging.getLogger(__name__)

M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3  # mallopt parameters (malloc.h)
MMAP_THRESHOLD = 32 << 20  # glibc's maximum on 64-bit (DEFAULT_MMAP_THRESHOLD_MAX)
TRIM_THRESHOLD = 256 << 20


def _libc() -> ctypes.CDLL | None:
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return None
    with suppress(OSError):
        return ctypes.CDLL("libc.so.6")
    return None


def keep_freed_memory() -> bool:
    """Set the thresholds above (process-wide); True where they were set."""
    libc = _libc()
    if libc is None:
        return False
    done: bool = (
        libc.mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD) == 1
        and libc.mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD) == 1
    )
    if done:
        log.info("malloc: blocks up to %d MiB reused from the heap (trim above %d MiB)", MMAP_THRESHOLD >> 20,
                 TRIM_THRESHOLD >> 20)  # fmt: skip
    return done


def release_freed_memory() -> None:
    """Hand the heap's free pages back to the kernel (``malloc_trim(0)``; a no-op elsewhere)."""
    libc = _libc()
    if libc is not None:
        libc.malloc_trim(0)
