"""Merging GIFT into a weight: the one formula for ``W_hat``, and the one record of merged
weights.

    W_hat_c = W_c + (W_c phi + b1) psi + b2      per row chunk c, summed over its Thetas

:func:`merged_weight` computes it in float32 (float64 for float64 weights). :func:`fold`
writes a merged value into a weight Parameter and keeps the original for an exact
:func:`restore`; every layer that merges (``GiftLinear``, the PEFT tuner layer) goes through
these two. A Parameter can be folded by one owner at a time: two layers sharing one weight
(tied or aliased) cannot both fold into it, which is what made merge-then-unmerge of shared
weights order-dependent.

A module base (a quantized layer) is folded by :func:`fold_module_base`: its kind
(:mod:`gift_kernels.nn.bases`) re-quantizes ``W_hat`` into new weight objects and the old ones
are kept, so :func:`restore_module_base` is exact; the re-quantization itself is lossy, and a
:class:`~gift_kernels.nn.bases.LossyMergeWarning` states by how much.
"""

from __future__ import annotations

import contextlib
import warnings
import weakref
from dataclasses import dataclass
from typing import Dict, Iterator, List, Optional, Sequence, Tuple

import torch
from torch import Tensor, nn

from . import bases
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


# --------------------------------------------------------------------------- module bases


@dataclass
class ModuleFold:
    """What :func:`fold_module_base` kept: the base's original weight objects (``snapshot``)
    and the measured re-quantization error of the merged weight."""

    snapshot: object
    error: float  # ||dq(Q(W_hat)) - W_hat|| / ||W_hat||
    error_of_update: float  # ||dq(Q(W_hat)) - W_hat|| / ||W_hat - W||: how much of GIFT's update was lost


def _norm_ratio(num: Tensor, den: Tensor) -> float:
    d = float(den.double().norm())
    return float(num.double().norm()) / d if d > 0 else (0.0 if float(num.double().norm()) == 0 else float("inf"))


@torch.no_grad()
def fold_module_base(base: nn.Module, weight_rows: Tensor, w_hat: Tensor, owner: str, *, warn: bool = True) -> ModuleFold:
    """Write ``w_hat`` (``(d_out, d_in)``, from ``weight_rows``, the base's dequantized original)
    into a module base in its own format. Raises, with the base unchanged, when its kind cannot
    merge; warns (:class:`~gift_kernels.nn.bases.LossyMergeWarning`) with the measured error."""
    why = bases.merge_refusal(base)
    if why:
        raise TypeError(f"{owner}: {why}")
    kind = bases.kind_of(base)
    snapshot = kind.snapshot(base)
    try:
        kind.requantize(base, w_hat)
        got = kind.dequantize(base)
    except BaseException:
        kind.restore(base, snapshot)
        raise
    w_hat = w_hat.to(got.dtype)
    diff = got - w_hat
    fold = ModuleFold(snapshot, _norm_ratio(diff, w_hat), _norm_ratio(diff, w_hat - weight_rows.to(got.dtype)))
    if warn:
        warnings.warn(
            f"{owner}: merging re-quantizes W_hat into the {type(base).__name__} base ({kind.name}); the merged "
            f"weight differs from the exact W_hat by {fold.error:.2e} relative (||Q(W_hat) - W_hat|| / ||W_hat||), "
            f"{fold.error_of_update:.2f}x the size of GIFT's update (/ ||W_hat - W||), and the merged layer's "
            f"outputs differ from the unmerged layer's accordingly. unmerge() restores the original weight exactly; "
            f"GiftLinear.to_linear() exports W_hat to a dense nn.Linear without this loss",
            bases.LossyMergeWarning, stacklevel=3)
    return fold


@torch.no_grad()
def restore_module_base(base: nn.Module, fold: ModuleFold) -> None:
    """Undo :func:`fold_module_base`: the original weight objects, bit for bit."""
    bases.kind_of(base).restore(base, fold.snapshot)


@contextlib.contextmanager
def original_module_base(base: nn.Module, fold: Optional[ModuleFold]) -> Iterator[nn.Module]:
    """Inside, a merged module base holds its original weight again (references swapped, no
    copy); the merged weight is put back on exit. A no-op when ``fold`` is None."""
    if fold is None:
        yield base
        return
    kind = bases.kind_of(base)
    merged = kind.snapshot(base)
    kind.restore(base, fold.snapshot)
    try:
        yield base
    finally:
        kind.restore(base, merged)
