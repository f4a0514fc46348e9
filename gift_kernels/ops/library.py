"""GIFT as registered ``torch.library`` ops, with fake implementations and autograd, and the
eager autograd Functions over the same launchers.

Four ops in the ``gift_kernels`` namespace, callable by other libraries as
``torch.ops.gift_kernels.<name>``:

    gift_linear_fwd(x, weight, bias?, phi, psi) -> (y, t, B)
        the epilogue form: x (M, d_in) 2-D, y = x W^T + b + t B^T, t = x psi^T (M, r),
        B = W phi (d_out, r); t and B in the rank-path dtype (dtypes.rank_dtype)
    gift_linear_bwd(grad_y, x, t, B, weight, phi, psi, needs[5]) -> (dx, dW, db, dphi, dpsi)
        needs: which of (x, weight, bias, phi, psi) want a gradient; the others come back
        as empty (0-element) tensors.
    gift_input_fwd(x, phi, psi) -> (u, t)
        the input-side form: u = x + t phi^T, to be fed to any base layer linear in its input
    gift_input_bwd(grad_u, x, t, phi, psi, needs[3]) -> (dx, dphi, dpsi)

The backend (torch / triton / cuda) is chosen inside each op at run time
(:mod:`gift_kernels.ops.backends`), so a compiled graph follows ``gift_kernels.backend()``
without recompiling. Each op validates its inputs (it is a public entry point); the
functional API validates before calling the eager Functions, which do not validate again.

Eager calls go through :class:`GiftLinearFunction` / :class:`GiftInputFunction` instead: the
same launchers and backward, minus ``custom_op``'s per-call Python overhead (measured on the
2-core CPU machine: ~115 us vs ~62 us per forward with autograd at M = 4, 128 x 128, against
6 us for F.linear), which matters for decode-sized calls. They remember the backend their
forward ran on and run the backward there. With ``create_graph=True`` their backward is
computed with differentiable ATen ops, so higher-order gradients are exact; the registered
ops refuse double backward with an error.
"""

from __future__ import annotations

from typing import List, Optional, Tuple

import torch
from torch import Tensor

from . import backends
from . import schema
from . import torch_backend
from .checks import check_gift_args, check_input_args
from .dtypes import rank_dtype


def _empty_unless(grads, shapes, like: Tensor):
    return tuple(g if g is not None else like.new_empty(shape, dtype=dtype) for g, (shape, dtype) in zip(grads, shapes))


# ------------------------------------------------------------------ epilogue form


@torch.library.custom_op("gift_kernels::gift_linear_fwd", mutates_args=())
def gift_linear_fwd(
    x: Tensor, weight: Tensor, bias: Optional[Tensor], phi: Tensor, psi: Tensor
) -> Tuple[Tensor, Tensor, Tensor]:
    check_gift_args(x, weight, bias, phi, psi, x_2d=True)
    return backends.resolve(x, weight.shape[0]).gift_fwd(x, weight, bias, phi, psi)


@torch.library.custom_op("gift_kernels::gift_linear_bwd", mutates_args=())
def gift_linear_bwd(
    grad_y: Tensor,
    x: Tensor,
    t: Tensor,
    B: Tensor,
    weight: Tensor,
    phi: Tensor,
    psi: Tensor,
    needs: List[bool],
) -> Tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    schema.check_needs("gift_linear_bwd", needs)
    mod = backends.resolve(x, weight.shape[0])
    grads = mod.gift_bwd(grad_y, x, t, B, weight, phi, psi, tuple(needs))
    return _empty_unless(grads, schema.grad_shapes(x, weight, phi, psi, needs), x)


def _no_double_backward(op: str):
    """An autograd rule for a backward op that refuses, by name, to be differentiated again."""

    def backward(ctx, *grads):
        raise RuntimeError(
            f"gift_kernels::{op}: higher-order gradients (create_graph=True, then a second backward) are not "
            f"supported through the registered ops (torch.compile's path); call gift_kernels.gift_linear eagerly, "
            f"whose backward is differentiable"
        )

    return backward


gift_linear_fwd.register_fake(schema.fwd_fake)
gift_linear_bwd.register_fake(schema.make_bwd_fake("gift_linear_bwd"))
gift_linear_fwd.register_autograd(schema.make_backward(torch.ops.gift_kernels.gift_linear_bwd),
                                  setup_context=schema.setup_context)
gift_linear_bwd.register_autograd(_no_double_backward("gift_linear_bwd"), setup_context=lambda ctx, inputs, output: None)


def gift_linear_infer(x, weight, bias, phi, psi):
    """Eager forward when no grad is needed: the backend's ``gift_infer`` if it has one
    (free to re-associate, nothing is saved), else the forward launcher's y."""
    mod = backends.resolve(x, weight.shape[0])
    if mod.gift_infer is not None:
        return mod.gift_infer(x, weight, bias, phi, psi)
    return mod.gift_fwd(x, weight, bias, phi, psi)[0]


def _rank_factors(x, weight, phi, psi):
    """t and B with autograd, for a differentiable backward (create_graph=True)."""
    rd, act_dtype = rank_dtype(x.dtype, phi.dtype), x.dtype
    t = torch.mm(x.to(rd), psi.to(rd).t()) if rd != act_dtype else torch.mm(x, psi.to(act_dtype).t())
    B = torch.mm(weight.to(rd), phi.to(rd)) if rd != act_dtype else torch.mm(weight, phi.to(act_dtype))
    return t.to(rd), B.to(rd)


class GiftLinearFunction(torch.autograd.Function):
    """Eager path of the epilogue form: same launchers and backward as the op, without
    custom_op's overhead. Inputs must already be validated and x 2-D."""

    @staticmethod
    def forward(ctx, x, weight, bias, phi, psi):
        mod = backends.resolve(x, weight.shape[0])
        y, t, B = mod.gift_fwd(x, weight, bias, phi, psi)
        ctx.backend = backends.name_of(mod)
        ctx.save_for_backward(x, t, B, weight, phi, psi)
        return y

    @staticmethod
    def backward(ctx, grad_y):
        x, t, B, weight, phi, psi = ctx.saved_tensors
        needs = ctx.needs_input_grad
        if torch.is_grad_enabled():  # create_graph=True: the torch formulas, differentiable end to end
            t, B = _rank_factors(x, weight, phi, psi)
            return torch_backend.gift_bwd(grad_y, x, t, B, weight, phi, psi, needs)
        mod = backends.resolve(x, weight.shape[0], prefer=ctx.backend)
        return mod.gift_bwd(grad_y, x, t, B, weight, phi, psi, needs)


# ------------------------------------------------------------------ input-side form


@torch.library.custom_op("gift_kernels::gift_input_fwd", mutates_args=())
def gift_input_fwd(x: Tensor, phi: Tensor, psi: Tensor) -> Tuple[Tensor, Tensor]:
    check_input_args(x, phi, psi, x_2d=True)
    return backends.resolve(x, x.shape[1], op="gift_input").input_fwd(x, phi, psi)


@torch.library.custom_op("gift_kernels::gift_input_bwd", mutates_args=())
def gift_input_bwd(
    grad_u: Tensor, x: Tensor, t: Tensor, phi: Tensor, psi: Tensor, needs: List[bool]
) -> Tuple[Tensor, Tensor, Tensor]:
    schema.check_needs("gift_input_bwd", needs, schema.INPUT_NEEDS)
    mod = backends.resolve(x, x.shape[1], op="gift_input")
    grads = mod.input_bwd(grad_u, x, t, phi, psi, tuple(needs))
    return _empty_unless(grads, schema.input_grad_shapes(x, phi, psi, needs), x)


gift_input_fwd.register_fake(schema.input_fwd_fake)
gift_input_bwd.register_fake(schema.input_bwd_fake)
gift_input_fwd.register_autograd(schema.make_input_backward(torch.ops.gift_kernels.gift_input_bwd),
                                 setup_context=schema.input_setup_context)
gift_input_bwd.register_autograd(_no_double_backward("gift_input_bwd"), setup_context=lambda ctx, inputs, output: None)


class GiftInputFunction(torch.autograd.Function):
    """Eager path of the input-side form ``u = x + (x psi^T) phi^T`` (inputs validated, x 2-D)."""

    @staticmethod
    def forward(ctx, x, phi, psi):
        mod = backends.resolve(x, x.shape[1], op="gift_input")
        u, t = mod.input_fwd(x, phi, psi)
        ctx.backend = backends.name_of(mod)
        ctx.save_for_backward(x, t, phi, psi)
        return u

    @staticmethod
    def backward(ctx, grad_u):
        x, t, phi, psi = ctx.saved_tensors
        needs = ctx.needs_input_grad
        if torch.is_grad_enabled():  # create_graph=True
            rd = rank_dtype(x.dtype, phi.dtype)
            t = torch.mm(x.to(rd), psi.to(rd).t())
            return torch_backend.input_bwd(grad_u, x, t, phi, psi, needs)
        mod = backends.resolve(x, x.shape[1], op="gift_input", prefer=ctx.backend)
        return mod.input_bwd(grad_u, x, t, phi, psi, needs)
