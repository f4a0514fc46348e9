"""Device code shared by the op folders' Triton kernels: ``@triton.jit`` functions, which Triton
inlines where a kernel calls them (no call at run time, the same code as written in place).
Imported only by the op folders' ``triton.py``."""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def skinny_k_loop(a_ptrs, b_ptrs, mask_m, mask_r, K, stride_ak, stride_bk,
                  BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr, DOT_PRECISION: tl.constexpr):
    """``sum_k a[:, k] b[k, :]`` over all of K for a (BLOCK_M x BLOCK_K) tile of ``a`` at
    ``a_ptrs`` and a (BLOCK_K x BLOCK_R) tile of a rank-r ``b`` at ``b_ptrs``, both advanced by
    BLOCK_K along K each step; ``b`` converted to ``a``'s dtype, accumulated in float32. The K
    loop of the split path's skinny products (t, B, dt) and of the mixed shrink."""
    offs_k = tl.arange(0, BLOCK_K)
    acc = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        mask_k = offs_k < K - k0
        a = tl.load(a_ptrs, mask=mask_m[:, None] & mask_k[None, :], other=0.0)
        b = tl.load(b_ptrs, mask=mask_k[:, None] & mask_r[None, :], other=0.0).to(a.dtype)
        acc = tl.dot(a, b, acc, input_precision=DOT_PRECISION)
        a_ptrs += BLOCK_K * stride_ak
        b_ptrs += BLOCK_K * stride_bk
    return acc
