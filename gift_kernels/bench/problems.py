"""A benchmark problem: the inputs of one shape on one device.

Random (never zeros: they hide unwritten outputs and run faster than real data), drawn on
the device itself with a ``torch.Generator(device)`` (drawing 8192 x 14336 on the CPU and
copying took tens of seconds per shape on the GPU machine). Theta is float32 (master weights,
as a user keeps them) and non-trivial, so the GIFT term is O(1) beside the base term.

Decode timings replay several distinct weights (``n_weights``) from a CUDA graph: one weight
would be served from L2 after the first replay (see :func:`weights_beyond_l2`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import List, Optional

import torch

from .shapes import Shape

L2_BYTES_DEFAULT = 60 * 2**20  # H200 (50 MiB on an H100): used when the device does not say


@dataclass
class Inputs:
    """One set of layer inputs: what a provider's call reads."""

    x: torch.Tensor
    weight: torch.Tensor
    bias: Optional[torch.Tensor]
    phi: torch.Tensor
    psi: torch.Tensor
    grad_out: torch.Tensor


class Problem:
    """Inputs for ``shape``: x, grad_out and Theta once; ``n_weights`` distinct (W, b)."""

    def __init__(self, shape: Shape, dtype: torch.dtype, device, *, theta_dtype: torch.dtype = torch.float32,
                 seed: int = 0, n_weights: int = 1):
        device = torch.device(device)
        g = torch.Generator(device=device).manual_seed(seed)
        k, n, r = shape.d_in, shape.d_out, shape.r

        def rnd(*size, scale=1.0, dt=dtype):
            return torch.randn(*size, generator=g, device=device, dtype=dt).mul_(scale)

        self.shape, self.dtype, self.device = shape, dtype, device
        self.x = rnd(shape.m, k).requires_grad_(True)
        self.weights = [rnd(n, k, scale=k**-0.5) for _ in range(max(1, n_weights))]
        self.biases = [rnd(n) for _ in self.weights]
        self.phi = rnd(k, r, scale=k**-0.5, dt=theta_dtype).requires_grad_(True)
        self.psi = rnd(r, k, scale=k**-0.5, dt=theta_dtype).requires_grad_(True)
        self.grad_out = rnd(shape.m, n)

    @property
    def weight(self) -> torch.Tensor:
        return self.weights[0]

    @property
    def bias(self) -> torch.Tensor:
        return self.biases[0]

    def inputs(self, i: int = 0) -> Inputs:
        """The inputs with the ``i``-th weight (x, Theta and grad_out are shared)."""
        return Inputs(self.x, self.weights[i], self.biases[i], self.phi, self.psi, self.grad_out)

    def all_inputs(self) -> List[Inputs]:
        return [self.inputs(i) for i in range(len(self.weights))]

    def clear_grads(self) -> None:
        for t in (self.x, self.phi, self.psi):
            t.grad = None


def l2_bytes(device) -> int:
    device = torch.device(device)
    if device.type == "cuda":
        size = getattr(torch.cuda.get_device_properties(device), "L2_cache_size", 0)
        if size:
            return int(size)
    return L2_BYTES_DEFAULT


def weights_beyond_l2(shape: Shape, dtype: torch.dtype, l2: int, at_least: int = 4, at_most: int = 64) -> int:
    """How many distinct weights a replayed graph must cycle through so that each is evicted
    from L2 before it is read again: together at least twice the L2, and at least ``at_least``."""
    per = shape.d_in * shape.d_out * torch.finfo(dtype).bits // 8
    return max(at_least, min(at_most, math.ceil(2 * l2 / max(per, 1))))


def flops(shape: Shape) -> dict:
    """GIFT's FLOPs per call (epilogue form): forward, and forward + input and Theta grads."""
    m, n, k, r = shape.m, shape.d_out, shape.d_in, shape.r
    base = 2 * m * n * k
    return {"fwd": base + 2 * r * (m * k + n * k + m * n), "fwd+bwd": 2 * base + 2 * r * (3 * m * k + 3 * m * n + 2 * n * k)}


def min_bytes(shape: Shape, elem: int) -> dict:
    """The fewest bytes a call must move: x, W read and y written once (twice with backward)."""
    m, n, k = shape.m, shape.d_out, shape.d_in
    return {"fwd": elem * (m * k + n * k + m * n), "fwd+bwd": elem * 2 * (m * k + n * k + m * n)}
