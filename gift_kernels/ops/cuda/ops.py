"""The Python side of the CUDA extension's ops, for any namespace that registers them.

The extension (``csrc/gift_ops.cpp``) registers ``<ns>::cuda_gift_linear_fwd`` /
``<ns>::cuda_gift_linear_bwd`` and the input-side ``<ns>::cuda_gift_input_fwd`` /
``<ns>::cuda_gift_input_bwd``: ``gift_kernels`` in the CUDA build, ``gift_kernels_emulated``
in the CPU emulation build the tests use. This module gives them fake implementations (for
torch.compile and ``torch.library.opcheck``) and autograd, and holds the launchers over an op
namespace, so the emulation runs the same launcher code as the real backend. It does not load
the extension (:mod:`gift_kernels.ops.cuda.backend` does).
"""

from __future__ import annotations

from typing import List, Optional, Sequence, Tuple

import torch
from torch import Tensor

from .. import schema as rules


def register_python_parts(namespace: str) -> None:
    """Fake implementations and autograd for ``<namespace>::cuda_gift_linear_fwd`` / ``_bwd``:
    the same rules as the Python ops (:mod:`gift_kernels.ops.schema`).

    Called by :mod:`gift_kernels.ops.cuda.backend` for ``gift_kernels``, and by the tests for
    the CPU emulation build's ``gift_kernels_emulated``.
    """
    fwd_name, bwd_name = f"{namespace}::cuda_gift_linear_fwd", f"{namespace}::cuda_gift_linear_bwd"
    torch.library.register_fake(fwd_name)(rules.fwd_fake)
    torch.library.register_fake(bwd_name)(rules.make_bwd_fake(bwd_name))
    bwd_op = getattr(getattr(torch.ops, namespace), "cuda_gift_linear_bwd")
    torch.library.register_autograd(fwd_name, rules.make_backward(bwd_op), setup_context=rules.setup_context)
    in_fwd, in_bwd = f"{namespace}::cuda_gift_input_fwd", f"{namespace}::cuda_gift_input_bwd"
    torch.library.register_fake(in_fwd)(rules.input_fwd_fake)
    torch.library.register_fake(in_bwd)(rules.input_bwd_fake)
    in_bwd_op = getattr(getattr(torch.ops, namespace), "cuda_gift_input_bwd")
    torch.library.register_autograd(in_fwd, rules.make_input_backward(in_bwd_op),
                                    setup_context=rules.input_setup_context)


def fwd_with(ops, x: Tensor, weight: Tensor, bias: Optional[Tensor], phi: Tensor, psi: Tensor) -> Tuple[Tensor, Tensor, Tensor]:
    """The launcher over an op namespace (``torch.ops.gift_kernels`` or the emulation's)."""
    y, t, B = ops.cuda_gift_linear_fwd(x, weight, bias, phi, psi)
    return y, t, B


def bwd_with(ops, grad_y, x, t, B, weight, phi, psi, needs: Sequence[bool]) -> Tuple[Optional[Tensor], ...]:
    flags: List[bool] = [bool(n) for n in needs]
    grads = ops.cuda_gift_linear_bwd(grad_y, x, t, B, weight, phi, psi, flags)
    return tuple(g if n else None for g, n in zip(grads, flags))


def input_fwd_with(ops, x: Tensor, phi: Tensor, psi: Tensor) -> Tuple[Tensor, Tensor]:
    """``(u, t)`` of the input-side form over an op namespace."""
    u, t = ops.cuda_gift_input_fwd(x, phi, psi)
    return u, t


def input_bwd_with(ops, grad_u, x, t, phi, psi, needs: Sequence[bool]) -> Tuple[Optional[Tensor], ...]:
    flags: List[bool] = [bool(n) for n in needs]
    grads = ops.cuda_gift_input_bwd(grad_u, x, t, phi, psi, flags)
    return tuple(g if n else None for g, n in zip(grads, flags))
