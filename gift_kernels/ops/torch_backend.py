"""The ``torch`` backend: GIFT in plain ATen calls, without the dense delta.

    epilogue form    t = x psi^T (M x r)   B = W phi (N x r)   y = x W^T + b + t B^T
    input-side form  t = x psi^T           u = x + t phi^T     (the caller applies the base to u)

Only skinny products are added to the frozen layer's GEMM: no ``d_out x d_in`` delta and no
second full GEMM. ``t B^T`` and ``dt psi`` are accumulated into the big GEMM's output in place
(``addmm_``), so the only extra passes over activations are the ones the skinny products need.

Rank path dtype (:func:`gift_kernels.ops.dtypes.rank_dtype`): t and B are float32 when x is
16-bit and Theta float32 or wider, else x's dtype. With bf16 x the skinny GEMMs still run in
bf16 (bf16 has float32's range: nothing can overflow) and only their (M x r, N x r) results
are widened; with fp16 x they run in float32, so that a large ``x psi^T`` or ``g B`` cannot
overflow fp16 where the merged layer would not (this costs fp16 copies of x and g: fp16 is
not this backend's fast path). Theta's grads come back in Theta's dtype.

This is the CPU path and the reference the other backends are checked against.
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch

from .dtypes import rank_dtype
from .segments import chunks

Tensor = torch.Tensor


def unavailable_reason(device: torch.device) -> Optional[str]:
    return None  # runs wherever ATen does


def declines(op: str, x: Tensor, n: int) -> Optional[str]:
    return None  # takes every validated call


def prefers_input_form(m: int, n: int, k: int, r: int) -> bool:
    """Whether the input-side form is cheaper than the epilogue form for a training step.

    Extra FLOPs over the frozen layer (forward + input and Theta grads): epilogue
    ``2r (3MK + 3MN + 2NK)``, input-side ``2r * 6MK``. The epilogue's ``2NK`` terms are
    ``B = W phi`` and ``dphi = W^T dB``, full passes over W that cost as much as the frozen
    GEMM when M ~ r; the input-side form never reads W. Both add about the same passes over
    activations on this backend (u written and read; y and dx updated in place), so FLOPs
    decide: input-side when ``3MK < 3MN + 2NK``, i.e. always for square layers and at small
    M, and the epilogue for wide-in, narrow-out layers at large M.
    """
    return 3 * m * k < 3 * m * n + 2 * n * k


def _wide(x: Tensor, rd: torch.dtype) -> bool:
    """fp16 x with a float32 rank path: the skinny GEMMs run in float32 (see the module doc)."""
    return rd != x.dtype and x.dtype == torch.float16


def gift_fwd(
    x: Tensor, weight: Tensor, bias: Optional[Tensor], phi: Tensor, psi: Tensor
) -> Tuple[Tensor, Tensor, Tensor]:
    """Forward on 2-D ``x (M, K)``. Returns ``(y, t, B)``; ``t`` and ``B`` are saved for backward."""
    rd = rank_dtype(x.dtype, phi.dtype)
    y = torch.mm(x, weight.t()) if bias is None else torch.addmm(bias, x, weight.t())
    if _wide(x, rd):
        t = torch.mm(x.to(rd), psi.to(rd).t())
        B = torch.mm(weight.to(rd), phi.to(rd))
        y = torch.addmm(y.to(rd), t, B.t()).to(x.dtype)
        return y, t, B
    act_dtype = x.dtype
    t = torch.mm(x, psi.to(act_dtype).t())
    B = torch.mm(weight, phi.to(act_dtype))
    y.addmm_(t, B.t())
    return y, t.to(rd), B.to(rd)


def input_fwd(x: Tensor, phi: Tensor, psi: Tensor) -> Tuple[Tensor, Tensor]:
    """``u = x + (x psi^T) phi^T`` on 2-D ``x``. Returns ``(u, t)``; ``t`` is saved for backward."""
    rd = rank_dtype(x.dtype, phi.dtype)
    if _wide(x, rd):
        t = torch.mm(x.to(rd), psi.to(rd).t())
        return torch.addmm(x.to(rd), t, phi.to(rd).t()).to(x.dtype), t
    act_dtype = x.dtype
    t = torch.mm(x, psi.to(act_dtype).t())
    return torch.addmm(x, t, phi.to(act_dtype).t()), t.to(rd)


def gift_infer(x: Tensor, weight: Tensor, bias: Optional[Tensor], phi: Tensor, psi: Tensor) -> Tensor:
    """Forward with no autograd to serve: nothing to save, so take the cheaper association.

    Prologue ``y = (x + (x psi^T) phi^T) W^T + b`` costs 4MKr extra FLOPs and needs no
    ``B = W phi``; the epilogue form costs 2r(MK + NK + MN). At decode sizes (M ~ r) the
    prologue avoids B's full pass over W, which costs as much as the frozen GEMM itself.
    """
    m, k = x.shape
    n = weight.shape[0]
    if m * k >= n * (k + m):  # epilogue is cheaper (very narrow outputs)
        return gift_fwd(x, weight, bias, phi, psi)[0]
    u = input_fwd(x, phi, psi)[0]
    return torch.mm(u, weight.t()) if bias is None else torch.addmm(bias, u, weight.t())


def gift_bwd(
    grad_y: Tensor,
    x: Tensor,
    t: Tensor,
    B: Tensor,
    weight: Tensor,
    phi: Tensor,
    psi: Tensor,
    needs: Tuple[bool, bool, bool, bool, bool],
) -> Tuple[Optional[Tensor], ...]:
    """Backward. ``needs`` = which of (x, weight, bias, phi, psi) want a gradient.

    Returns ``(dx, dweight, dbias, dphi, dpsi)`` with ``None`` where not needed.
    """
    need_x, need_w, need_b, need_phi, need_psi = needs
    g = grad_y
    act_dtype = x.dtype
    wide = _wide(x, t.dtype)
    rd = t.dtype if wide else act_dtype  # the dtype the skinny GEMMs run in
    g_r, x_r = (g.to(rd), x.to(rd)) if wide else (g, x)
    t_r, B_r = t.to(rd), B.to(rd)
    dx = dw = db = dphi = dpsi = None

    if need_x or need_psi:
        dt = torch.mm(g_r, B_r)  # (M, r)
        if need_x:
            dx = torch.mm(g, weight)
            if wide:
                dx = torch.addmm(dx.to(rd), dt, psi.to(rd)).to(act_dtype)
            else:
                dx.addmm_(dt, psi.to(act_dtype))
        if need_psi:
            dpsi = torch.mm(dt.t(), x_r).to(psi.dtype)
    if need_phi or need_w:
        dB = torch.mm(t_r.t(), g_r).t()  # (N, r); (t^T g)^T streams g row-major: ~30% faster on CPU than g^T t
        if need_phi:
            w_r = weight.to(rd) if wide else weight
            dphi = torch.mm(w_r.t(), dB).to(phi.dtype)
        if need_w:
            dw = torch.mm(g.t(), x)
            if wide:
                dw.add_(torch.mm(dB, phi.to(rd).t()).to(act_dtype))
            else:
                dw.addmm_(dB, phi.to(act_dtype).t())
    if need_b:
        db = g.sum(0)
    return dx, dw, db, dphi, dpsi


# Up to this many rows, dphi = du^T t as one mm beats (t^T du)^T plus its transposing copy
# (CPU, 1 thread, K = 1024, r = 16: 0.38x at M = 16, even at 64, 1.5x slower at 256).
_DIRECT_DPHI_M = 32


def input_bwd(
    grad_u: Tensor, x: Tensor, t: Tensor, phi: Tensor, psi: Tensor, needs: Tuple[bool, bool, bool]
) -> Tuple[Optional[Tensor], ...]:
    """Backward of the input-side form from ``du`` (what the base layer's backward returned).

    ``needs`` = which of (x, phi, psi) want a gradient:
    ``dt = du phi``, ``dx = du + dt psi``, ``dphi = du^T t``, ``dpsi = dt^T x``.
    """
    need_x, need_phi, need_psi = needs
    act_dtype = x.dtype
    wide = _wide(x, t.dtype)
    rd = t.dtype if wide else act_dtype
    du_r, x_r = (grad_u.to(rd), x.to(rd)) if wide else (grad_u, x)
    dx = dphi = dpsi = None
    if need_x or need_psi:
        dt = torch.mm(du_r, phi.to(rd))
        if need_x:
            dx = torch.addmm(du_r, dt, psi.to(rd)).to(act_dtype)
        if need_psi:
            dpsi = torch.mm(dt.t(), x_r).to(psi.dtype)
    if need_phi:
        if du_r.shape[0] <= _DIRECT_DPHI_M:  # a few rows: du^T t directly, no K x r transposing copy
            dphi = torch.mm(du_r.t(), t.to(rd)).to(phi.dtype)
        else:  # (t^T du)^T streams du row-major, as dB above; contiguous, as the op's schema promises
            dphi = torch.mm(t.to(rd).t(), du_r).t().to(phi.dtype).contiguous()
    return dx, dphi, dpsi


# ------------------------------------------------------------------ mixed-adapter batches
#
# u_i = x_i + (x_i psi_a^T) phi_a^T with a = adapter_ids[i] (-1: u_i = x_i), a bank of A
# Thetas phis (A, d_in, r), psis (A, r, d_in). The adapted rows are grouped by adapter and cut
# into padded chunks, one adapter each (gift_kernels.ops.segments.chunks): one gather puts them
# in that layout, one bmm pair over the chunks computes every adapter's skinny products (no
# Python loop over adapters), one index_add adds t phi_a^T back onto x (rows without an adapter
# are never touched). A batch of one adapter is the single-adapter form. The caller applies the
# base layer to u: one GEMM for every row, whatever its adapter.


def _chunked(a: Tensor, ch) -> Tensor:
    """Rows of ``a (M, d)`` in the chunk layout ``(n_chunks, size, d)`` (padding: copies of row 0)."""
    return a.index_select(0, ch.src).view(ch.n_chunks, ch.size, a.shape[1])


def _bank(bank: Tensor, ch, dtype: torch.dtype) -> Tensor:
    """Each chunk's Theta: the bank itself when chunk a is adapter a, else a gather."""
    return (bank if ch.identity else bank.index_select(0, ch.chunk_adapters)).to(dtype)


def _rows_only(padded: Tensor, ch) -> Tensor:
    """Zero in the padding slots (``where``: a NaN in a copied row stays out)."""
    return torch.where(ch.valid, padded, padded.new_zeros(()))


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
    tp = _rows_only(torch.bmm(xp, _bank(psis, ch, compute).transpose(1, 2)), ch)  # (C, S, r)
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
        dtp = _rows_only(torch.bmm(gp, _bank(phis, ch, compute)), ch)  # (C, S, r)
        if need_x:
            dx = _add_back(g, torch.bmm(dtp, _bank(psis, ch, compute)), ch).to(x.dtype)
        if need_psi:
            dpsis = _bank_sum(torch.bmm(dtp.transpose(1, 2), _chunked(x.to(compute), ch)), ch, n_adapters, psis.dtype)
    if need_phi:
        tp = _rows_only(_chunked(t.to(compute), ch), ch)
        dphis = _bank_sum(torch.bmm(gp.transpose(1, 2), tp), ch, n_adapters, phis.dtype)
    return dx, dphis, dpsis
