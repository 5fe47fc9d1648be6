"""The compiled residual add + RMS norm and SiLU gate (server/ops/norm_native.c) against norm_torch.

fp32: to fp32 rounding (the sum of squares runs in another order than torch's; the polynomial
exp is off by ~2e-7 relative). bf16: the residual rounds to bf16 before the norm reads it, as
torch's next op reads it, and each output rounds once: within one bf16 step of torch's.
"""

from __future__ import annotations

import pytest
import torch

from server.ops import norm_native, norm_torch

GEN = torch.Generator().manual_seed(0)
EPS = 1e-5


@pytest.fixture(scope="module")
def native(tmp_path_factory):
    ops = norm_native.load(tmp_path_factory.mktemp("kernels"))
    assert ops is not None, "a C compiler is on PATH: the kernels must build"
    return ops


def _tolerance(dtype: torch.dtype) -> dict[str, float]:
    return {"rtol": 1e-5, "atol": 1e-5} if dtype == torch.float32 else {"rtol": 1.6e-2, "atol": 1.6e-2}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize(("rows", "size"), [(1, 8), (3, 100), (8, 576), (33, 960)])
def test_add_rms_norm_matches_torch(native, dtype, rows, size):
    hidden, residual = (torch.randn(rows, size, generator=GEN).to(dtype) for _ in range(2))
    weight = (1 + 0.1 * torch.randn(size, generator=GEN)).to(dtype)
    want, want_residual = norm_torch.add_rms_norm(hidden, residual, weight, EPS)
    hidden_before = hidden.clone()
    got, got_residual = native.add_rms_norm(hidden, residual, weight, EPS)
    assert got_residual is residual  # the sum is written over the residual handed in
    assert torch.equal(got_residual, want_residual)  # one rounded add, either way
    assert torch.equal(hidden, hidden_before)
    assert got.dtype == dtype and got.shape == (rows, size)
    torch.testing.assert_close(got, want, **_tolerance(dtype))


def test_without_a_residual_the_hidden_state_is_the_residual(native):
    hidden, weight = torch.randn(4, 64, generator=GEN), torch.rand(64, generator=GEN)
    got, residual = native.add_rms_norm(hidden, None, weight, EPS)
    assert residual is hidden
    torch.testing.assert_close(got, norm_torch.add_rms_norm(hidden, None, weight, EPS)[0])


def test_rows_of_zeros_and_large_values_stay_finite(native):
    hidden = torch.zeros(2, 64)
    hidden[1] = 1e19  # squares overflow fp32's sum: the norm is then 0, as torch's
    weight = torch.ones(64)
    got, _ = native.add_rms_norm(hidden, None, weight, EPS)
    want, _ = norm_torch.add_rms_norm(hidden, None, weight, EPS)
    assert torch.equal(got[0], torch.zeros(64))
    torch.testing.assert_close(got, want)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize(("rows", "inter"), [(1, 4), (5, 13), (8, 1536)])  # 13: a tail past 8 lanes
def test_silu_mul_matches_torch(native, dtype, rows, inter):
    gate_up = (3 * torch.randn(rows, 2 * inter, generator=GEN)).to(dtype)
    gate_up[0, :2] = torch.tensor([-100.0, 90.0])  # exp's clamps: silu → -0 and x
    got = native.silu_mul(gate_up)
    torch.testing.assert_close(got, norm_torch.silu_mul(gate_up), **_tolerance(dtype))


def test_silu_mul_reads_rows_with_their_own_stride(native):
    wide = torch.randn(4, 40, generator=GEN)
    gate_up = wide[:, 4:36]  # rows 40 apart
    torch.testing.assert_close(native.silu_mul(gate_up), norm_torch.silu_mul(gate_up), rtol=1e-5, atol=1e-6)


def test_inputs_the_kernels_do_not_take_go_to_torch(native):
    half = torch.randn(2, 16, generator=GEN).half()
    torch.testing.assert_close(
        native.add_rms_norm(half, None, torch.ones(16).half(), EPS)[0],
        norm_torch.add_rms_norm(half, None, torch.ones(16).half(), EPS)[0],
    )
    columns = torch.randn(16, 2, generator=GEN).T  # a column stride of 2
    assert torch.equal(native.silu_mul(columns), norm_torch.silu_mul(columns))
    with pytest.raises(ValueError, match=r"residual \(2, 16\) and hidden \(1, 16\) differ"):
        native.add_rms_norm(torch.randn(1, 16), torch.randn(2, 16), torch.ones(16), EPS)
