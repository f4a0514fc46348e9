"""The input-side form on Triton: ``u = x + (x psi^T) phi^T`` for any base layer, kernels then
launchers (W is never read; on CUDA the base GEMM on u is cuBLAS's).

``_gift_input_fwd_kernel``  t = x psi^T and u = x + t phi^T, one program per row block
    (persistent: each program loops over row blocks ``pid, pid + programs, ...``): a pass
    over the row block's x for t, then a second pass writing u (that second read is meant to
    come from L2: the launcher bounds the programs so that their row blocks fit). With
    ``WRITE_U`` off it is the backward's ``dt = du phi`` (one pass over du).
``_gift_input_bwd_kernel``  given dt: on a grid (d_in column blocks x row splits), dx = du + dt
    psi (one read of du and x, one write of dx) and the split's partial dphi = du^T t and
    dpsi = dt^T x, kept in registers and written once; the launcher sums the splits in a fixed
    order. No atomics anywhere: the same bits on every run. Cost model: benchmarks/NOTES.md.

Rank-path dtype: the t and dt buffers are float32 for 16-bit x with a float32 Theta
(``rank_dtype``: the element type of the t pointer), so the rank-r products are held and
multiplied in float32 (3xTF32 on the tensor cores: float32 accuracy) and cannot overflow fp16;
otherwise x's dtype. Tiles:
:mod:`gift_kernels.ops.tiles`; availability, device facts and tuning: :mod:`gift_kernels.ops.tiles.runtime`.
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch
import triton
import triton.language as tl

from .. import tiles as configs
from ..dtypes import as_dtype, rank_dtype
from ..tiles import runtime
from ..tiles.runtime import device_capability, device_ctx, launch, offsets_fit

Tensor = torch.Tensor


@triton.jit(do_not_specialize=["M"])
def _gift_input_fwd_kernel(
    x_ptr, phi_ptr, psi_ptr, t_ptr, u_ptr,
    M, K, R,
    stride_xm, stride_xk, stride_phik, stride_phir, stride_psir, stride_psik,
    stride_tm, stride_tr, stride_um, stride_uk,
    BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr, WRITE_U: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    """t = x psi^T (stored in t's dtype, the rank dtype) and, when WRITE_U, u = x + t phi^T;
    rank in chunks of BLOCK_R. t = x psi^T multiplies in x's dtype (psi converted in-kernel)
    with a float32 accumulator; t phi^T multiplies in the rank dtype, so a float32 t never
    passes through fp16. Without WRITE_U it is the backward's dt = du phi (x = du, psi = a
    transposed view of phi)."""
    # the launcher never launches an empty problem: the compiler may drop the loops' guards
    # (predicate registers are few; one kept live across the passes was spilled)
    tl.assume(M > 0)
    tl.assume(K > 0)
    tl.assume(R > 0)
    x_dtype = x_ptr.dtype.element_ty
    rank_dtype = t_ptr.dtype.element_ty
    offs_k = tl.arange(0, BLOCK_K)
    offs_r = tl.arange(0, BLOCK_R)
    n_k = tl.cdiv(K, BLOCK_K)
    for rb in range(tl.program_id(0), tl.cdiv(M, BLOCK_M), tl.num_programs(0)):
        offs_m = rb * BLOCK_M + tl.arange(0, BLOCK_M)
        mask_m = offs_m < M
        # pass 1 over the row block: t. Each row block starts at its own K step, so the
        # programs in flight read different psi tiles (a fixed order per row block: the same
        # sums on every run)
        for r0 in range(0, R, BLOCK_R):
            mask_r = offs_r < R - r0
            t_acc = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
            for i in range(0, n_k):
                ks = ((i + rb) % n_k) * BLOCK_K + offs_k
                mask_k = ks < K
                x = tl.load(x_ptr + offs_m[:, None] * stride_xm + ks[None, :] * stride_xk,
                            mask=mask_m[:, None] & mask_k[None, :], other=0.0)
                psi_t = tl.load(psi_ptr + ks[:, None] * stride_psik + (r0 + offs_r)[None, :] * stride_psir,
                                mask=mask_k[:, None] & mask_r[None, :], other=0.0).to(x_dtype)
                t_acc = tl.dot(x, psi_t, t_acc, input_precision=DOT_PRECISION)
            tl.store(t_ptr + offs_m[:, None] * stride_tm + (r0 + offs_r)[None, :] * stride_tr, t_acc.to(rank_dtype),
                     mask=mask_m[:, None] & mask_r[None, :])
        if WRITE_U:
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


@triton.jit(do_not_specialize=["M", "ROWS_PER_SPLIT"])
def _gift_input_bwd_kernel(
    du_ptr, add_ptr, x_ptr, t_ptr, dt_ptr, psi_ptr, dx_ptr, dphi_ptr, dpsi_ptr,
    M, K, R, ROWS_PER_SPLIT,
    stride_dum, stride_duk, stride_addm, stride_addk, stride_xm, stride_xk, stride_tm, stride_tr,
    stride_dtm, stride_dtr, stride_psir, stride_psik, stride_dxm, stride_dxk,
    stride_dphis, stride_dphik, stride_dphir, stride_dpsis, stride_dpsir, stride_dpsik,
    BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr,
    NEED_X: tl.constexpr, NEED_PHI: tl.constexpr, NEED_PSI: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    """Program (column block of d_in, split of the rows), R <= BLOCK_R: dx = add + dt psi on
    its tile (add = du, or dx itself for the launcher's later rank windows), and its split's
    partial sums dphi_s = du^T t (BLOCK_K x R) and dpsi_s = dt^T x (R x BLOCK_K), each written
    once into a float32 workspace (S, K, R) / (S, R, K) that no other program touches: no
    atomics; the launcher sums the S partials in a fixed order. Every product with t or dt
    runs in the rank dtype (t's), accumulated in float32."""
    tl.assume(M > 0)
    tl.assume(K > 0)
    tl.assume(R > 0)
    rank_dtype = t_ptr.dtype.element_ty
    pid_k = tl.program_id(0)
    pid_s = tl.program_id(1)
    offs_k = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)
    offs_r = tl.arange(0, BLOCK_R)
    mask_k = offs_k < K
    mask_r = offs_r < R
    m_begin = pid_s * ROWS_PER_SPLIT
    m_end = tl.minimum(M, m_begin + ROWS_PER_SPLIT)
    if NEED_X:
        psi = tl.load(psi_ptr + offs_r[:, None] * stride_psir + offs_k[None, :] * stride_psik,
                      mask=mask_r[:, None] & mask_k[None, :], other=0.0).to(rank_dtype)
    dphi_acc = tl.zeros((BLOCK_K, BLOCK_R), dtype=tl.float32)
    dpsi_acc = tl.zeros((BLOCK_R, BLOCK_K), dtype=tl.float32)
    for m0 in range(m_begin, m_end, BLOCK_M):
        offs_m = m0 + tl.arange(0, BLOCK_M)
        mask_m = offs_m < m_end
        mask_mk = mask_m[:, None] & mask_k[None, :]
        mask_mr = mask_m[:, None] & mask_r[None, :]
        if NEED_PHI:
            du = tl.load(du_ptr + offs_m[:, None] * stride_dum + offs_k[None, :] * stride_duk, mask=mask_mk, other=0.0)
            t = tl.load(t_ptr + offs_m[:, None] * stride_tm + offs_r[None, :] * stride_tr, mask=mask_mr, other=0.0)
            dphi_acc = tl.dot(tl.trans(du.to(rank_dtype)), t, dphi_acc, input_precision=DOT_PRECISION)
        if NEED_X or NEED_PSI:
            dt = tl.load(dt_ptr + offs_m[:, None] * stride_dtm + offs_r[None, :] * stride_dtr, mask=mask_mr,
                         other=0.0).to(rank_dtype)
        if NEED_PSI:
            x = tl.load(x_ptr + offs_m[:, None] * stride_xm + offs_k[None, :] * stride_xk, mask=mask_mk,
                        other=0.0).to(rank_dtype)
            dpsi_acc = tl.dot(tl.trans(dt), x, dpsi_acc, input_precision=DOT_PRECISION)
        if NEED_X:
            acc = tl.load(add_ptr + offs_m[:, None] * stride_addm + offs_k[None, :] * stride_addk, mask=mask_mk,
                          other=0.0).to(tl.float32)
            acc = tl.dot(dt, psi, acc, input_precision=DOT_PRECISION)
            tl.store(dx_ptr + offs_m[:, None] * stride_dxm + offs_k[None, :] * stride_dxk,
                     acc.to(dx_ptr.dtype.element_ty), mask=mask_mk)
    if NEED_PHI:
        tl.store(dphi_ptr + pid_s * stride_dphis + offs_k[:, None] * stride_dphik + offs_r[None, :] * stride_dphir,
                 dphi_acc, mask=mask_k[:, None] & mask_r[None, :])
    if NEED_PSI:
        tl.store(dpsi_ptr + pid_s * stride_dpsis + offs_r[:, None] * stride_dpsir + offs_k[None, :] * stride_dpsik,
                 dpsi_acc, mask=mask_r[:, None] & mask_k[None, :])


# ------------------------------------------------------------------------ launchers


def input_meta(cfg: configs.InputConfig, br: int, dtype: torch.dtype, write_u: bool = True) -> dict:
    """Constexprs and launch options of ``_gift_input_fwd_kernel`` (``WRITE_U``: u besides t;
    without it the kernel is the backward's dt = du phi)."""
    return dict(BLOCK_M=cfg.block_m, BLOCK_K=cfg.block_k, BLOCK_R=br, WRITE_U=write_u,
                DOT_PRECISION=runtime.dot_precision(dtype), num_warps=cfg.num_warps, num_stages=cfg.num_stages)


def input_bwd_meta(cfg: configs.InputConfig, br: int, dtype: torch.dtype, needs: Tuple[bool, bool, bool]) -> dict:
    """Constexprs and launch options of ``_gift_input_bwd_kernel``; ``needs`` = (x, phi, psi)."""
    return dict(BLOCK_M=cfg.block_m, BLOCK_K=cfg.block_k, BLOCK_R=br, NEED_X=needs[0], NEED_PHI=needs[1],
                NEED_PSI=needs[2], DOT_PRECISION=runtime.dot_precision(dtype), num_warps=cfg.num_warps,
                num_stages=cfg.num_stages)


def input_fwd_args(x, phi, psi, t, u) -> tuple:
    """Positional arguments of ``_gift_input_fwd_kernel``."""
    return (x, phi, psi, t, u, x.shape[0], x.shape[1], phi.shape[1],
            *x.stride(), *phi.stride(), *psi.stride(), *t.stride(), *u.stride())


def input_bwd_args(du, add, x, t, dt, psi, dx, dphi_ws, dpsi_ws, rows_per_split: int) -> tuple:
    """Positional arguments of ``_gift_input_bwd_kernel``: ``t``, ``dt``, ``psi`` one rank
    window (R = t.shape[1]); the workspaces (S, K, R) and (S, R, K). Tensors a variant does not
    read or write are stood in for by any tensor of the right dtype."""
    return (du, add, x, t, dt, psi, dx, dphi_ws, dpsi_ws, x.shape[0], x.shape[1], t.shape[1], rows_per_split,
            *du.stride(), *add.stride(), *x.stride(), *t.stride(), *dt.stride(), *psi.stride(), *dx.stride(),
            *dphi_ws.stride(), *dpsi_ws.stride())


def input_programs(x: Tensor, block_m: int, m: int, k: int) -> int:
    """Grid of ``_gift_input_fwd_kernel`` (persistent over row blocks). Enough programs to
    stream (at least one per SM), few enough that the row blocks in flight fit in half the
    L2 -- the second pass over a row block then reads L2, not HBM -- and at most 4 per SM."""
    blocks = runtime.cdiv(m, block_m)
    if not x.is_cuda:
        return min(blocks, runtime.INTERPRETED_PROGRAMS)
    sms, l2 = runtime.device_sizes(x.device)
    per_sm = max(1, min(4, (l2 // 2) // (sms * block_m * k * x.element_size())))
    return min(blocks, sms * per_sm)


def input_splits(x: Tensor, block_m: int, block_k: int, m: int, k: int) -> Tuple[int, int]:
    """(S, rows per split) of ``_gift_input_bwd_kernel``'s grid (column blocks x S): the fewest
    row splits that give about 4 programs per SM (under the interpreter: two, so that the
    partial sums run), each a whole number of row blocks. S depends on the shape and the
    device only, so the reduction order is the same on every run."""
    blocks, cols = runtime.cdiv(m, block_m), runtime.cdiv(k, block_k)
    target = 4 * runtime.device_sizes(x.device)[0] if x.is_cuda else 2 * cols
    splits = max(1, min(blocks, runtime.cdiv(target, cols)))
    rows = runtime.cdiv(blocks, splits) * block_m
    return runtime.cdiv(m, rows), rows


def _input_config(kernel: str, key: tuple, x: Tensor, theta: Tensor, m: int, k: int, br: int, run,
                  reset) -> configs.InputConfig:
    fixed = configs.fixed_config()
    if fixed is not None:
        return configs.InputConfig(fixed.block_m, fixed.block_k, fixed.num_warps, fixed.num_stages)
    cands = configs.input_candidates(kernel, device_capability(x.device), x.element_size(), theta.element_size(),
                                     br, m, k)
    return runtime.autotune(key, cands, run, reset, x.device)


def _rank_product(a: Tensor, b_t: Tensor, out: Tensor, write_u: Optional[Tensor] = None, b: Optional[Tensor] = None):
    """``out = a @ b_t^T`` (t = x psi^T, or dt = du phi with ``b_t = phi^T``) by
    ``_gift_input_fwd_kernel``, and ``write_u = a + out @ b^T`` when given."""
    m, k = a.shape
    r = out.shape[1]
    br = configs.input_rank_tile(r, a.element_size())
    u = write_u if write_u is not None else a  # never written without WRITE_U
    b = b if b is not None else b_t.t()  # never read without WRITE_U

    def run(cfg):
        grid = (input_programs(a, cfg.block_m, m, k),)
        launch(_gift_input_fwd_kernel, grid, input_fwd_args(a, b, b_t, out, u),
               input_meta(cfg, br, a.dtype, write_u is not None))

    key = ("input_fwd", a.device.index, configs.m_bucket(m), k, br, a.dtype, b_t.dtype, write_u is not None)
    run(_input_config("input_fwd", key, a, b_t, m, k, br, run, lambda: None))


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
    with device_ctx(x):
        _rank_product(x, psi, t, write_u=u, b=phi)
    return u, t


def input_bwd(
    grad_u: Tensor, x: Tensor, t: Tensor, phi: Tensor, psi: Tensor, needs: Tuple[bool, bool, bool]
) -> Tuple[Optional[Tensor], ...]:
    """Backward of the input-side form, deterministic (no atomics), per rank window of at most
    :func:`configs.input_grad_rank_tile` columns: ``dt = du phi`` by ``_gift_input_fwd_kernel``
    (one pass over du), then ``_gift_input_bwd_kernel`` (one pass over du and x, one write of dx):
    ``dx = du + dt psi`` and the split partials of ``dphi = du^T t`` and ``dpsi = dt^T x``,
    summed over the splits in a fixed order. ``needs`` = which of (x, phi, psi) want a
    gradient. Returns ``(dx, dphi, dpsi)``, None where not needed."""
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
    f32 = dict(device=x.device, dtype=torch.float32)
    dx = x.new_empty(m, k) if need_x else None
    dphis, dpsis = [], []  # one (K, w) / (w, K) float32 sum per rank window
    window = configs.input_grad_rank_tile(r)
    cfg = None
    with device_ctx(x):
        for r0 in range(0, r, window):
            w = min(window, r - r0)
            # one window (r <= window, the usual case): the tensors themselves, no slicing
            t_w, phi_w, psi_w = (t, phi, psi) if w == r else (t[:, r0:r0 + w], phi[:, r0:r0 + w], psi[r0:r0 + w])
            dt = t_w  # stands in (never read) when neither dx nor dpsi is wanted
            if need_x or need_psi:
                dt = x.new_empty(m, w, dtype=t.dtype)
                _rank_product(du, phi_w.t(), dt)
            add = dx if r0 > 0 and need_x else du  # later windows add onto the dx written so far
            br = configs.block_r(w)

            def run(c):
                splits, rows = input_splits(x, c.block_m, c.block_k, m, k)
                # per-split workspaces, each element written by one program (unwanted: dt stands in)
                ws_phi = torch.empty(splits, k, w, **f32) if need_phi else dt.unsqueeze(0)
                ws_psi = torch.empty(splits, w, k, **f32) if need_psi else dt.unsqueeze(0)
                grid = (runtime.cdiv(k, c.block_k), splits)
                launch(_gift_input_bwd_kernel, grid,
                       input_bwd_args(du, add, x, t_w, dt, psi_w, dx if need_x else du, ws_phi, ws_psi, rows),
                       input_bwd_meta(c, br, x.dtype, needs))
                return ws_phi, ws_psi

            if cfg is None:  # tuned on the first window, whose launches are idempotent (later ones add onto dx)
                key = ("input_bwd", x.device.index, configs.m_bucket(m), k, br, x.dtype, phi.dtype, needs)
                cfg = _input_config("input_bwd", key, x, phi, m, k, br, run, lambda: None)
            ws_phi, ws_psi = run(cfg)
            if need_phi:
                dphis.append(runtime.sum_partials(ws_phi))
            if need_psi:
                dpsis.append(runtime.sum_partials(ws_psi))
    dphi = as_dtype(dphis[0] if len(dphis) == 1 else torch.cat(dphis, 1), phi.dtype) if need_phi else None
    dpsi = as_dtype(dpsis[0] if len(dpsis) == 1 else torch.cat(dpsis, 0), psi.dtype) if need_psi else None
    return dx, dphi, dpsi
