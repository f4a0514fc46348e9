"""The input-side op's spec in plain PyTorch: written to be read, in float64, differentiable."""

from __future__ import annotations

import torch


def gift_input_ref(x: torch.Tensor, phi: torch.Tensor, psi: torch.Tensor) -> torch.Tensor:
    """The input-side spec: ``u = x (I + phi psi)^T``, literally, in float64 (differentiable)."""
    eye = torch.eye(x.shape[-1], dtype=torch.float64, device=x.device)
    return x.double() @ (eye + phi.double() @ psi.double()).t()
