"""Mixed batches: each sample of one forward through its own adapter. A bank stacks the Thetas
of the batch's adapters for one layer type; :func:`mixed_linear` runs one adapted layer on the
whole batch (one segmented skinny product pair for all the adapters, then one base GEMM for
every sample). Used by :class:`~gift_kernels.nn.GiftLinear`'s mixed mode and the PEFT layer."""

from __future__ import annotations

import math
import threading
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..ops import memo
from ..ops.functional import gift_input_mixed, gift_linear_mixed
from .merge import chunk_bounds
from .theta import GiftTheta, GiftThetaWithBias


@dataclass
class Bank:
    """The Thetas of the adapters of one batch for one layer type, stacked: ``phis (U, d_in, r)``,
    ``psis (U, r, d_in)`` (zero-padded to the largest rank) and, when some adapter has projection
    biases, ``directions (U, d_in)``: each adapter's ``psi^T b1 + b2`` (zero for the others)."""

    phis: Tensor
    psis: Tensor
    directions: Optional[Tensor] = None


def stack_bank(thetas: Sequence[GiftTheta]) -> Bank:
    """One :class:`Bank` from the Thetas of U adapters for one layer type (differentiable)."""
    rank = max(t.rank for t in thetas)
    dtype = thetas[0].phi.dtype
    for t in thetas[1:]:
        dtype = torch.promote_types(dtype, t.phi.dtype)  # a bank never narrows a Theta
    phis = torch.stack([F.pad(t.phi.to(dtype), (0, rank - t.rank)) for t in thetas])
    psis = torch.stack([F.pad(t.psi.to(dtype), (0, 0, 0, rank - t.rank)) for t in thetas])
    directions = None
    if any(isinstance(t, GiftThetaWithBias) for t in thetas):
        directions = torch.stack([t.token_direction().to(dtype) if isinstance(t, GiftThetaWithBias)
                                  else t.phi.new_zeros(t.in_features, dtype=dtype) for t in thetas])
    return Bank(phis, psis, directions)


def shared_banks(cache: Optional[Dict[tuple, Bank]], adapters: Sequence[Sequence[GiftTheta]]) -> List[Bank]:
    """:func:`stack_bank` of each row chunk's Thetas, through ``cache``: one forward's dict (None:
    no sharing). Without grad (serving), layers of one type share their Thetas, hence their bank:
    stacked once per type and forward, not once per layer, from the Thetas' values at that
    forward. With grad, each layer stacks its own: non-reentrant activation checkpointing
    recomputes a layer's saved tensors on their own, and a bank stacked by another layer would
    be saved tensors its recompute does not make (torch refuses the mismatch)."""
    if cache is None or torch.is_grad_enabled() or torch.compiler.is_compiling():
        return [stack_bank(thetas) for thetas in adapters]
    mode = torch.is_inference_mode_enabled()
    out = []
    for thetas in adapters:
        key = ("bank", tuple(id(t) for t in thetas), mode)  # the Thetas outlive the forward: ids are theirs
        bank = cache.get(key)
        if bank is None:
            bank = cache[key] = stack_bank(thetas)
        out.append(bank)
    return out


def token_ids(x: Tensor, sample_ids: Tensor, where: str) -> Tensor:
    """Per-row ids of ``x (batch, ..., d_in)`` from one id per sample (dim 0)."""
    if x.dim() < 2 or x.shape[0] != sample_ids.shape[0]:
        raise ValueError(f"{where}: got input of shape {tuple(x.shape)} but {sample_ids.shape[0]} adapter name(s); "
                         f"a mixed batch needs the samples along dim 0 of every adapted layer's input")
    per_sample = math.prod(x.shape[1:-1])
    return sample_ids.to(x.device).repeat_interleave(per_sample)


class SampleIds:
    """The adapter of each sample (dim 0) of a mixed batch, for every layer in mixed mode.

    :meth:`rows` gives a layer its per-row ids. Between :meth:`open` and :meth:`close` (one
    model forward: :func:`~gift_kernels.mixed_adapters` calls them from the model's forward
    hooks) layers whose inputs have the same rows get one id tensor, built there, owned by a
    :mod:`~gift_kernels.ops.memo` scope and never handed to user code, so the row layout
    (grouping the rows by adapter: host syncs on the torch path) is built once per forward, not
    once per layer. Outside a forward each call builds its own. Per thread: forwards running
    in several threads keep apart."""

    def __init__(self, sample_ids: Tensor):
        self.sample_ids = sample_ids
        self._local = threading.local()

    def open(self) -> None:
        """A forward starts (nested forwards share the outermost one's ids)."""
        local = self._local
        local.depth = getattr(local, "depth", 0) + 1
        if local.depth == 1:
            local.scope = memo.scope()
            local.scope.__enter__()
            local.ids = {}
            local.banks = {}
            local.grad = torch.is_grad_enabled()

    def close(self) -> None:
        """The forward :meth:`open` started ended (normally or by an exception)."""
        local = self._local
        if not getattr(local, "depth", 0):  # a hook ran without its pre-hook (an earlier hook raised)
            return
        local.depth -= 1
        if local.depth == 0:
            scope, local.scope, local.ids, local.banks = local.scope, None, None, None
            scope.__exit__(None, None, None)

    def forward_records_grad(self) -> bool:
        """Whether a model forward is open here and began with grad enabled (a layer inside it
        running without grad is then under reentrant activation checkpointing)."""
        return getattr(self._local, "depth", 0) > 0 and self._local.grad

    def reset(self) -> None:
        """Close what this thread left open: a forward ended by a ``BaseException`` (Ctrl-C),
        which the model's forward hooks do not see."""
        local = self._local
        if getattr(local, "depth", 0):
            local.depth = 1
            self.close()

    def banks(self, adapters: Sequence[Sequence[GiftTheta]]) -> List[Bank]:
        """The stacked banks of one layer, one per row chunk: shared by the layers of one
        forward (:func:`shared_banks`); outside a forward, stacked for this call."""
        return shared_banks(getattr(self._local, "banks", None), adapters)

    def rows(self, x: Tensor, where: str) -> Tensor:
        """Per-row ids of ``x (batch, ..., d_in)`` (while a graph is traced: built in the graph)."""
        if torch.compiler.is_compiling():
            return token_ids(x, self.sample_ids, where)
        ids: Optional[Dict[tuple, Tensor]] = getattr(self._local, "ids", None)
        if ids is None:
            return token_ids(x, self.sample_ids, where)
        key = (x.device, tuple(x.shape[:-1]))
        out = ids.get(key)
        if out is None:
            out = ids[key] = memo.own(token_ids(x, self.sample_ids, where))
        return out


def mixed_linear(
    x: Tensor, ids: Tensor, banks: Sequence[Bank], splits: Sequence[int], *,
    weight: Optional[Tensor] = None, bias: Optional[Tensor] = None, base_layer: Optional[nn.Module] = None,
) -> Tensor:
    """One adapted layer on a mixed batch: row chunk ``c`` of the output (``splits``) through
    ``banks[c]``, row ``i`` of ``x`` through adapter ``ids[i]`` of the banks (-1: none).

    Over a dense ``weight (d_out, d_in)`` / ``bias``: :func:`gift_linear_mixed` per chunk; over
    a module base (``base_layer``, run as a black box): ``base_layer(gift_input_mixed(...))``
    per chunk (chunks times the base's cost, as :class:`~gift_kernels.nn.GiftLinear` does).
    """
    ids = ids.reshape(x.shape[:-1])
    one = len(splits) == 1  # one projection: the weight and bias themselves, no row views
    outs = []
    for (start, stop), bank in zip(chunk_bounds(splits), banks):
        if base_layer is not None:
            y = base_layer(gift_input_mixed(x, bank.phis, bank.psis, ids))
            if not one:
                y = y[..., start:stop]
        else:
            w, b = (weight, bias) if one else (weight[start:stop], None if bias is None else bias[start:stop])
            y = gift_linear_mixed(x, w, b, bank.phis, bank.psis, ids)
        if bank.directions is not None:  # the projection biases: a per-row scalar x . v_a
            v = torch.cat([bank.directions.new_zeros(1, x.shape[-1]), bank.directions])[ids + 1]
            y = y + (x * v.to(x.dtype)).sum(-1, keepdim=True).to(y.dtype)
        outs.append(y)
    return outs[0] if len(outs) == 1 else torch.cat(outs, dim=-1)
