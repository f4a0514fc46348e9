"""GIFT over a module base run as a black box (a quantized layer; :mod:`gift_kernels.nn.bases`):
the input-side form ``base(x + (x psi^T) phi^T)`` or the epilogue form from the dequantized
weight, and the check that the base is differentiable in its input."""

from __future__ import annotations

import math
import weakref
from typing import Sequence

import torch
from torch import Tensor, nn

from ..ops import plan as plans
from ..ops.dtypes import rank_dtype
from ..ops.functional import gift_input
from . import bases
from .merge import chunk_bounds
from .stacked import concat_thetas, with_token_direction
from .theta import GiftTheta


# bases whose output was seen to depend on their input through autograd, per training mode
_INPUT_GRAD_OK: "weakref.WeakKeyDictionary[nn.Module, set]" = weakref.WeakKeyDictionary()


def _reaches(start, target, limit: int = 4096) -> bool:
    """Whether autograd node ``target`` is reachable from ``start`` (never expanding ``target``:
    the search stays inside the base layer's own graph). Past ``limit`` nodes: assume yes."""
    seen, todo = set(), [start]
    while todo:
        node = todo.pop()
        if node is None or node in seen:
            continue
        if node is target:
            return True
        seen.add(node)
        if len(seen) > limit:
            return True
        todo.extend(n for n, _ in node.next_functions)
    return False


def check_input_grad(base: nn.Module, u: Tensor, y: Tensor) -> None:
    """Refuse a base whose output does not depend on its input through autograd (a layer that
    quantizes its input without a backward, such as torchao's dynamic-activation configs):
    Theta would silently get no gradient. Checked once per base and training mode."""
    if not torch.is_grad_enabled() or not u.requires_grad or torch.compiler.is_compiling():
        return
    ok = _INPUT_GRAD_OK.get(base)
    if ok is not None and base.training in ok:
        return
    if not (y.requires_grad and _reaches(y.grad_fn, u.grad_fn)):
        raise RuntimeError(
            f"GiftLinear: the {type(base).__name__} base layer gives no gradient with respect to its input (its output "
            f"does not depend on its input through autograd), so GIFT's Theta would get none; a base must be "
            f"differentiable in its input (docs/quantized.md)"
        )
    _INPUT_GRAD_OK.setdefault(base, set()).add(base.training)


class _DequantizedEpilogue(torch.autograd.Function):
    """``(x psi^T)(W_c phi)^T`` for rows ``[start, stop)`` of a module base's dequantized weight:
    GIFT's epilogue term without a dense weight kept anywhere. ``W`` is dequantized in forward
    and again in backward, transiently; saved: x (the caller's) and ``t = x psi^T`` (M x r)."""

    @staticmethod
    def forward(ctx, x2, phi, psi, base, dequantize, start, stop):
        rd = rank_dtype(x2.dtype, phi.dtype)
        w = dequantize(base)[start:stop].to(rd)
        t = x2.to(rd) @ psi.to(rd).t()
        ctx.save_for_backward(x2, t, phi, psi)
        ctx.base, ctx.dequantize, ctx.rows = base, dequantize, (start, stop)
        return (t @ (w @ phi.to(rd)).t()).to(x2.dtype)

    @staticmethod
    def backward(ctx, g):
        x2, t, phi, psi = ctx.saved_tensors
        rd = t.dtype
        start, stop = ctx.rows
        w = ctx.dequantize(ctx.base)[start:stop].to(rd)
        g = g.to(rd)
        need_x, need_phi, need_psi = ctx.needs_input_grad[:3]
        dx = dphi = dpsi = None
        if need_x or need_psi:
            dt = g @ (w @ phi.to(rd))  # M x r
            if need_x:
                dx = (dt @ psi.to(rd)).to(x2.dtype)
            if need_psi:
                dpsi = (dt.t() @ x2.to(rd)).to(psi.dtype)
        if need_phi:
            dphi = (w.t() @ (g.t() @ t)).to(phi.dtype)
        return dx, dphi, dpsi, None, None, None, None


def module_form(base: nn.Module, n_chunks: int, form: str, *, rows: int = 0, training: bool = False) -> str:
    """The form a module base runs in: ``"input"`` (``base(x + (x psi^T) phi^T)``, one base call
    per row chunk) or ``"epilogue"`` (one base call on x plus each chunk's ``(x psi^T)(W_c phi)^T``
    from the dequantized weight, recomputed in backward). ``"auto"``: the plan's rule
    (:func:`gift_kernels.ops.plan.module_form`)."""
    kind = bases.kind_of(base)
    can = kind is not None and kind.dequantize is not None
    if form == "epilogue" and not can:
        raise ValueError(f"GiftLinear: form='epilogue' needs the base's weight as a dense matrix; a "
                         f"{type(base).__name__} base has no registered dequantize (gift_kernels.nn.bases), use "
                         f"form='input' or 'auto'")
    return plans.module_form(form, can_dequantize=can, keeps_input=can and kind.keeps_input, n_chunks=n_chunks,
                             rows=rows, training=training)


def gift_module_forward(base: nn.Module, x: Tensor, chunk_thetas: Sequence[Sequence[GiftTheta]],
                        splits: Sequence[int], *, form: str = "auto") -> Tensor:
    """GIFT over a module base run as a black box (a quantized layer): each row chunk ``c`` of
    its output gets ``W_c (I + sum_a phi_a psi_a)`` over its Thetas (several Thetas: several
    adapters, concatenated along the rank), plus the per-token scalar of any
    :class:`GiftThetaWithBias`. See :func:`module_form` for the two forms."""
    n = len(splits)
    training = torch.is_grad_enabled() and (x.requires_grad or any(
        p.requires_grad for thetas in chunk_thetas for th in thetas for p in (th.phi, th.psi)))
    if training:  # a base packed for inference since adaptation would give Theta zero gradients
        bases.check_trainable(base, "GiftLinear")
    form = module_form(base, n, form, rows=x.numel() // max(x.shape[-1], 1), training=training)
    bounds = chunk_bounds(splits)
    if form == "epilogue":
        y = base(x)
        lead, d_in = x.shape[:-1], x.shape[-1]
        x2 = x.reshape(math.prod(lead), d_in)
        dequantize = bases.kind_of(base).dequantize
        outs = []
        for (start, stop), thetas in zip(bounds, chunk_thetas):
            yc = y[..., start:stop] if n > 1 else y
            if thetas:
                phi, psi = concat_thetas(thetas)
                delta = _DequantizedEpilogue.apply(x2, phi, psi, base, dequantize, start, stop)
                yc = yc + delta.view(*lead, stop - start).to(yc.dtype)
            outs.append(with_token_direction(yc, x, thetas))
        return outs[0] if n == 1 else torch.cat(outs, dim=-1)
    plain = None  # base(x), shared by every chunk without a Theta
    outs = []
    for (start, stop), thetas in zip(bounds, chunk_thetas):
        if thetas:
            phi, psi = concat_thetas(thetas)
            u = gift_input(x, phi, psi)
            y = base(u)
            check_input_grad(base, u, y)
        else:
            plain = base(x) if plain is None else plain
            y = plain
        yc = y[..., start:stop] if n > 1 else y
        outs.append(with_token_direction(yc, x, thetas))
    return outs[0] if n == 1 else torch.cat(outs, dim=-1)
