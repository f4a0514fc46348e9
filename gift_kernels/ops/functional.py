"""The functional API: ``gift_linear`` (a dense layer adapted with GIFT), ``gift_input``
(the input-side transform ``u = x + (x psi^T) phi^T`` for any base layer), and their
mixed-adapter forms ``gift_linear_mixed`` / ``gift_input_mixed`` (one adapter of a bank per row).

This is the public boundary of the op layer: inputs are validated here, once per kind of call
(a call whose validated signature and plan key were seen before is found by
:func:`gift_kernels.ops.plan.known`, checks skipped: they depend on nothing else); the plan
(:mod:`gift_kernels.ops.plan`) is asked once per call, and the call runs through the registered
op (under ``torch.compile``) or the eager autograd Function, which carries the plan to backward.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from . import plan as plans
from .checks import (check_base_args, check_gift_args, check_input_args, check_mixed_args, flat, gift_signature,
                     input_signature, unflat)
from .input.op import GiftInputFunction, GiftInputLinearFunction
from .linear.op import GiftLinearFunction
from .mixed.op import GiftMixedFunction
from .plan import FORMS

_AUTOCAST_DEVICES = ("cpu", "cuda", "xpu", "mps", "hpu", "mtia", "maia")


def _autocast(x: Tensor, weight: Optional[Tensor], bias: Optional[Tensor]):
    """Apply torch.autocast's rule for linear layers: x, W, b in the autocast dtype.

    A custom op is opaque to autocast, so the cast happens here. Theta is left in its own
    dtype (float32 master weights); the kernels cast it and return its grads in it. Devices
    autocast does not know (``meta``) are left alone.
    """
    if not torch._C._is_any_autocast_enabled():  # the common case, without building a device object
        return x, weight, bias
    if not isinstance(x, Tensor) or x.device.type not in _AUTOCAST_DEVICES:
        return x, weight, bias
    dev = x.device.type
    if not torch.is_autocast_enabled(dev):
        return x, weight, bias
    dt = torch.get_autocast_dtype(dev)

    def cast(t):
        ok = isinstance(t, Tensor) and t.is_floating_point() and t.dtype != torch.float64
        return t.to(dt) if ok else t

    return cast(x), cast(weight), cast(bias)


def _needs_grad(*tensors) -> bool:
    if not torch.is_grad_enabled():
        return False
    for t in tensors:  # a loop, not any(generator): this runs on every call
        if t is not None and t.requires_grad:
            return True
    return False


def gift_input(x: Tensor, phi: Tensor, psi: Tensor) -> Tensor:
    """``u = x + (x psi^T) phi^T = x (I + phi psi)^T``: GIFT on the input side.

    ``base(gift_input(x, phi, psi))`` equals a base layer with weight ``W (I + phi psi)`` for
    any base that is linear in its input (dense, quantized, another library's), and never
    reads W. ``x``: ``(..., d_in)``; ``phi``: ``(d_in, r)``; ``psi``: ``(r, d_in)``, possibly
    wider than ``x`` (float32 Theta with 16-bit activations: the rank-r path then runs and is
    held in float32). Returns ``u`` like ``x``. Autograd keeps x and ``t = x psi^T`` (M x r).
    Under autocast, x is cast like a linear layer's input.
    """
    x, _, _ = _autocast(x, None, None)
    if torch.compiler.is_compiling():
        check_input_args(x, phi, psi)
        return torch.ops.gift_kernels.gift_input_fwd(flat(x), phi, psi)[0].view(x.shape)
    sig = input_signature(x, phi, psi)
    if sig is None:  # not tensors, or a 0-d x: refused by the checks
        check_input_args(x, phi, psi)
    training = _needs_grad(x, phi, psi)
    d_in = x.shape[-1]
    plan = plans.known("gift_input", sig, x, d_in, training=training)
    if plan is None:  # a kind of call not seen yet: checked once, then decided
        check_input_args(x, phi, psi)
        plan = plans.choose("gift_input", x, d_in, phi, training=training, signature=sig)
    if training:
        return GiftInputFunction.apply(x, phi, psi, plan)
    return unflat(plan.fwd(flat(x), phi, psi)[0], x)


def gift_linear(
    x: Tensor,
    weight: Tensor,
    bias: Optional[Tensor],
    phi: Tensor,
    psi: Tensor,
    *,
    form: str = "auto",
) -> Tensor:
    """``F.linear(x, weight @ (I + phi @ psi), bias)`` without forming ``phi @ psi``.

    Args:
        x: ``(..., d_in)`` activations, any leading shape.
        weight: ``(d_out, d_in)`` frozen (or trainable) weight, same dtype as ``x``.
        bias: ``(d_out,)`` or None.
        phi: ``(d_in, r)`` and psi: ``(r, d_in)``, GIFT's Theta; may be a wider dtype than
            ``x`` (e.g. float32 Theta with bf16 activations).
        form: ``"epilogue"`` (``x W^T + (x psi^T)(W phi)^T``), ``"input"``
            (``F.linear(x + (x psi^T) phi^T, W, b)``: never reads W for GIFT; on CUDA the GEMM
            is cuBLAS's) or ``"auto"``: the plan's form rule (:mod:`gift_kernels.ops.plan`: fp16
            activations take the epilogue, which cannot overflow where the merged layer is
            finite; CPU picks by cost; CUDA by measurement, the first call of a kind). An
            explicit form is honoured, with or without grad. Both forms give the same values up
            to rounding.

    Returns ``(..., d_out)`` in ``x``'s dtype. Differentiable in every floating input that
    requires grad; Theta's grads come back in Theta's dtype.
    """
    if form not in FORMS:
        raise ValueError(f"gift_linear: form must be one of {FORMS}, got {form!r}")
    x, weight, bias = _autocast(x, weight, bias)
    if torch.compiler.is_compiling():  # the registered ops: no graph break, fake impls to trace
        check_gift_args(x, weight, bias, phi, psi)
        return _traced_linear(x, weight, bias, phi, psi, form)
    sig = gift_signature(x, weight, bias, phi, psi)
    if sig is None:  # not tensors, or a 0-d x: refused by the checks
        check_gift_args(x, weight, bias, phi, psi)
    d_out = weight.shape[0]
    training = _needs_grad(x, weight, bias, phi, psi)
    plan = plans.known("gift_linear", sig, x, d_out, training=training, form=form)
    if plan is None:  # a kind of call not seen yet: checked once, then decided (timed on CUDA under auto)
        check_gift_args(x, weight, bias, phi, psi)
        trial = (lambda p: _trial(p, flat(x), weight, bias, phi, psi, training)) if form == "auto" else None
        plan = plans.choose("gift_linear", x, d_out, phi, training=training, form=form, trial=trial, signature=sig)
    if training:  # one autograd node either way (the input side's base GEMM inside it)
        fn = GiftInputLinearFunction if plan.form == "input" else GiftLinearFunction
        return fn.apply(x, weight, bias, phi, psi, plan)
    # inference: nothing to save
    if plan.form == "input":
        return unflat(F.linear(plan.fwd(flat(x), phi, psi)[0], weight, bias), x)
    return unflat(plan.fwd(flat(x), weight, bias, phi, psi)[0], x)


def _traced_linear(x, weight, bias, phi, psi, form: str) -> Tensor:
    """``gift_linear`` while a graph is traced: the registered ops, the form by :func:`plans.traced_form`."""
    x2 = flat(x)
    d_out = weight.shape[0]
    if form == "auto":
        training = _needs_grad(x, weight, bias, phi, psi)
        form = plans.traced_form(x2.device.type, x2.dtype, x2.shape[0], d_out, x2.shape[1], phi.shape[1], training)
    if form == "input":
        y = F.linear(torch.ops.gift_kernels.gift_input_fwd(x2, phi, psi)[0], weight, bias)
    else:
        y = torch.ops.gift_kernels.gift_linear_fwd(x2, weight, bias, phi, psi)[0]
    return y.view(*x.shape[:-1], d_out)


@torch.no_grad()
def _trial(plan: plans.Plan, x, weight, bias, phi, psi, training: bool) -> None:
    """One call of ``gift_linear`` on a candidate plan, forward and (training) backward, on the
    call's own tensors and without autograd: what ``auto`` times on CUDA (only on a plan miss)."""
    needs = tuple(t is not None and t.requires_grad for t in (x, weight, bias, phi, psi)) if training else ()
    if plan.form == "input":
        u, t = plan.fwd(x, phi, psi)
        y = F.linear(u, weight, bias)
        if any(needs):
            plan.bwd(torch.mm(y, weight), x, t, phi, psi, (needs[0], needs[3], needs[4]))
    else:
        y, t, B = plan.fwd(x, weight, bias, phi, psi)
        if any(needs):
            plan.bwd(y, x, t, B, weight, phi, psi, needs)


# ------------------------------------------------------------------ mixed-adapter batches


def _input_mixed(x: Tensor, phis: Tensor, psis: Tensor, adapter_ids: Tensor) -> Tensor:
    """``gift_input_mixed`` on validated ``x (..., d_in)``, one id per row."""
    ids = adapter_ids.reshape(-1)
    if torch.compiler.is_compiling():
        return torch.ops.gift_kernels.gift_mixed_fwd(flat(x), phis, psis, ids)[0].view(x.shape)
    training = _needs_grad(x, phis, psis)
    plan = plans.choose("gift_mixed", x, x.shape[-1], phis, training=training)
    if training:
        return GiftMixedFunction.apply(x, phis, psis, ids, plan)
    return unflat(plan.fwd(flat(x), phis, psis, ids)[0], x)


def gift_input_mixed(x: Tensor, phis: Tensor, psis: Tensor, adapter_ids: Tensor) -> Tensor:
    """:func:`gift_input` with one adapter of a bank per row: ``u_i = x_i + (x_i psi_a^T) phi_a^T``,
    ``a = adapter_ids[i]``, and ``u_i = x_i`` where ``a = -1``.

    ``x``: ``(..., d_in)``; ``phis``: ``(A, d_in, r)``; ``psis``: ``(A, r, d_in)`` (a bank of A
    Thetas, possibly wider than x, as in :func:`gift_input`); ``adapter_ids``: int64, one per
    row of x (shape ``x.shape[:-1]`` or flattened), in ``[-1, A)``. ``base(u)`` is then every
    row through its own adapter with one call of the base layer (any base linear in x).
    Differentiable in x and the bank (multi-tenant training: each adapter gets the grads of
    its own rows).
    """
    x, _, _ = _autocast(x, None, None)
    check_mixed_args(x, phis, psis, adapter_ids, check_values=not torch.compiler.is_compiling())
    return _input_mixed(x, phis, psis, adapter_ids)


def gift_linear_mixed(
    x: Tensor, weight: Tensor, bias: Optional[Tensor], phis: Tensor, psis: Tensor, adapter_ids: Tensor
) -> Tensor:
    """A mixed-adapter batch through one dense layer: row ``i`` gets
    ``F.linear(x_i, W (I + phi_a psi_a), b)`` with ``a = adapter_ids[i]``, the plain layer where
    ``a = -1``.

    Computed in the input-side form, ``F.linear(gift_input_mixed(x, phis, psis, adapter_ids), W, b)``:
    one segmented skinny product pair on the input (the rows grouped by adapter) and one base
    GEMM for every row; W is never read per adapter, and the bank holds only Thetas. Shapes as
    :func:`gift_input_mixed`, plus ``weight (d_out, d_in)`` and ``bias (d_out,)`` or None in x's
    dtype. Returns ``(..., d_out)``.
    """
    where = "gift_linear_mixed"
    x, weight, bias = _autocast(x, weight, bias)
    check_mixed_args(x, phis, psis, adapter_ids, where=where, check_values=not torch.compiler.is_compiling())
    check_base_args(x, weight, bias, where)
    return F.linear(_input_mixed(x, phis, psis, adapter_ids), weight, bias)
