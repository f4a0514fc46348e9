"""The epilogue form of GIFT, ``y = x W^T + b + (x psi^T)(W phi)^T``: its contract.

    gift_linear_fwd(x, weight, bias?, phi, psi) -> (y, t, B)
        x (M, d_in) 2-D, y = x W^T + b + t B^T (M, d_out), t = x psi^T (M, r),
        B = W phi (d_out, r); t and B in the rank-path dtype (dtypes.rank_dtype)
    gift_linear_bwd(grad_y, x, t, B, weight, phi, psi, needs[5]) -> (dx, dW, db, dphi, dpsi)
        needs: which of (x, weight, bias, phi, psi) want a gradient; the others come back as
        empty (0-element) tensors. Grads in their tensor's dtype (Theta's in Theta's).

Stated once, here, as the fake (meta) implementations every registration of this schema uses:
the package's op (``op.py``) and the CUDA extension's kernels (``cuda.py``). The folder reads
``reference.py`` (the spec) -> ``torch.py`` / ``triton.py`` / ``cuda.py`` (launchers) ->
``op.py`` (registered op, autograd, eager Function).
"""

from __future__ import annotations

from ..checks import check_gift_args, check_needs
from ..dtypes import rank_dtype

NEEDS = ("x", "weight", "bias", "phi", "psi")


def grad_shapes(x, weight, phi, psi, needs):
    """(shape, dtype) of each grad; an unneeded one is an empty (0,) tensor (ops cannot return None)."""
    shapes = (x.shape, weight.shape, weight.shape[:1], phi.shape, psi.shape)
    dtypes = (x.dtype, weight.dtype, weight.dtype, phi.dtype, psi.dtype)
    return [(s if n else (0,), d) for s, d, n in zip(shapes, dtypes, needs)]


def fwd_fake(x, weight, bias, phi, psi):
    check_gift_args(x, weight, bias, phi, psi, x_2d=True)
    m, n, r = x.shape[0], weight.shape[0], phi.shape[1]
    rd = rank_dtype(x.dtype, phi.dtype)
    return x.new_empty(m, n), x.new_empty(m, r, dtype=rd), x.new_empty(n, r, dtype=rd)


def bwd_fake(grad_y, x, t, B, weight, phi, psi, needs):
    check_needs("gift_linear_bwd", needs, NEEDS)
    return tuple(x.new_empty(shape, dtype=dtype) for shape, dtype in grad_shapes(x, weight, phi, psi, needs))
