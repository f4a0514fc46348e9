"""The mixed-adapter op registered with ``torch.library`` (fake and autograd in one place), and
the eager autograd Function over the same launchers. Contract: :mod:`gift_kernels.ops.mixed`.
As :mod:`gift_kernels.ops.linear.op`: the registered ops ask the plan at run time; the eager
Function is given its plan and carries it to backward; ``create_graph=True`` runs a
differentiable backward.
"""

from __future__ import annotations

import weakref
from typing import List, Tuple

import torch
from torch import Tensor

from .. import memo
from .. import plan as plans
from ..checks import check_mixed_args, check_needs, flat, grad_like, unflat
from ..registry import empty_unless
from . import NEEDS, bwd_fake, fwd_fake, grad_shapes
from . import torch as torch_path


def _plan(x: Tensor, phis: Tensor) -> plans.Plan:
    return plans.choose("gift_mixed", x, x.shape[1], phis, training=True)


@torch.library.custom_op("gift_kernels::gift_mixed_fwd", mutates_args=())
def gift_mixed_fwd(x: Tensor, phis: Tensor, psis: Tensor, adapter_ids: Tensor) -> Tuple[Tensor, Tensor]:
    check_mixed_args(x, phis, psis, adapter_ids, where="gift_mixed op", x_2d=True)
    return _plan(x, phis).fwd(x, phis, psis, adapter_ids)


@torch.library.custom_op("gift_kernels::gift_mixed_bwd", mutates_args=())
def gift_mixed_bwd(
    grad_u: Tensor, x: Tensor, t: Tensor, phis: Tensor, psis: Tensor, adapter_ids: Tensor, needs: List[bool]
) -> Tuple[Tensor, Tensor, Tensor]:
    check_needs("gift_mixed_bwd", needs, NEEDS)
    grads = _plan(x, phis).bwd(grad_u, x, t, phis, psis, adapter_ids, tuple(needs))
    return empty_unless(grads, grad_shapes(x, phis, psis, needs), x)


def _setup_context(ctx, inputs, output):
    """Autograd keeps x, t (M x r), the bank and the ids: nothing per adapter and layer."""
    x, phis, psis, adapter_ids = inputs
    _, t = output
    ctx.save_for_backward(x, t, phis, psis, adapter_ids)
    ctx.mark_non_differentiable(t)


def _backward(ctx, grad_u, _grad_t):
    x, t, phis, psis, adapter_ids = ctx.saved_tensors
    needs = list(ctx.needs_input_grad[:3])
    grads = torch.ops.gift_kernels.gift_mixed_bwd(grad_u, x, t, phis, psis, adapter_ids, needs)
    return tuple(g if n else None for g, n in zip(grads, needs)) + (None,)


gift_mixed_fwd.register_fake(fwd_fake)
gift_mixed_bwd.register_fake(bwd_fake)
gift_mixed_fwd.register_autograd(_backward, setup_context=_setup_context)


class GiftMixedFunction(torch.autograd.Function):
    """Eager path of the mixed-adapter input-side form on ``plan`` (inputs validated). ``x
    (..., d_in)``, flattened inside the Function; ``adapter_ids`` (M,), one per row of the
    flattened x; ``u`` has x's shape. The ids' row layout is built once, in forward, and reused
    by backward (:mod:`gift_kernels.ops.memo`)."""

    @staticmethod
    def forward(ctx, x, phis, psis, adapter_ids, plan):
        with memo.scope(adapter_ids) as ids_memo:  # the row layout, built here, reused by backward
            u, t = plan.fwd(flat(x), phis, psis, adapter_ids)
        # reused only with this very t: a checkpointed or offloaded step recomputes or reloads
        # the saved tensors, and the ids may then hold other contents than this forward's
        ctx.plan, ctx.ids_memo, ctx.t_ref = plan, ids_memo, weakref.ref(t)
        ctx.save_for_backward(x, t, phis, psis, adapter_ids)
        return unflat(u, x)

    @staticmethod
    def backward(ctx, grad_u):
        x, t, phis, psis, adapter_ids = ctx.saved_tensors
        needs = ctx.needs_input_grad[:3]
        x2, g = flat(x), flat(grad_u)
        if torch.is_grad_enabled():  # create_graph=True: the torch formulas, differentiable end to end
            t = torch_path.mixed_fwd(x2, phis, psis, adapter_ids)[1]
            grads = torch_path.mixed_bwd(g, x2, t, phis, psis, adapter_ids, needs)
        else:
            plans.ran(ctx.plan, x.device.type)
            reuse = ctx.ids_memo if ctx.ids_memo is not None and ctx.t_ref() is t else None
            with memo.scope(adapter_ids, reuse=reuse):
                grads = ctx.plan.bwd(g, x2, t, phis, psis, adapter_ids, needs)
            ctx.ids_memo = None  # the layout goes with the backward (a retained graph rebuilds it)
        return (grad_like(grads[0], x),) + grads[1:] + (None, None)
