"""Tile configurations for the Triton GIFT kernels, and the rules that prune them.

One function, :func:`candidates`, says which configurations the autotuner may try for a
problem: keyed on the kernel, the target's compute capability, the element size, an M
bucket and (N, K), and pruned by :func:`fits` to what fits the target's shared memory and
registers. Nothing here touches a device: the capability is passed in by the launcher
(queried lazily on first launch) or by ``benchmarks/compile_kernels.py``, which compiles
every configuration returned here for sm_80 and sm_90 and proves the kept list does not
spill (``benchmarks/KERNEL_REPORT.md``).

Environment switches:

``GIFT_KERNELS_TRITON_CONFIG``  one fixed configuration for every GEMM-shaped kernel,
    ``"BLOCK_M,BLOCK_N,BLOCK_K,num_warps,num_stages"`` (e.g. ``"64,64,32,4,3"``); no
    autotuning. In the backward kernel BLOCK_N is the tile of dx's columns (d_in) and
    BLOCK_K the tile of the reduction over d_out, as in the forward.
``GIFT_KERNELS_TRITON_FUSION``  ``auto`` (default), ``split`` or ``fused``: how the
    low-rank terms are computed for M > DECODE_M (see triton_gift.py). Decode-size M
    always uses the fused kernel (it reads W once).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import List, Optional, Tuple

CONFIG_ENV = "GIFT_KERNELS_TRITON_CONFIG"
FUSION_ENV = "GIFT_KERNELS_TRITON_FUSION"
FUSIONS = ("auto", "split", "fused")

DECODE_M = 16  # M at or below this takes the decode path (one M block: W is read once)
MAX_FUSED_R = 64  # the fused kernels keep a (rows x r) accumulator; above this, split

# per-block shared memory (bytes) a kernel may use, by major compute capability
SMEM_LIMIT = {8: 163 * 1024, 9: 227 * 1024}
# a thread's register budget for what the estimate counts (the compiler needs the rest)
REG_LIMIT = 255


@dataclass(frozen=True)
class Config:
    """One tile configuration. For the backward kernel block_n tiles dx's columns (d_in)
    and block_k the reduction over d_out."""

    block_m: int
    block_n: int
    block_k: int
    num_warps: int
    num_stages: int

    def __str__(self) -> str:
        return f"{self.block_m}x{self.block_n}x{self.block_k}_w{self.num_warps}_s{self.num_stages}"


@dataclass(frozen=True)
class SkinnyConfig:
    """Tiles of the skinny kernel ``out (rows x r) = a (rows x K) @ b (K x r)``."""

    block_m: int
    block_k: int
    num_warps: int
    num_stages: int

    def __str__(self) -> str:
        return f"{self.block_m}x{self.block_k}_w{self.num_warps}_s{self.num_stages}"


def m_bucket(m: int) -> str:
    """The M bucket configurations are keyed on (shapes stay run-time inside a bucket)."""
    if m <= DECODE_M:
        return "decode"
    if m <= 256:
        return "small"
    return "large"


def block_r(r: int) -> int:
    """The rank tile: r padded to a power of two, at least 16 (tl.dot's minimum), at most
    MAX_FUSED_R (larger ranks are looped over in chunks by the split kernels)."""
    b = 16
    while b < r and b < MAX_FUSED_R:
        b *= 2
    return b


C = Config
# Candidate lists: (capability major, element bytes) -> bucket -> configs. Hopper (9) runs
# tl.dot as wgmma with operands in shared memory, so its accumulators can be larger than
# Ampere's (8), whose mma.sync keeps operand fragments in registers.
_GEMM: dict = {
    (9, 2): {
        "large": [C(128, 256, 64, 8, 3), C(128, 128, 64, 8, 4), C(128, 128, 64, 4, 4)],
        "small": [C(64, 128, 64, 4, 4), C(64, 64, 64, 4, 4), C(64, 128, 128, 4, 3)],
        "decode": [C(16, 64, 128, 4, 4), C(16, 32, 256, 4, 3), C(16, 128, 128, 4, 3)],
    },
    (8, 2): {
        "large": [C(128, 128, 32, 4, 4), C(128, 256, 32, 8, 3), C(128, 128, 64, 8, 3)],
        "small": [C(64, 128, 32, 4, 4), C(64, 64, 64, 4, 4)],
        "decode": [C(16, 64, 128, 4, 3), C(16, 32, 256, 4, 3), C(16, 128, 64, 4, 4)],
    },
    (9, 4): {
        "large": [C(128, 128, 32, 8, 3), C(128, 64, 32, 4, 3), C(64, 128, 32, 4, 3)],
        "small": [C(64, 64, 32, 4, 3), C(64, 128, 32, 4, 3)],
        "decode": [C(16, 64, 64, 4, 3), C(16, 32, 128, 4, 3)],
    },
    (8, 4): {
        "large": [C(128, 128, 32, 8, 3), C(128, 64, 32, 4, 3), C(64, 128, 32, 4, 3)],
        "small": [C(64, 64, 32, 4, 3), C(64, 128, 32, 4, 3)],
        "decode": [C(16, 64, 64, 4, 3), C(16, 32, 128, 4, 3)],
    },
}
_SKINNY: dict = {
    2: [SkinnyConfig(64, 128, 4, 4), SkinnyConfig(128, 64, 4, 4)],
    4: [SkinnyConfig(64, 64, 4, 3), SkinnyConfig(32, 128, 4, 3)],
}
del C

KERNELS = ("fwd", "bwd")


def _arch(capability: Tuple[int, int]) -> int:
    """The candidate table for a capability: Hopper-class (9+) or Ampere-class (8)."""
    return 9 if capability[0] >= 9 else 8


def smem_estimate(cfg: Config, kernel: str, fused: bool, elem: int, theta_elem: int, br: int) -> int:
    """Shared memory the software pipeline needs: num_stages copies of the tiles that are
    loaded per loop step (the main operands plus, when fused, the rank-r operand)."""
    if kernel == "fwd":
        per_stage = (cfg.block_m + cfg.block_n) * cfg.block_k * elem
        if fused:
            per_stage += 2 * cfg.block_k * br * theta_elem  # psi^T and phi tiles
    else:  # bwd: g (block_m x block_k) and W (block_k x block_n), B (block_k x br) when fused
        per_stage = (cfg.block_m + cfg.block_n) * cfg.block_k * elem
        if fused:
            per_stage += cfg.block_k * br * elem
    return cfg.num_stages * per_stage


def reg_estimate(cfg: Config, kernel: str, fused: bool, elem: int, br: int, arch: int) -> int:
    """32-bit registers per thread for what lives across the main loop: the fp32
    accumulators and, on Ampere (mma.sync), the operand fragments of one step; plus a
    fixed allowance for addresses and indices."""
    threads = 32 * cfg.num_warps
    acc = cfg.block_m * cfg.block_n
    if fused:
        acc += cfg.block_m * br + (cfg.block_n * br if kernel == "fwd" else 0)
    regs = acc // threads
    if arch < 9:
        regs += (cfg.block_m + cfg.block_n) * cfg.block_k * elem // 4 // threads
    return regs + 48


def fits(cfg: Config, kernel: str, fused: bool, elem: int, theta_elem: int, br: int,
         capability: Tuple[int, int]) -> bool:
    """Whether ``cfg`` fits the target: shared memory within the per-block limit and the
    register estimate within budget (configs that spill are pruned here, not by hand)."""
    arch = _arch(capability)
    if smem_estimate(cfg, kernel, fused, elem, theta_elem, br) > SMEM_LIMIT[arch]:
        return False
    return reg_estimate(cfg, kernel, fused, elem, br, arch) <= REG_LIMIT


def candidates(kernel: str, capability: Tuple[int, int], elem: int, theta_elem: int, m: int,
               n: int, k: int, br: int, fused: bool) -> List[Config]:
    """The configurations the autotuner tries for one problem, best guess first.

    ``n`` is the GEMM's output width (d_out forward, d_in backward) and ``k`` its
    reduction (d_in forward, d_out backward). Tiles far wider than the problem are
    dropped (they would only compute padding), then everything that does not fit.
    """
    table = _GEMM[(_arch(capability), 4 if elem >= 4 else 2)][m_bucket(m)]
    keep = [c for c in table if fits(c, kernel, fused, elem, theta_elem, br, capability)]
    narrow = [c for c in keep if c.block_n <= max(16, 2 * n) and c.block_k <= max(16, 2 * k)]
    return narrow or keep[:1]


def all_candidates(kernel: str, capability: Tuple[int, int], elem: int, theta_elem: int, br: int,
                   fused: bool, bucket: str) -> List[Config]:
    """Every configuration :func:`candidates` can return for a bucket (what CI compiles)."""
    table = _GEMM[(_arch(capability), 4 if elem >= 4 else 2)][bucket]
    return [c for c in table if fits(c, kernel, fused, elem, theta_elem, br, capability)]


def skinny_candidates(elem: int) -> List[SkinnyConfig]:
    return list(_SKINNY[4 if elem >= 4 else 2])


def fixed_config() -> Optional[Config]:
    """The configuration forced by ``GIFT_KERNELS_TRITON_CONFIG``, or None."""
    spec = os.environ.get(CONFIG_ENV, "").strip()
    if not spec:
        return None
    try:
        bm, bn, bk, warps, stages = (int(v) for v in spec.split(","))
    except ValueError:
        raise ValueError(
            f"{CONFIG_ENV}={spec!r}: expected 'BLOCK_M,BLOCK_N,BLOCK_K,num_warps,num_stages', e.g. '64,64,32,4,3'"
        ) from None
    for name, v in (("BLOCK_M", bm), ("BLOCK_N", bn), ("BLOCK_K", bk)):
        if v < 16 or v & (v - 1):
            raise ValueError(f"{CONFIG_ENV}={spec!r}: {name} must be a power of two >= 16, got {v}")
    if warps not in (1, 2, 4, 8, 16) or stages < 1:
        raise ValueError(f"{CONFIG_ENV}={spec!r}: num_warps must be 1/2/4/8/16 and num_stages >= 1")
    return Config(bm, bn, bk, warps, stages)


def fusion_mode() -> str:
    mode = os.environ.get(FUSION_ENV, "auto").strip().lower() or "auto"
    if mode not in FUSIONS:
        raise ValueError(f"{FUSION_ENV}={mode!r}: choose one of {FUSIONS}")
    return mode
