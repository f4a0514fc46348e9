"""``GiftLayer``: what a GIFT layer does with its frozen base, written once.

Two layers use it: :class:`~gift_kernels.nn.GiftLinear` (this package's module) and the PEFT
tuner layer (:mod:`gift_kernels.adapters.peft`, a thin shell that picks the active adapters'
Thetas). A subclass says where its base lives (:meth:`GiftLayer.module_base`,
:meth:`GiftLayer.dense_weight`, :meth:`GiftLayer.base_bias`) and which Thetas apply; this class
reads the weight rows, runs the forward (one adapter per row chunk, several concatenated along
the rank, or a mixed batch), and merges and unmerges:

- a dense base (``nn.Linear``, a transformers ``Conv1D`` read through a transposed view) is
  merged by :func:`~gift_kernels.nn.merge.fold`, the original kept in the non-persistent
  buffer ``_original_weight`` for a bit-exact unmerge;
- a module base (a quantized layer, run as a black box) gets ``W_hat`` re-quantized in its own
  format (:func:`~gift_kernels.nn.merge.fold_module_base`, lossy, with a warning) and its
  original weight objects are kept in ``_base_fold``, so unmerge is exact.
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from . import bases
from .merge import ModuleFold, fold, fold_module_base, merged_weight, original_module_base, restore, restore_module_base
from .mixed import Bank, mixed_linear
from .module_base import gift_module_forward
from .stacked import gift_linear_stacked
from .theta import GiftTheta

ChunkThetas = Sequence[Sequence[GiftTheta]]  # per row chunk, the Thetas applied to it (summed)


class GiftLayer(nn.Module):
    """The base-side behaviour of a GIFT layer (see the module docstring). Subclasses call
    :meth:`_init_merge_state` in their constructor and set ``transposed``."""

    transposed: bool = False

    def _init_merge_state(self) -> None:
        # the pre-merge dense weight; a non-persistent buffer so .to() moves it and state_dict ignores it
        self.register_buffer("_original_weight", None, persistent=False)
        self.__dict__["_base_fold"] = None  # a merged module base's original weight objects

    # ------------------------------------------------------------------ where the base lives

    def module_base(self) -> Optional[nn.Module]:
        """The base run as a black box (a quantized layer), or None for a dense weight."""
        raise NotImplementedError

    def dense_weight(self) -> nn.Parameter:
        """The dense base's weight Parameter, in its own layout (transposed for a Conv1D)."""
        raise NotImplementedError

    @property
    def base_bias(self) -> Optional[Tensor]:
        raise NotImplementedError

    @property
    def has_module_base(self) -> bool:
        """Whether the base is a module GIFT runs as a black box, not a dense weight."""
        return self.module_base() is not None

    @property
    def merged(self) -> bool:
        return self._buffers.get("_original_weight") is not None or self.__dict__.get("_base_fold") is not None

    # ------------------------------------------------------------------ reading the base

    def weight_rows(self, *, original: bool = False) -> Tensor:
        """The weight as ``(d_out, d_in)`` (a view for Conv1D; for a module base, its dequantized
        weight, float32, a new tensor); ``original``: the pre-merge weight."""
        base = self.module_base()
        if base is not None:
            with original_module_base(base, self.__dict__["_base_fold"] if original else None):
                return bases.dense_weight(base, f"{type(self).__name__}.weight_rows")
        w = self._original_weight if (original and self._original_weight is not None) else self.dense_weight()
        return w.t() if self.transposed else w

    def base_state_key(self) -> Optional[tuple]:
        """Changes whenever the original weight does (module bases; None: dense, or unknown)."""
        base = self.module_base()
        if base is None:
            return None
        with original_module_base(base, self.__dict__["_base_fold"]):
            return bases.state_key(base)

    def merged_rows(self, chunk_thetas: ChunkThetas, splits: Sequence[int]) -> Tensor:
        """``W_hat`` as ``(d_out, d_in)`` float32 (float64 for a float64 weight) from the original
        weight, merged or not."""
        return merged_weight(self.weight_rows(original=True), chunk_thetas, splits)

    # ------------------------------------------------------------------ compute

    def gift_forward(self, x: Tensor, chunk_thetas: ChunkThetas, splits: Sequence[int], form: str) -> Tensor:
        """The unmerged layer: row chunk ``c`` through ``W_c (I + sum_a phi_a psi_a)``."""
        base = self.module_base()
        if base is not None:
            return gift_module_forward(base, x, chunk_thetas, splits, form=form)
        return gift_linear_stacked(x, self.weight_rows(), self.base_bias, chunk_thetas, splits, form=form)

    def base_forward(self, x: Tensor) -> Tensor:
        """The base alone (merged: with ``W_hat`` folded in)."""
        base = self.module_base()
        if base is not None:
            return base(x)
        return F.linear(x, self.weight_rows(), self.base_bias)

    def mixed_forward(self, x: Tensor, ids: Tensor, banks: Sequence[Bank], splits: Sequence[int]) -> Tensor:
        """A mixed batch: row ``i`` of ``x`` through adapter ``ids[i]`` of ``banks`` (one per row
        chunk; -1: the base alone). A module base is run on the transformed input, in the
        activations' dtype, never replaced by its dequantized weight."""
        base = self.module_base()
        if base is not None:
            return mixed_linear(x, ids, banks, splits, base_layer=base)
        return mixed_linear(x, ids, banks, splits, weight=self.weight_rows(), bias=self.base_bias)

    # ------------------------------------------------------------------ merge

    @torch.no_grad()
    def fold_thetas(self, chunk_thetas: ChunkThetas, splits: Sequence[int], owner: str, *,
                    check_finite: bool = False) -> None:
        """Write ``W_hat`` (from the original weight and ``chunk_thetas``) into the base. On a
        merged layer this replaces the merged weight; the first merge's original is kept, so
        :meth:`restore_base` is exact. ``check_finite``: refuse a NaN/inf ``W_hat`` (PEFT's
        ``safe_merge``), leaving the base unchanged."""
        rows = self.weight_rows(original=True)
        w_hat = merged_weight(rows, chunk_thetas, splits)
        if check_finite and not torch.isfinite(w_hat).all():
            raise ValueError(f"{owner}: NaNs or infs in the merged weight")
        base = self.module_base()
        if base is not None:
            done = fold_module_base(base, rows, w_hat, owner)
            first = self.__dict__["_base_fold"]
            self.__dict__["_base_fold"] = done if first is None else ModuleFold(first.snapshot, done.error,
                                                                              done.error_of_update)
            return
        weight = self.dense_weight()
        w_hat = w_hat.to(weight.dtype)
        w_hat = w_hat.t().contiguous() if self.transposed else w_hat
        if self._original_weight is not None:
            weight.copy_(w_hat)
        else:
            self._original_weight = fold(weight, w_hat, owner)

    @torch.no_grad()
    def restore_base(self) -> None:
        """Undo :meth:`fold_thetas`: the original weight, bit for bit."""
        base = self.module_base()
        if base is not None and self.__dict__["_base_fold"] is not None:
            restore_module_base(base, self.__dict__["_base_fold"])
            self.__dict__["_base_fold"] = None
        elif self._original_weight is not None:
            restore(self.dense_weight(), self._original_weight)
            self._original_weight = None

    @property
    def merge_error(self) -> Optional[tuple]:
        """For a merged module base: ``(||Q(W_hat) - W_hat|| / ||W_hat||, ... / ||W_hat - W||)``."""
        f = self.__dict__.get("_base_fold")
        return None if f is None else (f.error, f.error_of_update)
