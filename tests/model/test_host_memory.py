"""glibc keeps a step's large freed tensors for reuse instead of page-faulting them in again."""

from __future__ import annotations

import multiprocessing
import platform

import pytest

from server.model import host_memory


def page_faults_of_logits_steps(keep: bool) -> int:
    """Minor page faults of what 20 decode steps do with their logits (an LM-head GEMM through
    oneDNN's packed weights as the CPU engine runs it where the CPU packs bf16, bf16 [8, 49152]
    out, then fp32, then the sampler's copy), after 30 steps that let the heap and glibc's
    adaptive thresholds settle."""
    import resource

    import torch

    from server.model.cpu_tuning import base_gemm, prepare_weight

    if keep:
        assert host_memory.keep_freed_memory()
    torch.set_num_threads(2)
    dense = torch.randn(49152, 576, dtype=torch.bfloat16)
    try:
        weight = prepare_weight(dense, "onednn")
    except RuntimeError:  # oneDNN packs bf16 only with AVX512-BW or AVX-NE-CONVERT: the plain GEMM
        weight = dense
    x = torch.randn(8, 576, dtype=torch.bfloat16)

    def step() -> None:
        base_gemm(x, weight, None, False).float().to(torch.float32, copy=True)

    for _ in range(30):
        step()
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(20):
        step()
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="glibc malloc settings")
def test_large_blocks_are_reused_instead_of_faulted_in_again():
    """With our settings the steps' blocks never fault in again. glibc's defaults usually do (more
    than a quarter of the pages, every step), but its thresholds adapt to what was freed before,
    and in a full test run they once settled at 0 faults: so only our side is asserted."""
    with multiprocessing.get_context("spawn").Pool(1) as pool:  # a fresh process: default malloc
        kept = pool.apply(page_faults_of_logits_steps, (True,))
    pages = 20 * 8 * 49152 * (2 + 4 + 4) // 4096  # what the 20 steps allocate
    assert kept < pages // 50, f"kept blocks must not fault again ({kept} faults for {pages} pages)"


def test_release_is_safe_to_call_any_time():
    host_memory.release_freed_memory()
    host_memory.release_freed_memory()
