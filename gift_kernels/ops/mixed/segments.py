"""Token-to-adapter segmentation for mixed-adapter batches, shared by the mixed launchers.

A mixed batch maps each row (token) ``i`` of ``x`` to an adapter ``adapter_ids[i]`` in
``[-1, A)``, -1 meaning the base layer alone. Both launchers group rows by adapter first:

:func:`segments` (the Triton kernels, interface as vLLM's ``lora_shrink`` / ``lora_expand``):
    ``sorted_rows`` the row indices sorted by adapter (stable), ``counts[s]`` the rows of slot
    ``s``, ``starts[s]`` where slot ``s`` begins in ``sorted_rows``, ``slot_adapters[s]`` the
    adapter of slot ``s`` (``-1`` for slot 0, then ``0 .. A-1``). Computed on the device
    without a host sync (the grid covers every slot; empty slots exit at once).

:func:`chunks` (the torch backend): the adapted rows grouped by adapter and cut into
    chunks of ``size`` rows, each chunk one adapter's, padded: one gather puts x into the
    layout, a pair of ``bmm`` over the chunks computes every adapter's skinny products at once
    (no loop over adapters), one ``index_add`` adds them back onto x. Padding at most doubles
    the rows; each present adapter's Theta is gathered at most ``1 + rows / size`` times (not
    at all when chunk a is adapter a). Needs a few counts on the host (two syncs).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from .. import memo


@dataclass(frozen=True)
class Segments:
    sorted_rows: Tensor  # (M,) int64
    counts: Tensor  # (A + 1,) int32
    starts: Tensor  # (A + 1,) int32
    slot_adapters: Tensor  # (A + 1,) int32: -1, 0, 1, ..., A - 1


def segments(adapter_ids: Tensor, n_adapters: int) -> Segments:
    """vLLM-style metadata of a mixed batch (see the module docstring); no host sync. Inside an
    eager mixed call, computed once for its forward and backward (:mod:`gift_kernels.ops.memo`)."""
    return memo.derived(adapter_ids, ("segments", n_adapters), lambda: _segments(adapter_ids, n_adapters))


def _segments(adapter_ids: Tensor, n_adapters: int) -> Segments:
    slot = adapter_ids + 1  # slot 0: no adapter
    sorted_rows = torch.argsort(slot, stable=True)
    counts = torch.zeros(n_adapters + 1, dtype=torch.int64, device=slot.device)
    counts.scatter_add_(0, slot, torch.ones_like(slot))  # bincount would sync for its output size
    starts = counts.cumsum(0) - counts
    slots = torch.arange(-1, n_adapters, device=slot.device, dtype=torch.int32)
    return Segments(sorted_rows, counts.to(torch.int32), starts.to(torch.int32), slots)


@dataclass(frozen=True)
class Chunks:
    """The adapted rows of x in a padded layout of ``n_chunks`` chunks of ``size`` rows, each
    chunk one adapter's (rows without an adapter are left out)."""

    src: Tensor  # (n_chunks * size,) the row of x in each slot (padding slots: row 0)
    valid: Tensor  # (n_chunks, size, 1) bool: the slot holds a row (not padding)
    chunk_adapters: Tensor  # (n_chunks,) the adapter of each chunk
    size: int
    n_chunks: int
    identity: bool  # chunk a is adapter a for every adapter: the bank needs no gather
    adapted: int  # rows with an adapter
    single: int  # the adapter of every row when they all have the same one, else -1


def chunks(adapter_ids: Tensor, n_adapters: int) -> Chunks:
    """The torch backend's padded chunk layout of the adapted rows (see the module docstring);
    inside an eager mixed call, computed once for its forward and backward (as :func:`segments`)."""
    return memo.derived(adapter_ids, ("chunks", n_adapters), lambda: _chunks(adapter_ids, n_adapters))


def _chunks(adapter_ids: Tensor, n_adapters: int) -> Chunks:
    """:func:`chunks`, computed.

    One chunk per present adapter, as long as its largest group, when that at most doubles the
    rows (typical batches: no gather of the bank when every adapter is present); else chunks of
    the mean group size (a skewed batch: a hot adapter spans several chunks)."""
    device = adapter_ids.device
    m = adapter_ids.shape[0]
    key = torch.where(adapter_ids < 0, n_adapters, adapter_ids)  # rows without an adapter: last
    counts_all = torch.bincount(key, minlength=n_adapters + 1)
    counts = counts_all[:n_adapters]
    longest, present, base = torch.stack([counts.max(), (counts > 0).sum(), counts_all[n_adapters]]).tolist()
    n = m - base
    if n == 0:
        empty = torch.empty(0, dtype=torch.int64, device=device)
        return Chunks(empty, torch.empty(0, 1, 1, dtype=torch.bool, device=device), empty, 1, 0, False, 0, -1)
    size = longest if present * longest <= 2 * n else -(-n // present)
    order = torch.argsort(key, stable=True)[:n]
    group = key[order]
    starts = counts.cumsum(0) - counts
    per_adapter = (counts + size - 1) // size
    first_chunk = per_adapter.cumsum(0) - per_adapter
    n_chunks = int(per_adapter.sum())
    pos = torch.arange(n, device=device) - starts[group]  # row's place within its adapter's group
    slot = (first_chunk[group] + pos // size) * size + pos % size
    src = torch.zeros(n_chunks * size, dtype=torch.int64, device=device)
    src[slot] = order
    valid = torch.zeros(n_chunks * size, dtype=torch.bool, device=device)
    valid[slot] = True
    chunk_adapters = torch.repeat_interleave(torch.arange(n_adapters, device=device), per_adapter,
                                             output_size=n_chunks)
    single = int(chunk_adapters[0]) if present == 1 and base == 0 else -1
    identity = present == n_adapters and n_chunks == n_adapters  # every adapter present, one chunk each
    return Chunks(src, valid.view(n_chunks, size, 1), chunk_adapters, size, n_chunks, identity, n, single)
