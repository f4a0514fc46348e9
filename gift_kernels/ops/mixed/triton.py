"""Triton kernels and launchers of the mixed-adapter batch (one adapter of a bank per row).

    u_i = x_i + (x_i psi_a^T) phi_a^T     a = adapter_ids[i]; a = -1: u_i = x_i

The interface is modelled on vLLM's segmented LoRA ops (``lora_shrink`` / ``lora_expand``,
after Punica's SGMV): the rows are grouped by adapter once per call
(:func:`gift_kernels.ops.mixed.segments.segments`: row indices sorted by adapter, rows per slot,
slot start offsets, the adapter of each slot, slot 0 being "no adapter"), and every kernel
runs on a grid ``(row blocks, column blocks, slots)``: a program takes up to BLOCK_M rows of
one slot, gathered through the sorted indices, and exits at once if its slot has fewer rows.
The grid covers all ``A + 1`` slots, so no host sync is needed (the cost: empty programs for
adapters absent from the batch).

``_mixed_shrink_kernel``  ``out[i] = a[i] @ bank_a^T`` for a rank-r bank ``(A, r, K)`` (any
    strides): ``t = x psi_a^T`` forward, ``dt = du phi_a`` backward (the bank a transposed
    view of phis).
``_mixed_expand_kernel``  ``out[i] = a[i] + t[i] @ bank_a^T`` for a bank ``(A, K, r)``:
    ``u = x + t phi_a^T`` forward, ``dx = du + dt psi_a`` backward; slot 0 copies ``a``.
``_mixed_grad_kernel``  ``out_a = sum_i a[i]^T b[i]`` over the rows of adapter a, ``(K, r)``
    per adapter, reduced inside one program (no atomics): ``dphi_a = du^T t``,
    ``dpsi_a^T = x^T dt``.

Dtypes as the dense kernels: Theta is cast to x's dtype for the shrink, t (the rank-path
dtype, float32 for 16-bit x with a float32 bank) is multiplied in its own dtype, accumulation
is float32.
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch
import triton
import triton.language as tl

from .. import tiles as configs
from ..dtypes import rank_dtype
from ..tiles.device import skinny_k_loop
from ..tiles.runtime import cdiv, device_ctx, dot_precision, launch
from .segments import Segments, segments

Tensor = torch.Tensor


@triton.jit
def _slot_rows(rows_ptr, counts_ptr, starts_ptr, slot, m0, BLOCK_M: tl.constexpr):
    """The rows ``m0 .. m0 + BLOCK_M`` of a slot (indices into x) and their mask."""
    count = tl.load(counts_ptr + slot)
    start = tl.load(starts_ptr + slot)
    offs = m0 + tl.arange(0, BLOCK_M)
    mask = offs < count
    rows = tl.load(rows_ptr + start + offs, mask=mask, other=0)
    return rows, mask


@triton.jit(do_not_specialize=["K", "R"])
def _mixed_shrink_kernel(
    a_ptr, bank_ptr, out_ptr, rows_ptr, counts_ptr, starts_ptr, slots_ptr,
    K, R,
    stride_am, stride_ak, stride_ba, stride_br, stride_bk, stride_om, stride_or,
    BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_r = tl.program_id(1)
    slot = tl.program_id(2)
    adapter = tl.load(slots_ptr + slot)
    if adapter < 0:  # rows without an adapter: out stays zero
        return
    if pid_m * BLOCK_M >= tl.load(counts_ptr + slot):
        return
    rows, mask_m = _slot_rows(rows_ptr, counts_ptr, starts_ptr, slot, pid_m * BLOCK_M, BLOCK_M)
    offs_r = pid_r * BLOCK_R + tl.arange(0, BLOCK_R)
    offs_k = tl.arange(0, BLOCK_K)
    mask_r = offs_r < R
    a_ptrs = a_ptr + rows[:, None] * stride_am + offs_k[None, :] * stride_ak
    b_ptrs = (bank_ptr + adapter.to(tl.int64) * stride_ba + offs_k[:, None] * stride_bk
              + offs_r[None, :] * stride_br)  # bank_a^T tile (BLOCK_K, BLOCK_R)
    acc = skinny_k_loop(a_ptrs, b_ptrs, mask_m, mask_r, K, stride_ak, stride_bk,
                        BLOCK_M, BLOCK_K, BLOCK_R, DOT_PRECISION)
    out_ptrs = out_ptr + rows[:, None] * stride_om + offs_r[None, :] * stride_or
    tl.store(out_ptrs, acc.to(out_ptr.dtype.element_ty), mask=mask_m[:, None] & mask_r[None, :])


@triton.jit(do_not_specialize=["K", "R"])
def _mixed_expand_kernel(
    a_ptr, t_ptr, bank_ptr, out_ptr, rows_ptr, counts_ptr, starts_ptr, slots_ptr,
    K, R,
    stride_am, stride_ak, stride_tm, stride_tr, stride_ba, stride_bk, stride_br, stride_om, stride_ok,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    slot = tl.program_id(2)
    if pid_m * BLOCK_M >= tl.load(counts_ptr + slot):
        return
    adapter = tl.load(slots_ptr + slot)
    rows, mask_m = _slot_rows(rows_ptr, counts_ptr, starts_ptr, slot, pid_m * BLOCK_M, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask = mask_m[:, None] & (offs_n < K)[None, :]
    a = tl.load(a_ptr + rows[:, None] * stride_am + offs_n[None, :] * stride_ak, mask=mask, other=0.0)
    out_ptrs = out_ptr + rows[:, None] * stride_om + offs_n[None, :] * stride_ok
    if adapter < 0:  # rows without an adapter: a copy
        tl.store(out_ptrs, a.to(out_ptr.dtype.element_ty), mask=mask)
        return
    rank_dtype = t_ptr.dtype.element_ty
    offs_r = tl.arange(0, BLOCK_R)
    bank = bank_ptr + adapter.to(tl.int64) * stride_ba
    acc = a.to(tl.float32)
    for r0 in range(0, R, BLOCK_R):  # rank chunks keep the registers of r = BLOCK_R
        mask_r = offs_r < R - r0
        t = tl.load(t_ptr + rows[:, None] * stride_tm + (r0 + offs_r)[None, :] * stride_tr,
                    mask=mask_m[:, None] & mask_r[None, :], other=0.0)
        b = tl.load(bank + (r0 + offs_r)[:, None] * stride_br + offs_n[None, :] * stride_bk,
                    mask=mask_r[:, None] & (offs_n < K)[None, :], other=0.0).to(rank_dtype)  # bank_a^T tile
        acc = tl.dot(t, b, acc, input_precision=DOT_PRECISION)
    tl.store(out_ptrs, acc.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit(do_not_specialize=["K", "R"])
def _mixed_grad_kernel(
    a_ptr, b_ptr, out_ptr, rows_ptr, counts_ptr, starts_ptr, slots_ptr,
    K, R,
    stride_am, stride_ak, stride_bm, stride_br, stride_oa, stride_ok, stride_or,
    BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    pid_k = tl.program_id(0)
    pid_r = tl.program_id(1)
    slot = tl.program_id(2)
    adapter = tl.load(slots_ptr + slot)
    if adapter < 0:
        return
    count = tl.load(counts_ptr + slot)
    offs_k = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)
    offs_r = pid_r * BLOCK_R + tl.arange(0, BLOCK_R)
    mask_k = offs_k < K
    mask_r = offs_r < R
    rank_dtype = b_ptr.dtype.element_ty
    acc = tl.zeros((BLOCK_K, BLOCK_R), dtype=tl.float32)
    for m0 in range(0, count, BLOCK_M):  # every row of this adapter, in one program: no atomics
        rows, mask_m = _slot_rows(rows_ptr, counts_ptr, starts_ptr, slot, m0, BLOCK_M)
        a = tl.load(a_ptr + rows[:, None] * stride_am + offs_k[None, :] * stride_ak,
                    mask=mask_m[:, None] & mask_k[None, :], other=0.0).to(rank_dtype)
        b = tl.load(b_ptr + rows[:, None] * stride_bm + offs_r[None, :] * stride_br,
                    mask=mask_m[:, None] & mask_r[None, :], other=0.0)
        acc = tl.dot(tl.trans(a), b, acc, input_precision=DOT_PRECISION)
    out_ptrs = out_ptr + adapter.to(tl.int64) * stride_oa + offs_k[:, None] * stride_ok + offs_r[None, :] * stride_or
    tl.store(out_ptrs, acc.to(out_ptr.dtype.element_ty), mask=mask_k[:, None] & mask_r[None, :])


# ------------------------------------------------------------------------ launchers


def tile(kernel: str, m: int, elem: int, br: int) -> Tuple[int, int, int]:
    """(BLOCK_M, BLOCK_K of the K loops or the expand's column tile BLOCK_N, num_warps) of
    ``shrink`` / ``expand`` / ``grad`` for M rows, element size and rank tile: 16-row blocks at
    decode sizes (most slots hold a row or two), 64 rows otherwise (the grad: 32); fp32 dots run
    on the FMA units, so shorter K steps there (as the dense kernels' fp32 tiles). fp32 at rank
    tile 64 takes 8 warps and (the shrink) at most 32 rows: 4 warps and 64 rows spilled in the
    compile check (triton 3.6 and 3.9, sm_80 and sm_90; with 3xTF32 on the float32 operands,
    16-bit x with a float32 bank compiled clean again, sm_80/86/89/90: benchmarks/NOTES.md). The
    shrink's 16-row tile at rank tile 64 steps K by 32: by 64, 16-bit x with a 16-bit bank
    spilled on sm_86 / sm_89 under triton 3.9 (the transposed bank view of dt = du phi_a)."""
    block_m = 16 if m <= 4 * configs.DECODE_M else 64
    fp32_wide = elem >= 4 and br >= 64
    if kernel == "grad":
        block_m = 32
    elif kernel == "shrink" and fp32_wide:
        block_m = min(block_m, 32)
    step = 64 if kernel == "expand" else (32 if elem >= 4 else 64)
    if kernel == "shrink" and br >= 64 and block_m == 16:
        step = 32
    return block_m, step, 8 if fp32_wide else 4


# Each ``*_call`` returns (kernel, grid, arguments, constexprs + options) exactly as launched:
# benchmarks/compile_kernels.py compiles the same arguments for sm_80 / sm_90.


def shrink_call(a: Tensor, bank: Tensor, out: Tensor, seg: Segments):
    """``out[i] = a[i] @ bank_a^T`` for ``bank (A, r, K)``; rows without an adapter untouched."""
    m, k = a.shape
    r = bank.shape[1]
    br = configs.block_r(r)
    block_m, block_k, warps = tile("shrink", m, a.element_size(), br)
    grid = (cdiv(m, block_m), cdiv(r, br), seg.counts.shape[0])
    args = (a, bank, out, seg.sorted_rows, seg.counts, seg.starts, seg.slot_adapters, k, r,
            *a.stride(), *bank.stride(), *out.stride())
    meta = dict(BLOCK_M=block_m, BLOCK_K=block_k, BLOCK_R=br, DOT_PRECISION=dot_precision(a.dtype), num_warps=warps)
    return _mixed_shrink_kernel, grid, args, meta


def expand_call(a: Tensor, t: Tensor, bank: Tensor, out: Tensor, seg: Segments):
    """``out[i] = a[i] + t[i] @ bank_a^T`` for ``bank (A, K, r)``; ``out[i] = a[i]`` without adapter."""
    m, k = a.shape
    r = bank.shape[2]
    block_m, block_n, warps = tile("expand", m, a.element_size(), configs.SPLIT_R)
    grid = (cdiv(m, block_m), cdiv(k, block_n), seg.counts.shape[0])
    args = (a, t, bank, out, seg.sorted_rows, seg.counts, seg.starts, seg.slot_adapters, k, r,
            *a.stride(), *t.stride(), *bank.stride(), *out.stride())
    meta = dict(BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_R=configs.SPLIT_R, DOT_PRECISION=dot_precision(a.dtype),
                num_warps=warps)
    return _mixed_expand_kernel, grid, args, meta


def grad_call(a: Tensor, b: Tensor, out: Tensor, seg: Segments):
    """``out_a (K, r) = sum a[i]^T b[i]`` over adapter a's rows, for every adapter (``out (A, K, r)``)."""
    m, k = a.shape
    r = b.shape[1]
    br = configs.block_r(r)
    block_m, block_k, warps = tile("grad", m, a.element_size(), br)
    grid = (cdiv(k, block_k), cdiv(r, br), seg.counts.shape[0])
    args = (a, b, out, seg.sorted_rows, seg.counts, seg.starts, seg.slot_adapters, k, r,
            *a.stride(), *b.stride(), *out.stride())
    meta = dict(BLOCK_M=block_m, BLOCK_K=block_k, BLOCK_R=br, DOT_PRECISION=dot_precision(a.dtype), num_warps=warps)
    return _mixed_grad_kernel, grid, args, meta


def _launch(call) -> None:
    launch(*call)


def _shrink(a: Tensor, bank: Tensor, out: Tensor, seg: Segments) -> None:
    _launch(shrink_call(a, bank, out, seg))


def _expand(a: Tensor, t: Tensor, bank: Tensor, out: Tensor, seg: Segments) -> None:
    _launch(expand_call(a, t, bank, out, seg))


def _grad(a: Tensor, b: Tensor, out: Tensor, seg: Segments) -> None:
    _launch(grad_call(a, b, out, seg))


def mixed_fwd(x: Tensor, phis: Tensor, psis: Tensor, adapter_ids: Tensor) -> Tuple[Tensor, Tensor]:
    """The backend's ``mixed_fwd``: ``(u, t)`` of the mixed-adapter input-side form."""
    m, k = x.shape
    n_adapters, _, r = phis.shape
    t = x.new_zeros(m, r, dtype=rank_dtype(x.dtype, phis.dtype))
    u = torch.empty((m, k), dtype=x.dtype, device=x.device)
    if m == 0 or k == 0:
        return u, t
    seg = segments(adapter_ids, n_adapters)
    with device_ctx(x):
        _shrink(x, psis, t, seg)
        _expand(x, t, phis, u, seg)
    return u, t


def mixed_bwd(
    grad_u: Tensor, x: Tensor, t: Tensor, phis: Tensor, psis: Tensor, adapter_ids: Tensor,
    needs: Tuple[bool, bool, bool],
) -> Tuple[Optional[Tensor], ...]:
    """The backend's ``mixed_bwd``: ``(dx, dphis, dpsis)``, None where not needed."""
    need_x, need_phi, need_psi = needs
    m, k = x.shape
    n_adapters, _, r = phis.shape
    dx = dphis = dpsis = None
    if m == 0 or k == 0:
        return (torch.zeros_like(x) if need_x else None, torch.zeros_like(phis) if need_phi else None,
                torch.zeros_like(psis) if need_psi else None)
    seg = segments(adapter_ids, n_adapters)
    with device_ctx(x):
        if need_x or need_psi:
            dt = x.new_zeros(m, r, dtype=t.dtype)
            _shrink(grad_u, phis.transpose(1, 2), dt, seg)  # du phi_a
            if need_x:
                dx = torch.empty((m, k), dtype=x.dtype, device=x.device)
                _expand(grad_u, dt, psis.transpose(1, 2), dx, seg)  # du + dt psi_a
            if need_psi:
                acc = torch.empty(n_adapters, r, k, dtype=torch.float32, device=x.device)
                _grad(x, dt, acc.transpose(1, 2), seg)  # dpsi_a^T = x^T dt
                dpsis = acc.to(psis.dtype)
        if need_phi:
            acc = torch.empty(n_adapters, k, r, dtype=torch.float32, device=x.device)
            _grad(grad_u, t, acc, seg)  # dphi_a = du^T t
            dphis = acc.to(phis.dtype)
    return dx, dphis, dpsis
