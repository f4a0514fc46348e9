"""The epilogue form on Triton: ``y = x W^T + b + (x psi^T)(W phi)^T``, kernels then launchers.

    forward   t = x psi^T (M x r)   B = W phi (N x r)   y = x W^T + t B^T + b
    backward  dt = g B   dx = g W + dt psi   dpsi = dt^T x   dphi = W^T g^T t = (g W)^T t

Kernels, each on run-time shapes (M is never specialised: no recompilation per token count):

``_gift_fwd_kernel``   the main GEMM ``x W^T`` with ``t B^T`` and the bias added in its
    epilogue (never a second pass over y). ``FUSED``: t and B are accumulated inside the
    K-loop from the same x and W tiles (no extra pass over x or W, but each program
    recomputes its rows of t, once per column block, and its rows of B, once per row
    block). Not fused ("split"): t and B come from ``_gift_skinny_kernel`` (one extra pass
    over x and one over W) and only the epilogue touches the rank-r factors.
``_gift_bwd_kernel``   the dx GEMM ``g W`` with ``dt psi`` in its epilogue. ``FUSED``: dt is
    accumulated in the N-loop from the same g tiles (recomputed once per column block of
    dx); split: dt comes from ``_gift_skinny_kernel`` (one extra pass over g). Both
    variants also reduce dphi = (g W)^T t from the accumulator (so W is never read a
    second time) and dpsi = dt^T x from one x tile per program, over M: each row block's
    partial written once into a workspace, summed in a fixed order (no atomics).
``_gift_skinny_kernel``  ``out = a @ b`` for a rank-r ``b``: t, B and dt in the split
    variant (memory-bound: one pass over ``a``).

The launchers own shapes, strides, buffers and tiles. Decode-size inputs (M <= 16) always take
the fused forward: one row block, so every program reads its W tile once and computes its rows
of ``x W^T`` and of ``B = W phi`` from it. Which variant runs for larger M is chosen by
:func:`gift_kernels.ops.tiles.fusion_mode` (``auto`` = split, the primary design; see
benchmarks/NOTES.md). On CUDA this GEMM competes with cuBLAS: the plan's default there is the
input-side form (cuBLAS for the GEMM); this form runs when asked for (``form="epilogue"``) or
when it wins ``auto``'s measurement.

Dtypes: x, W, b, g in fp32 / fp16 / bf16 with fp32 accumulation (fp32 dots in IEEE
precision, like ``F.linear``; the float32 rank path of 16-bit x in 3xTF32:
:func:`gift_kernels.ops.tiles.runtime.dot_precision`); Theta may be wider (float32 with a bf16 base): it is loaded in
its own dtype and converted in-kernel, and its grads come back in its dtype. t, B and dt are
held in the rank-path dtype (:func:`gift_kernels.ops.dtypes.rank_dtype`). Other dtypes, and
tensors beyond the kernels' 32-bit offsets, are declined (:func:`gift_kernels.ops.tiles.runtime.declines`).
Under ``TRITON_INTERPRET=1`` (set before triton is imported) the kernels run on CPU tensors;
that is how CI checks their arithmetic.
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch
import triton
import triton.language as tl

from .. import tiles as configs
from ..dtypes import as_dtype, rank_dtype
from ..tiles import runtime
from ..tiles.device import skinny_k_loop
from ..tiles.runtime import device_capability, device_ctx, launch

Tensor = torch.Tensor

GROUP_M = 8  # row blocks per group in the program order (L2 reuse of the W / g tiles)


@triton.jit
def _grouped_pids(pid, num_pid_m, num_pid_n, GROUP_M: tl.constexpr):
    """Program id -> (row block, column block), GROUP_M row blocks at a time so that the
    programs running together share column tiles in L2."""
    group = GROUP_M * num_pid_n
    first_m = (pid // group) * GROUP_M
    size_m = tl.minimum(num_pid_m - first_m, GROUP_M)
    pid_m = first_m + (pid % group) % size_m
    pid_n = (pid % group) // size_m
    return pid_m, pid_n


@triton.jit(do_not_specialize=["M"])
def _gift_fwd_kernel(
    x_ptr, w_ptr, bias_ptr, phi_ptr, psi_ptr, t_ptr, wphi_ptr, y_ptr,
    M, N, K, R,
    stride_xm, stride_xk, stride_wn, stride_wk,
    stride_phik, stride_phir, stride_psir, stride_psik,
    stride_tm, stride_tr, stride_wphin, stride_wphir, stride_ym, stride_yn,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr,
    GROUP_M: tl.constexpr, HAS_BIAS: tl.constexpr, FUSED: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    pid_m, pid_n = _grouped_pids(tl.program_id(0), tl.cdiv(M, BLOCK_M), tl.cdiv(N, BLOCK_N), GROUP_M)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    offs_r = tl.arange(0, BLOCK_R)
    mask_m = offs_m < M
    mask_n = offs_n < N
    out_dtype = y_ptr.dtype.element_ty  # dtype of the main GEMM's operands = x's dtype
    rank_dtype = t_ptr.dtype.element_ty  # t and B: float32, or x's dtype

    x_ptrs = x_ptr + offs_m[:, None] * stride_xm + offs_k[None, :] * stride_xk
    w_ptrs = w_ptr + offs_k[:, None] * stride_wk + offs_n[None, :] * stride_wn  # W^T tile
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    if FUSED:  # t and B from the same x and W tiles; R <= BLOCK_R here
        mask_r = offs_r < R
        psi_ptrs = psi_ptr + offs_k[:, None] * stride_psik + offs_r[None, :] * stride_psir  # psi^T tile
        phi_ptrs = phi_ptr + offs_k[:, None] * stride_phik + offs_r[None, :] * stride_phir
        t_acc = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
        wphi_acc = tl.zeros((BLOCK_N, BLOCK_R), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        mask_k = offs_k < K - k0
        x = tl.load(x_ptrs, mask=mask_m[:, None] & mask_k[None, :], other=0.0)
        w = tl.load(w_ptrs, mask=mask_k[:, None] & mask_n[None, :], other=0.0)
        acc = tl.dot(x, w, acc, input_precision=DOT_PRECISION)
        if FUSED:
            psi_t = tl.load(psi_ptrs, mask=mask_k[:, None] & mask_r[None, :], other=0.0).to(out_dtype)
            phi = tl.load(phi_ptrs, mask=mask_k[:, None] & mask_r[None, :], other=0.0).to(out_dtype)
            t_acc = tl.dot(x, psi_t, t_acc, input_precision=DOT_PRECISION)
            wphi_acc = tl.dot(tl.trans(w), phi, wphi_acc, input_precision=DOT_PRECISION)
            psi_ptrs += BLOCK_K * stride_psik
            phi_ptrs += BLOCK_K * stride_phik
        x_ptrs += BLOCK_K * stride_xk
        w_ptrs += BLOCK_K * stride_wk

    if FUSED:
        # t and B rounded to the rank dtype, as the split variant stores them
        t = t_acc.to(rank_dtype)
        wphi = wphi_acc.to(rank_dtype)
        # one column of programs writes t, one row of programs writes B (saved for backward)
        if pid_n == 0:
            t_ptrs = t_ptr + offs_m[:, None] * stride_tm + offs_r[None, :] * stride_tr
            tl.store(t_ptrs, t, mask=mask_m[:, None] & mask_r[None, :])
        if pid_m == 0:
            wphi_ptrs = wphi_ptr + offs_n[:, None] * stride_wphin + offs_r[None, :] * stride_wphir
            tl.store(wphi_ptrs, wphi, mask=mask_n[:, None] & mask_r[None, :])
        acc = tl.dot(t, tl.trans(wphi), acc, input_precision=DOT_PRECISION)
    else:
        for r0 in range(0, R, BLOCK_R):
            mask_r = offs_r < R - r0
            t = tl.load(t_ptr + offs_m[:, None] * stride_tm + (r0 + offs_r)[None, :] * stride_tr,
                        mask=mask_m[:, None] & mask_r[None, :], other=0.0)
            wphi = tl.load(wphi_ptr + offs_n[:, None] * stride_wphin + (r0 + offs_r)[None, :] * stride_wphir,
                           mask=mask_n[:, None] & mask_r[None, :], other=0.0)
            acc = tl.dot(t, tl.trans(wphi), acc, input_precision=DOT_PRECISION)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + offs_n, mask=mask_n, other=0.0).to(tl.float32)[None, :]
    y_ptrs = y_ptr + offs_m[:, None] * stride_ym + offs_n[None, :] * stride_yn
    tl.store(y_ptrs, acc.to(out_dtype), mask=mask_m[:, None] & mask_n[None, :])


@triton.jit(do_not_specialize=["M"])
def _gift_bwd_kernel(
    g_ptr, w_ptr, wphi_ptr, dt_ptr, t_ptr, x_ptr, psi_ptr, dx_ptr, dphi_ptr, dpsi_ptr,
    M, N, K, R,
    stride_gm, stride_gn, stride_wn, stride_wk, stride_wphin, stride_wphir,
    stride_dtm, stride_dtr, stride_tm, stride_tr, stride_xm, stride_xk,
    stride_psir, stride_psik, stride_dxm, stride_dxk, stride_dphis, stride_dpsis,
    BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr,
    GROUP_M: tl.constexpr, FUSED: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    """Program (row block, column block of dx). BLOCK_K tiles dx's columns (d_in),
    BLOCK_N the reduction over d_out. Each program writes its row block's partial dphi
    (K x r) and dpsi (r x K) tiles into float32 workspaces of one slice per row block
    (``stride_dphis`` / ``stride_dpsis`` apart), each element written by exactly one program:
    no atomics; the launcher sums the slices in a fixed order."""
    pid_m, pid_k = _grouped_pids(tl.program_id(0), tl.cdiv(M, BLOCK_M), tl.cdiv(K, BLOCK_K), GROUP_M)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_k = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)
    offs_n = tl.arange(0, BLOCK_N)
    offs_r = tl.arange(0, BLOCK_R)
    mask_m = offs_m < M
    mask_k = offs_k < K
    out_dtype = dx_ptr.dtype.element_ty
    rank_dtype = t_ptr.dtype.element_ty

    g_ptrs = g_ptr + offs_m[:, None] * stride_gm + offs_n[None, :] * stride_gn
    w_ptrs = w_ptr + offs_n[:, None] * stride_wn + offs_k[None, :] * stride_wk
    acc = tl.zeros((BLOCK_M, BLOCK_K), dtype=tl.float32)
    if FUSED:  # dt = g B from the same g tiles; R <= BLOCK_R here
        wphi_ptrs = wphi_ptr + offs_n[:, None] * stride_wphin + offs_r[None, :] * stride_wphir
        dt_acc = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
    for n0 in range(0, N, BLOCK_N):
        mask_n = offs_n < N - n0
        g = tl.load(g_ptrs, mask=mask_m[:, None] & mask_n[None, :], other=0.0)
        w = tl.load(w_ptrs, mask=mask_n[:, None] & mask_k[None, :], other=0.0)
        acc = tl.dot(g, w, acc, input_precision=DOT_PRECISION)
        if FUSED:
            wphi = tl.load(wphi_ptrs, mask=mask_n[:, None] & (offs_r < R)[None, :], other=0.0).to(out_dtype)
            dt_acc = tl.dot(g, wphi, dt_acc, input_precision=DOT_PRECISION)
            wphi_ptrs += BLOCK_N * stride_wphin
        g_ptrs += BLOCK_N * stride_gn
        w_ptrs += BLOCK_N * stride_wn

    # dphi = (g W)^T t from the accumulator, before dt psi is added; gw is dead after this
    # loop, before the x tile is loaded (keeps the epilogue's registers down)
    gw = acc.to(rank_dtype)
    for r0 in range(0, R, BLOCK_R):
        mask_r = offs_r < R - r0
        t = tl.load(t_ptr + offs_m[:, None] * stride_tm + (r0 + offs_r)[None, :] * stride_tr,
                    mask=mask_m[:, None] & mask_r[None, :], other=0.0)
        dphi = tl.dot(tl.trans(gw), t, input_precision=DOT_PRECISION)  # (BLOCK_K, BLOCK_R)
        tl.store(dphi_ptr + pid_m * stride_dphis + offs_k[:, None] * R + (r0 + offs_r)[None, :], dphi,
                 mask=mask_k[:, None] & mask_r[None, :])
    # dpsi = dt^T x from one x tile; dx = g W + dt psi
    x = tl.load(x_ptr + offs_m[:, None] * stride_xm + offs_k[None, :] * stride_xk,
                mask=mask_m[:, None] & mask_k[None, :], other=0.0).to(rank_dtype)
    for r0 in range(0, R, BLOCK_R):  # one chunk when FUSED
        mask_r = offs_r < R - r0
        if FUSED:
            dt = dt_acc.to(rank_dtype)
        else:
            dt = tl.load(dt_ptr + offs_m[:, None] * stride_dtm + (r0 + offs_r)[None, :] * stride_dtr,
                         mask=mask_m[:, None] & mask_r[None, :], other=0.0)
        dpsi = tl.dot(tl.trans(dt), x, input_precision=DOT_PRECISION)  # (BLOCK_R, BLOCK_K)
        tl.store(dpsi_ptr + pid_m * stride_dpsis + (r0 + offs_r)[:, None] * K + offs_k[None, :], dpsi,
                 mask=mask_r[:, None] & mask_k[None, :])
        psi = tl.load(psi_ptr + (r0 + offs_r)[:, None] * stride_psir + offs_k[None, :] * stride_psik,
                      mask=mask_r[:, None] & mask_k[None, :], other=0.0).to(rank_dtype)
        acc = tl.dot(dt, psi, acc, input_precision=DOT_PRECISION)
    dx_ptrs = dx_ptr + offs_m[:, None] * stride_dxm + offs_k[None, :] * stride_dxk
    tl.store(dx_ptrs, acc.to(out_dtype), mask=mask_m[:, None] & mask_k[None, :])


@triton.jit(do_not_specialize=["M"])
def _gift_skinny_kernel(
    a_ptr, b_ptr, c_ptr,
    M, K, R,
    stride_am, stride_ak, stride_bk, stride_br, stride_cm, stride_cr,
    BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    """``c (M x R) = a (M x K) @ b (K x R)``, ``b`` converted to ``a``'s dtype in-kernel,
    accumulated in float32 and stored in ``c``'s dtype; program (row block, rank chunk)."""
    pid_m = tl.program_id(0)
    pid_r = tl.program_id(1)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_r = pid_r * BLOCK_R + tl.arange(0, BLOCK_R)
    offs_k = tl.arange(0, BLOCK_K)
    mask_m = offs_m < M
    mask_r = offs_r < R
    a_ptrs = a_ptr + offs_m[:, None] * stride_am + offs_k[None, :] * stride_ak
    b_ptrs = b_ptr + offs_k[:, None] * stride_bk + offs_r[None, :] * stride_br
    acc = skinny_k_loop(a_ptrs, b_ptrs, mask_m, mask_r, K, stride_ak, stride_bk,
                        BLOCK_M, BLOCK_K, BLOCK_R, DOT_PRECISION)
    c_ptrs = c_ptr + offs_m[:, None] * stride_cm + offs_r[None, :] * stride_cr
    tl.store(c_ptrs, acc.to(c_ptr.dtype.element_ty), mask=mask_m[:, None] & mask_r[None, :])


# ------------------------------------------------------------------------ launchers


# ------------------------------------------------------- constexprs (shared with CI)


def fwd_meta(cfg: configs.Config, br: int, has_bias: bool, fused: bool, dtype: torch.dtype) -> dict:
    """Constexprs and launch options of ``_gift_fwd_kernel``, exactly as the launcher passes
    them (benchmarks/compile_kernels.py compiles with the same dict)."""
    return dict(BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k, BLOCK_R=br,
                GROUP_M=GROUP_M, HAS_BIAS=has_bias, FUSED=fused, DOT_PRECISION=runtime.dot_precision(dtype),
                num_warps=cfg.num_warps, num_stages=cfg.num_stages)


def bwd_meta(cfg: configs.Config, br: int, fused: bool, dtype: torch.dtype) -> dict:
    """Constexprs of ``_gift_bwd_kernel``: cfg.block_n tiles dx's columns (the kernel's
    BLOCK_K), cfg.block_k the reduction over d_out (the kernel's BLOCK_N)."""
    return dict(BLOCK_M=cfg.block_m, BLOCK_K=cfg.block_n, BLOCK_N=cfg.block_k, BLOCK_R=br,
                GROUP_M=GROUP_M, FUSED=fused, DOT_PRECISION=runtime.dot_precision(dtype),
                num_warps=cfg.num_warps, num_stages=cfg.num_stages)


def skinny_meta(cfg: configs.SkinnyConfig, br: int, dtype: torch.dtype) -> dict:
    return dict(BLOCK_M=cfg.block_m, BLOCK_K=cfg.block_k, BLOCK_R=br, DOT_PRECISION=runtime.dot_precision(dtype),
                num_warps=cfg.num_warps, num_stages=cfg.num_stages)


def fwd_args(x, weight, bias, phi, psi, t, wphi, y) -> tuple:
    """Positional arguments of ``_gift_fwd_kernel`` (``bias`` None: y stands in, unread)."""
    return (x, weight, bias if bias is not None else y, phi, psi, t, wphi, y,
            x.shape[0], weight.shape[0], x.shape[1], phi.shape[1],
            *x.stride(), *weight.stride(), *phi.stride(), *psi.stride(), *t.stride(), *wphi.stride(), *y.stride())


def bwd_args(g, weight, wphi, dt, t, x, psi, dx, dphi_ws, dpsi_ws) -> tuple:
    """Positional arguments of ``_gift_bwd_kernel`` (``dt`` unread when fused); the
    workspaces hold one contiguous (K, r) / (r, K) slice per row block."""
    return (g, weight, wphi, dt, t, x, psi, dx, dphi_ws, dpsi_ws,
            x.shape[0], weight.shape[0], x.shape[1], psi.shape[0],
            *g.stride(), *weight.stride(), *wphi.stride(), *dt.stride(), *t.stride(), *x.stride(), *psi.stride(),
            *dx.stride(), dphi_ws.stride(0), dpsi_ws.stride(0))


def skinny_args(a, b, out) -> tuple:
    """Positional arguments of ``_gift_skinny_kernel``."""
    return (a, b, out, a.shape[0], a.shape[1], b.shape[1],
            *a.stride(), *b.stride(), *out.stride())


def uses_fused(x: Tensor, theta: Tensor, m: int, r: int) -> bool:
    """Whether the low-rank terms are computed inside the big GEMM (fused) or by the
    skinny kernel (split). fp32 always runs split (its FMA-path dots leave no registers for
    the in-loop rank accumulators), and so does any rank without a kept fused tile."""
    if not configs.fusable(device_capability(x.device), x.element_size(), theta.element_size(), r, m):
        return False
    if m <= configs.DECODE_M:
        return True  # one row block: W is read once and nothing is recomputed
    return configs.fusion_mode() == "fused"


def _gemm_config(kernel: str, key: tuple, x: Tensor, theta: Tensor, m: int, n: int, k: int, br: int,
                 fused: bool, run, reset) -> configs.Config:
    fixed = configs.fixed_config()
    if fixed is not None:
        return fixed
    cands = configs.candidates(kernel, device_capability(x.device), x.element_size(), theta.element_size(),
                               m, n, k, br, fused)
    return runtime.autotune(key, cands, run, reset, x.device)


def _skinny(a: Tensor, b: Tensor, out: Tensor) -> Tensor:
    """``out = a @ b`` (rows x r) by ``_gift_skinny_kernel``; b may be a transposed view."""
    m, k = a.shape
    r = b.shape[1]
    br = configs.block_r(r)
    fixed = configs.fixed_config()
    if fixed is not None:
        cfg = configs.SkinnyConfig(fixed.block_m, fixed.block_k, fixed.num_warps, fixed.num_stages)
    else:
        cfg = configs.skinny_candidates(device_capability(a.device), a.element_size(), b.element_size(), br)[0]
    grid = (runtime.cdiv(m, cfg.block_m), runtime.cdiv(r, br))
    launch(_gift_skinny_kernel, grid, skinny_args(a, b, out), skinny_meta(cfg, br, a.dtype))
    return out


def gift_fwd(
    x: Tensor, weight: Tensor, bias: Optional[Tensor], phi: Tensor, psi: Tensor
) -> Tuple[Tensor, Tensor, Tensor]:
    """Forward on 2-D ``x (M, K)`` (any strides). Returns ``(y, t, B)``."""
    m, k = x.shape
    n, r = weight.shape[0], phi.shape[1]
    rd = rank_dtype(x.dtype, phi.dtype)
    y = x.new_empty(m, n)
    t = x.new_empty(m, r, dtype=rd)
    wphi = x.new_empty(n, r, dtype=rd)
    if m == 0 or n == 0 or k == 0:  # nothing to launch: y = b, t and B are zero
        if bias is not None:
            y.copy_(bias.expand(m, n))
        else:
            y.zero_()
        return y, t.zero_(), wphi.zero_()

    fused = uses_fused(x, phi, m, r)
    br = configs.rank_tile(r, fused)
    with device_ctx(x):
        if not fused:
            _skinny(x, psi.t(), t)
            _skinny(weight, phi, wphi)

        def run(cfg):
            grid = (runtime.cdiv(m, cfg.block_m) * runtime.cdiv(n, cfg.block_n),)
            launch(_gift_fwd_kernel, grid, fwd_args(x, weight, bias, phi, psi, t, wphi, y),
                   fwd_meta(cfg, br, bias is not None, fused, x.dtype))

        key = ("fwd", x.device.index, configs.m_bucket(m), n, k, br, x.dtype, phi.dtype, bias is not None, fused)
        cfg = _gemm_config("fwd", key, x, phi, m, n, k, br, fused, run, lambda: None)
        run(cfg)
    return y, t, wphi


def gift_bwd(
    grad_y: Tensor,
    x: Tensor,
    t: Tensor,
    B: Tensor,
    weight: Tensor,
    phi: Tensor,
    psi: Tensor,
    needs: Tuple[bool, bool, bool, bool, bool],
) -> Tuple[Optional[Tensor], ...]:
    """Backward. ``needs`` = which of (x, weight, bias, phi, psi) want a gradient.

    dx, dphi and dpsi come from one kernel (plus, in the split variant, one skinny pass
    over g for dt); dW and db, needed only when the base layer trains, use torch ops.
    """
    need_x, need_w, need_b, need_phi, need_psi = needs
    g = grad_y
    m, k = x.shape
    n, r = weight.shape[0], phi.shape[1]
    out_dtype, rd = x.dtype, t.dtype
    dx = dw = db = dphi = dpsi = None

    if m == 0 or n == 0 or k == 0:
        if need_x:
            dx = torch.zeros_like(x)
        if need_phi:
            dphi = torch.zeros_like(phi)
        if need_psi:
            dpsi = torch.zeros_like(psi)
    elif need_x:
        # dphi and dpsi ride along even if unwanted: a frozen Theta with a wanted dx is rare
        fused = uses_fused(x, psi, m, r)
        br = configs.rank_tile(r, fused)
        dx = x.new_empty(m, k)
        with device_ctx(x):
            dt = t  # placeholder pointer of the rank dtype when fused (never read)
            if not fused:
                dt = _skinny(g, B, x.new_empty(m, r, dtype=rd))

            def run(cfg):
                # one (K, r) / (r, K) partial per row block, summed below in a fixed order:
                # deterministic, and no program contends with another for an address
                blocks = runtime.cdiv(m, cfg.block_m)
                dphi_ws = torch.empty(blocks, k, r, device=x.device, dtype=torch.float32)
                dpsi_ws = torch.empty(blocks, r, k, device=x.device, dtype=torch.float32)
                grid = (blocks * runtime.cdiv(k, cfg.block_n),)
                launch(_gift_bwd_kernel, grid, bwd_args(g, weight, B, dt, t, x, psi, dx, dphi_ws, dpsi_ws),
                       bwd_meta(cfg, br, fused, out_dtype))
                return dphi_ws, dpsi_ws

            key = ("bwd", x.device.index, configs.m_bucket(m), n, k, br, out_dtype, psi.dtype, fused)
            cfg = _gemm_config("bwd", key, x, psi, m, k, n, br, fused, run, lambda: None)
            dphi_ws, dpsi_ws = run(cfg)
        if need_phi:
            dphi = as_dtype(runtime.sum_partials(dphi_ws), phi.dtype)
        if need_psi:
            dpsi = as_dtype(runtime.sum_partials(dpsi_ws), psi.dtype)
    elif need_phi or need_psi:
        # no dx wanted (e.g. the first adapted layer): the g W GEMM would only serve dphi,
        # so take the skinny route instead, each product one pass over g, x or W
        if need_psi:
            with device_ctx(x):
                dt = _skinny(g, B, x.new_empty(m, r, dtype=rd))
            dpsi = torch.mm(dt.t(), x.to(rd)).to(psi.dtype)
        if need_phi:
            dphi = torch.mm(weight.to(rd).t(), torch.mm(g.to(rd).t(), t)).to(phi.dtype)

    if need_w:
        dw = torch.mm(g.t(), x) if m else torch.zeros_like(weight)
        if m:
            dw.add_(torch.mm(torch.mm(g.to(rd).t(), t), phi.to(rd).t()).to(out_dtype))
    if need_b:
        db = g.sum(0)
    return dx, dw, db, dphi, dpsi
