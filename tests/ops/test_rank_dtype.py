"""The rank-r path held in float32 (``gift_kernels.ops.dtypes.rank_dtype``) on the torch
backend: with fp16 activations and a float32 Theta, t = x psi^T may exceed fp16's range
where the merged layer's output does not. The Triton kernels (interpreted) and the CUDA
extension (emulated) are checked on the same inputs in tests/ops/test_triton.py and
tests/ops/test_cuda_kernels_emulated.py.
"""

from __future__ import annotations

import pytest
import torch

import gift_kernels
from gift_kernels.ops.input import torch as torch_input
from gift_kernels.ops.linear import torch as torch_backend
from gift_kernels.ops.dtypes import rank_dtype
from gift_testing import FP16_MAX, check_against_reference, overflow_inputs


@pytest.mark.parametrize("form", ["epilogue", "input"])
def test_fp16_rank_path_does_not_overflow_on_torch_backend(form):
    inputs = overflow_inputs()
    with gift_kernels.backend("torch"):
        check_against_reference(lambda *a: gift_kernels.gift_linear(*a, form=form), inputs, compute_dtype=torch.float16)
        assert gift_kernels.last_backend("cpu") == "torch"


def test_torch_launchers_hold_t_and_B_in_float32():
    inputs = {k: v.detach() for k, v in overflow_inputs().items()}
    x, w, b, phi, psi = (inputs[n] for n in ("x", "weight", "bias", "phi", "psi"))
    y, t, B = torch_backend.gift_fwd(x, w, b, phi, psi)
    assert y.dtype == torch.float16 and t.dtype == B.dtype == torch.float32
    assert torch.isfinite(y).all() and t.abs().max() > FP16_MAX
    u, t_in = torch_input.input_fwd(x, phi, psi)
    assert torch.isfinite(u).all() and t_in.dtype == torch.float32


@pytest.mark.parametrize("x_dtype, theta_dtype, want", [
    (torch.float16, torch.float32, torch.float32), (torch.bfloat16, torch.float32, torch.float32),
    (torch.bfloat16, torch.float64, torch.float32), (torch.float16, torch.float16, torch.float16),
    (torch.bfloat16, torch.bfloat16, torch.bfloat16), (torch.float32, torch.float32, torch.float32),
    (torch.float32, torch.bfloat16, torch.float32), (torch.float64, torch.float32, torch.float64),
])
def test_rank_dtype_rule(x_dtype, theta_dtype, want):
    assert rank_dtype(x_dtype, theta_dtype) == want
