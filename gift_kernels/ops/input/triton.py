"""The input-side form on Triton: ``u = x + (x psi^T) phi^T`` for any base layer, kernels then
launchers (W is never read; on CUDA the base GEMM on u is cuBLAS's).

``_gift_input_fwd_kernel``  t = x psi^T and u = x + t phi^T, one program per row block
    (persistent: each program loops over row blocks ``pid, pid + programs, ...``): a pass
    over the row block's x for t, then a second pass writing u (that second read is meant to
    come from L2: the launcher bounds the programs so that their row blocks fit).
``_gift_input_bwd_kernel``  from du: dt = du phi and dphi += du^T t in one pass over du, then
    dx = du + dt psi and dpsi += dt^T x in one pass over x (and du again, for dx). dphi and
    dpsi are float32 buffers reduced over the row blocks with atomics. Cost model and the
    split-over-K alternative: benchmarks/NOTES.md.

Rank-path dtype: the t and dt buffers are float32 for 16-bit x with a float32 Theta
(``rank_dtype``: the element type of the t pointer), so the rank-r products are held and
multiplied in float32 and cannot overflow fp16; otherwise x's dtype. Tiles:
:mod:`gift_kernels.ops.tiles`; availability, device facts and tuning: :mod:`gift_kernels.ops.tiles.runtime`.
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch
import triton
import triton.language as tl

from .. import tiles as configs
from ..dtypes import rank_dtype
from ..tiles import runtime
from ..tiles.runtime import device_capability, device_ctx, launch, offsets_fit

Tensor = torch.Tensor


@triton.jit(do_not_specialize=["M"])
def _gift_input_fwd_kernel(
    x_ptr, phi_ptr, psi_ptr, t_ptr, u_ptr,
    M, K, R,
    stride_xm, stride_xk, stride_phik, stride_phir, stride_psir, stride_psik,
    stride_tm, stride_tr, stride_um, stride_uk,
    BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    """t = x psi^T (stored in t's dtype, the rank dtype) and u = x + t phi^T, rank in
    chunks of BLOCK_R. t = x psi^T multiplies in x's dtype (psi converted in-kernel) with a
    float32 accumulator; t phi^T multiplies in the rank dtype, so a float32 t never passes
    through fp16."""
    # the launcher never launches an empty problem: the compiler may drop the loops' guards
    # (predicate registers are few; one kept live across the passes was spilled)
    tl.assume(M > 0)
    tl.assume(K > 0)
    tl.assume(R > 0)
    x_dtype = x_ptr.dtype.element_ty
    rank_dtype = t_ptr.dtype.element_ty
    offs_k = tl.arange(0, BLOCK_K)
    offs_r = tl.arange(0, BLOCK_R)
    for rb in range(tl.program_id(0), tl.cdiv(M, BLOCK_M), tl.num_programs(0)):
        offs_m = rb * BLOCK_M + tl.arange(0, BLOCK_M)
        mask_m = offs_m < M
        # pass 1 over the row block: t
        for r0 in range(0, R, BLOCK_R):
            mask_r = offs_r < R - r0
            t_acc = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
            for k0 in range(0, K, BLOCK_K):
                ks = k0 + offs_k
                mask_k = ks < K
                x = tl.load(x_ptr + offs_m[:, None] * stride_xm + ks[None, :] * stride_xk,
                            mask=mask_m[:, None] & mask_k[None, :], other=0.0)
                psi_t = tl.load(psi_ptr + ks[:, None] * stride_psik + (r0 + offs_r)[None, :] * stride_psir,
                                mask=mask_k[:, None] & mask_r[None, :], other=0.0).to(x_dtype)
                t_acc = tl.dot(x, psi_t, t_acc, input_precision=DOT_PRECISION)
            tl.store(t_ptr + offs_m[:, None] * stride_tm + (r0 + offs_r)[None, :] * stride_tr, t_acc.to(rank_dtype),
                     mask=mask_m[:, None] & mask_r[None, :])
        tl.debug_barrier()  # t's rows, stored by other threads of this program, are read below
        # pass 2 over the row block: u = x + t phi^T
        for k0 in range(0, K, BLOCK_K):
            ks = k0 + offs_k
            mask_k = ks < K
            mask_mk = mask_m[:, None] & mask_k[None, :]
            acc = tl.load(x_ptr + offs_m[:, None] * stride_xm + ks[None, :] * stride_xk,
                          mask=mask_mk, other=0.0).to(tl.float32)
            for r0 in range(0, R, BLOCK_R):
                mask_r = offs_r < R - r0
                t = tl.load(t_ptr + offs_m[:, None] * stride_tm + (r0 + offs_r)[None, :] * stride_tr,
                            mask=mask_m[:, None] & mask_r[None, :], other=0.0)
                phi_t = tl.load(phi_ptr + (r0 + offs_r)[:, None] * stride_phir + ks[None, :] * stride_phik,
                                mask=mask_r[:, None] & mask_k[None, :], other=0.0).to(rank_dtype)  # phi^T tile
                acc = tl.dot(t, phi_t, acc, input_precision=DOT_PRECISION)
            tl.store(u_ptr + offs_m[:, None] * stride_um + ks[None, :] * stride_uk, acc.to(x_dtype), mask=mask_mk)
        tl.debug_barrier()  # the next row block's t stores must not overtake this block's t loads


@triton.jit(do_not_specialize=["M"])
def _gift_input_bwd_kernel(
    du_ptr, x_ptr, t_ptr, phi_ptr, psi_ptr, dt_ptr, dx_ptr, dphi_ptr, dpsi_ptr,
    M, K, R,
    stride_dum, stride_duk, stride_xm, stride_xk, stride_tm, stride_tr,
    stride_phik, stride_phir, stride_psir, stride_psik, stride_dtm, stride_dtr, stride_dxm, stride_dxk,
    BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr, NEED_X: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    """dt = du phi (scratch in t's dtype), dphi = du^T t and dpsi = dt^T x into float32
    (K x R) / (R x K) buffers with atomics, dx = du + dt psi when NEED_X. du phi multiplies
    in x's dtype (phi converted) with a float32 accumulator; every product with t or dt in
    the rank dtype."""
    # the launcher never launches an empty problem: the compiler may drop the loops' guards
    # (predicate registers are few; one kept live across the passes was spilled)
    tl.assume(M > 0)
    tl.assume(K > 0)
    tl.assume(R > 0)
    x_dtype = du_ptr.dtype.element_ty
    rank_dtype = t_ptr.dtype.element_ty
    offs_k = tl.arange(0, BLOCK_K)
    offs_r = tl.arange(0, BLOCK_R)
    for rb in range(tl.program_id(0), tl.cdiv(M, BLOCK_M), tl.num_programs(0)):
        offs_m = rb * BLOCK_M + tl.arange(0, BLOCK_M)
        mask_m = offs_m < M
        # pass 1 over du: dt and dphi
        for r0 in range(0, R, BLOCK_R):
            mask_r = offs_r < R - r0
            mask_mr = mask_m[:, None] & mask_r[None, :]
            t = tl.load(t_ptr + offs_m[:, None] * stride_tm + (r0 + offs_r)[None, :] * stride_tr, mask=mask_mr,
                        other=0.0)
            dt_acc = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
            for k0 in range(0, K, BLOCK_K):
                ks = k0 + offs_k
                mask_k = ks < K
                mask_kr = mask_k[:, None] & mask_r[None, :]
                du = tl.load(du_ptr + offs_m[:, None] * stride_dum + ks[None, :] * stride_duk,
                             mask=mask_m[:, None] & mask_k[None, :], other=0.0)
                phi = tl.load(phi_ptr + ks[:, None] * stride_phik + (r0 + offs_r)[None, :] * stride_phir,
                              mask=mask_kr, other=0.0).to(x_dtype)
                dt_acc = tl.dot(du, phi, dt_acc, input_precision=DOT_PRECISION)
                dphi = tl.dot(tl.trans(du.to(rank_dtype)), t, input_precision=DOT_PRECISION)  # (BLOCK_K, BLOCK_R)
                tl.atomic_add(dphi_ptr + ks[:, None] * R + (r0 + offs_r)[None, :], dphi, mask=mask_kr, sem="relaxed")
            tl.store(dt_ptr + offs_m[:, None] * stride_dtm + (r0 + offs_r)[None, :] * stride_dtr,
                     dt_acc.to(dt_ptr.dtype.element_ty), mask=mask_mr)
        tl.debug_barrier()  # dt's rows, stored by other threads of this program, are read below
        # pass 2 over x (and du): dpsi and dx
        for k0 in range(0, K, BLOCK_K):
            ks = k0 + offs_k
            mask_k = ks < K
            mask_mk = mask_m[:, None] & mask_k[None, :]
            x = tl.load(x_ptr + offs_m[:, None] * stride_xm + ks[None, :] * stride_xk, mask=mask_mk,
                        other=0.0).to(rank_dtype)
            if NEED_X:
                acc = tl.load(du_ptr + offs_m[:, None] * stride_dum + ks[None, :] * stride_duk, mask=mask_mk,
                              other=0.0).to(tl.float32)
            for r0 in range(0, R, BLOCK_R):
                mask_r = offs_r < R - r0
                mask_rk = mask_r[:, None] & mask_k[None, :]
                dt = tl.load(dt_ptr + offs_m[:, None] * stride_dtm + (r0 + offs_r)[None, :] * stride_dtr,
                             mask=mask_m[:, None] & mask_r[None, :], other=0.0).to(rank_dtype)
                dpsi = tl.dot(tl.trans(dt), x, input_precision=DOT_PRECISION)  # (BLOCK_R, BLOCK_K)
                tl.atomic_add(dpsi_ptr + (r0 + offs_r)[:, None] * K + ks[None, :], dpsi, mask=mask_rk, sem="relaxed")
                if NEED_X:
                    psi = tl.load(psi_ptr + (r0 + offs_r)[:, None] * stride_psir + ks[None, :] * stride_psik,
                                  mask=mask_rk, other=0.0).to(rank_dtype)
                    acc = tl.dot(dt, psi, acc, input_precision=DOT_PRECISION)
            if NEED_X:
                tl.store(dx_ptr + offs_m[:, None] * stride_dxm + ks[None, :] * stride_dxk, acc.to(dx_ptr.dtype.element_ty),
                         mask=mask_mk)
        tl.debug_barrier()  # the next row block's dt stores must not overtake this block's dt loads


# ------------------------------------------------------------------------ launchers


def input_meta(cfg: configs.InputConfig, br: int, dtype: torch.dtype, need_x: Optional[bool] = None) -> dict:
    """Constexprs and launch options of ``_gift_input_fwd_kernel`` (``need_x`` None) or
    ``_gift_input_bwd_kernel`` (``NEED_X``: whether dx is written)."""
    meta = dict(BLOCK_M=cfg.block_m, BLOCK_K=cfg.block_k, BLOCK_R=br, DOT_PRECISION=runtime.dot_precision(dtype),
                num_warps=cfg.num_warps, num_stages=cfg.num_stages)
    if need_x is not None:
        meta["NEED_X"] = need_x
    return meta


def input_fwd_args(x, phi, psi, t, u) -> tuple:
    """Positional arguments of ``_gift_input_fwd_kernel``."""
    return (x, phi, psi, t, u, x.shape[0], x.shape[1], phi.shape[1],
            x.stride(0), x.stride(1), phi.stride(0), phi.stride(1), psi.stride(0), psi.stride(1),
            t.stride(0), t.stride(1), u.stride(0), u.stride(1))


def input_bwd_args(du, x, t, phi, psi, dt, dx, dphi_acc, dpsi_acc) -> tuple:
    """Positional arguments of ``_gift_input_bwd_kernel`` (``dx`` unread and unwritten
    without NEED_X; any tensor of x's dtype stands in)."""
    return (du, x, t, phi, psi, dt, dx, dphi_acc, dpsi_acc, x.shape[0], x.shape[1], phi.shape[1],
            du.stride(0), du.stride(1), x.stride(0), x.stride(1), t.stride(0), t.stride(1),
            phi.stride(0), phi.stride(1), psi.stride(0), psi.stride(1), dt.stride(0), dt.stride(1),
            dx.stride(0), dx.stride(1))


def input_programs(x: Tensor, block_m: int, m: int, k: int) -> int:
    """Grid of the input-side kernels (persistent over row blocks). Enough programs to
    stream (at least one per SM), few enough that the row blocks in flight fit in half the
    L2 -- the second pass over a row block (x forward, du backward) then reads L2, not HBM
    -- and at most 4 per SM."""
    blocks = triton.cdiv(m, block_m)
    if not x.is_cuda:
        return min(blocks, runtime.INTERPRETED_PROGRAMS)
    sms, l2 = runtime.device_sizes(x.device)
    per_sm = max(1, min(4, (l2 // 2) // (sms * block_m * k * x.element_size())))
    return min(blocks, sms * per_sm)


def _input_config(kernel: str, key: tuple, x: Tensor, theta: Tensor, m: int, k: int, br: int, run,
                  reset) -> configs.InputConfig:
    fixed = configs.fixed_config()
    if fixed is not None:
        return configs.InputConfig(fixed.block_m, fixed.block_k, fixed.num_warps, fixed.num_stages)
    cands = configs.input_candidates(kernel, device_capability(x.device), x.element_size(), theta.element_size(),
                                     br, m, k)
    return runtime.autotune(key, cands, run, reset, x.device)


def input_fwd(x: Tensor, phi: Tensor, psi: Tensor) -> Tuple[Tensor, Tensor]:
    """``u = x + (x psi^T) phi^T`` on 2-D ``x (M, K)`` (any strides) by ``_gift_input_fwd_kernel``:
    one pass over x for t, one more (from L2) writing u. Returns ``(u, t)``, t in the rank dtype."""
    m, k = x.shape
    r = phi.shape[1]
    u = x.new_empty(m, k)
    t = x.new_empty(m, r, dtype=rank_dtype(x.dtype, phi.dtype))
    if m == 0 or k == 0:  # u = x (no elements when k = 0), t = x psi^T = 0
        return u.copy_(x), t.zero_()
    phi = offsets_fit(phi, "gift_input", "phi")
    psi = offsets_fit(psi, "gift_input", "psi")
    br = configs.input_rank_tile(r, x.element_size())
    with device_ctx(x):

        def run(cfg):
            grid = (input_programs(x, cfg.block_m, m, k),)
            launch(_gift_input_fwd_kernel, grid, input_fwd_args(x, phi, psi, t, u), input_meta(cfg, br, x.dtype))

        key = ("input_fwd", x.device.index, configs.m_bucket(m), k, br, x.dtype, phi.dtype)
        run(_input_config("input_fwd", key, x, phi, m, k, br, run, lambda: None))
    return u, t


def input_bwd(
    grad_u: Tensor, x: Tensor, t: Tensor, phi: Tensor, psi: Tensor, needs: Tuple[bool, bool, bool]
) -> Tuple[Optional[Tensor], ...]:
    """Backward of the input-side form by ``_gift_input_bwd_kernel``: one pass over du for
    ``dt = du phi`` and ``dphi = du^T t``, one over x (and du, for ``dx = du + dt psi``) for
    ``dpsi = dt^T x``. ``needs`` = which of (x, phi, psi) want a gradient; dphi and dpsi ride
    along when only one of them (or only dx) is wanted. Returns ``(dx, dphi, dpsi)``, None
    where not needed."""
    need_x, need_phi, need_psi = needs
    if not (need_x or need_phi or need_psi):
        return None, None, None
    m, k = x.shape
    r = phi.shape[1]
    if m == 0 or k == 0:
        return (torch.zeros_like(x) if need_x else None, torch.zeros_like(phi) if need_phi else None,
                torch.zeros_like(psi) if need_psi else None)
    du = offsets_fit(grad_u, "gift_input backward", "grad_u")
    phi = offsets_fit(phi, "gift_input backward", "phi")
    psi = offsets_fit(psi, "gift_input backward", "psi")
    br = configs.input_rank_tile(r, x.element_size())
    dx = x.new_empty(m, k) if need_x else x  # x stands in for the pointer when no dx is written
    dt = x.new_empty(m, r, dtype=t.dtype)
    dphi_acc = torch.zeros(k, r, device=x.device, dtype=torch.float32)
    dpsi_acc = torch.zeros(r, k, device=x.device, dtype=torch.float32)
    with device_ctx(x):

        def run(cfg):
            grid = (input_programs(x, cfg.block_m, m, k),)
            launch(_gift_input_bwd_kernel, grid, input_bwd_args(du, x, t, phi, psi, dt, dx, dphi_acc, dpsi_acc),
                   input_meta(cfg, br, x.dtype, need_x))

        def reset():  # timed launches accumulated into the Theta grads
            dphi_acc.zero_()
            dpsi_acc.zero_()

        key = ("input_bwd", x.device.index, configs.m_bucket(m), k, br, x.dtype, phi.dtype, need_x)
        run(_input_config("input_bwd", key, x, phi, m, k, br, run, reset))
    return (dx if need_x else None, dphi_acc.to(phi.dtype) if need_phi else None,
            dpsi_acc.to(psi.dtype) if need_psi else None)
