"""What every registration of a GIFT op schema shares: the fake (meta) implementations, the
autograd rules, and the dtype of the rank-r path.

Two registrations use the epilogue schema: the Python ops ``gift_kernels::gift_linear_fwd/bwd``
(:mod:`gift_kernels.ops.library`) and the CUDA extension's ``<ns>::cuda_gift_linear_fwd/bwd``
(:mod:`gift_kernels.ops.cuda.ops`). It sits below both and imports only the input checks.

    gift_linear_fwd(x, weight, bias?, phi, psi) -> (y, t, B)
    gift_linear_bwd(grad_y, x, t, B, weight, phi, psi, needs[5]) -> (dx, dW, db, dphi, dpsi)
    gift_input_fwd(x, phi, psi) -> (u, t)
    gift_input_bwd(grad_u, x, t, phi, psi, needs[3]) -> (dx, dphi, dpsi)
"""

from __future__ import annotations

from typing import Callable, Sequence

import torch

from .checks import check_gift_args, check_input_args
from .dtypes import rank_dtype

NEEDS = ("x", "weight", "bias", "phi", "psi")
INPUT_NEEDS = ("x", "phi", "psi")


def check_needs(op: str, needs: Sequence[bool], names: Sequence[str] = NEEDS) -> None:
    if len(needs) != len(names):
        raise ValueError(f"{op}: needs must have {len(names)} flags for {tuple(names)}, got {len(needs)}")


def grad_shapes(x, weight, phi, psi, needs):
    """(shape, dtype) of each grad; an unneeded one is an empty (0,) tensor (ops cannot return None)."""
    shapes = (x.shape, weight.shape, weight.shape[:1], phi.shape, psi.shape)
    dtypes = (x.dtype, weight.dtype, weight.dtype, phi.dtype, psi.dtype)
    return [(s if n else (0,), d) for s, d, n in zip(shapes, dtypes, needs)]


def input_grad_shapes(x, phi, psi, needs):
    shapes, dtypes = (x.shape, phi.shape, psi.shape), (x.dtype, phi.dtype, psi.dtype)
    return [(s if n else (0,), d) for s, d, n in zip(shapes, dtypes, needs)]


def fwd_fake(x, weight, bias, phi, psi):
    check_gift_args(x, weight, bias, phi, psi, x_2d=True)
    m, n, r = x.shape[0], weight.shape[0], phi.shape[1]
    rd = rank_dtype(x.dtype, phi.dtype)
    return x.new_empty(m, n), x.new_empty(m, r, dtype=rd), x.new_empty(n, r, dtype=rd)


def input_fwd_fake(x, phi, psi):
    check_input_args(x, phi, psi, x_2d=True)
    return x.new_empty(x.shape), x.new_empty(x.shape[0], phi.shape[1], dtype=rank_dtype(x.dtype, phi.dtype))


def make_bwd_fake(op: str) -> Callable:
    def bwd_fake(grad_y, x, t, B, weight, phi, psi, needs):
        check_needs(op, needs)
        return tuple(x.new_empty(shape, dtype=dtype) for shape, dtype in grad_shapes(x, weight, phi, psi, needs))

    return bwd_fake


def input_bwd_fake(grad_u, x, t, phi, psi, needs):
    check_needs("gift_input_bwd", needs, INPUT_NEEDS)
    return tuple(x.new_empty(shape, dtype=dtype) for shape, dtype in input_grad_shapes(x, phi, psi, needs))


def setup_context(ctx, inputs, output):
    """Autograd keeps x, t (M x r), B (d_out x r) and the parameters; nothing M x d or d x d new."""
    x, weight, bias, phi, psi = inputs
    _, t, B = output
    ctx.save_for_backward(x, t, B, weight, phi, psi)
    ctx.mark_non_differentiable(t, B)


def input_setup_context(ctx, inputs, output):
    """Autograd keeps x, t (M x r) and Theta."""
    x, phi, psi = inputs
    _, t = output
    ctx.save_for_backward(x, t, phi, psi)
    ctx.mark_non_differentiable(t)


def make_backward(bwd_op: Callable) -> Callable:
    """The autograd rule of a fwd op whose backward is ``bwd_op`` (same schema as above)."""

    def backward(ctx, grad_y, _grad_t, _grad_B):
        x, t, B, weight, phi, psi = ctx.saved_tensors
        needs = list(ctx.needs_input_grad)
        grads = bwd_op(grad_y, x, t, B, weight, phi, psi, needs)
        return tuple(g if n else None for g, n in zip(grads, needs))

    return backward


def make_input_backward(bwd_op: Callable) -> Callable:
    def backward(ctx, grad_u, _grad_t):
        x, t, phi, psi = ctx.saved_tensors
        needs = list(ctx.needs_input_grad)
        grads = bwd_op(grad_u, x, t, phi, psi, needs)
        return tuple(g if n else None for g, n in zip(grads, needs))

    return backward
