"""Tile configurations for the Triton GIFT kernels of every op, and the rules that prune them.

One function, :func:`candidates`, says which configurations the autotuner may try for a
problem: keyed on the kernel, the target (compute capability and shared memory per block:
:data:`TARGET_SMEM`), the element size, an M bucket and (N, K), and pruned by :func:`fits` to
what fits the target: an estimate of the shared memory within the target's limit, and the
measured table in ``pruned.py`` of tiles that spilled
registers (register use near the limit is too erratic to estimate: the same tile spills
with bf16 Theta and not with fp32 Theta). The table is per triton version (code generation
changes between versions): :func:`pruned_table` picks the running triton's entry and, for a
version never measured, the union of all entries (keys are per target ``sm_XY``; a target
the entry was not measured for avoids what spilled on any, :func:`is_pruned`).
``benchmarks/compile_kernels.py --update-pruned`` compiles every candidate for sm_80, sm_86,
sm_89 and sm_90 and rewrites the running version's entry; without the flag it compiles what is kept and fails if any of it spills
(CI, with each triton version the project supports), writing ``benchmarks/KERNEL_REPORT.md``.
Nothing here touches a device or imports triton: the capability is passed in by the launcher
(queried lazily on first launch, :mod:`.runtime`) or by the compile script. Every lookup a
launcher makes per call is cached (the tables are constant in a process; the triton version is
read from package metadata once): the hot path walks no table. ``clear_caches()`` after the
prune table is rewritten (the compile script does).

Environment switches:

``GIFT_KERNELS_TRITON_CONFIG``  one fixed configuration for every GEMM-shaped kernel,
    ``"BLOCK_M,BLOCK_N,BLOCK_K,num_warps,num_stages"`` (e.g. ``"64,64,32,4,3"``); no
    autotuning. In the backward kernel BLOCK_N is the tile of dx's columns (d_in) and
    BLOCK_K the tile of the reduction over d_out, as in the forward.
``GIFT_KERNELS_TRITON_FUSION``  ``auto`` (default), ``split`` or ``fused``: how the
    low-rank terms are computed for M > DECODE_M (see gift_kernels/ops/linear/triton.py). Decode-size M always
    uses the fused kernel (it reads W once); fp32 and ranks without a kept fused tile always
    run split. ``with fusion("fused"):`` overrides it for a block (benchmarks use that).
"""

from __future__ import annotations

import contextlib
import functools
import os
from dataclasses import dataclass
from typing import Iterator, List, Optional, Tuple

from . import pruned as _pruned

CONFIG_ENV = "GIFT_KERNELS_TRITON_CONFIG"
FUSION_ENV = "GIFT_KERNELS_TRITON_FUSION"
FUSIONS = ("auto", "split", "fused")

DECODE_M = 16  # M at or below this takes the decode path (one M block: W is read once)
MAX_FUSED_R = 64  # the fused kernels keep a (rows x r) accumulator; above this, split
SPLIT_R = 16  # rank chunk of the split kernels' epilogues

# Per-block shared memory (bytes, the opt-in maximum) of the targets the compile check covers:
# A100 / H100-class parts and the consumer Ampere / Ada cards (A10, L4, RTX 30 / 40). A target
# is a capability ``(major, minor)`` or ``(major, minor, shared memory per block)``: the
# launchers pass the device's own value (runtime.device_target, read on first launch), the
# compile check and the tests a capability whose limit is read here; a capability not listed
# gets the smallest (no tile is offered that might not fit).
TARGET_SMEM = {(8, 0): 163 * 1024, (8, 6): 99 * 1024, (8, 9): 99 * 1024, (9, 0): 227 * 1024}


def smem_limit(target: tuple) -> int:
    """Per-block shared memory of a target (see :data:`TARGET_SMEM`)."""
    if len(target) > 2:
        return int(target[2])
    return TARGET_SMEM.get(tuple(target[:2]), min(TARGET_SMEM.values()))


def target_sm(target: tuple) -> int:
    """The target's ``sm_XY`` number, the arch field of the prune keys (spills and shared
    memory are measured per target: an sm_80 tile may not fit an sm_86 card)."""
    return 10 * target[0] + target[1]


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
    """Tiles of the skinny kernel ``out (rows x r) = a (rows x K) @ b (K x r)``, and of the
    input-side kernels (``InputConfig``): rows per block, K step, warps, stages."""

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


def rank_tile(r: int, fused: bool) -> int:
    """BLOCK_R of the GEMM kernels. Fused, it must hold all r columns (the in-loop
    accumulators); split, the epilogue loops over r in chunks of SPLIT_R, which keeps
    its registers at those of r = 16 whatever the rank."""
    return block_r(r) if fused else SPLIT_R


C = Config
# Candidate lists: (capability major, element bytes) -> path -> bucket -> configs, best
# guess first. Hopper (9) runs 16-bit tl.dot as wgmma with operands in shared memory, so
# its accumulators can be larger than Ampere's (8), whose mma.sync keeps operand fragments
# in registers. fp32 runs IEEE fp32 dots on the FMA units, whose operands live in registers:
# small tiles only. The fused kernels carry rank-r accumulators and Theta tiles besides,
# and for M > DECODE_M they are the alternative to measure, so they get one tile per bucket.
_GEMM: dict = {
    (9, 2): {
        "split": {
            "large": [C(128, 256, 64, 8, 3), C(128, 128, 64, 8, 4), C(128, 128, 64, 8, 3)],
            "small": [C(64, 128, 64, 4, 4), C(64, 64, 64, 4, 4), C(64, 128, 64, 8, 3)],
            "decode": [C(16, 64, 128, 4, 4), C(16, 128, 64, 4, 4)],
        },
        "fused": {
            "large": [C(128, 128, 64, 8, 3)],
            "small": [C(64, 128, 64, 8, 3)],
            "decode": [C(16, 64, 128, 4, 4), C(16, 64, 64, 4, 4), C(16, 128, 64, 8, 4)],
        },
    },
    (8, 2): {
        "split": {
            "large": [C(128, 128, 64, 8, 3), C(128, 256, 32, 8, 3), C(128, 128, 32, 8, 4)],
            "small": [C(64, 128, 64, 8, 3), C(64, 64, 64, 4, 4)],
            "decode": [C(16, 64, 128, 4, 3), C(16, 128, 64, 4, 3)],
        },
        "fused": {
            "large": [C(128, 128, 32, 8, 3)],
            "small": [C(64, 128, 32, 8, 3)],
            "decode": [C(16, 64, 128, 4, 3), C(16, 64, 64, 4, 3), C(16, 128, 64, 8, 3)],
        },
    },
    (9, 4): {
        "split": {
            "large": [C(64, 64, 16, 8, 3), C(32, 32, 32, 4, 3)],
            "small": [C(32, 32, 32, 4, 3), C(64, 64, 16, 8, 3)],
            "decode": [C(16, 64, 32, 4, 3), C(16, 32, 64, 4, 3)],
        },
        "fused": {"large": [], "small": [], "decode": []},  # fp32 always runs split
    },
}
_GEMM[(8, 4)] = _GEMM[(9, 4)]  # the FMA path does not change with the architecture
_SKINNY: dict = {
    # the later 16-bit tiles are fallbacks for toolchains where the first one spills
    # (triton 3.6, sm_80, rank tile >= 32: 8 bytes); the launcher takes the first kept one
    2: [SkinnyConfig(64, 128, 4, 4), SkinnyConfig(64, 64, 4, 4), SkinnyConfig(32, 64, 4, 3)],
    4: [SkinnyConfig(64, 32, 4, 3), SkinnyConfig(32, 32, 4, 3)],
}
del C

KERNELS = ("fwd", "bwd")


def _arch(capability: Tuple[int, int]) -> int:
    """The candidate table for a capability: Hopper-class (9+) or Ampere-class (8)."""
    return 9 if capability[0] >= 9 else 8


def smem_estimate(cfg: Config, kernel: str, fused: bool, elem: int, theta_elem: int, br: int) -> int:
    """Shared memory (bytes): num_stages copies of the tiles loaded per loop step (plus the
    rank-r operand when fused), and for the backward the epilogue's operand tiles (g W and
    x, both block_m x block_n), which are not overlaid on the pipeline buffers."""
    per_stage = (cfg.block_m + cfg.block_n) * cfg.block_k * elem
    if fused:
        per_stage += (2 * theta_elem if kernel == "fwd" else elem) * cfg.block_k * br
    total = cfg.num_stages * per_stage
    if kernel == "bwd":
        total += 2 * cfg.block_m * cfg.block_n * elem
    return total


def prune_key(kernel: str, fused: bool, capability: Tuple[int, int], elem: int, theta_elem: int, br: int,
              cfg) -> tuple:
    """The key of a :func:`pruned_table`: fp16 and bf16 share one (either spilling
    prunes both), and so do with and without bias."""
    path = "skinny" if kernel == "skinny" else ("fused" if fused else "split")
    fields = (cfg.block_m, cfg.block_k, cfg.num_warps, cfg.num_stages) if kernel == "skinny" else (
        cfg.block_m, cfg.block_n, cfg.block_k, cfg.num_warps, cfg.num_stages)
    return (kernel, path, target_sm(capability), elem, theta_elem, br, fields)


@functools.lru_cache(maxsize=None)
def triton_version() -> str:
    """``major.minor`` of the installed triton, from its metadata (triton is not imported)."""
    try:
        from importlib.metadata import version

        full = version("triton")
    except Exception:  # not installed as a distribution: ask the module
        import triton

        full = triton.__version__
    return ".".join(full.split(".")[:2])


@functools.lru_cache(maxsize=None)
def pruned_table(version: Optional[str] = None) -> frozenset:
    """The measured prune table for triton ``version`` (default: the installed one). A version
    never measured gets the union of every measured version's table: each tile that spilled
    under some toolchain is avoided until that version is measured itself."""
    tables = _pruned.PRUNED
    v = version or triton_version()
    if v in tables:
        return tables[v]
    return frozenset().union(*tables.values())


@functools.lru_cache(maxsize=None)
def _prune_state(version: Optional[str] = None) -> Tuple[frozenset, frozenset]:
    """(table, targets it was measured for) for triton ``version`` (default: the installed one);
    a version never measured: every entry's union and targets."""
    v = version or triton_version()
    if v in _pruned.PRUNED:
        return _pruned.PRUNED[v], frozenset(_pruned.TARGETS.get(v, ()))
    return pruned_table(v), frozenset().union(*(frozenset(t) for t in _pruned.TARGETS.values()))


def is_pruned(key: tuple) -> bool:
    """Whether a prune key (:func:`prune_key` / :func:`input_prune_key`) is in the running
    triton's table; for a target that table was not measured for (e.g. sm_87, sm_120), whether
    it is in the table for any measured target."""
    table, targets = _prune_state()
    if key[2] in targets:
        return key in table
    return any((*key[:2], t, *key[3:]) in table for t in targets)


def fits(cfg, kernel: str, fused: bool, elem: int, theta_elem: int, br: int,
         capability: Tuple[int, int], measured: bool = True) -> bool:
    """Whether ``cfg`` fits the target: its estimated shared memory within the per-block
    limit and, unless ``measured`` is False, not found to spill registers (or to exceed
    shared memory) when ``benchmarks/compile_kernels.py --update-pruned`` compiled it for
    this architecture with the running triton (:func:`pruned_table`)."""
    if kernel != "skinny" and smem_estimate(cfg, kernel, fused, elem, theta_elem, br) > smem_limit(capability):
        return False
    return not measured or not is_pruned(prune_key(kernel, fused, capability, elem, theta_elem, br, cfg))


def _table(capability: Tuple[int, int], elem: int, fused: bool) -> dict:
    return _GEMM[(_arch(capability), 4 if elem >= 4 else 2)]["fused" if fused else "split"]


def _kept(kernel: str, capability: Tuple[int, int], elem: int, theta_elem: int, br: int, fused: bool,
          bucket: str, measured: bool = True) -> List[Config]:
    """The bucket's list pruned by :func:`fits`; if nothing fits (a large rank in the fused
    kernels), the next smaller bucket's list, down to decode's small tiles."""
    table = _table(capability, elem, fused)
    order = ("large", "small", "decode")
    for b in order[order.index(bucket):]:
        keep = [c for c in table[b] if fits(c, kernel, fused, elem, theta_elem, br, capability, measured)]
        if keep:
            return keep
    raise ValueError(f"no {kernel} tile fits sm_{capability[0]}{capability[1]} for element size {elem}, "
                     f"rank tile {br}, fused={fused}")


def candidates(kernel: str, capability: Tuple[int, int], elem: int, theta_elem: int, m: int,
               n: int, k: int, br: int, fused: bool) -> List[Config]:
    """The configurations the autotuner tries for one problem, best guess first (cached per
    M bucket: M itself only picks the bucket).

    ``n`` is the GEMM's output width (d_out forward, d_in backward) and ``k`` its
    reduction (d_in forward, d_out backward). Tiles far wider than the problem are
    dropped (they would only compute padding), after everything that does not fit.
    """
    return _candidates(kernel, capability, elem, theta_elem, m_bucket(m), n, k, br, fused)


@functools.lru_cache(maxsize=None)
def _candidates(kernel, capability, elem, theta_elem, bucket, n, k, br, fused) -> List[Config]:
    keep = _kept(kernel, capability, elem, theta_elem, br, fused, bucket)
    narrow = [c for c in keep if c.block_n <= max(16, 2 * n) and c.block_k <= max(16, 2 * k)]
    return narrow or keep[:1]


def all_candidates(kernel: str, capability: Tuple[int, int], elem: int, theta_elem: int, br: int,
                   fused: bool, bucket: str, measured: bool = True) -> List[Config]:
    """Every configuration :func:`candidates` can return for a bucket (what CI compiles);
    ``measured=False``: before the measured pruning (what ``--update-pruned`` compiles)."""
    try:
        return _kept(kernel, capability, elem, theta_elem, br, fused, bucket, measured)
    except ValueError:
        return []


def can_fuse(capability: Tuple[int, int], elem: int, theta_elem: int, br: int, m: int) -> bool:
    """Whether a fused tile is kept for this problem (fp32 and large ranks run split)."""
    return _can_fuse(capability, elem, theta_elem, br, m_bucket(m))


def fusable(capability: Tuple[int, int], elem: int, theta_elem: int, r: int, m: int) -> bool:
    """Whether the fused variant can run a problem of rank ``r`` and ``m`` rows at all (the one
    rule: the launcher's choice and the benchmarks' variants ask it)."""
    return r <= MAX_FUSED_R and can_fuse(capability, elem, theta_elem, block_r(r), m)


@functools.lru_cache(maxsize=None)
def _can_fuse(capability, elem, theta_elem, br, bucket) -> bool:
    if elem >= 4 or br > MAX_FUSED_R:
        return False
    return all(all_candidates(k, capability, elem, theta_elem, br, True, bucket) for k in KERNELS)


@functools.lru_cache(maxsize=None)
def skinny_candidates(capability: Tuple[int, int], elem: int, theta_elem: int, br: int,
                      measured: bool = True) -> List[SkinnyConfig]:
    """The skinny kernel's tiles, pruned like the GEMM tiles."""
    cands = _SKINNY[4 if elem >= 4 else 2]
    keep = [c for c in cands if fits(c, "skinny", False, elem, theta_elem, br, capability, measured)]
    return keep or cands[-1:]


def fixed_config() -> Optional[Config]:
    """The configuration forced by ``GIFT_KERNELS_TRITON_CONFIG``, or None."""
    spec = os.environ.get(CONFIG_ENV, "").strip()
    return _parse_config(spec) if spec else None


@functools.lru_cache(maxsize=16)
def _parse_config(spec: str) -> Config:
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


_fusion_override: List[str] = []


def fusion_mode() -> str:
    """The fusion variant asked for: the innermost :func:`fusion` block, else the env var."""
    if _fusion_override:
        return _fusion_override[-1]
    mode = os.environ.get(FUSION_ENV, "auto").strip().lower() or "auto"
    if mode not in FUSIONS:
        raise ValueError(f"{FUSION_ENV}={mode!r}: choose one of {FUSIONS}")
    return mode


@contextlib.contextmanager
def fusion(mode: str) -> Iterator[str]:
    """Run the Triton kernels inside the block with fusion variant ``mode`` (restored on exit)."""
    if mode not in FUSIONS:
        raise ValueError(f"gift_kernels.ops.tiles.fusion: choose one of {FUSIONS}, got {mode!r}")
    _fusion_override.append(mode)
    try:
        yield mode
    finally:
        _fusion_override.pop()


# ------------------------------------------------------------ input-side form kernels
# Tiles of _gift_input_fwd_kernel (one program per row block, a loop over d_in in block_k
# steps, the rank in chunks of input_rank_tile) and _gift_input_bwd_kernel (a d_in column block
# of block_k over a split of the rows, block_m at a time). Memory-bound: the row tile is kept
# small so that enough programs stream at small M and the forward's row blocks stay in L2 for
# its second pass (benchmarks/NOTES.md, input-side form); 16-bit dots run on mma.sync at 16
# rows, so one table serves every target (pruned per target). fp32 runs IEEE dots on the FMA
# units (operands in registers): narrower K steps.


# rows x K step, num_warps, num_stages: the skinny kernel's tile fields
InputConfig = SkinnyConfig


_IC = InputConfig
# kernel -> element bytes -> bucket -> configs, best guess first; pruned per target and triton
# version by the compile check (pruned.py), and when nothing of a bucket is left the next
# smaller bucket's list serves, down to decode's (the smallest tiles). The forward runs t = x
# psi^T then u = x + t phi^T per row block; its tiles also run dt = du phi (WRITE_U off).
# The decode lists end with tiles that compiled clean for every target and triton version at rank
# tile 64 with a float32 Theta (the fallback when a toolchain spills in the others).
# The backward (column block x row split) holds two (block_k x rank tile) float32
# accumulators, dphi and dpsi, besides the row tiles of du, x and dx. fp32 runs IEEE dots on
# the FMA units (operands in registers): narrower K steps.
_INPUT: dict = {
    "input_fwd": {
        2: {
            "decode": [_IC(16, 128, 4, 4), _IC(16, 64, 4, 2), _IC(16, 64, 8, 2)],
            "small": [_IC(16, 128, 4, 4), _IC(32, 128, 8, 3)],
            "large": [_IC(32, 128, 8, 3), _IC(64, 128, 4, 3)],
        },
        4: {
            "decode": [_IC(16, 32, 4, 2)],
            "small": [_IC(16, 32, 4, 2), _IC(32, 32, 8, 3)],
            "large": [_IC(32, 32, 8, 3)],
        },
    },
    "input_bwd": {
        2: {
            "decode": [_IC(16, 64, 4, 2)],
            "small": [_IC(32, 64, 4, 3), _IC(16, 128, 4, 3)],
            "large": [_IC(64, 64, 8, 3), _IC(32, 128, 8, 3), _IC(32, 64, 4, 3)],
        },
        4: {  # 8-warp tiles: the rank tile 64 fallbacks (every 4-warp fp32 tile spilled there)
            "decode": [_IC(16, 32, 4, 2), _IC(16, 32, 8, 2), _IC(16, 16, 8, 2)],
            "small": [_IC(32, 32, 8, 2), _IC(16, 32, 4, 2)],
            "large": [_IC(32, 32, 8, 2), _IC(16, 64, 8, 2)],
        },
    },
}
del _IC

INPUT_KERNELS = ("input_fwd", "input_bwd")
INPUT_FP32_R = 16  # the fp32 input-side kernels' rank chunk


def input_rank_tile(r: int, elem: int) -> int:
    """BLOCK_R of the input-side kernels for element size ``elem``: 16-bit, r padded to a
    power of two in [16, MAX_FUSED_R] (larger ranks run in chunks of MAX_FUSED_R, one more pass
    over the row block each); fp32, chunks of INPUT_FP32_R whatever r."""
    return INPUT_FP32_R if elem >= 4 else block_r(r)


def input_grad_rank_tile(r: int) -> int:
    """BLOCK_R of ``_gift_input_bwd_kernel``, the rank window of the input-side backward: r
    padded to a power of two in [16, MAX_FUSED_R] for every dtype (larger ranks run in windows of
    MAX_FUSED_R, one more pass over du and x each)."""
    return block_r(r)


def input_rank_tiles(kernel: str, elem: int) -> Tuple[int, ...]:
    """Every rank tile ``kernel`` runs with for element size ``elem`` (:func:`input_rank_tile`
    for the forward, :func:`input_grad_rank_tile` for the backward)."""
    if kernel == "input_fwd" and elem >= 4:
        return (INPUT_FP32_R,)
    return (16, 32, MAX_FUSED_R)


def input_smem_estimate(cfg: InputConfig, kernel: str, elem: int, theta_elem: int, br: int) -> int:
    """Shared memory (bytes): num_stages copies of one loop step's tiles (the row tiles, the
    Theta tile and the rank-r tiles; the backward reads du and x, t and dt together)."""
    two = 2 if kernel == "input_bwd" else 1
    return cfg.num_stages * (two * cfg.block_m * (cfg.block_k * elem + br * 4) + cfg.block_k * br * theta_elem)


def input_prune_key(kernel: str, capability: Tuple[int, int], elem: int, theta_elem: int, br: int,
                    cfg: InputConfig) -> tuple:
    """The key of :data:`pruned.PRUNED` for an input-side kernel (same layout as
    :func:`prune_key`, path ``"input"``)."""
    return (kernel, "input", target_sm(capability), elem, theta_elem, br,
            (cfg.block_m, cfg.block_k, cfg.num_warps, cfg.num_stages))


def input_candidates(kernel: str, capability: Tuple[int, int], elem: int, theta_elem: int, br: int, m: int,
                     k: int, measured: bool = True) -> List[InputConfig]:
    """The input-side kernel's configurations for a problem, best guess first: the M
    bucket's list without what exceeds shared memory or was measured to spill (pruned.py;
    if nothing is left, the next smaller bucket's, then the next larger one's: every tile is
    correct for every M), then without K steps far wider than d_in."""
    return _input_candidates(kernel, capability, elem, theta_elem, br, m_bucket(m), k, measured)


@functools.lru_cache(maxsize=None)
def _input_candidates(kernel, capability, elem, theta_elem, br, bucket, k, measured) -> List[InputConfig]:
    table = _INPUT[kernel][4 if elem >= 4 else 2]
    limit = smem_limit(capability)

    def ok(c):
        if input_smem_estimate(c, kernel, elem, theta_elem, br) > limit:
            return False
        return not measured or not is_pruned(input_prune_key(kernel, capability, elem, theta_elem, br, c))

    order = ("large", "small", "decode")
    i = order.index(bucket)
    for bucket in order[i:] + order[:i][::-1]:
        keep = [c for c in table[bucket] if ok(c)]
        if keep:
            return [c for c in keep if c.block_k <= max(16, 2 * k)] or keep[:1]
    raise ValueError(f"no {kernel} tile fits sm_{capability[0]}{capability[1]} for element size {elem}, "
                     f"Theta element size {theta_elem}, rank tile {br}")


def all_input_candidates(kernel: str, capability: Tuple[int, int], elem: int, theta_elem: int, br: int,
                         bucket: str, measured: bool = True) -> List[InputConfig]:
    """Every configuration :func:`input_candidates` can return for a bucket (what the compile
    check compiles; ``measured=False``: before the measured pruning)."""
    m = {"decode": 1, "small": DECODE_M + 1, "large": 257}[bucket]
    return input_candidates(kernel, capability, elem, theta_elem, br, m, 1 << 30, measured)


def clear_caches() -> None:
    """Forget every cached lookup (after ``pruned.py`` was rewritten and reloaded)."""
    for fn in (triton_version, pruned_table, _prune_state, _candidates, _can_fuse, skinny_candidates, _input_candidates,
               _parse_config):
        fn.cache_clear()
