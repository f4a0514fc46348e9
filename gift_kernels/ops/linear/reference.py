"""The epilogue op's plain-PyTorch references: the spec the kernels are tested against, and the
authors' formulation the benchmarks compare with.

Nothing here is fast on purpose; it is written to be read.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F


def gift_weight_ref(weight: torch.Tensor, phi: torch.Tensor, psi: torch.Tensor) -> torch.Tensor:
    """``W_hat = W (I + phi psi)``, literally, in float64."""
    w = weight.double()
    eye = torch.eye(w.shape[1], dtype=torch.float64, device=w.device)
    return w @ (eye + phi.double() @ psi.double())


def gift_linear_ref(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: Optional[torch.Tensor],
    phi: torch.Tensor,
    psi: torch.Tensor,
) -> torch.Tensor:
    """The spec: ``F.linear(x, weight @ (I + phi @ psi), bias)`` computed in float64.

    Differentiable through autograd, so ``torch.autograd.grad`` of this function is the
    float64 reference for every gradient.
    """
    b = None if bias is None else bias.double()
    return F.linear(x.double(), gift_weight_ref(weight, phi, psi), b)


def gift_linear_authors(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: Optional[torch.Tensor],
    phi: torch.Tensor,
    psi: torch.Tensor,
) -> torch.Tensor:
    """The authors' formulation (savadikarc/gift), the baseline to beat.

    Every call builds the dense ``d_out x d_in`` residual ``delta = (W phi) psi`` and runs a
    second full GEMM with it; autograd then needs ``g^T x`` (a full d_out x d_in GEMM) to
    reach Theta.
    """
    dt = x.dtype
    delta = (weight @ phi.to(dt)) @ psi.to(dt)
    return F.linear(x, weight, bias) + F.linear(x, delta)
