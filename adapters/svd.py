"""ΔW cut to rank r as peft's ``*svd`` compositions cut it, without its full SVD (issue 18).

peft: ``U, S, Vh = torch.linalg.svd(ΔW, full_matrices=True)``; B = U[:, :r]·diag(S[:r]), A = Vh[:r]
(then, with ``svd_clamp``, both clamped to a quantile of their values). Three ways to it, by what
the caller has:

    factored(b_cat, a_cat, r)    ΔW = b_cat·a_cat, never formed: QR of both factors, SVD of the small
                                 R_b·R_aᵀ [k, k] (k = Σ rᵢ); O((out + in)·k²)
    top_of_dense(ΔW, r)          a dense ΔW (pruned): eigenvectors of its Gram matrix on the smaller
                                 side [m, m] (m = min(out, in)), in float64; no [max, max] factor
    peft_factors(ΔW, r, clamp)   LAPACK's gesdd as peft runs it: its very factors, signs included

Contracts:
- factored, top_of_dense: B·A equals peft's to float32 rounding (closer to the exact rank-r cut
  than peft's float32 SVD is: the work is float64). B's columns are σᵢ·uᵢ with σ descending, A's
  rows the unit vᵢᵀ: peft's factors up to the sign of each pair (and a rotation within a repeated
  σ), which B·A, and so the served adapter, does not see. Pairs past ΔW's rank are zero columns of
  B and zero rows of A (peft's have S ≈ 0 and arbitrary unit rows in A: the same B·A).
- peft_factors: what ``svd_clamp`` needs, whose quantile of the factors' values depends on their
  signs. ``full_matrices=False``: on the CPU gesdd makes both variants from one bidiagonal SVD
  (only the orthogonal factor of its first QR / LQ step is formed differently), so the factors
  are peft's, bitwise for square ΔW, to rounding (≤ 4e-7 over 440 random cases) otherwise, with
  the same signs; it skips peft's [out, out] and [in, in] bases. (CPU torch takes no ``driver``.)
- Every result is float32 (B [out, r], A [r, in]); ranks past min(out, in, k) are zero-padded.
"""

from __future__ import annotations

import torch


def factored(b_cat: torch.Tensor, a_cat: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(B [out, rank], A [rank, in]) of ΔW = b_cat [out, k] · a_cat [k, in] cut to ``rank``."""
    q_b, r_b = torch.linalg.qr(b_cat.double())  # [out, m], [m, k]
    q_a, r_a = torch.linalg.qr(a_cat.double().T)  # [in, n], [n, k]
    u, s, vh = torch.linalg.svd(r_b @ r_a.T, full_matrices=False)  # [m, p], [p], [p, n]
    keep = min(rank, s.shape[0])
    b = q_b @ (u[:, :keep] * s[:keep])  # [out, keep]: σᵢ·uᵢ
    a = vh[:keep] @ q_a.T  # [keep, in]
    return _padded(b, a, rank)


def top_of_dense(delta: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(B [out, rank], A [rank, in]) of ``delta`` [out, in] cut to ``rank``.

    The top singular vectors on the smaller side are those of its Gram matrix (ΔWᵀΔW or ΔWΔWᵀ),
    in float64, where squaring σ costs no precision float32 would see; the other side is ΔW times
    them, so B·A is ΔW projected on them whatever σ is (no division by a small one)."""
    d = delta.double()
    out_dim, in_dim = d.shape
    keep = min(rank, out_dim, in_dim)
    if out_dim >= in_dim:
        v = _top_eigenvectors(d.T @ d, keep)  # [in, keep]
        return _padded(d @ v, v.T, rank)  # ΔW·vᵢ = σᵢ·uᵢ
    u = _top_eigenvectors(d @ d.T, keep)  # [out, keep]
    c = u.T @ d  # [keep, in]: σᵢ·vᵢᵀ
    s = c.norm(dim=1)  # [keep]
    unit = torch.where(s > 0, 1 / s, torch.zeros_like(s))
    return _padded(u * s, c * unit[:, None], rank)


def peft_factors(delta: torch.Tensor, rank: int, clamp: float | None) -> tuple[torch.Tensor, torch.Tensor]:
    """(B [out, rank], A [rank, in]) exactly as peft makes them, ``clamp`` (a quantile) included."""
    u, s, vh = torch.linalg.svd(delta.float(), full_matrices=False)  # [out, m], [m], [m, in]
    keep = min(rank, s.shape[0])
    b, a = u[:, :keep] @ torch.diag(s[:keep]), vh[:keep]
    if clamp is not None:
        high = torch.quantile(torch.cat([b.flatten(), a.flatten()]), clamp)
        b, a = b.clamp(-high, high), a.clamp(-high, high)
    return _padded(b, a, rank)


def _top_eigenvectors(gram: torch.Tensor, count: int) -> torch.Tensor:
    """[m, count]: the eigenvectors of the symmetric ``gram`` [m, m] with the largest eigenvalues,
    largest first."""
    _, vectors = torch.linalg.eigh(gram)  # ascending eigenvalues
    top: torch.Tensor = vectors[:, gram.shape[0] - count :]
    return top.flip(1)


def _padded(b: torch.Tensor, a: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """b [out, keep], a [keep, in] → float32 [out, rank], [rank, in], zeros past ``keep``."""
    keep = b.shape[1]
    b_out = torch.zeros(b.shape[0], rank)
    a_out = torch.zeros(rank, a.shape[1])
    b_out[:, :keep], a_out[:keep] = b, a
    return b_out, a_out
