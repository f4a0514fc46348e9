"""Mixed-adapter batches in plain ATen calls: one adapter of a bank per row, the input-side form.

u_i = x_i + (x_i psi_a^T) phi_a^T with a = adapter_ids[i] (-1: u_i = x_i), a bank of A
Thetas phis (A, d_in, r), psis (A, r, d_in). The adapted rows are grouped by adapter and cut
into padded chunks, one adapter each (:func:`gift_kernels.ops.mixed.segments.chunks`): one
gather puts them in that layout, one bmm pair over the chunks computes every adapter's skinny
products (no Python loop over adapters), one index_add adds t phi_a^T back onto x (rows without
an adapter are never touched). A batch of one adapter is the single-adapter form. The caller
applies the base layer to u: one GEMM for every row, whatever its adapter.

Padding slots hold copies of a real row: their INPUTS are zeroed (``torch.where``, not a
multiply) before any product, so a NaN or inf in one tenant's row never reaches another
adapter's outputs or gradients. The layout needs a few counts on the host (two syncs on a
GPU): this is the CPU path; the Triton kernels segment without a sync.
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch

from ..dtypes import rank_dtype, wide_products as _wide
from ..input.torch import input_bwd, input_fwd
from .segments import chunks

Tensor = torch.Tensor




def _chunked(a: Tensor, ch) -> Tensor:
    """Rows of ``a (M, d)`` in the chunk layout ``(n_chunks, size, d)``, zero in the padding
    slots: the gather copies a real row there, and ``where`` (not a multiply: 0 x NaN is NaN)
    keeps whatever that row holds out of every product."""
    rows = a.index_select(0, ch.src).view(ch.n_chunks, ch.size, a.shape[1])
    return torch.where(ch.valid, rows, rows.new_zeros(()))


def _bank(bank: Tensor, ch, dtype: torch.dtype) -> Tensor:
    """Each chunk's Theta: the bank itself when chunk a is adapter a, else a gather."""
    return (bank if ch.identity else bank.index_select(0, ch.chunk_adapters)).to(dtype)


def _add_back(base: Tensor, padded: Tensor, ch) -> Tensor:
    """``base`` plus the chunk layout added back onto its rows (padding slots carry zeros)."""
    return torch.index_add(base, 0, ch.src, padded.reshape(-1, padded.shape[-1]).to(base.dtype))


def _bank_sum(per_chunk: Tensor, ch, n_adapters: int, dtype: torch.dtype) -> Tensor:
    """Per-chunk Theta grads summed per adapter (zero for adapters without rows; float32
    accumulation for 16-bit)."""
    if ch.identity:
        return per_chunk.to(dtype)
    acc = torch.float32 if per_chunk.dtype in (torch.float16, torch.bfloat16) else per_chunk.dtype
    out = per_chunk.new_zeros((n_adapters,) + tuple(per_chunk.shape[1:]), dtype=acc)
    return out.index_add_(0, ch.chunk_adapters, per_chunk.to(acc)).to(dtype)


def mixed_fwd(x: Tensor, phis: Tensor, psis: Tensor, adapter_ids: Tensor) -> Tuple[Tensor, Tensor]:
    """The mixed-adapter input-side form on 2-D ``x``. Returns ``(u, t)``; ``t`` (M, r) is
    ``x_i psi_a^T`` per row (zero for rows without an adapter), saved for backward."""
    m, _ = x.shape
    r = phis.shape[2]
    rd = rank_dtype(x.dtype, phis.dtype)
    ch = chunks(adapter_ids, phis.shape[0])
    if ch.single >= 0:  # one adapter for every row
        return input_fwd(x, phis[ch.single], psis[ch.single])
    t = x.new_zeros(m, r, dtype=rd)
    if ch.adapted == 0:
        return x.clone(memory_format=torch.contiguous_format), t
    compute = rd if _wide(x, rd) else x.dtype  # the products' dtype: the rank dtype where it is wider
    xc = x.to(compute)
    xp = _chunked(xc, ch)  # (C, S, K)
    tp = torch.bmm(xp, _bank(psis, ch, compute).transpose(1, 2))  # (C, S, r), zero in padding
    vp = torch.bmm(tp, _bank(phis, ch, compute).transpose(1, 2))  # (C, S, K): t phi_a^T
    return _add_back(xc, vp, ch).to(x.dtype), _add_back(t, tp, ch)


def mixed_bwd(
    grad_u: Tensor, x: Tensor, t: Tensor, phis: Tensor, psis: Tensor, adapter_ids: Tensor,
    needs: Tuple[bool, bool, bool],
) -> Tuple[Optional[Tensor], ...]:
    """Backward of :func:`mixed_fwd` from ``du``; ``needs`` = which of (x, phis, psis) want a
    gradient. Per row of adapter a: ``dt = du phi_a``, ``dx = du + dt psi_a``; per adapter:
    ``dphi_a = sum du^T t``, ``dpsi_a = sum dt^T x`` (zero for adapters without rows)."""
    need_x, need_phi, need_psi = needs
    n_adapters = phis.shape[0]
    ch = chunks(adapter_ids, n_adapters)
    if ch.single >= 0:
        a = ch.single
        dx, dphi, dpsi = input_bwd(grad_u, x, t, phis[a], psis[a], needs)
        out = []
        for g, bank in ((dphi, phis), (dpsi, psis)):
            if g is not None:
                full = torch.zeros_like(bank)
                full[a] = g
                g = full
            out.append(g)
        return dx, out[0], out[1]
    if ch.adapted == 0:
        return (grad_u.clone(memory_format=torch.contiguous_format) if need_x else None,
                torch.zeros_like(phis) if need_phi else None, torch.zeros_like(psis) if need_psi else None)
    compute = t.dtype if _wide(x, t.dtype) else x.dtype
    dx = dphis = dpsis = None
    g = grad_u.to(compute)
    gp = _chunked(g, ch)  # (C, S, K)
    if need_x or need_psi:
        dtp = torch.bmm(gp, _bank(phis, ch, compute))  # (C, S, r), zero in padding
        if need_x:
            dx = _add_back(g, torch.bmm(dtp, _bank(psis, ch, compute)), ch).to(x.dtype)
        if need_psi:
            dpsis = _bank_sum(torch.bmm(dtp.transpose(1, 2), _chunked(x.to(compute), ch)), ch, n_adapters, psis.dtype)
    if need_phi:
        tp = _chunked(t.to(compute), ch)
        dphis = _bank_sum(torch.bmm(gp.transpose(1, 2), tp), ch, n_adapters, phis.dtype)
    return dx, dphis, dpsis
