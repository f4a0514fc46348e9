"""The Triton kernels of GIFT (launchers in :mod:`launch`; tiles in :mod:`configs`).

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
    second time) and dpsi = dt^T x from one x tile per program, over M with atomics.
``_gift_skinny_kernel``  ``out = a @ b`` for a rank-r ``b``: t, B and dt in the split
    variant (memory-bound: one pass over ``a``).

The input-side form ``u = x + (x psi^T) phi^T`` (any base layer runs on u; W is never read):

``_gift_input_fwd_kernel``  t = x psi^T and u = x + t phi^T, one program per row block
    (persistent: each program loops over row blocks ``pid, pid + programs, ...``): a pass
    over the row block's x for t, then a second pass writing u (that second read is meant to
    come from L2: the launcher bounds the programs so that their row blocks fit).
``_gift_input_bwd_kernel``  from du: dt = du phi and dphi += du^T t in one pass over du, then
    dx = du + dt psi and dpsi += dt^T x in one pass over x (and du again, for dx). dphi and
    dpsi are float32 buffers reduced over the row blocks with atomics. Cost model and the
    split-over-K alternative: benchmarks/NOTES.md.

Rank-path dtype: the t, B and dt buffers are float32 for 16-bit x with a float32 Theta
(``rank_dtype`` in the kernels: the element type of the t pointer), so the rank-r products are held and multiplied
in float32 (tf32 on the tensor cores) and cannot overflow fp16; otherwise x's dtype.
"""

from __future__ import annotations

import triton
import triton.language as tl


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
    stride_psir, stride_psik, stride_dxm, stride_dxk,
    BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr,
    GROUP_M: tl.constexpr, FUSED: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    """Program (row block, column block of dx). BLOCK_K tiles dx's columns (d_in),
    BLOCK_N the reduction over d_out. dphi (K x r) and dpsi (r x K) are float32 buffers
    reduced over the row blocks with atomics."""
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
        tl.atomic_add(dphi_ptr + offs_k[:, None] * R + (r0 + offs_r)[None, :], dphi,
                      mask=mask_k[:, None] & mask_r[None, :], sem="relaxed")
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
        tl.atomic_add(dpsi_ptr + (r0 + offs_r)[:, None] * K + offs_k[None, :], dpsi,
                      mask=mask_r[:, None] & mask_k[None, :], sem="relaxed")
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
    acc = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        mask_k = offs_k < K - k0
        a = tl.load(a_ptrs, mask=mask_m[:, None] & mask_k[None, :], other=0.0)
        b = tl.load(b_ptrs, mask=mask_k[:, None] & mask_r[None, :], other=0.0).to(a.dtype)
        acc = tl.dot(a, b, acc, input_precision=DOT_PRECISION)
        a_ptrs += BLOCK_K * stride_ak
        b_ptrs += BLOCK_K * stride_bk
    c_ptrs = c_ptr + offs_m[:, None] * stride_cm + offs_r[None, :] * stride_cr
    tl.store(c_ptrs, acc.to(c_ptr.dtype.element_ty), mask=mask_m[:, None] & mask_r[None, :])


# ------------------------------------------------------------------ input-side form


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
