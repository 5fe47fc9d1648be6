"""The fused C LoRA kernel agrees with the token-by-token reference, and builds or declines cleanly.

Shapes are odd on purpose: ranks 1 to 64 read through rank-true views of Rmax=64 buffers, batches
of 1, 3 and 8, adapters of different ranks in one batch, used slots that do not start at 0,
prefill-like segments of 20+ tokens, fused qkv-like slices, every dtype mix the CPU tuning may
choose (fp32 or bf16 slots under fp32 or bf16 x/y) and y as a strided view.
"""

import shutil
import threading

import pytest
import torch

from server.ops import lora_native, native_build
from server.ops.lora_torch import LoRASegments, add_lora_reference
from server.ops.native_build import NativeSource
from tests.ops.test_lora_torch import _slot_buffers

CPU = torch.device("cpu")
QKV = ((0, 32), (32, 40), (40, 48))
TOLERANCES = {torch.float32: (1e-5, 1e-4), torch.bfloat16: (2e-2, 5e-2)}  # by y's dtype: (rtol, atol)


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("cache")


@pytest.fixture(scope="module")
def kernel(cache_dir):
    native = lora_native.load(cache_dir)
    if native is None:
        pytest.skip("native LoRA kernel unavailable here (see the warning logged by load())")
    return native


def _run_case(kernel, segs, slices, slot_ranks, max_rank, *, in_features=24, base=torch.float32,
              slots=torch.float32, y_pad=0, seed=0):  # fmt: skip
    """(kernel result, reference result, base y) for (slot, tokens) runs ``segs``.

    y_pad > 0 makes y a column view of a wider buffer (row stride out_total + y_pad). Base-only
    tokens get NaN activations: the kernel must not read them.
    """
    gen = torch.Generator().manual_seed(seed)
    lora_a, lora_b = _slot_buffers(gen, len(slot_ranks), slices, max_rank, in_features, slot_ranks, slots)
    token_slots = [s for s, n in segs for _ in range(n)]
    x = torch.randn(len(token_slots), in_features, generator=gen).to(base)  # [T, in]
    x[torch.tensor(token_slots) < 0] = float("nan")
    out = slices[-1][1]
    y_full = torch.randn(len(token_slots), out + y_pad, generator=gen).to(base)
    y, got = y_full[:, :out], y_full.clone()[:, :out]  # [T, out], row stride out + y_pad
    segments = LoRASegments.build(token_slots, CPU, slot_ranks)
    rank = segments.max_rank
    expected = y.clone()
    add_lora_reference(expected, x, lora_a, lora_b, segments, slices)  # all R rank rows
    kernel.add_lora(got, x, lora_a[:, :rank], lora_b[:, :rank], segments, slices)  # rank-true views
    return got, expected, y


CASES = [
    # (segments as (slot, tokens), output slices, rank of each slot, buffers' max rank)
    ([(0, 1), (3, 1), (1, 1), (-1, 1), (2, 1)], ((0, 48),), [8, 8, 8, 8], 8),  # decode, one token each
    ([(2, 17), (-1, 5), (0, 30)], QKV, [16, 4, 16, 1], 16),  # prefill, fused qkv-like
    ([(1, 3), (0, 1)], ((0, 24), (24, 48)), [4, 4], 4),  # gate_up-like, mixed
    ([(-1, 6)], ((0, 16),), [8, 8, 8], 8),  # no adapter at all
    ([(5, 2), (-1, 3), (4, 9), (0, 1)], ((0, 40),), [32] * 8, 32),
    ([(0, 1)], QKV, [1], 64),  # rank 1 under max rank 64, batch 1
    ([(0, 1)], QKV, [64], 64),  # rank 64, batch 1
    ([(1, 1), (2, 1), (0, 1)], QKV, [64, 16, 8], 64),  # batch 3, three ranks in one step
    ([(s, 1) for s in range(8)], QKV, [1, 8, 16, 64, 16, 8, 1, 16], 64),  # batch 8, mixed ranks
    ([(3, 8)], ((0, 24), (24, 48)), [16, 16, 16, 16], 64),  # all 8 requests on one adapter
    ([(5, 1), (7, 1), (6, 1)], ((0, 40),), [16] * 8, 64),  # used slots 5..7, not from 0
    ([(6, 1), (-1, 2), (2, 1)], QKV, [0, 0, 8, 0, 0, 0, 16, 0], 16),  # gaps between used slots
    ([(1, 23), (-1, 4), (0, 21), (2, 1)], QKV, [8, 64, 1], 64),  # prefill: 20+ tokens, odd blocks
]


@pytest.mark.parametrize("num_threads", [1, 2], ids=["1thread", "2threads"])
@pytest.mark.parametrize("segs,slices,slot_ranks,max_rank", CASES)
def test_fp32_matches_reference(kernel, segs, slices, slot_ranks, max_rank, num_threads, monkeypatch):
    monkeypatch.setattr(kernel, "num_threads", num_threads)
    got, expected, y = _run_case(kernel, segs, slices, slot_ranks, max_rank)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-4)
    base_rows = torch.tensor([s < 0 for s, n in segs for _ in range(n)])
    assert torch.equal(got[base_rows], y[base_rows]), "tokens without an adapter get exactly the base output"


@pytest.mark.parametrize("slots", [torch.float32, torch.bfloat16], ids=["fp32slots", "bf16slots"])
@pytest.mark.parametrize("base", [torch.float32, torch.bfloat16], ids=["fp32base", "bf16base"])
@pytest.mark.parametrize(
    "segs",
    [[(s, 1) for s in range(8)], [(2, 20), (-1, 3), (0, 7)], [(4, 1)]],
    ids=["decode", "prefill", "alone"],
)
def test_dtype_mixes_match_reference(kernel, segs, base, slots):
    """Slots in fp32 or bf16 under x/y in fp32 or bf16: fp32 accumulation, added into y's dtype."""
    got, expected, y = _run_case(
        kernel, segs, QKV, [16, 1, 64, 8, 16, 16, 16, 16], 64, base=base, slots=slots
    )
    assert got.dtype == base
    rtol, atol = TOLERANCES[base]
    torch.testing.assert_close(got.float(), expected.float(), rtol=rtol, atol=atol)
    base_rows = torch.tensor([s < 0 for s, n in segs for _ in range(n)])
    assert torch.equal(got[base_rows], y[base_rows])
    assert not torch.equal(got, y)


@pytest.mark.parametrize("base", [torch.float32, torch.bfloat16])
def test_y_as_a_strided_view(kernel, base):
    """y [T, out] with row stride out + 13; the columns past out are never written."""
    segs = [(1, 1), (-1, 1), (0, 22)]
    got, expected, y = _run_case(kernel, segs, QKV, [8, 16], 64, base=base, y_pad=13, in_features=100)
    assert got.stride(0) == 48 + 13
    rtol, atol = TOLERANCES[base]
    torch.testing.assert_close(got.float(), expected.float(), rtol=rtol, atol=atol)
    rows = lambda t: t.as_strided((t.shape[0], t.stride(0)), (t.stride(0), 1))  # noqa: E731  [T, out + 13]
    assert torch.equal(rows(got)[:, 48:], rows(y)[:, 48:]), "columns past out are untouched"


def test_wide_rows_cross_column_tiles(kernel):
    """SmolLM2-like widths: in 1536, slices (576, 192, 192) wider than one 512-column tile."""
    slices = ((0, 576), (576, 768), (768, 960))
    segs = [(0, 1), (2, 1), (1, 9)]
    got, expected, _ = _run_case(kernel, segs, slices, [16, 8, 64], 64, in_features=1536)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-4)


def test_calls_from_several_python_threads_at_once(kernel, cache_dir):
    """Each caller gets its own result whether it shares the worker threads or runs alone."""
    gen = torch.Generator().manual_seed(3)
    lora_a, lora_b = _slot_buffers(gen, 8, QKV, 16, 24, [16, 8] * 4, torch.float32)
    token_slots = [s for s in range(8) for _ in range(3)]  # 8 segments of 3 tokens: 8 chunks
    segments = LoRASegments.build(token_slots, CPU, [16, 8] * 4)
    x, y = torch.randn(24, 24, generator=gen), torch.randn(24, 48, generator=gen)
    expected = y.clone()
    add_lora_reference(expected, x, lora_a, lora_b, segments, QKV)
    failures = []

    def caller(num_threads):
        native = lora_native.load(cache_dir)
        native.num_threads = num_threads
        for _ in range(50):
            got = y.clone()
            native.add_lora(got, x, lora_a, lora_b, segments, QKV)
            if not torch.allclose(got, expected, rtol=1e-5, atol=1e-4):
                failures.append(num_threads)

    threads = [threading.Thread(target=caller, args=(n,)) for n in (1, 2, 3, 2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert failures == []


def test_unsupported_inputs_are_refused(kernel):
    segments = LoRASegments.build([0, 1], CPU)
    a, b = torch.zeros(2, 4, 1, 8), torch.zeros(2, 4, 16)
    x, y = torch.zeros(2, 8), torch.zeros(2, 16)
    with pytest.raises(ValueError, match="dtypes"):
        kernel.add_lora(y.half(), x.half(), a, b, segments, ((0, 16),))
    with pytest.raises(ValueError, match="CPU"):
        kernel.add_lora(y, x, a.to("meta"), b, segments, ((0, 16),))
    with pytest.raises(ValueError, match="contiguous"):
        kernel.add_lora(y, torch.zeros(8, 2).T, a, b, segments, ((0, 16),))
    with pytest.raises(ValueError, match="beyond"):
        kernel.add_lora(y, x, a, b, segments, ((0, 17),))
    with pytest.raises(ValueError, match="beyond"):
        kernel.add_lora(y, x, a[:1], b[:1], segments, ((0, 16),))  # slot 1 of 1 slot
    with pytest.raises(ValueError, match="disagree"):
        kernel.add_lora(y, x, a, b, segments, ((0, 8), (8, 16)))  # 2 slices, A has N=1
    with pytest.raises(ValueError, match="overlap"):
        kernel.add_lora(y, x, torch.zeros(2, 4, 2, 8), b, segments, ((0, 9), (8, 16)))


def test_no_compiler_means_none_and_one_warning(tmp_path, monkeypatch, caplog):
    monkeypatch.setattr(native_build.shutil, "which", lambda name: None)
    assert lora_native.load(tmp_path) is None
    assert lora_native.load(tmp_path) is None  # decided once per process: one warning
    warnings = [r for r in caplog.records if r.name == native_build.__name__ and r.levelname == "WARNING"]
    assert len(warnings) == 1 and "no C compiler" in warnings[0].getMessage()


def test_failed_compile_or_platform_means_none(tmp_path, monkeypatch):
    bad = tmp_path / "broken.c"
    bad.write_text("this is not C\n")
    monkeypatch.setattr(lora_native, "SOURCE", NativeSource("lora_native", bad, headers=()))
    assert lora_native.load(tmp_path / "a") is None
    assert not list((tmp_path / "a" / "kernels").iterdir()), "no half-written library left behind"
    monkeypatch.setattr(native_build.platform, "machine", lambda: "riscv64")
    with pytest.raises(native_build.NativeUnavailable, match="platform"):
        native_build.build(lora_native.SOURCE, tmp_path / "b")


def test_the_library_is_cached_on_disk_per_build_key(tmp_path, monkeypatch):
    source = lora_native.SOURCE
    first = native_build.build(source, tmp_path)
    compiler, text = shutil.which("cc") or shutil.which("gcc"), source.text()
    key = native_build.build_key(source, compiler, text)
    assert first == tmp_path / "kernels" / f"lora_native-{key}.so"
    monkeypatch.setattr(native_build, "_compile", lambda *args: pytest.fail("recompiled a cached library"))
    assert native_build.build(source, tmp_path) == first
    assert native_build.build_key(source, compiler, text + b"\n") != key
    other_flags = NativeSource(source.name, source.path, (*source.cflags, "-DOTHER"))
    assert native_build.build_key(other_flags, compiler, text) != key
