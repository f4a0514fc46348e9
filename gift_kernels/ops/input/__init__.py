"""The input-side form of GIFT, ``u = x + (x psi^T) phi^T`` (``base(u)`` for any base layer
linear in its input): its contract.

    gift_input_fwd(x, phi, psi) -> (u, t)
        x (M, d_in) 2-D; u like x; t = x psi^T (M, r) in the rank-path dtype
    gift_input_bwd(grad_u, x, t, phi, psi, needs[3]) -> (dx, dphi, dpsi)
        needs: which of (x, phi, psi) want a gradient; the others come back empty (0-element)

Stated once, here, as the fake implementations. The folder reads ``reference.py`` ->
``torch.py`` / ``triton.py`` (launchers) -> ``op.py`` (registered op, autograd, eager Function).
"""

from __future__ import annotations

from ..checks import check_input_args, check_needs
from ..dtypes import rank_dtype

NEEDS = ("x", "phi", "psi")


def grad_shapes(x, phi, psi, needs):
    shapes, dtypes = (x.shape, phi.shape, psi.shape), (x.dtype, phi.dtype, psi.dtype)
    return [(s if n else (0,), d) for s, d, n in zip(shapes, dtypes, needs)]


def fwd_fake(x, phi, psi):
    check_input_args(x, phi, psi, x_2d=True)
    return x.new_empty(x.shape), x.new_empty(x.shape[0], phi.shape[1], dtype=rank_dtype(x.dtype, phi.dtype))


def bwd_fake(grad_u, x, t, phi, psi, needs):
    check_needs("gift_input_bwd", needs, NEEDS)
    return tuple(x.new_empty(shape, dtype=dtype) for shape, dtype in grad_shapes(x, phi, psi, needs))
