"""The dtype rule of GIFT's rank-r path, shared by every backend and the op schemas."""

from __future__ import annotations

import torch

_NARROW = (torch.float16, torch.bfloat16)


def rank_dtype(x_dtype: torch.dtype, theta_dtype: torch.dtype) -> torch.dtype:
    """The dtype t = x psi^T and B = W phi are held in: float32 for 16-bit activations with a
    float32 (or wider) Theta, so the rank-r path cannot overflow fp16 where the merged layer
    would not; else x's dtype."""
    if x_dtype in _NARROW and theta_dtype.itemsize >= 4:
        return torch.float32
    return x_dtype


def wide_products(x: torch.Tensor, rd: torch.dtype) -> bool:
    """fp16 x with a float32 rank path: the torch paths run the skinny GEMMs in float32, so a
    large ``x psi^T`` or ``g B`` cannot overflow fp16 (bf16 has float32's range: its products
    stay in bf16 and only their M x r / N x r results are widened)."""
    return rd != x.dtype and x.dtype == torch.float16


def as_dtype(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``t`` in ``dtype``: itself when it already is (a Python comparison instead of a
    dispatched no-op ``.to``: the rank-r paths call this several times per step)."""
    return t if t.dtype == dtype else t.to(dtype)
