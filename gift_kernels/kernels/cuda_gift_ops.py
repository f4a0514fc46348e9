"""The Python side of the CUDA extension's ops, for any namespace that registers them.

The extension (``csrc/gift_ops.cpp``) registers ``<ns>::cuda_gift_linear_fwd`` and
``<ns>::cuda_gift_linear_bwd``: ``gift_kernels`` in the CUDA build, ``gift_kernels_emulated``
in the CPU emulation build the tests use. This module gives them fake implementations (for
torch.compile and ``torch.library.opcheck``) and autograd, and holds the launchers over an op
namespace, so the emulation runs the same launcher code as the real backend. It does not load
the extension (:mod:`gift_kernels.kernels.cuda_gift` does).
"""

from __future__ import annotations

from typing import List, Optional, Sequence, Tuple

import torch
from torch import Tensor

from .._checks import check_gift_args


def _check_needs(op: str, needs: Sequence[bool]) -> None:
    if len(needs) != 5:
        raise ValueError(f"{op}: needs must have 5 flags for (x, weight, bias, phi, psi), got {len(needs)}")


def register_python_parts(namespace: str) -> None:
    """Fake implementations and autograd for ``<namespace>::cuda_gift_linear_fwd`` / ``_bwd``.

    Called by :mod:`gift_kernels.kernels.cuda_gift` for ``gift_kernels``, and by the tests for
    the CPU emulation build's ``gift_kernels_emulated``.
    """
    fwd_name, bwd_name = f"{namespace}::cuda_gift_linear_fwd", f"{namespace}::cuda_gift_linear_bwd"

    @torch.library.register_fake(fwd_name)
    def _fwd_fake(x, weight, bias, phi, psi):
        check_gift_args(x, weight, bias, phi, psi, x_2d=True)
        m, n, r = x.shape[0], weight.shape[0], phi.shape[1]
        return x.new_empty(m, n), x.new_empty(m, r), x.new_empty(n, r)

    @torch.library.register_fake(bwd_name)
    def _bwd_fake(grad_y, x, t, B, weight, phi, psi, needs):
        _check_needs(bwd_name, needs)
        shapes = (x.shape, weight.shape, weight.shape[:1], phi.shape, psi.shape)
        dtypes = (x.dtype, x.dtype, x.dtype, phi.dtype, psi.dtype)
        return tuple(x.new_empty(s if n else (0,), dtype=d) for s, d, n in zip(shapes, dtypes, needs))

    bwd_op = getattr(getattr(torch.ops, namespace), "cuda_gift_linear_bwd")

    def _setup_context(ctx, inputs, output):
        x, weight, bias, phi, psi = inputs
        _, t, B = output
        ctx.save_for_backward(x, t, B, weight, phi, psi)
        ctx.mark_non_differentiable(t, B)

    def _backward(ctx, grad_y, _grad_t, _grad_B):
        x, t, B, weight, phi, psi = ctx.saved_tensors
        needs = list(ctx.needs_input_grad)
        grads = bwd_op(grad_y.contiguous(), x, t, B, weight, phi, psi, needs)
        return tuple(g if n else None for g, n in zip(grads, needs))

    torch.library.register_autograd(fwd_name, _backward, setup_context=_setup_context)



def fwd_with(ops, x: Tensor, weight: Tensor, bias: Optional[Tensor], phi: Tensor, psi: Tensor) -> Tuple[Tensor, Tensor, Tensor]:
    """The launcher over an op namespace (``torch.ops.gift_kernels`` or the emulation's)."""
    y, t, B = ops.cuda_gift_linear_fwd(x, weight, bias, phi, psi)
    return y, t, B


def bwd_with(ops, grad_y, x, t, B, weight, phi, psi, needs: Sequence[bool]) -> Tuple[Optional[Tensor], ...]:
    flags: List[bool] = [bool(n) for n in needs]
    grads = ops.cuda_gift_linear_bwd(grad_y, x, t, B, weight, phi, psi, flags)
    return tuple(g if n else None for g, n in zip(grads, flags))
