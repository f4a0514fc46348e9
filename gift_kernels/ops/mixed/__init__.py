"""Mixed-adapter batches: one adapter of a bank per row, in the input-side form. Its contract:

    gift_mixed_fwd(x, phis, psis, adapter_ids) -> (u, t)
        u_i = x_i + (x_i psi_a^T) phi_a^T with a = adapter_ids[i] (-1: u_i = x_i); x (M, d_in),
        phis (A, d_in, r), psis (A, r, d_in), adapter_ids (M,) int64 in [-1, A); t (M, r) in the
        rank-path dtype (zero where a = -1). The caller runs the base layer on u: one GEMM for
        all rows (gift_kernels.gift_linear_mixed).
    gift_mixed_bwd(grad_u, x, t, phis, psis, adapter_ids, needs[3]) -> (dx, dphis, dpsis)

Why the input-side form: a bank of GIFT adapters is (phi_a, psi_a) per layer type, and this
form reads nothing else; the epilogue form would need B_a = W phi_a for every adapter of every
layer (a LoRA-sized bank). One tenant's rows never touch another adapter's outputs or grads,
NaN and inf included (padding is zeroed at the inputs, not multiplied by zero).

Stated once, here, as the fake implementations. The folder reads ``reference.py`` ->
``segments.py`` (rows grouped by adapter) -> ``torch.py`` / ``triton.py`` -> ``op.py``.
"""

from __future__ import annotations

from ..checks import check_mixed_args, check_needs
from ..dtypes import rank_dtype

NEEDS = ("x", "phis", "psis")


def grad_shapes(x, phis, psis, needs):
    shapes, dtypes = (x.shape, phis.shape, psis.shape), (x.dtype, phis.dtype, psis.dtype)
    return [(s if n else (0,), d) for s, d, n in zip(shapes, dtypes, needs)]


def fwd_fake(x, phis, psis, adapter_ids):
    check_mixed_args(x, phis, psis, adapter_ids, where="gift_mixed op", x_2d=True, check_values=False)
    return x.new_empty(x.shape), x.new_empty(x.shape[0], phis.shape[2], dtype=rank_dtype(x.dtype, phis.dtype))


def bwd_fake(grad_u, x, t, phis, psis, adapter_ids, needs):
    check_needs("gift_mixed_bwd", needs, NEEDS)
    return tuple(x.new_empty(shape, dtype=dtype) for shape, dtype in grad_shapes(x, phis, psis, needs))
