"""The input-side form on the CUDA C++ extension: launchers over its kernels (``csrc/``).

The extension registers the kernels as C++ ops with the input-side op's schema
(``TORCH_LIBRARY`` in ``csrc/gift_ops.cpp``; ``gift_kernels`` in the CUDA build,
``gift_kernels_emulated`` in the CPU emulation build the tests use):

    cuda_gift_input_fwd(x, phi, psi) -> (u, t)
    cuda_gift_input_bwd(grad_u, x, t, phi, psi, needs) -> (dx, dphi, dpsi)

``u = x + (x psi^T) phi^T`` by the skinny kernel (t) and the epilogue kernel with x as its
addend; the backward by the skinny kernel (``dt = du phi``), the dx kernel (``du + dt psi`` and
the ``dpsi`` partials) and the db kernel (the ``dphi = du^T t`` partials); every reduction over M
is split into per-block float32 partials summed in a fixed order (deterministic). They are
kernels called from inside the package's registered op (:mod:`gift_kernels.ops.input.op`, which
owns the autograd rule); they get the op's own fake implementations (:mod:`gift_kernels.ops.input`)
so that meta tensors and ``opcheck`` work on them too.
"""

from __future__ import annotations

from typing import List, Optional, Sequence, Tuple

import torch
from torch import Tensor

from . import bwd_fake, fwd_fake


def register_fakes(namespace: str) -> None:
    """The contract's fake implementations on ``<namespace>::cuda_gift_input_fwd`` / ``_bwd``."""
    torch.library.register_fake(f"{namespace}::cuda_gift_input_fwd")(fwd_fake)
    torch.library.register_fake(f"{namespace}::cuda_gift_input_bwd")(bwd_fake)


def input_fwd_with(ops, x: Tensor, phi: Tensor, psi: Tensor) -> Tuple[Tensor, Tensor]:
    """The forward launcher over an op namespace (``torch.ops.gift_kernels`` or the emulation's)."""
    u, t = ops.cuda_gift_input_fwd(x, phi, psi)
    return u, t


def input_bwd_with(ops, grad_u, x, t, phi, psi, needs: Sequence[bool]) -> Tuple[Optional[Tensor], ...]:
    """The backward launcher over an op namespace; None where a grad is not needed."""
    flags: List[bool] = [bool(n) for n in needs]
    grads = ops.cuda_gift_input_bwd(grad_u, x, t, phi, psi, flags)
    return tuple(g if n else None for g, n in zip(grads, flags))


def input_fwd(x: Tensor, phi: Tensor, psi: Tensor) -> Tuple[Tensor, Tensor]:
    """``(u, t)`` on 2-D ``x (M, K)``; ``t`` is saved for backward."""
    return input_fwd_with(torch.ops.gift_kernels, x, phi, psi)


def input_bwd(grad_u: Tensor, x: Tensor, t: Tensor, phi: Tensor, psi: Tensor,
              needs: Tuple[bool, bool, bool]) -> Tuple[Optional[Tensor], ...]:
    """``(dx, dphi, dpsi)``; ``needs`` = which of (x, phi, psi) want a gradient, None where not."""
    return input_bwd_with(torch.ops.gift_kernels, grad_u, x, t, phi, psi, needs)


try:  # the plan loads the extension before it imports these launchers; the emulation tests import them without it
    from ..cuda import extension  # noqa: F401
except ImportError:
    pass
else:
    register_fakes("gift_kernels")
