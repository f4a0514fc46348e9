"""The functional API: ``gift_linear(x, weight, bias, phi, psi)``."""

from __future__ import annotations

import math
from typing import Optional

import torch
from torch import Tensor

from . import ops  # registers torch.ops.gift_kernels.*
from ._checks import check_gift_args


def _autocast(x: Tensor, weight: Tensor, bias: Optional[Tensor]):
    """Apply torch.autocast's rule for linear layers: x, W, b in the autocast dtype.

    A custom op is opaque to autocast, so the cast happens here. Theta is left in its own
    dtype (float32 master weights); the kernels cast it and return its grads in it.
    """
    if not isinstance(x, Tensor):
        return x, weight, bias
    dev = x.device.type
    if not torch.is_autocast_enabled(dev):
        return x, weight, bias
    dt = torch.get_autocast_dtype(dev)

    def cast(t):
        ok = isinstance(t, Tensor) and t.is_floating_point() and t.dtype != torch.float64
        return t.to(dt) if ok else t

    return cast(x), cast(weight), cast(bias)


def gift_linear(
    x: Tensor,
    weight: Tensor,
    bias: Optional[Tensor],
    phi: Tensor,
    psi: Tensor,
) -> Tensor:
    """``F.linear(x, weight @ (I + phi @ psi), bias)`` without forming ``phi @ psi``.

    Args:
        x: ``(..., d_in)`` activations, any leading shape.
        weight: ``(d_out, d_in)`` frozen (or trainable) weight, same dtype as ``x``.
        bias: ``(d_out,)`` or None.
        phi: ``(d_in, r)`` and psi: ``(r, d_in)``, GIFT's Theta; may be a wider dtype than
            ``x`` (e.g. float32 Theta with bf16 activations).

    Returns ``(..., d_out)`` in ``x``'s dtype. Differentiable in every floating input that
    requires grad; Theta's grads come back in Theta's dtype.
    """
    x, weight, bias = _autocast(x, weight, bias)
    check_gift_args(x, weight, bias, phi, psi)
    d_out, d_in = weight.shape
    lead = x.shape[:-1]
    x2 = x.reshape(math.prod(lead), d_in)  # not -1: d_in may be 0
    if torch.compiler.is_compiling():  # the registered op: no graph break, a fake impl to trace
        y = torch.ops.gift_kernels.gift_linear_fwd(x2, weight, bias, phi, psi)[0]
    elif torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (x2, weight, bias, phi, psi)):
        y = ops.GiftLinearFunction.apply(x2, weight, bias, phi, psi)  # eager: less overhead than the op
    else:  # inference: nothing to save, the backend may re-associate (no B = W phi at decode)
        y = ops.gift_linear_infer(x2, weight, bias, phi, psi)
    return y.view(*lead, d_out)
