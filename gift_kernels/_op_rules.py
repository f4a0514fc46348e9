"""What every registration of the GIFT op schema shares: the fake (meta) implementations
and the autograd rule.

Two registrations use it: the Python ops ``gift_kernels::gift_linear_fwd/bwd`` (ops.py) and
the CUDA extension's ``<ns>::cuda_gift_linear_fwd/bwd`` (kernels/cuda_gift_ops.py). It sits
below both and imports only the input checks.

    fwd(x, weight, bias?, phi, psi) -> (y, t, B)
    bwd(grad_y, x, t, B, weight, phi, psi, needs[5]) -> (dx, dW, db, dphi, dpsi)
"""

from __future__ import annotations

from typing import Callable, Sequence

from ._checks import check_gift_args

NEEDS = ("x", "weight", "bias", "phi", "psi")


def check_needs(op: str, needs: Sequence[bool]) -> None:
    if len(needs) != len(NEEDS):
        raise ValueError(f"{op}: needs must have {len(NEEDS)} flags for {NEEDS}, got {len(needs)}")


def grad_shapes(x, weight, phi, psi, needs):
    """(shape, dtype) of each grad; an unneeded one is an empty (0,) tensor (ops cannot return None)."""
    shapes = (x.shape, weight.shape, weight.shape[:1], phi.shape, psi.shape)
    dtypes = (x.dtype, weight.dtype, weight.dtype, phi.dtype, psi.dtype)
    return [(s if n else (0,), d) for s, d, n in zip(shapes, dtypes, needs)]


def fwd_fake(x, weight, bias, phi, psi):
    check_gift_args(x, weight, bias, phi, psi, x_2d=True)
    m, n, r = x.shape[0], weight.shape[0], phi.shape[1]
    return x.new_empty(m, n), x.new_empty(m, r), x.new_empty(n, r)


def make_bwd_fake(op: str) -> Callable:
    def bwd_fake(grad_y, x, t, B, weight, phi, psi, needs):
        check_needs(op, needs)
        return tuple(x.new_empty(shape, dtype=dtype) for shape, dtype in grad_shapes(x, weight, phi, psi, needs))

    return bwd_fake


def setup_context(ctx, inputs, output):
    """Autograd keeps x, t (M x r), B (d_out x r) and the parameters; nothing M x d or d x d new."""
    x, weight, bias, phi, psi = inputs
    _, t, B = output
    ctx.save_for_backward(x, t, B, weight, phi, psi)
    ctx.mark_non_differentiable(t, B)


def make_backward(bwd_op: Callable) -> Callable:
    """The autograd rule of a fwd op whose backward is ``bwd_op`` (same schema as above)."""

    def backward(ctx, grad_y, _grad_t, _grad_B):
        x, t, B, weight, phi, psi = ctx.saved_tensors
        needs = list(ctx.needs_input_grad)
        grads = bwd_op(grad_y, x, t, B, weight, phi, psi, needs)
        return tuple(g if n else None for g, n in zip(grads, needs))

    return backward
