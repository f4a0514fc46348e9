"""The epilogue form in plain ATen calls: ``y = x W^T + b + (x psi^T)(W phi)^T``, no dense delta.

    t = x psi^T (M x r)   B = W phi (N x r)   y = x W^T + b + t B^T

Only skinny products are added to the frozen layer's GEMM: no ``d_out x d_in`` delta and no
second full GEMM. ``t B^T`` and ``dt psi`` are accumulated into the big GEMM's output in place
(``addmm_``), so the only extra passes over activations are the ones the skinny products need.

Rank path dtype (:func:`gift_kernels.ops.dtypes.rank_dtype`): t and B are float32 when x is
16-bit and Theta float32 or wider, else x's dtype. With bf16 x the skinny GEMMs still run in
bf16 (bf16 has float32's range: nothing can overflow) and only their (M x r, N x r) results
are widened; with fp16 x they run in float32 (:func:`gift_kernels.ops.dtypes.wide_products`),
so that a large ``x psi^T`` or ``g B`` cannot overflow fp16 where the merged layer would not
(this costs fp16 copies of x and g: fp16 is not this path's fast case). Theta's grads come
back in Theta's dtype.

The CPU path and the reference the other backends are checked against.
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch
import torch.nn.functional as F

from ..dtypes import as_dtype, rank_dtype, wide_products as _wide

Tensor = torch.Tensor


def gift_fwd(
    x: Tensor, weight: Tensor, bias: Optional[Tensor], phi: Tensor, psi: Tensor
) -> Tuple[Tensor, Tensor, Tensor]:
    """Forward on 2-D ``x (M, K)``. Returns ``(y, t, B)``; ``t`` and ``B`` are saved for backward."""
    rd = rank_dtype(x.dtype, phi.dtype)
    y = F.linear(x, weight, bias)  # addmm / mm with the transpose taken in C++, not by a Python .t()
    if _wide(x, rd):
        t = torch.mm(as_dtype(x, rd), as_dtype(psi, rd).t())
        B = torch.mm(as_dtype(weight, rd), as_dtype(phi, rd))
        y = as_dtype(torch.addmm(as_dtype(y, rd), t, B.t()), x.dtype)
        return y, t, B
    act_dtype = x.dtype
    t = F.linear(x, as_dtype(psi, act_dtype))
    B = torch.mm(weight, as_dtype(phi, act_dtype))
    y.addmm_(t, B.t())
    return y, as_dtype(t, rd), as_dtype(B, rd)


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
    g_r, x_r = (as_dtype(g, rd), as_dtype(x, rd)) if wide else (g, x)
    t_r, B_r = as_dtype(t, rd), as_dtype(B, rd)
    dx = dw = db = dphi = dpsi = None

    if need_x or need_psi:
        dt = torch.mm(g_r, B_r)  # (M, r)
        if need_x:
            dx = torch.mm(g, weight)
            if need_phi and not wide and x.shape[0] < weight.shape[0] and not torch.is_grad_enabled():
                # dphi = W^T g^T t = (g W)^T t: the frozen dx (M x d_in) is read instead of W
                # (d_out x d_in) again, before dt psi goes into it (create_graph keeps W^T dB:
                # autograd must not see dx change after this product saved it)
                dphi = as_dtype(torch.mm(dx.t(), t_r), phi.dtype)
            if wide:
                dx = as_dtype(torch.addmm(as_dtype(dx, rd), dt, as_dtype(psi, rd)), act_dtype)
            else:
                dx.addmm_(dt, as_dtype(psi, act_dtype))
        if need_psi:
            dpsi = as_dtype(torch.mm(dt.t(), x_r), psi.dtype)
    if (need_phi and dphi is None) or need_w:
        dB = torch.mm(t_r.t(), g_r).t()  # (N, r); (t^T g)^T streams g row-major: ~30% faster on CPU than g^T t
        if need_phi and dphi is None:
            w_r = as_dtype(weight, rd) if wide else weight
            dphi = as_dtype(torch.mm(w_r.t(), dB), phi.dtype)
        if need_w:
            dw = torch.mm(g.t(), x)
            if wide:
                dw.add_(as_dtype(torch.mm(dB, as_dtype(phi, rd).t()), act_dtype))
            else:
                dw.addmm_(dB, as_dtype(phi, act_dtype).t())
    if need_b:
        db = g.sum(0)
    return dx, dw, db, dphi, dpsi
