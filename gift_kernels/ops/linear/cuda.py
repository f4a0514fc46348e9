"""The epilogue form on the CUDA C++ extension: launchers over its kernels (``csrc/``).

The extension registers the kernels as C++ ops with the epilogue op's schema
(``TORCH_LIBRARY`` in ``csrc/gift_ops.cpp``; ``gift_kernels`` in the CUDA build,
``gift_kernels_emulated`` in the CPU emulation build the tests use):

    cuda_gift_linear_fwd(x, weight, bias?, phi, psi) -> (y, t, B)
    cuda_gift_linear_bwd(grad_y, x, t, B, weight, phi, psi, needs) -> (dx, dW, db, dphi, dpsi)

They are kernels called from inside the package's registered op (:mod:`gift_kernels.ops.linear.op`,
which owns the autograd rule): no autograd is registered for them. They get the op's own fake
implementations (:mod:`gift_kernels.ops.linear`, the one statement of the contract) so that
meta tensors and ``opcheck`` work on them too. :func:`fwd_with` / :func:`bwd_with` take the op
namespace, so the emulation runs this same launcher code.
"""

from __future__ import annotations

from typing import List, Optional, Sequence, Tuple

import torch
from torch import Tensor

from . import bwd_fake, fwd_fake


def register_fakes(namespace: str) -> None:
    """The contract's fake implementations on ``<namespace>::cuda_gift_linear_fwd`` / ``_bwd``
    (``gift_kernels`` here; the tests' emulation build registers ``gift_kernels_emulated``)."""
    torch.library.register_fake(f"{namespace}::cuda_gift_linear_fwd")(fwd_fake)
    torch.library.register_fake(f"{namespace}::cuda_gift_linear_bwd")(bwd_fake)


def fwd_with(ops, x: Tensor, weight: Tensor, bias: Optional[Tensor], phi: Tensor, psi: Tensor) -> Tuple[Tensor, Tensor, Tensor]:
    """The forward launcher over an op namespace (``torch.ops.gift_kernels`` or the emulation's)."""
    y, t, B = ops.cuda_gift_linear_fwd(x, weight, bias, phi, psi)
    return y, t, B


def bwd_with(ops, grad_y, x, t, B, weight, phi, psi, needs: Sequence[bool]) -> Tuple[Optional[Tensor], ...]:
    """The backward launcher over an op namespace; None where a grad is not needed."""
    flags: List[bool] = [bool(n) for n in needs]
    grads = ops.cuda_gift_linear_bwd(grad_y, x, t, B, weight, phi, psi, flags)
    return tuple(g if n else None for g, n in zip(grads, flags))


def gift_fwd(x: Tensor, weight: Tensor, bias: Optional[Tensor], phi: Tensor, psi: Tensor) -> Tuple[Tensor, Tensor, Tensor]:
    """Forward on 2-D ``x (M, K)``. Returns ``(y, t, B)``; ``t`` and ``B`` are saved for backward."""
    return fwd_with(torch.ops.gift_kernels, x, weight, bias, phi, psi)


def gift_bwd(grad_y: Tensor, x: Tensor, t: Tensor, B: Tensor, weight: Tensor, phi: Tensor, psi: Tensor,
             needs: Tuple[bool, bool, bool, bool, bool]) -> Tuple[Optional[Tensor], ...]:
    """Backward. ``needs`` = which of (x, weight, bias, phi, psi) want a gradient; ``None`` where not."""
    return bwd_with(torch.ops.gift_kernels, grad_y, x, t, B, weight, phi, psi, needs)


def _load() -> bool:
    """Whether the extension is loaded (the plan loads it, :mod:`gift_kernels.ops.cuda.extension`,
    before it imports these launchers; the emulation tests import them without it)."""
    try:
        from ..cuda import extension  # noqa: F401
    except ImportError:
        return False
    return True


if _load():
    register_fakes("gift_kernels")
