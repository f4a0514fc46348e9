"""Shared helpers for the test suite: input factories, the float64 reference gradients and
the checks against them.

Tolerances compare ``max|out - ref| / max|ref|`` against the float64 reference, with the one
tolerance table per dtype, ``TOL``, and ``rel_err``, both owned by
:mod:`gift_kernels.bench.validate` (the benchmark validates every row with the same table;
the reasons for each entry are written there).
"""

from __future__ import annotations

import math
from typing import Optional, Sequence

import torch
from torch import nn

from gift_kernels.bench.validate import TOL, rel_err  # noqa: F401  (re-exported for the tests)
from gift_kernels.ops import gift_linear_ref

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


FP16_MAX = torch.finfo(torch.float16).max


def overflow_inputs(m: int = 24, n: int = 20, k: int = 40, r: int = 4, *, seed: int = 0, train_base: bool = True):
    """fp16 x with a float32 Theta for which t = x psi^T exceeds fp16's range (psi large, phi
    small, phi psi O(1)) while the merged layer's output and every gradient stay well inside
    it: an fp16 rank path gives inf / nan, a float32 one (``rank_dtype``) the reference."""
    inputs = make_inputs(m, n, k, r, dtype=torch.float16, theta_dtype=torch.float32, seed=seed, train_base=train_base)
    with torch.no_grad():
        inputs["x"].mul_(8)  # exact in fp16
        inputs["psi"].mul_(1e4)
        inputs["phi"].mul_(1e-2)  # stays a normal fp16 number where kernels round it to x's dtype
    t = inputs["x"].double() @ inputs["psi"].double().t()
    assert t.abs().max().item() > 2 * FP16_MAX, "overflow_inputs: t does not exceed fp16's range"
    return inputs


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


class Wrapped(nn.Module):
    """A root that calls its body: how an ``nn.Sequential`` is adapted (a Sequential root cannot
    hold the Theta store, its forward would call it)."""

    def __init__(self, body: nn.Module):
        super().__init__()
        self.body = body

    def forward(self, x):
        return self.body(x)


def exact_bf16_dot_in_interpreter() -> None:
    """Patch the Triton interpreter (in the calling test process only, one run with
    ``TRITON_INTERPRET=1``) so that ``tl.dot`` on bf16 operands multiplies their values, not
    their uint16 storage (the interpreter's bug): each bf16 operand is widened to float32 by
    its bits (bf16 is float32's upper half: exact for every pattern, subnormals included) before
    numpy's matmul, as a tensor core multiplies bf16 into a float32 accumulator. Everything else
    runs through the interpreter unchanged; note that its casts to bf16 truncate where a GPU
    rounds to nearest even (one ulp, within the bf16 tolerance: the interpreted tests cannot
    tell the rounding modes apart). Idempotent."""
    import numpy as np
    import triton.language as tl
    from triton.runtime import interpreter

    dot = interpreter.InterpreterBuilder.create_dot
    if getattr(dot, "exact_bf16", False):
        return

    def widened(h):
        if h.dtype.scalar != tl.bfloat16:
            return h
        data = (h.data.astype(np.uint32) << np.uint32(16)).view(np.float32)
        return interpreter.TensorHandle(data, tl.float32)

    def create_dot(self, a, b, d, input_precision, max_num_imprecise_acc):
        return dot(self, widened(a), widened(b), d, input_precision, max_num_imprecise_acc)

    create_dot.exact_bf16 = True
    interpreter.InterpreterBuilder.create_dot = create_dot
