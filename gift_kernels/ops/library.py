"""GIFT as registered ``torch.library`` ops, with fake implementations and autograd, and the
eager autograd Functions over the same launchers.

Four ops in the ``gift_kernels`` namespace, callable by other libraries as
``torch.ops.gift_kernels.<name>``:

    gift_linear_fwd(x, weight, bias?, phi, psi) -> (y, t, B)
        the epilogue form: x (M, d_in) 2-D, y = x W^T + b + t B^T, t = x psi^T (M, r),
        B = W phi (d_out, r); t and B in the rank-path dtype (dtypes.rank_dtype)
    gift_linear_bwd(grad_y, x, t, B, weight, phi, psi, needs[5]) -> (dx, dW, db, dphi, dpsi)
        needs: which of (x, weight, bias, phi, psi) want a gradient; the others come back
        as empty (0-element) tensors.
    gift_input_fwd(x, phi, psi) -> (u, t)
        the input-side form: u = x + t phi^T, to be fed to any base layer linear in its input
    gift_input_bwd(grad_u, x, t, phi, psi, needs[3]) -> (dx, dphi, dpsi)

plus the mixed-adapter pair ``gift_mixed_fwd`` / ``gift_mixed_bwd`` (one adapter of a bank
per row; the section at the end of this file).

The backend (torch / triton / cuda) is chosen inside each op at run time
(:mod:`gift_kernels.ops.backends`), so a compiled graph follows ``gift_kernels.backend()``
without recompiling. Each op validates its inputs (it is a public entry point); the
functional API validates before calling the eager Functions, which do not validate again.

Eager calls go through :class:`GiftLinearFunction` / :class:`GiftInputFunction` instead: the
same launchers and backward, minus ``custom_op``'s per-call Python overhead (measured on the
2-core CPU machine: ~115 us vs ~62 us per forward with autograd at M = 4, 128 x 128, against
6 us for F.linear), which matters for decode-sized calls. They remember the backend their
forward ran on and run the backward there. With ``create_graph=True`` their backward is
computed with differentiable ATen ops, so higher-order gradients are exact; the registered
ops refuse double backward with an error.
"""

from __future__ import annotations

from typing import List, Optional, Tuple

import torch
from torch import Tensor

from . import backends
from . import schema
from . import torch_backend
from .checks import check_gift_args, check_input_args, check_mixed_args
from .dtypes import rank_dtype


def _empty_unless(grads, shapes, like: Tensor):
    return tuple(g if g is not None else like.new_empty(shape, dtype=dtype) for g, (shape, dtype) in zip(grads, shapes))


# ------------------------------------------------------------------ epilogue form


@torch.library.custom_op("gift_kernels::gift_linear_fwd", mutates_args=())
def gift_linear_fwd(
    x: Tensor, weight: Tensor, bias: Optional[Tensor], phi: Tensor, psi: Tensor
) -> Tuple[Tensor, Tensor, Tensor]:
    check_gift_args(x, weight, bias, phi, psi, x_2d=True)
    return backends.resolve(x, weight.shape[0]).gift_fwd(x, weight, bias, phi, psi)


@torch.library.custom_op("gift_kernels::gift_linear_bwd", mutates_args=())
def gift_linear_bwd(
    grad_y: Tensor,
    x: Tensor,
    t: Tensor,
    B: Tensor,
    weight: Tensor,
    phi: Tensor,
    psi: Tensor,
    needs: List[bool],
) -> Tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    schema.check_needs("gift_linear_bwd", needs)
    mod = backends.resolve(x, weight.shape[0])
    grads = mod.gift_bwd(grad_y, x, t, B, weight, phi, psi, tuple(needs))
    return _empty_unless(grads, schema.grad_shapes(x, weight, phi, psi, needs), x)


def _no_double_backward(op: str):
    """An autograd rule for a backward op that refuses, by name, to be differentiated again."""

    def backward(ctx, *grads):
        raise RuntimeError(
            f"gift_kernels::{op}: higher-order gradients (create_graph=True, then a second backward) are not "
            f"supported through the registered ops (torch.compile's path); call gift_kernels.gift_linear eagerly, "
            f"whose backward is differentiable"
        )

    return backward


gift_linear_fwd.register_fake(schema.fwd_fake)
gift_linear_bwd.register_fake(schema.make_bwd_fake("gift_linear_bwd"))
gift_linear_fwd.register_autograd(schema.make_backward(torch.ops.gift_kernels.gift_linear_bwd),
                                  setup_context=schema.setup_context)
gift_linear_bwd.register_autograd(_no_double_backward("gift_linear_bwd"), setup_context=lambda ctx, inputs, output: None)


def gift_linear_infer(x, weight, bias, phi, psi):
    """Eager forward when no grad is needed: the backend's ``gift_infer`` if it has one
    (free to re-associate, nothing is saved), else the forward launcher's y."""
    mod = backends.resolve(x, weight.shape[0])
    if mod.gift_infer is not None:
        return mod.gift_infer(x, weight, bias, phi, psi)
    return mod.gift_fwd(x, weight, bias, phi, psi)[0]


def _rank_factors(x, weight, phi, psi):
    """t and B with autograd, for a differentiable backward (create_graph=True)."""
    rd, act_dtype = rank_dtype(x.dtype, phi.dtype), x.dtype
    t = torch.mm(x.to(rd), psi.to(rd).t()) if rd != act_dtype else torch.mm(x, psi.to(act_dtype).t())
    B = torch.mm(weight.to(rd), phi.to(rd)) if rd != act_dtype else torch.mm(weight, phi.to(act_dtype))
    return t.to(rd), B.to(rd)


class GiftLinearFunction(torch.autograd.Function):
    """Eager path of the epilogue form: same launchers and backward as the op, without
    custom_op's overhead. Inputs must already be validated and x 2-D."""

    @staticmethod
    def forward(ctx, x, weight, bias, phi, psi):
        mod = backends.resolve(x, weight.shape[0])
        y, t, B = mod.gift_fwd(x, weight, bias, phi, psi)
        ctx.backend = backends.name_of(mod)
        ctx.save_for_backward(x, t, B, weight, phi, psi)
        return y

    @staticmethod
    def backward(ctx, grad_y):
        x, t, B, weight, phi, psi = ctx.saved_tensors
        needs = ctx.needs_input_grad
        if torch.is_grad_enabled():  # create_graph=True: the torch formulas, differentiable end to end
            t, B = _rank_factors(x, weight, phi, psi)
            return torch_backend.gift_bwd(grad_y, x, t, B, weight, phi, psi, needs)
        mod = backends.resolve(x, weight.shape[0], prefer=ctx.backend)
        return mod.gift_bwd(grad_y, x, t, B, weight, phi, psi, needs)


# ------------------------------------------------------------------ input-side form


@torch.library.custom_op("gift_kernels::gift_input_fwd", mutates_args=())
def gift_input_fwd(x: Tensor, phi: Tensor, psi: Tensor) -> Tuple[Tensor, Tensor]:
    check_input_args(x, phi, psi, x_2d=True)
    return backends.resolve(x, x.shape[1], op="gift_input").input_fwd(x, phi, psi)


@torch.library.custom_op("gift_kernels::gift_input_bwd", mutates_args=())
def gift_input_bwd(
    grad_u: Tensor, x: Tensor, t: Tensor, phi: Tensor, psi: Tensor, needs: List[bool]
) -> Tuple[Tensor, Tensor, Tensor]:
    schema.check_needs("gift_input_bwd", needs, schema.INPUT_NEEDS)
    mod = backends.resolve(x, x.shape[1], op="gift_input")
    grads = mod.input_bwd(grad_u, x, t, phi, psi, tuple(needs))
    return _empty_unless(grads, schema.input_grad_shapes(x, phi, psi, needs), x)


gift_input_fwd.register_fake(schema.input_fwd_fake)
gift_input_bwd.register_fake(schema.input_bwd_fake)
gift_input_fwd.register_autograd(schema.make_input_backward(torch.ops.gift_kernels.gift_input_bwd),
                                 setup_context=schema.input_setup_context)
gift_input_bwd.register_autograd(_no_double_backward("gift_input_bwd"), setup_context=lambda ctx, inputs, output: None)


class GiftInputFunction(torch.autograd.Function):
    """Eager path of the input-side form ``u = x + (x psi^T) phi^T`` (inputs validated, x 2-D)."""

    @staticmethod
    def forward(ctx, x, phi, psi):
        mod = backends.resolve(x, x.shape[1], op="gift_input")
        u, t = mod.input_fwd(x, phi, psi)
        ctx.backend = backends.name_of(mod)
        ctx.save_for_backward(x, t, phi, psi)
        return u

    @staticmethod
    def backward(ctx, grad_u):
        x, t, phi, psi = ctx.saved_tensors
        needs = ctx.needs_input_grad
        if torch.is_grad_enabled():  # create_graph=True
            rd = rank_dtype(x.dtype, phi.dtype)
            t = torch.mm(x.to(rd), psi.to(rd).t())
            return torch_backend.input_bwd(grad_u, x, t, phi, psi, needs)
        mod = backends.resolve(x, x.shape[1], op="gift_input", prefer=ctx.backend)
        return mod.input_bwd(grad_u, x, t, phi, psi, needs)


# ------------------------------------------------------------------ mixed-adapter batches
#
#     gift_mixed_fwd(x, phis, psis, adapter_ids) -> (u, t)
#         one adapter per row: u_i = x_i + (x_i psi_a^T) phi_a^T with a = adapter_ids[i]
#         (-1: u_i = x_i); x (M, d_in), phis (A, d_in, r), psis (A, r, d_in), adapter_ids (M,)
#         int64; t (M, r) in the rank-path dtype (zero where a = -1). The caller runs the base
#         layer on u: one GEMM for all rows (gift_kernels.gift_linear_mixed).
#     gift_mixed_bwd(grad_u, x, t, phis, psis, adapter_ids, needs[3]) -> (dx, dphis, dpsis)
#
# Why the input-side form: a bank of GIFT adapters is (phi_a, psi_a) per layer type, and this
# form reads nothing else; the epilogue form would need B_a = W phi_a for every adapter of
# every layer (a LoRA-sized bank). Fake implementations and the autograd rule live here, with
# the ops (this schema has no other registration).

MIXED_NEEDS = ("x", "phis", "psis")


@torch.library.custom_op("gift_kernels::gift_mixed_fwd", mutates_args=())
def gift_mixed_fwd(x: Tensor, phis: Tensor, psis: Tensor, adapter_ids: Tensor) -> Tuple[Tensor, Tensor]:
    check_mixed_args(x, phis, psis, adapter_ids, where="gift_mixed op", x_2d=True)
    return backends.resolve(x, x.shape[1], op="gift_mixed").mixed_fwd(x, phis, psis, adapter_ids)


@torch.library.custom_op("gift_kernels::gift_mixed_bwd", mutates_args=())
def gift_mixed_bwd(
    grad_u: Tensor, x: Tensor, t: Tensor, phis: Tensor, psis: Tensor, adapter_ids: Tensor, needs: List[bool]
) -> Tuple[Tensor, Tensor, Tensor]:
    schema.check_needs("gift_mixed_bwd", needs, MIXED_NEEDS)
    mod = backends.resolve(x, x.shape[1], op="gift_mixed")
    grads = mod.mixed_bwd(grad_u, x, t, phis, psis, adapter_ids, tuple(needs))
    return _empty_unless(grads, _mixed_grad_shapes(x, phis, psis, needs), x)


def _mixed_grad_shapes(x, phis, psis, needs):
    shapes, dtypes = (x.shape, phis.shape, psis.shape), (x.dtype, phis.dtype, psis.dtype)
    return [(s if n else (0,), d) for s, d, n in zip(shapes, dtypes, needs)]


def _mixed_fwd_fake(x, phis, psis, adapter_ids):
    check_mixed_args(x, phis, psis, adapter_ids, where="gift_mixed op", x_2d=True, check_values=False)
    return x.new_empty(x.shape), x.new_empty(x.shape[0], phis.shape[2], dtype=rank_dtype(x.dtype, phis.dtype))


def _mixed_bwd_fake(grad_u, x, t, phis, psis, adapter_ids, needs):
    schema.check_needs("gift_mixed_bwd", needs, MIXED_NEEDS)
    return tuple(x.new_empty(shape, dtype=dtype) for shape, dtype in _mixed_grad_shapes(x, phis, psis, needs))


def _mixed_setup_context(ctx, inputs, output):
    """Autograd keeps x, t (M x r), the bank and the ids: nothing per adapter and layer."""
    x, phis, psis, adapter_ids = inputs
    _, t = output
    ctx.save_for_backward(x, t, phis, psis, adapter_ids)
    ctx.mark_non_differentiable(t)


def _mixed_backward(ctx, grad_u, _grad_t):
    x, t, phis, psis, adapter_ids = ctx.saved_tensors
    needs = list(ctx.needs_input_grad[:3])
    grads = torch.ops.gift_kernels.gift_mixed_bwd(grad_u, x, t, phis, psis, adapter_ids, needs)
    return tuple(g if n else None for g, n in zip(grads, needs)) + (None,)


gift_mixed_fwd.register_fake(_mixed_fwd_fake)
gift_mixed_bwd.register_fake(_mixed_bwd_fake)
gift_mixed_fwd.register_autograd(_mixed_backward, setup_context=_mixed_setup_context)


class GiftMixedFunction(torch.autograd.Function):
    """Eager path of the mixed-adapter input-side form (inputs validated, x 2-D, ids (M,))."""

    @staticmethod
    def forward(ctx, x, phis, psis, adapter_ids):
        mod = backends.resolve(x, x.shape[1], op="gift_mixed")
        u, t = mod.mixed_fwd(x, phis, psis, adapter_ids)
        ctx.backend = backends.name_of(mod)
        ctx.save_for_backward(x, t, phis, psis, adapter_ids)
        return u

    @staticmethod
    def backward(ctx, grad_u):
        x, t, phis, psis, adapter_ids = ctx.saved_tensors
        needs = ctx.needs_input_grad[:3]
        if torch.is_grad_enabled():  # create_graph=True: the torch formulas, differentiable end to end
            t = torch_backend.mixed_fwd(x, phis, psis, adapter_ids)[1]
            return torch_backend.mixed_bwd(grad_u, x, t, phis, psis, adapter_ids, needs) + (None,)
        mod = backends.resolve(x, x.shape[1], op="gift_mixed", prefer=ctx.backend)
        return mod.mixed_bwd(grad_u, x, t, phis, psis, adapter_ids, needs) + (None,)
