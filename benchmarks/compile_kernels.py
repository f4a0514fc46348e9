"""Compile every Triton GIFT kernel configuration for sm_80, sm_86, sm_89 and sm_90, without a GPU.

For each target, kernel (the table :data:`KERNELS`: forward, backward, skinny, input-side forward and backward,
the mixed-adapter shrink / expand / grad), path,
x dtype and Theta dtype, bias or not, rank tile and every configuration the autotuner may
pick (``configs.all_candidates``), this compiles the kernel with the launcher's own
constexprs (``fwd_meta`` / ``bwd_meta`` / ``skinny_meta``) and the specialisation its own
argument list gets at launch (``fwd_args`` / ``bwd_args`` / ``skinny_args`` on contiguous,
16-byte aligned tensors whose sizes are multiples of 16, with t, B and dt in the rank-path
dtype as the launchers allocate them), then reads registers and stack from the cubin with
triton's own ``cuobjdump``.

It fails (exit status 1) where a configuration the launchers can pick has a compile error,
any local-memory use (stack > 0: a spill), shared memory above the target's per-block limit
(``tiles.smem_limit``: 163 KiB on sm_80, 99 KiB on sm_86 / sm_89, 227 KiB on sm_90) or, on sm_90, a main-GEMM path (16-bit dtypes, row tile >= 64)
without ``wgmma``. With ``--odd`` it also compiles the specialisations that shapes the GPU
suite launches get (sizes and strides not multiples of 16, a non-contiguous x) for sm_90 and
reports their spills without failing on them. It writes ``benchmarks/KERNEL_REPORT.md`` (for
the newest triton the prune table was measured with) or ``KERNEL_REPORT_triton<version>.md``.

``--update-pruned`` compiles every candidate, including the pruned ones, and rewrites the
running triton version's entry of ``gift_kernels/ops/tiles/pruned.py`` (the other versions'
entries are kept): the prune table is per triton version, because code generation changes
between versions (triton 3.6 spills 8 bytes on six sm_80 configurations that 3.9 compiles
cleanly).

    python benchmarks/compile_kernels.py [--jobs 2] [--report PATH] [--quick] [--odd] [--update-pruned]

Adding a kernel: one entry in :data:`KERNELS` (its name in the kernels module, the variants
the launcher can produce, how the launcher builds its arguments and constexprs).
Nothing is cached across runs: every run compiles into a fresh TRITON_CACHE_DIR.
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import re
import resource
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Callable, Dict, Iterable, List, Optional, Tuple

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
TARGETS = (80, 86, 89, 90)  # A100 / H100 class, and the consumer Ampere / Ada cards (99 KiB per block)
ODD_TARGETS = (90,)  # the GPU machine's (H200): where the GPU suite's odd shapes launch
# (x dtype, Theta dtype): every base dtype with its own Theta, and float32 Theta under a
# 16-bit base (the mixed-precision training setup)
DTYPES = (("fp32", "fp32"), ("fp16", "fp16"), ("fp16", "fp32"), ("bf16", "bf16"), ("bf16", "fp32"))
RANK_TILES = (16, 32, 64)
ELEM = {"fp32": 4, "fp16": 2, "bf16": 2}
# (m, n, k) of the compiled problem per layout: "aligned" like the standard shapes; "odd" like
# the GPU suite's 37 x 130 x 77 (no size or stride a multiple of 16); "strided" an aligned
# problem whose x is a non-contiguous view (stride 2 along d_in), as in the suite's 3-D test
LAYOUTS = {"aligned": (32, 64, 64), "odd": (37, 130, 77), "strided": (32, 64, 64)}


@dataclass(frozen=True)
class Job:
    kernel: str  # a key of KERNELS
    target: int
    path: str  # split | fused  (skinny: t | B,dt)
    dtype: str
    theta: str
    bias: bool
    br: int
    bucket: str
    cfg: tuple  # the Config / SkinnyConfig fields
    layout: str = "aligned"  # a key of LAYOUTS

    def variant(self) -> str:
        b = "bias" if self.bias else "nobias"
        lay = "" if self.layout == "aligned" else f"/{self.layout}"
        return f"{self.path}/{self.dtype}/theta_{self.theta}/{b}/r{self.br}{lay}"


@dataclass
class Result:
    job: Job
    ok: bool
    regs: int = -1
    stack: int = -1
    smem: int = -1
    wgmma: Optional[bool] = None
    seconds: float = 0.0
    cpu_seconds: float = 0.0
    errors: List[str] = field(default_factory=list)


def _torch_dtype(name: str):
    import torch

    return {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[name]


# ------------------------------------------------------------------ the kernel table


@dataclass(frozen=True)
class KernelEntry:
    """How one kernel is compiled: its name in its op's ``triton`` module (``module``), the
    variants its launcher can produce (``variants(target, dtype, theta, measured)`` ->
    ``(path, bias, rank tile, bucket, cfg fields)``, from the config source in configs.py) and
    its launch (``launch(job, tensor) -> (args, meta)``: the launcher's own ``*_args`` and
    ``*_meta``; ``tensor(shape, dtype, x=False)`` makes an input of the job's layout)."""

    kernel: str
    variants: Callable[[int, str, str, bool], Iterable[tuple]]
    launch: Callable[[Job, Callable], Tuple[tuple, dict]]
    reads_x: bool = True  # whether a non-contiguous x is a specialisation of its own
    module: str = "linear.triton"  # the module of gift_kernels.ops that defines it
    prunable: bool = True  # the launcher picks among tiles by the prune table (else: one tile, must be clean)


def _gemm_variants(kernel: str):
    def variants(target: int, dtype: str, theta: str, measured: bool):
        from gift_kernels.ops import tiles as cf

        cap = (target // 10, target % 10)
        for fused in (False, True):
            # split: one rank chunk whatever r; fused: the rank tile holds all of r
            for br in (RANK_TILES if fused else (cf.SPLIT_R,)):
                seen = set()
                for bucket in ("decode", "small", "large"):  # split also runs at decode sizes, at large r
                    for c in cf.all_candidates(kernel, cap, ELEM[dtype], ELEM[theta], br, fused, bucket, measured):
                        if c in seen:
                            continue
                        seen.add(c)
                        for bias in ((False, True) if kernel == "fwd" else (False,)):
                            yield ("fused" if fused else "split", bias, br, bucket,
                                   (c.block_m, c.block_n, c.block_k, c.num_warps, c.num_stages))

    return variants


def _skinny_variants(target: int, dtype: str, theta: str, measured: bool):
    from gift_kernels.ops import tiles as cf

    cap = (target // 10, target % 10)
    for br in RANK_TILES:
        skinny = cf.skinny_candidates(cap, ELEM[dtype], ELEM[theta], br, measured)
        for c in (skinny[:1] if measured else skinny):  # the launcher takes the first kept tile
            cfg = (c.block_m, c.block_k, c.num_warps, c.num_stages)
            # t = x psi^T reads psi^T, a transposed view (a specialisation of its own); B = W phi
            # reads phi, and dt = g B reads B (rank dtype, held like Theta): the same kernel
            yield ("t", False, br, "-", cfg)
            yield ("B,dt", False, br, "-", cfg)


def _rank(job: Job):
    from gift_kernels.ops.dtypes import rank_dtype

    return rank_dtype(_torch_dtype(job.dtype), _torch_dtype(job.theta))


def _fwd_launch(job: Job, e):
    from gift_kernels.ops import tiles as cf
    from gift_kernels.ops.linear import triton as tg

    m, n, k = LAYOUTS[job.layout]
    th, rd, r = _torch_dtype(job.theta), _rank(job), job.br
    args = tg.fwd_args(e(m, k, x=True), e(n, k), e(n) if job.bias else None, e(k, r, dtype=th), e(r, k, dtype=th),
                       e(m, r, dtype=rd), e(n, r, dtype=rd), e(m, n))
    return args, tg.fwd_meta(cf.Config(*job.cfg), job.br, job.bias, job.path == "fused", _torch_dtype(job.dtype))


def _bwd_launch(job: Job, e):
    import torch
    from gift_kernels.ops import tiles as cf
    from gift_kernels.ops.linear import triton as tg

    m, n, k = LAYOUTS[job.layout]
    th, rd, r, f32 = _torch_dtype(job.theta), _rank(job), job.br, torch.float32
    args = tg.bwd_args(e(m, n), e(n, k), e(n, r, dtype=rd), e(m, r, dtype=rd), e(m, r, dtype=rd), e(m, k, x=True),
                       e(r, k, dtype=th), e(m, k), e(2, k, r, dtype=f32), e(2, r, k, dtype=f32))
    return args, tg.bwd_meta(cf.Config(*job.cfg), job.br, job.path == "fused", _torch_dtype(job.dtype))


def _skinny_launch(job: Job, e):
    from gift_kernels.ops import tiles as cf
    from gift_kernels.ops.linear import triton as tg

    m, n, k = LAYOUTS[job.layout]
    th, rd, r = _torch_dtype(job.theta), _rank(job), job.br
    b = e(r, k, dtype=th).t() if job.path == "t" else e(k, r, dtype=th)  # as the launcher passes it
    args = tg.skinny_args(e(m, k, x=job.path == "t"), b, e(m, r, dtype=rd))
    return args, tg.skinny_meta(cf.SkinnyConfig(*job.cfg), job.br, _torch_dtype(job.dtype))


def _input_variants(kernel: str):
    def variants(target: int, dtype: str, theta: str, measured: bool):
        from gift_kernels.ops import tiles as cf

        cap = (target // 10, target % 10)
        # every configuration of every bucket, every rank tile it runs with; the forward as
        # u = x + (x psi^T) phi^T ("u") and as the backward's dt = du phi ("t": u not written,
        # psi a transposed view of phi), the backward with every gradient (its largest variant)
        paths = ("u", "t") if kernel == "input_fwd" else ("input",)
        for br in cf.input_rank_tiles(kernel, ELEM[dtype]):
            seen = set()
            for bucket in ("decode", "small", "large"):
                for c in cf.all_input_candidates(kernel, cap, ELEM[dtype], ELEM[theta], br, bucket, measured):
                    if c not in seen:
                        seen.add(c)
                        for path in paths:
                            yield (path, False, br, bucket, (c.block_m, c.block_k, c.num_warps, c.num_stages))

    return variants


def _input_launch(job: Job, e):
    import torch
    from gift_kernels.ops import tiles as cf
    from gift_kernels.ops.input import triton as tg

    m, _, k = LAYOUTS[job.layout]
    th, rd, r, f32 = _torch_dtype(job.theta), _rank(job), job.br, torch.float32
    c, cd = cf.InputConfig(*job.cfg), _torch_dtype(job.dtype)
    x, phi, psi, t = e(m, k, x=True), e(k, r, dtype=th), e(r, k, dtype=th), e(m, r, dtype=rd)
    if job.kernel == "input_fwd":
        if job.path == "t":  # dt = du phi, as the backward launches it: phi^T as the psi operand
            return tg.input_fwd_args(e(m, k), phi, phi.t(), t, e(m, k)), tg.input_meta(c, job.br, cd, False)
        return tg.input_fwd_args(x, phi, psi, t, e(m, k)), tg.input_meta(c, job.br, cd)
    splits = 2
    args = tg.input_bwd_args(e(m, k), e(m, k), x, t, e(m, r, dtype=rd), psi, e(m, k), e(splits, k, r, dtype=f32),
                             e(splits, r, k, dtype=f32), m // splits)
    return args, tg.input_bwd_meta(c, job.br, cd, (True, True, True))


# the mixed-adapter kernels (ops/mixed/triton.py): one tile per (rows bucket, rank tile), taken from
# the launcher's own *_call; "fwd" / "bwd" paths differ in which bank view (strides) is read
MIXED_ROWS = {"decode": 4, "prefill": 4 * 16 + 1}  # below / above the launcher's 16-row-block limit
MIXED_ADAPTERS = 3


def _mixed_variants(kernel: str):
    def variants(target: int, dtype: str, theta: str, measured: bool):
        from gift_kernels.ops.mixed import triton as tm

        ranks = (16,) if kernel == "mixed_expand" else RANK_TILES  # the expand loops in SPLIT_R chunks
        buckets = ("decode",) if kernel == "mixed_grad" else tuple(MIXED_ROWS)  # grad: fixed 32-row tiles
        for path in ("fwd", "bwd"):
            for br in ranks:
                for bucket in buckets:
                    yield (path, False, br, bucket, tm.tile(kernel[len("mixed_"):], MIXED_ROWS[bucket], ELEM[dtype], br))

    return variants


def _mixed_launch(job: Job, e):
    import torch
    from gift_kernels.ops.mixed.segments import segments
    from gift_kernels.ops.mixed import triton as tm

    m, k, a = MIXED_ROWS[job.bucket], LAYOUTS[job.layout][2], MIXED_ADAPTERS
    th, rd, r, f32 = _torch_dtype(job.theta), _rank(job), job.br, torch.float32
    seg = segments(torch.tensor([(i % (a + 1)) - 1 for i in range(m)]), a)
    x, t = e(m, k, x=True), e(m, r, dtype=rd)
    phis, psis = e(a, k, r, dtype=th), e(a, r, k, dtype=th)
    fwd = job.path == "fwd"
    if job.kernel == "mixed_shrink":  # t = x psi_a^T; dt = du phi_a (a transposed view of phis)
        call = tm.shrink_call(x, psis if fwd else phis.transpose(1, 2), t, seg)
    elif job.kernel == "mixed_expand":  # u = x + t phi_a^T; dx = du + dt psi_a
        call = tm.expand_call(x, t, phis if fwd else psis.transpose(1, 2), e(m, k), seg)
    else:  # dphi_a = du^T t into (A, K, r); dpsi_a^T = x^T dt into a transposed (A, r, K)
        out = e(a, k, r, dtype=f32) if fwd else e(a, r, k, dtype=f32).transpose(1, 2)
        call = tm.grad_call(x, t, out, seg)
    _, _, args, meta = call
    return args, meta


KERNELS: Dict[str, KernelEntry] = {
    "fwd": KernelEntry("_gift_fwd_kernel", _gemm_variants("fwd"), _fwd_launch),
    "bwd": KernelEntry("_gift_bwd_kernel", _gemm_variants("bwd"), _bwd_launch),
    "skinny": KernelEntry("_gift_skinny_kernel", _skinny_variants, _skinny_launch),
    "input_fwd": KernelEntry("_gift_input_fwd_kernel", _input_variants("input_fwd"), _input_launch,
                             module="input.triton"),
    "input_bwd": KernelEntry("_gift_input_bwd_kernel", _input_variants("input_bwd"), _input_launch,
                             module="input.triton"),
    **{name: KernelEntry(f"_{name}_kernel", _mixed_variants(name), _mixed_launch, module="mixed.triton",
                         prunable=False)
       for name in ("mixed_shrink", "mixed_expand", "mixed_grad")},
}


def jobs(quick: bool = False, measured: bool = True, dtypes=DTYPES, targets=TARGETS) -> List[Job]:
    """Every (kernel, variant, configuration, target) the launchers can produce; with
    ``measured=False`` also the ones the measured table prunes (to re-measure them)."""
    out: List[Job] = []
    for target in targets:
        for dtype, theta in dtypes:
            for name, entry in KERNELS.items():
                for path, bias, br, bucket, cfg in entry.variants(target, dtype, theta, measured):
                    out.append(Job(name, target, path, dtype, theta, bias, br, bucket, cfg))
    if quick:  # one configuration per (kernel, target, path, dtype): a fast smoke run
        firsts: Dict[tuple, Job] = {}
        for j in out:
            # the mixed kernels have no tuning space (one fixed tile per rank tile and rows
            # bucket, never pruned): their widest rank tile's tiles too, in each rows bucket
            fixed = (j.bucket,) if j.kernel.startswith("mixed_") and j.br == max(RANK_TILES) else ()
            firsts.setdefault((j.kernel, j.target, j.path, j.dtype, j.theta, j.bias) + fixed, j)
        out = list(firsts.values())
    return out


def odd_jobs(kept: List[Job]) -> List[Job]:
    """The odd-shape specialisations: for each kept (kernel, path, dtypes, bias, rank tile) on
    sm_90, its first configuration with sizes and strides not multiples of 16, and (for the
    kernels that read x) with a non-contiguous x."""
    firsts: Dict[tuple, Job] = {}
    for j in kept:
        if j.target in ODD_TARGETS:
            firsts.setdefault((j.kernel, j.target, j.path, j.dtype, j.theta, j.bias, j.br), j)
    out = []
    for j in firsts.values():
        out.append(replace(j, layout="odd"))
        if j.kernel == "fwd" and not j.bias:  # the strided x specialisation (bias does not change it)
            out.append(replace(j, layout="strided"))
    return out


def _tensor_maker(layout: str, cd):
    """``e(*shape, dtype=cd, x=False)``: an empty CPU tensor; x is a stride-2 view in the
    ``strided`` layout."""
    import torch

    def e(*shape, dtype=None, x=False):
        if x and layout == "strided":
            return torch.empty(shape[0], 2 * shape[1], dtype=dtype or cd)[:, ::2]
        return torch.empty(*shape, dtype=dtype or cd)

    return e


def _kernel_and_args(job: Job):
    """The kernel, its launch arguments (small tensors with the dtypes and layout of a real
    call) and the launcher's constexprs + options."""
    import importlib

    entry = KERNELS[job.kernel]
    args, meta = entry.launch(job, _tensor_maker(job.layout, _torch_dtype(job.dtype)))
    return getattr(importlib.import_module(f"gift_kernels.ops.{entry.module}"), entry.kernel), args, meta


def _specialize(fn, args, meta: dict):
    """Signature, constexprs and attributes as triton's JIT derives them from ``args``."""
    signature, constexprs, attrs = {}, {}, {}
    for i, p in enumerate(fn.params):
        name = p.name
        if name in meta:
            signature[name] = "constexpr"
            constexprs[name] = meta[name]
            continue
        ty, aligned = _specialize_arg(args[i], not p.do_not_specialize, not p.do_not_specialize_on_alignment)
        signature[name] = ty
        if ty == "constexpr":
            constexprs[name] = args[i]
        elif aligned:
            attrs[(i,)] = [["tt.divisibility", 16]]
    return signature, constexprs, attrs


def _specialize_arg(arg, specialize: bool, align: bool):
    """(type, 16-divisible) of one argument, by triton's own rule where it exposes it."""
    try:
        from triton._C.libtriton import native_specialize_impl
        from triton.backends.compiler import BaseBackend

        ty, attr = native_specialize_impl(BaseBackend, arg, False, specialize, align)
        return ty, isinstance(attr, str) and "D" in attr
    except ImportError:  # older triton: the same rule, written out
        import torch

        if isinstance(arg, torch.Tensor):
            names = {torch.float32: "*fp32", torch.float16: "*fp16", torch.bfloat16: "*bf16"}
            return names[arg.dtype], align and arg.data_ptr() % 16 == 0
        if specialize and arg == 1:
            return "constexpr", False
        return ("i32" if -2**31 <= arg < 2**31 else "i64"), specialize and align and arg % 16 == 0


def _cuobjdump() -> str:
    import triton

    return str(Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump")


def _cpu() -> float:
    """CPU seconds of this process and its finished children (ptxas, cuobjdump)."""
    ch = resource.getrusage(resource.RUSAGE_CHILDREN)
    return time.process_time() + ch.ru_utime + ch.ru_stime


def compile_one(job: Job) -> Result:
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    res = Result(job, ok=False)
    t0, c0 = time.perf_counter(), _cpu()
    try:
        fn, args, meta = _kernel_and_args(job)
        meta = dict(meta)
        options = {"num_warps": meta.pop("num_warps")}
        if "num_stages" in meta:  # else triton's default, as at launch
            options["num_stages"] = meta.pop("num_stages")
        sig, consts, attrs = _specialize(fn, args, meta)
        src = ASTSource(fn=fn, signature=sig, constexprs=consts, attrs=attrs)
        kernel = triton.compile(src, target=GPUTarget("cuda", job.target, 32), options=options)
    except Exception as exc:  # a compile error is a result to report, not a crash
        res.errors.append(f"compile error: {type(exc).__name__}: {str(exc).strip().splitlines()[-1][:300]}")
        res.seconds, res.cpu_seconds = time.perf_counter() - t0, _cpu() - c0
        return res
    res.seconds, res.cpu_seconds = time.perf_counter() - t0, _cpu() - c0
    res.smem = int(kernel.metadata.shared)
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(kernel.asm["cubin"])
        f.flush()
        dump = subprocess.run([_cuobjdump(), "--dump-resource-usage", f.name], capture_output=True, text=True).stdout
    usage = re.search(r"REG:(\d+)\s+STACK:(\d+)\s+SHARED:(\d+)\s+LOCAL:(\d+)", dump)
    if usage is None:
        res.errors.append(f"could not read cuobjdump's resource usage: {dump[-300:]!r}")
        return res
    res.regs, res.stack = int(usage.group(1)), int(usage.group(2)) + int(usage.group(4))
    res.smem += int(usage.group(3))
    if res.stack > 0:
        res.errors.append(f"spills: {res.stack} bytes of local memory")
    from gift_kernels.ops.tiles import smem_limit

    limit = smem_limit((job.target // 10, job.target % 10))
    if res.smem > limit:
        res.errors.append(f"shared memory {res.smem} B > sm_{job.target} limit {limit} B")
    if job.target >= 90:
        res.wgmma = "wgmma" in kernel.asm["ptx"]
        main_gemm = job.kernel in ("fwd", "bwd") and job.dtype != "fp32" and job.cfg[0] >= 64
        if main_gemm and not res.wgmma:
            res.errors.append("sm_90 main GEMM path without wgmma")
    res.ok = not res.errors
    return res


def _worker_init(cache_dir: str) -> None:
    os.environ["TRITON_CACHE_DIR"] = cache_dir
    os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")  # triton 3.9's default, stated


def run(jobs_: List[Job], processes: int) -> List[Result]:
    with tempfile.TemporaryDirectory(prefix="gift_triton_cache_") as cache:
        if processes <= 1:
            _worker_init(cache)
            return [compile_one(j) for j in jobs_]
        ctx = mp.get_context("spawn")  # fresh interpreters: no MLIR state shared through fork
        with ctx.Pool(processes, initializer=_worker_init, initargs=(cache,)) as pool:
            return pool.map(compile_one, jobs_, chunksize=4)


def _fmt_cfg(job: Job) -> str:
    if len(job.cfg) == 3:  # the mixed kernels' one tile: rows x K (or column) step, warps
        bm, bk, w = job.cfg
        return f"{bm}x{bk} w{w}"
    if len(job.cfg) == 4:  # skinny and input-side tiles: rows x K step
        bm, bk, w, s = job.cfg
        return f"{bm}x{bk} w{w} s{s}"
    bm, bn, bk, w, s = job.cfg
    return f"{bm}x{bn}x{bk} w{w} s{s}"


PRUNED_PY = ROOT / "gift_kernels" / "ops" / "tiles" / "pruned.py"


def _prune_key(job: Job) -> tuple:
    from gift_kernels.ops import tiles as cf

    if job.kernel in cf.INPUT_KERNELS:
        return cf.input_prune_key(job.kernel, (job.target // 10, job.target % 10), ELEM[job.dtype], ELEM[job.theta], job.br,
                                  cf.InputConfig(*job.cfg))
    cfg = cf.SkinnyConfig(*job.cfg) if job.kernel == "skinny" else cf.Config(*job.cfg)
    return cf.prune_key(job.kernel, job.path == "fused", (job.target // 10, job.target % 10), ELEM[job.dtype], ELEM[job.theta],
                        job.br, cfg)


def _version() -> str:
    from gift_kernels.ops.tiles import triton_version

    return triton_version()


def write_pruned(results: List[Result], dtypes=DTYPES, kernels=None, targets=TARGETS) -> int:
    """Rewrite the running triton version's entry of pruned.py: every configuration that
    spilled or overflowed shared memory (compile errors are failures, not prunes). The
    other versions' entries are kept as they were measured, and so are this version's keys
    of element classes (x bytes, Theta bytes) outside ``dtypes``, of kernels outside
    ``kernels`` or of targets outside ``targets`` (a partial re-measure). The entry's measured
    targets become the old ones and ``targets``."""
    import triton
    from gift_kernels.ops.tiles import pruned as current

    tables = dict(current.PRUNED)
    measured = dict(getattr(current, "MEASURED", {}))
    version = _version()
    measured[version] = triton.__version__
    classes = {(ELEM[d], ELEM[t]) for d, t in dtypes}
    kernels = set(KERNELS) if kernels is None else set(kernels)
    kept_old = {k for k in tables.get(version, ())
                if (k[3], k[4]) not in classes or k[0] not in kernels or k[2] not in targets}
    measured_targets = dict(getattr(current, "TARGETS", {}))
    measured_targets[version] = tuple(sorted(set(measured_targets.get(version, ())) | set(targets)))
    tables[version] = frozenset(kept_old | {_prune_key(r.job) for r in results
                                            if not r.ok and KERNELS[r.job.kernel].prunable
                                            and not any("compile error" in e for e in r.errors)})
    lines = [
        '"""Tile configurations that spill registers or exceed shared memory, per triton version',
        "(major.minor), as measured by ``python benchmarks/compile_kernels.py --update-pruned``",
        "with that version for its targets (generated: do not edit by hand; each run rewrites",
        "the entry of the triton it runs with and keeps the others). Key: (kernel, path, sm_XY,",
        "element bytes, Theta element bytes, rank tile, tile fields); see configs.prune_key;",
        "configs.pruned_table picks the entry.",
        "",
    ]
    lines += ['"""', "", "# the full triton version each entry was last measured with", "MEASURED = {"]
    lines += [f"    {v!r}: {measured.get(v, '?')!r}," for v in sorted(tables)]
    lines += ["}", "", "# the targets (sm_XY) each entry was measured for", "TARGETS = {"]
    lines += [f"    {v!r}: {measured_targets.get(v, ())!r}," for v in sorted(tables)]
    lines += ["}", "", "PRUNED = {"]
    for v in sorted(tables):
        lines.append(f"    {v!r}: frozenset({{")
        lines += [f"        {k!r}," for k in sorted(tables[v])]
        lines.append("    }),")
    lines.append("}")
    PRUNED_PY.write_text("\n".join(lines) + "\n")
    return len(tables[version])


def _reload_pruned() -> None:
    import importlib

    from gift_kernels.ops.tiles import pruned as current

    importlib.reload(current)  # the tiles read current.PRUNED, through caches cleared here
    from gift_kernels.ops import tiles

    tiles.clear_caches()


def default_report() -> Path:
    """KERNEL_REPORT.md for the newest triton the prune table was measured with, else a
    report of the version's own."""
    from gift_kernels.ops.tiles import pruned as current

    newest = max(current.PRUNED, key=lambda v: tuple(int(p) for p in v.split(".")))
    v = _version()
    name = "KERNEL_REPORT.md" if v == newest else f"KERNEL_REPORT_triton{v}.md"
    return ROOT / "benchmarks" / name


def _row(r: Result, kept: Optional[bool]) -> str:
    j = r.job
    w = "-" if r.wgmma is None else ("yes" if r.wgmma else "no")
    state = "-" if kept is None else ("kept" if kept else "pruned")
    return (f"| {j.kernel} | {j.path} | {j.dtype} | {j.theta} | {'yes' if j.bias else 'no'} | {j.br} | {j.bucket} | "
            f"{_fmt_cfg(j)} | sm_{j.target} | {r.regs} | {r.smem / 1024:.1f} | {r.stack} | {w} | {state} | "
            f"{r.seconds:.1f} |")


HEADER = ["| kernel | path | dtype | Theta | bias | r tile | M bucket | config | target | registers | shared (KiB) | "
          "spills (B) | wgmma | kept | s |",
          "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]


def _order(results: List[Result]) -> List[Result]:
    return sorted(results, key=lambda r: (r.job.kernel, r.job.path, r.job.dtype, r.job.theta, r.job.bias,
                                          r.job.br, r.job.target, r.job.layout, r.job.cfg))


def report(results: List[Result], odd: List[Result], kept: set, seconds: float, processes: int, path: Path,
           scope: str = "") -> str:
    import triton

    bad = [r for r in results if not r.ok and r.job in kept]
    kept_res = [r for r in results if r.job in kept]
    odd_bad = [r for r in odd if not r.ok]
    lines = [
        "# Triton kernel compile report",
        "",
        "Generated by `python benchmarks/compile_kernels.py` (do not edit by hand): every",
        "configuration the autotuner may pick (`configs.all_candidates`), for every path,",
        "dtype, Theta dtype, bias and rank tile, compiled for sm_80, sm_86, sm_89, sm_90 on a CPU-only",
        "machine with the launchers' own constexprs and argument specialisation (contiguous,",
        "aligned tensors, sizes multiples of 16; t, B, dt in the rank-path dtype). Registers and",
        "stack from `cuobjdump --dump-resource-usage`; shared memory = dynamic",
        "(`metadata.shared`) + static. A spill is any stack / local memory. wgmma: whether the",
        "sm_90 PTX uses it (required for the 16-bit main GEMM paths with a row tile >= 64; fp32",
        "runs IEEE fp32 dots, which have no tensor-core path; the decode tile of 16 rows is below",
        "wgmma's 64).",
        "",
        "Rows marked `pruned` are candidates that `configs.fits` removes because the measurement",
        f"for this triton version (`--update-pruned`, table entry {_version()!r} of",
        "`gift_kernels/ops/tiles/pruned.py`) found them spilling or over the shared-memory",
        "limit in some variant; the autotuner never offers them. Every kept row must be clean.",
        "",
        *([f"Scope of this run: {scope}.", ""] if scope else []),
        f"triton {triton.__version__}; {len(results)} compilations ({len(kept_res)} kept) in {seconds:.0f} s with "
        f"{processes} processes ({sum(r.cpu_seconds for r in results + odd):.0f} CPU-seconds in the compiler "
        f"processes); failures: {len(bad)}; max registers "
        f"{max((r.regs for r in kept_res), default=0)} and max stack {max((r.stack for r in kept_res), default=0)} B "
        "over the kept configurations."
        + (f" Odd-shape specialisations (sm_90, reported, not failed): {len(odd)} compiled, {len(odd_bad)} with "
           "spills or errors." if odd else ""),
        "",
    ]
    if bad:
        lines += ["## Failures", ""]
        for r in bad:
            lines.append(f"- {r.job.kernel} {r.job.variant()} {_fmt_cfg(r.job)} sm_{r.job.target}: "
                         + "; ".join(r.errors))
        lines.append("")
    if odd:
        lines += ["## Odd-shape specialisations (reported, not failed)", "",
                  "What the GPU suite's shapes launch on the H200 (sm_90): sizes and strides not multiples",
                  f"of 16 (`odd`: m, n, k = {LAYOUTS['odd']}) and a non-contiguous x (`strided`: stride 2",
                  "along d_in), each kept (kernel, path, dtypes, bias, rank tile) with its first configuration.",
                  ""]
        lines += [f"- {r.job.kernel} {r.job.variant()} {_fmt_cfg(r.job)}: " + "; ".join(r.errors) for r in odd_bad]
        lines += ([""] if odd_bad else ["No spills, no errors.", ""])
        lines += HEADER + [_row(r, None).replace(f"| {r.job.bucket} |", f"| {r.job.bucket}, {r.job.layout} |")
                           for r in _order(odd)] + [""]
    lines += ["## All configurations", ""] + HEADER + [_row(r, r.job in kept) for r in _order(results)]
    text = "\n".join(lines) + "\n"
    path.write_text(text)
    return text


def main(argv: Optional[List[str]] = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--jobs", type=int, default=2, help="compiler processes (default 2)")
    ap.add_argument("--report", type=Path, default=None,
                    help="default: benchmarks/KERNEL_REPORT.md, or KERNEL_REPORT_triton<version>.md for an older triton")
    ap.add_argument("--quick", action="store_true",
                    help="one configuration per kernel variant (and the mixed kernels' widest rank tile)")
    ap.add_argument("--odd", action="store_true",
                    help="also compile (and report, not fail on) the odd-shape specialisations for sm_90")
    ap.add_argument("--dtypes", default=None,
                    help="only these (x dtype, Theta dtype) pairs, e.g. 'bf16:fp32,fp16:fp32' (default: all)")
    ap.add_argument("--kernels", default=None,
                    help=f"only these kernels of the table, comma-separated (default: all of {', '.join(KERNELS)})")
    ap.add_argument("--targets", default=None,
                    help=f"only these targets, comma-separated sm numbers (default: all of {TARGETS})")
    ap.add_argument("--update-pruned", action="store_true",
                    help="compile every candidate, including the pruned ones, and rewrite this triton's prune table")
    args = ap.parse_args(argv)
    dtypes = DTYPES if not args.dtypes else tuple(tuple(p.split(":")) for p in args.dtypes.split(","))
    unknown = [p for p in dtypes if p not in DTYPES]
    if unknown:
        ap.error(f"--dtypes: unknown pairs {unknown}; choose from {DTYPES}")
    only = set(args.kernels.split(",")) if args.kernels else set(KERNELS)
    if only - set(KERNELS):
        ap.error(f"--kernels: unknown {sorted(only - set(KERNELS))}; choose from {list(KERNELS)}")

    targets = TARGETS if not args.targets else tuple(int(t) for t in args.targets.split(","))
    if set(targets) - set(TARGETS):
        ap.error(f"--targets: unknown {sorted(set(targets) - set(TARGETS))}; choose from {TARGETS}")

    def select(js):
        return [j for j in js if j.kernel in only]

    todo = select(jobs(quick=args.quick, measured=not args.update_pruned, dtypes=dtypes, targets=targets))
    t0 = time.perf_counter()
    results = run(todo, args.jobs)
    if args.update_pruned:
        n = write_pruned(results, dtypes, only, targets)
        print(f"wrote {PRUNED_PY} (triton {_version()}: {n} pruned configurations)")
        _reload_pruned()
    kept = set(select(jobs(quick=args.quick, measured=True, dtypes=dtypes, targets=targets)))
    odd = run(odd_jobs(sorted(kept, key=str)), args.jobs) if args.odd else []
    seconds = time.perf_counter() - t0
    path = args.report or default_report()
    partial = [f"kernels {', '.join(k for k in KERNELS if k in only)}" if only != set(KERNELS) else "",
               f"dtypes {', '.join(f'{d}:{t}' for d, t in dtypes)}" if dtypes != DTYPES else "",
               f"targets {', '.join(f'sm_{t}' for t in targets)}" if targets != TARGETS else "",
               "one configuration per variant (--quick)" if args.quick else ""]
    scope = "; ".join(p for p in partial if p)
    report(results, odd, kept, seconds, args.jobs, path, scope + (" (fp16 shares bf16's prune keys)" if
                                                                  "bf16:" in scope and "fp16" not in scope else ""))
    bad = [r for r in results if not r.ok and r.job in kept]
    missing = kept - {r.job for r in results}  # --update-pruned: kept = a subset of what compiled
    print(f"compiled {len(results) + len(odd)} kernel configurations in {seconds:.0f} s with triton {_version()}; "
          f"{len(bad)} failed; {sum(not r.ok for r in odd)} odd-shape specialisations spilled or failed "
          f"(reported only); report: {path}")
    for r in bad:
        print(f"FAIL {r.job.kernel} {r.job.variant()} {_fmt_cfg(r.job)} sm_{r.job.target}: {'; '.join(r.errors)}")
    for j in sorted(missing, key=str):
        print(f"FAIL not compiled: {j}")
    return 1 if bad or missing else 0


if __name__ == "__main__":
    sys.exit(main())
