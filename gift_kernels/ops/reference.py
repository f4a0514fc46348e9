"""Plain-PyTorch references: the spec the kernels are tested against, and the
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


def gift_input_ref(x: torch.Tensor, phi: torch.Tensor, psi: torch.Tensor) -> torch.Tensor:
    """The input-side spec: ``u = x (I + phi psi)^T``, literally, in float64 (differentiable)."""
    eye = torch.eye(x.shape[-1], dtype=torch.float64, device=x.device)
    return x.double() @ (eye + phi.double() @ psi.double()).t()


def gift_input_mixed_ref(x: torch.Tensor, phis: torch.Tensor, psis: torch.Tensor, adapter_ids: torch.Tensor) -> torch.Tensor:
    """The mixed-adapter spec, literally, in float64 (differentiable): row ``i`` of ``x (M, d_in)``
    becomes ``x_i (I + phi_a psi_a)^T`` with ``a = adapter_ids[i]``; ``a = -1`` leaves it as is."""
    d = x.shape[-1]
    eye = torch.eye(d, dtype=torch.float64, device=x.device)
    maps = eye + phis.double() @ psis.double()  # (A, d, d): I + phi_a psi_a
    maps = torch.cat([eye[None], maps])  # slot 0: the identity, for id -1
    per_row = maps[adapter_ids.reshape(-1) + 1]  # (M, d, d)
    x2 = x.double().reshape(-1, d)
    return torch.bmm(per_row, x2.unsqueeze(-1)).squeeze(-1).reshape(x.shape)


def gift_linear_mixed_ref(x, weight, bias, phis, psis, adapter_ids) -> torch.Tensor:
    """``F.linear(x_i, W (I + phi_a psi_a), b)`` per row, in float64."""
    b = None if bias is None else bias.double()
    return F.linear(gift_input_mixed_ref(x, phis, psis, adapter_ids), weight.double(), b)
