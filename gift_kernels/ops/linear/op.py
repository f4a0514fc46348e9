"""The epilogue op registered with ``torch.library`` (fake and autograd in one place), and the
eager autograd Function over the same launchers. Contract: :mod:`gift_kernels.ops.linear`.

``torch.ops.gift_kernels.gift_linear_fwd`` / ``gift_linear_bwd`` are callable by other
libraries and are what a ``torch.compile`` graph holds (no graph break; the fake to trace).
The plan (:mod:`gift_kernels.ops.plan`) is asked inside each op at run time, so a compiled graph
follows ``gift_kernels.backend()`` without recompiling. Each op validates its inputs (it is a
public entry point); the functional API validates before calling the eager Function, which
does not validate again.

Eager calls go through :class:`GiftLinearFunction` instead: the same launchers and backward,
minus ``custom_op``'s per-call Python overhead, which matters for decode-sized calls; it takes
x with its leading shape (the registered ops take 2-D x). It is given its plan by the caller
and carries it to backward (no second decision). With
``create_graph=True`` its backward is computed with differentiable ATen ops, so higher-order
gradients are exact; the registered ops refuse double backward with an error.
"""

from __future__ import annotations

from typing import List, Optional, Tuple

import torch
from torch import Tensor

from .. import plan as plans
from ..checks import check_gift_args, check_needs, flat, grad_like, unflat
from ..dtypes import rank_dtype
from ..registry import empty_unless, register_no_double_backward
from . import NEEDS, bwd_fake, fwd_fake, grad_shapes
from . import torch as torch_path


def _plan(x: Tensor, weight: Tensor, phi: Tensor) -> plans.Plan:
    return plans.choose("gift_linear", x, weight.shape[0], phi, training=True, form="epilogue")


@torch.library.custom_op("gift_kernels::gift_linear_fwd", mutates_args=())
def gift_linear_fwd(
    x: Tensor, weight: Tensor, bias: Optional[Tensor], phi: Tensor, psi: Tensor
) -> Tuple[Tensor, Tensor, Tensor]:
    check_gift_args(x, weight, bias, phi, psi, x_2d=True)
    return _plan(x, weight, phi).fwd(x, weight, bias, phi, psi)


@torch.library.custom_op("gift_kernels::gift_linear_bwd", mutates_args=())
def gift_linear_bwd(
    grad_y: Tensor, x: Tensor, t: Tensor, B: Tensor, weight: Tensor, phi: Tensor, psi: Tensor, needs: List[bool],
) -> Tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    check_needs("gift_linear_bwd", needs, NEEDS)
    grads = _plan(x, weight, phi).bwd(grad_y, x, t, B, weight, phi, psi, tuple(needs))
    return empty_unless(grads, grad_shapes(x, weight, phi, psi, needs), x)


def _setup_context(ctx, inputs, output):
    """Autograd keeps x, t (M x r), B (d_out x r) and the parameters; nothing M x d or d x d new."""
    x, weight, bias, phi, psi = inputs
    _, t, B = output
    ctx.save_for_backward(x, t, B, weight, phi, psi)
    ctx.mark_non_differentiable(t, B)


def _backward(ctx, grad_y, _grad_t, _grad_B):
    x, t, B, weight, phi, psi = ctx.saved_tensors
    needs = list(ctx.needs_input_grad)
    grads = torch.ops.gift_kernels.gift_linear_bwd(grad_y, x, t, B, weight, phi, psi, needs)
    return tuple(g if n else None for g, n in zip(grads, needs))


gift_linear_fwd.register_fake(fwd_fake)
gift_linear_bwd.register_fake(bwd_fake)
gift_linear_fwd.register_autograd(_backward, setup_context=_setup_context)
register_no_double_backward(gift_linear_bwd, "gift_linear_bwd")


def _rank_factors(x, weight, phi, psi):
    """t and B with autograd, for a differentiable backward (create_graph=True)."""
    rd, act_dtype = rank_dtype(x.dtype, phi.dtype), x.dtype
    t = torch.mm(x.to(rd), psi.to(rd).t()) if rd != act_dtype else torch.mm(x, psi.to(act_dtype).t())
    B = torch.mm(weight.to(rd), phi.to(rd)) if rd != act_dtype else torch.mm(weight, phi.to(act_dtype))
    return t.to(rd), B.to(rd)


class GiftLinearFunction(torch.autograd.Function):
    """Eager path of the epilogue form on ``plan`` (an epilogue plan of :func:`plans.choose`).
    Inputs must already be validated; ``x (..., d_in)``, any leading shape: it is flattened
    here, inside the Function, so no reshape or view node is added to the autograd graph
    around it (each costs microseconds of host time per call). Returns ``(..., d_out)``."""

    @staticmethod
    def forward(ctx, x, weight, bias, phi, psi, plan):
        x2 = flat(x)
        y, t, B = plan.fwd(x2, weight, bias, phi, psi)
        ctx.plan = plan
        ctx.save_for_backward(x, t, B, weight, phi, psi)
        return unflat(y, x)

    @staticmethod
    def backward(ctx, grad_y):
        x, t, B, weight, phi, psi = ctx.saved_tensors
        needs = ctx.needs_input_grad[:5]
        x2, g = flat(x), flat(grad_y)
        if torch.is_grad_enabled():  # create_graph=True: the torch formulas, differentiable end to end
            t, B = _rank_factors(x2, weight, phi, psi)
            grads = torch_path.gift_bwd(g, x2, t, B, weight, phi, psi, needs)
        else:
            plans.ran(ctx.plan, x.device.type)
            grads = ctx.plan.bwd(g, x2, t, B, weight, phi, psi, needs)
        return (grad_like(grads[0], x),) + grads[1:] + (None,)
