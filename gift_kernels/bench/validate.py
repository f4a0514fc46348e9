"""Correctness before speed: each row's output and gradients against a reference computed on
the device, and the one tolerance table per dtype (the test suite imports it from here).

Errors are ``max|out - ref| / max|ref|``. The reference runs in float64 on the CPU and for
small problems, else in float32 on the device (TF32 off; float64 GEMMs of the GPU shapes
would cost more than the timings). A row whose error exceeds the tolerance of its dtype, whose
gradient is missing, or whose backends differ from its label is *wrong*: it is reported with
its errors and timed no further, and no target reads it.
"""

from __future__ import annotations

import contextlib
import math
from typing import Dict, Optional, Tuple

import torch

from .problems import Inputs
from .providers import Provider, backend_mismatch, step

# relative (to max |ref|) error allowed against the float64 reference, per compute dtype: six
# unit roundoffs for the 16-bit dtypes (fp16 2^-11, bf16 2^-9), the longest rounding chain in
# GIFT (Theta cast, t, B, the base GEMM, the in-place add; or t, g^T t, W^T dB for dphi) at
# M = N = K = 1, where no averaging helps. At the test suite's sizes the torch backend measures
# 1.2-1.7x PyTorch's own same-dtype F.linear error (fp32 ~2.7e-7, fp16 ~3.6e-4, bf16 ~2.8e-3).
TOL: Dict[torch.dtype, float] = {
    torch.float64: 1e-12,
    torch.float32: 1e-5,
    torch.float16: 6 * 2.0**-11,
    torch.bfloat16: 6 * 2.0**-9,
}

SMALL = 2**27  # M * N * K up to which the device reference runs in float64


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    """``max|out - ref| / max|ref|`` in the reference's precision (0 for empty tensors; NaN
    and inf stay NaN / inf, so they never pass a tolerance)."""
    if ref.numel() == 0:
        return 0.0
    wide = ref.dtype if ref.dtype in (torch.float64, torch.float32) else torch.float64
    ref = ref.to(wide)
    denom = ref.abs().max().item()
    return (out.to(wide) - ref).abs().max().item() / max(denom, 1e-30)


def reference_dtype(inp: Inputs) -> torch.dtype:
    m, k = inp.x.shape
    n = inp.weight.shape[0]
    if inp.x.device.type == "cpu" or m * n * k <= SMALL or inp.x.dtype == torch.float64:
        return torch.float64
    return torch.float32


def _leaf(t: Optional[torch.Tensor], dt: torch.dtype, grad: bool = True) -> Optional[torch.Tensor]:
    return None if t is None else t.detach().to(dt).requires_grad_(grad)


@contextlib.contextmanager
def _no_tf32():
    """float32 references in full float32 (TF32 would miss fp32's own tolerance)."""
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


def reference(prov: Provider, inp: Inputs, dt: torch.dtype) -> Tuple[torch.Tensor, Dict[str, torch.Tensor]]:
    """The output and the grads of ``prov.leaves`` that ``prov.kind`` must produce, in ``dt``.

    gift: ``F.linear(x, W (I + phi psi), b)`` with ``W (I + phi psi)`` formed as
    ``W + (W phi) psi`` (the same matrix without a d_in x d_in identity); frozen: ``x W^T + b``;
    lora: ``x W^T + b + scale (x A^T) B^T``.
    """
    x, w, b = _leaf(inp.x, dt), _leaf(inp.weight, dt, False), _leaf(inp.bias, dt, False)
    leaves = {"x": x}
    with _no_tf32(), torch.enable_grad():
        if prov.kind == "frozen":
            y = torch.nn.functional.linear(x, w, b)
        elif prov.kind == "gift":
            phi, psi = _leaf(inp.phi, dt), _leaf(inp.psi, dt)
            leaves.update(phi=phi, psi=psi)
            y = torch.nn.functional.linear(x, w + (w @ phi) @ psi, b)
        elif prov.kind == "lora":
            a, bb, scale = prov.lora
            a, bb = _leaf(a, dt), _leaf(bb, dt)
            leaves.update(lora_A=a, lora_B=bb)
            y = torch.nn.functional.linear(x, w, b) + scale * (x @ a.t()) @ bb.t()
        else:
            raise ValueError(f"validate.reference: unknown provider kind {prov.kind!r} of {prov.name}")
        names = list(leaves)
        grads = torch.autograd.grad(y, [leaves[n] for n in names], inp.grad_out.to(dt))
    return y.detach(), dict(zip(names, grads))


class References:
    """The references of one problem, computed once per kind (every GIFT row shares one)."""

    def __init__(self):
        self._cache: Dict[str, Tuple[torch.Tensor, Dict[str, torch.Tensor]]] = {}

    def get(self, prov: Provider, inp: Inputs, dt: torch.dtype):
        key = prov.kind if prov.kind != "lora" else f"lora:{prov.name}"
        if key not in self._cache:
            self._cache[key] = reference(prov, inp, dt)
        return self._cache[key]


def check(prov: Provider, inp: Inputs, refs: References) -> dict:
    """Run ``prov`` forward and backward once (inside its context) and compare with the
    reference. Returns the row's validation fields: ``backend_fwd``, ``backend_bwd``,
    ``errors`` (per tensor), ``tol``, ``valid`` and, when not valid, ``why``."""
    leaves = prov.leaves(inp)
    for t in leaves.values():
        t.grad = None
    res = step(prov, inp)
    out = {"backend_fwd": res.backend_fwd, "backend_bwd": res.backend_bwd}
    dt = reference_dtype(inp)
    y_ref, grads_ref = refs.get(prov, inp, dt)
    tol = TOL[inp.x.dtype]
    errors = {"y": rel_err(res.y.detach(), y_ref)}
    why = []
    if res.y.dtype != inp.x.dtype:
        why.append(f"output dtype {res.y.dtype} != x dtype {inp.x.dtype}")
    for name, t in leaves.items():
        if t.grad is None:
            why.append(f"no gradient for {name}")
            errors[name] = math.inf
        else:
            errors[name] = rel_err(t.grad, grads_ref[name])
    bad = [f"{n} error {e:.2e}" for n, e in errors.items() if not e <= tol]  # NaN fails too
    if bad:
        why.append(", ".join(bad) + f" > tolerance {tol:.1e} ({str(inp.x.dtype).replace('torch.', '')})")
    mismatch = backend_mismatch(prov, res)
    if mismatch:
        why.append(mismatch)
    out.update(errors=errors, tol=tol, reference=str(dt).replace("torch.", ""), valid=not why)
    if why:
        out["why"] = "; ".join(why)
    for t in leaves.values():
        t.grad = None
    return out
