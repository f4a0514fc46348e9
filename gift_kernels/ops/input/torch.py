"""The input-side form in plain ATen calls: ``u = x + (x psi^T) phi^T`` (the caller applies the
base layer to u; W is never read).

    forward   t = x psi^T (M x r)   u = x + t phi^T
    backward  dt = du phi   dx = du + dt psi   dphi = du^T t   dpsi = dt^T x

Rank-path dtype and where the products run: as the epilogue form's torch path
(:mod:`gift_kernels.ops.linear.torch`; t in float32 for 16-bit x with a float32 Theta).
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch
import torch.nn.functional as F

from ..dtypes import as_dtype, rank_dtype, wide_products as _wide

Tensor = torch.Tensor


def input_fwd(x: Tensor, phi: Tensor, psi: Tensor) -> Tuple[Tensor, Tensor]:
    """``u = x + (x psi^T) phi^T`` on 2-D ``x``. Returns ``(u, t)``; ``t`` is saved for backward."""
    rd = rank_dtype(x.dtype, phi.dtype)
    if _wide(x, rd):
        t = torch.mm(as_dtype(x, rd), as_dtype(psi, rd).t())
        return as_dtype(torch.addmm(as_dtype(x, rd), t, as_dtype(phi, rd).t()), x.dtype), t
    act_dtype = x.dtype
    t = F.linear(x, as_dtype(psi, act_dtype))
    return torch.addmm(x, t, as_dtype(phi, act_dtype).t()), as_dtype(t, rd)


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
    du_r, x_r = (as_dtype(grad_u, rd), as_dtype(x, rd)) if wide else (grad_u, x)
    dx = dphi = dpsi = None
    if need_x or need_psi:
        dt = torch.mm(du_r, as_dtype(phi, rd))
        if need_x:
            dx = as_dtype(torch.addmm(du_r, dt, as_dtype(psi, rd)), act_dtype)
        if need_psi:
            dpsi = as_dtype(torch.mm(dt.t(), x_r), psi.dtype)
    if need_phi:
        if du_r.shape[0] <= _DIRECT_DPHI_M:  # a few rows: du^T t directly, no K x r transposing copy
            dphi = as_dtype(torch.mm(du_r.t(), as_dtype(t, rd)), phi.dtype)
        else:  # (t^T du)^T streams du row-major, as dB above; contiguous, as the op's schema promises
            dphi = torch.mm(as_dtype(t, rd).t(), du_r).t().to(phi.dtype).contiguous()
    return dx, dphi, dpsi
