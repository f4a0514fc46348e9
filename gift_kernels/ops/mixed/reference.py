"""The mixed-adapter op's spec in plain PyTorch: written to be read, in float64, differentiable."""

from __future__ import annotations

import torch
import torch.nn.functional as F


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
