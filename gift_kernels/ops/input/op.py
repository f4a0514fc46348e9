"""The input-side op registered with ``torch.library`` (fake and autograd in one place), and
the eager autograd Function over the same launchers. Contract: :mod:`gift_kernels.ops.input`.
As :mod:`gift_kernels.ops.linear.op`: the registered ops ask the plan at run time; the eager
Functions are given their plan and carry it to backward; ``create_graph=True`` runs a
differentiable backward; the registered ops refuse double backward.

:class:`GiftInputFunction` is u alone, for any base layer. :class:`GiftInputLinearFunction` is
``gift_linear``'s input-side form over a dense weight: u and ``F.linear(u, W, b)`` (cuBLAS on
CUDA) in one autograd node, so an eager training call walks one Python node per layer, not a
Python node and the base GEMM's node (each node costs host time on every call).
"""

from __future__ import annotations

from typing import List, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor

from .. import plan as plans
from ..checks import check_input_args, check_needs, flat, grad_like, unflat
from ..dtypes import rank_dtype
from ..registry import empty_unless, register_no_double_backward
from . import NEEDS, bwd_fake, fwd_fake, grad_shapes
from . import torch as torch_path


def _plan(x: Tensor, phi: Tensor) -> plans.Plan:
    return plans.choose("gift_input", x, x.shape[1], phi, training=True)


@torch.library.custom_op("gift_kernels::gift_input_fwd", mutates_args=())
def gift_input_fwd(x: Tensor, phi: Tensor, psi: Tensor) -> Tuple[Tensor, Tensor]:
    check_input_args(x, phi, psi, x_2d=True)
    return _plan(x, phi).fwd(x, phi, psi)


@torch.library.custom_op("gift_kernels::gift_input_bwd", mutates_args=())
def gift_input_bwd(
    grad_u: Tensor, x: Tensor, t: Tensor, phi: Tensor, psi: Tensor, needs: List[bool]
) -> Tuple[Tensor, Tensor, Tensor]:
    check_needs("gift_input_bwd", needs, NEEDS)
    grads = _plan(x, phi).bwd(grad_u, x, t, phi, psi, tuple(needs))
    return empty_unless(grads, grad_shapes(x, phi, psi, needs), x)


def _setup_context(ctx, inputs, output):
    """Autograd keeps x, t (M x r) and Theta."""
    x, phi, psi = inputs
    _, t = output
    ctx.save_for_backward(x, t, phi, psi)
    ctx.mark_non_differentiable(t)


def _backward(ctx, grad_u, _grad_t):
    x, t, phi, psi = ctx.saved_tensors
    needs = list(ctx.needs_input_grad)
    grads = torch.ops.gift_kernels.gift_input_bwd(grad_u, x, t, phi, psi, needs)
    return tuple(g if n else None for g, n in zip(grads, needs))


gift_input_fwd.register_fake(fwd_fake)
gift_input_bwd.register_fake(bwd_fake)
gift_input_fwd.register_autograd(_backward, setup_context=_setup_context)
register_no_double_backward(gift_input_bwd, "gift_input_bwd")


def _differentiable_bwd(du, x2, phi, psi, needs):
    """The input side's backward from differentiable ATen calls, t recomputed with autograd
    (``create_graph=True``: higher-order gradients exact)."""
    rd = rank_dtype(x2.dtype, phi.dtype)
    t = torch.mm(x2.to(rd), psi.to(rd).t())
    return torch_path.input_bwd(du, x2, t, phi, psi, needs)


class GiftInputFunction(torch.autograd.Function):
    """Eager path of ``u = x + (x psi^T) phi^T`` on ``plan`` (inputs validated). ``x (..., d_in)``,
    flattened inside the Function (no reshape node in the graph); ``u`` has x's shape."""

    @staticmethod
    def forward(ctx, x, phi, psi, plan):
        u, t = plan.fwd(flat(x), phi, psi)
        ctx.plan = plan
        ctx.save_for_backward(x, t, phi, psi)
        return unflat(u, x)

    @staticmethod
    def backward(ctx, grad_u):
        x, t, phi, psi = ctx.saved_tensors
        needs = ctx.needs_input_grad[:3]
        x2, g = flat(x), flat(grad_u)
        if torch.is_grad_enabled():  # create_graph=True
            grads = _differentiable_bwd(g, x2, phi, psi, needs)
        else:
            plans.ran(ctx.plan, x.device.type)
            grads = ctx.plan.bwd(g, x2, t, phi, psi, needs)
        return (grad_like(grads[0], x),) + grads[1:] + (None,)


class GiftInputLinearFunction(torch.autograd.Function):
    """Eager path of ``F.linear(x + (x psi^T) phi^T, W, b)`` on ``plan`` (an input-side plan of
    ``gift_linear``; inputs validated), one autograd node. Keeps only what the wanted grads
    need, as the two-node graph would: x, t, W and Theta when x or Theta wants a grad (``du = g
    W``, then the input side's backward), u when W trains (``dW = g^T u``), nothing for the bias.
    ``x (..., d_in)`` in, ``(..., d_out)`` out."""

    @staticmethod
    def forward(ctx, x, weight, bias, phi, psi, plan):
        u, t = plan.fwd(flat(x), phi, psi)
        need_x, need_w, _, need_phi, need_psi = ctx.needs_input_grad[:5]
        ctx.plan = plan
        if need_x or need_phi or need_psi:
            ctx.save_for_backward(x, t, weight, phi, psi, u if need_w else None)
        else:  # the base alone trains: W and b need no activation but u
            ctx.save_for_backward(None, None, None, None, None, u if need_w else None)
        return unflat(F.linear(u, weight, bias), x)

    @staticmethod
    def backward(ctx, grad_y):
        x, t, weight, phi, psi, u = ctx.saved_tensors
        need_x, need_w, need_b, need_phi, need_psi = ctx.needs_input_grad[:5]
        g = flat(grad_y)
        create_graph = torch.is_grad_enabled()
        if not create_graph:
            plans.ran(ctx.plan, grad_y.device.type)
        dx = dphi = dpsi = None
        if need_x or need_phi or need_psi:
            du, x2, needs = torch.mm(g, weight), flat(x), (need_x, need_phi, need_psi)
            if create_graph:  # differentiable end to end: u too, with the graph it depends on
                dx, dphi, dpsi = _differentiable_bwd(du, x2, phi, psi, needs)
                u = torch_path.input_fwd(x2, phi, psi)[0] if need_w else None
            else:
                dx, dphi, dpsi = ctx.plan.bwd(du, x2, t, phi, psi, needs)
            dx = grad_like(dx, x)
        dw = torch.mm(g.t(), u) if need_w else None
        db = g.sum(0) if need_b else None
        return dx, dw, db, dphi, dpsi, None
