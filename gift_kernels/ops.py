"""GIFT as registered ``torch.library`` ops, with fake implementations and autograd.

Two ops in the ``gift_kernels`` namespace, callable by other libraries as
``torch.ops.gift_kernels.<name>``:

    gift_linear_fwd(x, weight, bias?, phi, psi) -> (y, t, B)
        x: (M, d_in) 2-D, y = x W^T + b + t B^T, t = x psi^T (M, r), B = W phi (d_out, r)
    gift_linear_bwd(grad_y, x, t, B, weight, phi, psi, needs[5]) -> (dx, dW, db, dphi, dpsi)
        needs: which of (x, weight, bias, phi, psi) want a gradient; the others come back
        as empty (0-element) tensors.

The backend (torch / triton / cuda) is chosen inside the op at run time
(:mod:`gift_kernels.backends`), so a compiled graph follows ``gift_kernels.backend()``
without recompiling. Autograd saves x, t, B (d_out x r) and the parameters: no
M x d or d x d intermediate.

Eager calls go through :class:`GiftLinearFunction` instead: the same launchers and the
same backward, minus ``custom_op``'s per-call Python overhead (measured on the 2-core CPU
machine: ~115 us vs ~62 us per forward with autograd at M = 4, 128 x 128, against 6 us
for F.linear), which matters for decode-sized calls. ``torch.compile`` sees the op.
"""

from __future__ import annotations

from typing import List, Optional, Tuple

import torch
from torch import Tensor

from . import _op_rules as rules
from . import backends
from ._checks import check_gift_args


def _forward(x, weight, bias, phi, psi):
    return backends.impl(x.device).gift_fwd(x, weight, bias, phi, psi)


def _backward_grads(grad_y, saved, needs):
    """(dx, dW, db, dphi, dpsi) with None where not needed, from the saved tensors."""
    x, t, B, weight, phi, psi = saved
    return backends.impl(grad_y.device).gift_bwd(grad_y, x, t, B, weight, phi, psi, tuple(needs))


@torch.library.custom_op("gift_kernels::gift_linear_fwd", mutates_args=())
def gift_linear_fwd(
    x: Tensor, weight: Tensor, bias: Optional[Tensor], phi: Tensor, psi: Tensor
) -> Tuple[Tensor, Tensor, Tensor]:
    check_gift_args(x, weight, bias, phi, psi, x_2d=True)
    return _forward(x, weight, bias, phi, psi)


gift_linear_fwd.register_fake(rules.fwd_fake)


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
    rules.check_needs("gift_linear_bwd", needs)
    grads = _backward_grads(grad_y, (x, t, B, weight, phi, psi), needs)
    return tuple(
        g if g is not None else x.new_empty(shape, dtype=dtype)
        for g, (shape, dtype) in zip(grads, rules.grad_shapes(x, weight, phi, psi, needs))
    )


gift_linear_bwd.register_fake(rules.make_bwd_fake("gift_linear_bwd"))
gift_linear_fwd.register_autograd(rules.make_backward(torch.ops.gift_kernels.gift_linear_bwd), setup_context=rules.setup_context)


def gift_linear_infer(x, weight, bias, phi, psi):
    """Eager forward when no grad is needed: the backend's ``gift_infer`` if it has one
    (free to re-associate, nothing is saved), else the forward launcher's y."""
    impl = backends.impl(x.device)
    infer = getattr(impl, "gift_infer", None)
    return infer(x, weight, bias, phi, psi) if infer is not None else impl.gift_fwd(x, weight, bias, phi, psi)[0]


class GiftLinearFunction(torch.autograd.Function):
    """Eager path: same launchers and backward as the op, without custom_op's overhead.

    Inputs must already be validated (``functional.gift_linear`` does it) and x 2-D.
    """

    @staticmethod
    def forward(ctx, x, weight, bias, phi, psi):
        y, t, B = _forward(x, weight, bias, phi, psi)
        ctx.save_for_backward(x, t, B, weight, phi, psi)
        return y

    @staticmethod
    def backward(ctx, grad_y):
        return _backward_grads(grad_y, ctx.saved_tensors, ctx.needs_input_grad)
