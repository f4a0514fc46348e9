"""Shared helpers for the test suite: input factories, the float64 reference gradients and
the one tolerance table per dtype.

Tolerances compare ``max|out - ref| / max|ref|`` against the float64 reference. The
low-precision entries are six unit roundoffs of the dtype (fp16 2^-11, bf16 2^-9): the
longest rounding chain in GIFT (Theta cast, t, B, the base GEMM, the in-place add; or
t, g^T t, W^T dB for dphi) can stack that many at M = N = K = 1, where no averaging
helps. At the larger test sizes the torch backend measures 1.2-1.7x PyTorch's own
same-dtype ``F.linear`` error (fp32 ~2.7e-7, fp16 ~3.6e-4, bf16 ~2.8e-3 for F.linear).
"""

from __future__ import annotations

import math
from typing import Dict, Optional, Sequence

import torch

from gift_kernels.ops.reference import gift_linear_ref

# relative (to max |ref|) error allowed against the float64 reference, per compute dtype
TOL: Dict[torch.dtype, float] = {
    torch.float64: 1e-12,
    torch.float32: 1e-5,
    torch.float16: 6 * 2.0**-11,
    torch.bfloat16: 6 * 2.0**-9,
}

GRAD_NAMES = ("x", "weight", "bias", "phi", "psi")


def make_inputs(
    m: int,
    n: int,
    k: int,
    r: int,
    *,
    dtype: torch.dtype = torch.float32,
    theta_dtype: Optional[torch.dtype] = None,
    bias: bool = True,
    seed: int = 0,
    device: str = "cpu",
    lead: Sequence[int] = (),
    train_base: bool = False,
):
    """Random GIFT inputs scaled so that the base term and the GIFT term are both O(1).

    Returns a dict x, weight, bias, phi, psi (leaves that require grad where trainable).
    ``lead`` gives extra leading dims for x: shape (*lead, m, k).
    """
    g = torch.Generator().manual_seed(seed)
    theta_dtype = theta_dtype or dtype

    def rnd(*shape, scale=1.0, dt=dtype, grad=False):
        t = (torch.randn(*shape, generator=g, dtype=torch.float64) * scale).to(device=device, dtype=dt)
        return t.requires_grad_(grad)

    s = k ** -0.5
    return {
        "x": rnd(*lead, m, k, grad=True),
        "weight": rnd(n, k, scale=s, grad=train_base),
        "bias": rnd(n, grad=train_base) if bias else None,
        "phi": rnd(k, r, scale=s, dt=theta_dtype, grad=True),
        "psi": rnd(r, k, scale=s, dt=theta_dtype, grad=True),
    }


def leaves(inputs: dict):
    """(name, tensor) of the inputs that require grad, in GRAD_NAMES order."""
    return [(n, inputs[n]) for n in GRAD_NAMES if inputs[n] is not None and inputs[n].requires_grad]


def reference(inputs: dict, grad_out: torch.Tensor):
    """float64 output and grads of every trainable input, from the formula W (I + phi psi)."""
    ref_in = {n: (None if t is None else t.detach().double().requires_grad_(t.requires_grad)) for n, t in inputs.items()}
    y = gift_linear_ref(ref_in["x"], ref_in["weight"], ref_in["bias"], ref_in["phi"], ref_in["psi"])
    names = [n for n, _ in leaves(ref_in)]
    grads = torch.autograd.grad(y, [ref_in[n] for n in names], grad_out.double())
    return y.detach(), dict(zip(names, grads))


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    ref = ref.double()
    denom = ref.abs().max().item() if ref.numel() else 1.0
    if ref.numel() == 0:
        return 0.0
    return (out.double() - ref).abs().max().item() / max(denom, 1e-30)


def assert_close_to_ref(out: torch.Tensor, ref: torch.Tensor, dtype: torch.dtype, what: str) -> None:
    assert out.shape == ref.shape, f"{what}: shape {tuple(out.shape)} != reference {tuple(ref.shape)}"
    err = rel_err(out, ref)
    assert err <= TOL[dtype], f"{what}: relative error {err:.3e} > tolerance {TOL[dtype]:.1e} for {dtype}"


def check_against_reference(fn, inputs: dict, *, compute_dtype: torch.dtype, seed: int = 1) -> None:
    """Run ``fn(x, weight, bias, phi, psi)`` forward and backward and compare output and every
    gradient with the float64 reference. Also checks dtypes: output in x's dtype, each grad
    in its parameter's dtype."""
    y = fn(inputs["x"], inputs["weight"], inputs["bias"], inputs["phi"], inputs["psi"])
    assert y.dtype == inputs["x"].dtype, f"output dtype {y.dtype} != x dtype {inputs['x'].dtype}"
    g = torch.Generator().manual_seed(seed)
    grad_out = torch.randn(y.shape, generator=g, dtype=torch.float64).to(y.dtype).to(y.device)
    y_ref, grads_ref = reference(inputs, grad_out)
    assert_close_to_ref(y, y_ref, compute_dtype, "output")
    names = [n for n, _ in leaves(inputs)]
    grads = torch.autograd.grad(y, [inputs[n] for n in names], grad_out)
    for name, grad in zip(names, grads):
        assert grad.dtype == inputs[name].dtype, f"grad of {name}: dtype {grad.dtype} != {inputs[name].dtype}"
        assert_close_to_ref(grad, grads_ref[name], compute_dtype, f"grad of {name}")


def randomize_thetas(thetas, seed: int = 1) -> None:
    """Fill every Theta parameter of ``thetas`` (a ModuleDict) with N(0, 1/d_in): a trained-looking adapter."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for theta in thetas.values():
            for p in theta.parameters():
                p.copy_(torch.randn(p.shape, generator=g, dtype=torch.float64) / math.sqrt(theta.in_features))
