"""Token-to-adapter segmentation for mixed-adapter batches, shared by the mixed launchers.

A mixed batch maps each row (token) ``i`` of ``x`` to an adapter ``adapter_ids[i]`` in
``[-1, A)``, -1 meaning the base layer alone. Both launchers group rows by adapter first:

:func:`segments` (the Triton kernels, interface as vLLM's ``lora_shrink`` / ``lora_expand``):
    ``sorted_rows`` the row indices sorted by adapter (stable), ``counts[s]`` the rows of slot
    ``s``, ``starts[s]`` where slot ``s`` begins in ``sorted_rows``, ``slot_adapters[s]`` the
    adapter of slot ``s`` (``-1`` for slot 0, then ``0 .. A-1``). Computed on the device
    without a host sync (the grid covers every slot; empty slots exit at once).

:func:`chunks` (the torch backend): the adapted rows cut into equal chunks of ``size`` rows,
    each chunk one adapter's, padded with empty rows: a pair of ``bmm`` over the chunks
    computes every adapter's skinny products at once. ``size`` is the mean number of rows per
    used adapter, so padding at most doubles the rows and each used adapter's Theta is
    gathered at most ``1 + rows / size`` times. Needs the group sizes on the host (one sync).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass(frozen=True)
class Segments:
    sorted_rows: Tensor  # (M,) int64
    counts: Tensor  # (A + 1,) int32
    starts: Tensor  # (A + 1,) int32
    slot_adapters: Tensor  # (A + 1,) int32: -1, 0, 1, ..., A - 1


def segments(adapter_ids: Tensor, n_adapters: int) -> Segments:
    """vLLM-style metadata of a mixed batch (see the module docstring); no host sync."""
    slot = adapter_ids + 1  # slot 0: no adapter
    sorted_rows = torch.argsort(slot, stable=True)
    counts = torch.zeros(n_adapters + 1, dtype=torch.int64, device=slot.device)
    counts.scatter_add_(0, slot, torch.ones_like(slot))  # bincount would sync for its output size
    starts = counts.cumsum(0) - counts
    slots = torch.arange(-1, n_adapters, device=slot.device, dtype=torch.int32)
    return Segments(sorted_rows, counts.to(torch.int32), starts.to(torch.int32), slots)


@dataclass(frozen=True)
class Chunks:
    rows: Tensor  # (n,) the adapted rows of x, grouped by adapter
    slots: Tensor  # (n,) where each of those rows sits in the padded (n_chunks * size) layout
    chunk_adapters: Tensor  # (n_chunks,) the adapter of each chunk
    size: int  # rows per chunk
    n_chunks: int

    @property
    def padded_rows(self) -> int:
        return self.n_chunks * self.size


def chunks(adapter_ids: Tensor, n_adapters: int) -> Chunks:
    """The torch backend's padded chunk layout of the adapted rows (see the module docstring);
    ``n_chunks == 0`` when no row has an adapter."""
    device = adapter_ids.device
    key = torch.where(adapter_ids < 0, n_adapters, adapter_ids)  # base rows sort last
    order = torch.argsort(key, stable=True)
    counts = torch.bincount(key, minlength=n_adapters + 1)[:n_adapters]
    n = int(counts.sum())
    used = int((counts > 0).sum())
    if n == 0:
        empty = torch.empty(0, dtype=torch.int64, device=device)
        return Chunks(empty, empty, empty, 1, 0)
    size = -(-n // used)  # mean rows per used adapter, rounded up
    rows = order[:n]
    group = key[rows]
    starts = counts.cumsum(0) - counts
    pos = torch.arange(n, device=device) - starts[group]  # row's place within its adapter's group
    per_adapter = (counts + size - 1) // size  # chunks of each adapter
    first_chunk = per_adapter.cumsum(0) - per_adapter
    n_chunks = int(per_adapter.sum())
    chunk_adapters = torch.repeat_interleave(torch.arange(n_adapters, device=device), per_adapter,
                                             output_size=n_chunks)
    slots = (first_chunk[group] + pos // size) * size + pos % size
    return Chunks(rows, slots, chunk_adapters, size, n_chunks)
