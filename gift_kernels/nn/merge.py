"""Merging GIFT into a weight: the one formula for ``W_hat``, and the one record of merged
weights.

    W_hat_c = W_c + (W_c phi + b1) psi + b2      per row chunk c, summed over its Thetas

:func:`merged_weight` computes it in float32 (float64 for float64 weights). :func:`fold`
writes a merged value into a weight Parameter and keeps the original for an exact
:func:`restore`; every layer that merges (``GiftLinear``, the PEFT tuner layer) goes through
these two. A Parameter can be folded by one owner at a time: two layers sharing one weight
(tied or aliased) cannot both fold into it, which is what made merge-then-unmerge of shared
weights order-dependent.
"""

from __future__ import annotations

import weakref
from typing import Dict, List, Optional, Sequence, Tuple

import torch
from torch import Tensor, nn

from .theta import GiftTheta, GiftThetaWithBias


def chunk_bounds(splits: Sequence[int]) -> List[Tuple[int, int]]:
    """``[(start, stop)]`` row ranges of the chunks of sizes ``splits``."""
    bounds, start = [], 0
    for size in splits:
        bounds.append((start, start + size))
        start += size
    return bounds


def merge_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


@torch.no_grad()
def merged_weight(weight_rows: Tensor, chunk_thetas: Sequence[Sequence[GiftTheta]], splits: Sequence[int]) -> Tensor:
    """``W_hat`` as a ``(d_out, d_in)`` float32 (float64 for float64 weights) tensor, from the
    weight's rows ``(d_out, d_in)`` and each row chunk's Thetas."""
    acc = merge_dtype(weight_rows.dtype)
    w = weight_rows.to(acc)
    out = w.clone()
    for (start, stop), thetas in zip(chunk_bounds(splits), chunk_thetas):
        wc = w[start:stop]
        for theta in thetas:
            generated = wc @ theta.phi.to(device=w.device, dtype=acc)
            if isinstance(theta, GiftThetaWithBias) and theta.in_bias is not None:
                generated = generated + theta.in_bias.to(acc)
            out[start:stop] += generated @ theta.psi.to(device=w.device, dtype=acc)
            if isinstance(theta, GiftThetaWithBias) and theta.out_bias is not None:
                out[start:stop] += theta.out_bias.to(acc)
    return out


# id(Parameter) -> (weak reference to it, name of the layer whose merged value it holds). Keyed
# by id: tensors compare elementwise, so they cannot be dict keys; the weak reference tells a
# live entry from a recycled id.
_folded: Dict[int, Tuple["weakref.ref[Tensor]", str]] = {}


def folded_by(param: Tensor) -> Optional[str]:
    """The owner that folded a merged value into ``param``, or None."""
    entry = _folded.get(id(param))
    return entry[1] if entry is not None and entry[0]() is param else None


def check_can_fold(param: Tensor, owner: str) -> None:
    other = folded_by(param)
    if other is not None:
        raise RuntimeError(
            f"{owner}: its weight is the same Parameter that {other} has already merged into (shared or tied "
            f"weights); merging twice would fold GIFT in twice. Unmerge {other} first, or give the layers their own "
            f"weights"
        )


@torch.no_grad()
def fold(param: nn.Parameter, merged: Tensor, owner: str) -> Tensor:
    """Write ``merged`` into ``param`` in place; return a copy of the original for :func:`restore`."""
    check_can_fold(param, owner)
    original = param.detach().clone()
    param.copy_(merged)
    _folded[id(param)] = (weakref.ref(param), owner)
    return original


@torch.no_grad()
def restore(param: nn.Parameter, original: Tensor) -> None:
    """Undo :func:`fold`: the original weight, bit for bit."""
    param.copy_(original)
    if folded_by(param) is not None:
        del _folded[id(param)]
