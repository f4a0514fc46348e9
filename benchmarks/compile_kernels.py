"""Compile every Triton GIFT kernel configuration for sm_80 and sm_90, without a GPU.

For each target, kernel (forward, backward, skinny), path (split / fused / decode), x dtype
and Theta dtype, bias or not, rank tile and every configuration the autotuner may pick
(``triton_configs.all_candidates``), this compiles the kernel with the launcher's own
constexprs (``fwd_meta`` / ``bwd_meta`` / ``skinny_meta``) and the specialisation its
own argument list gets at launch (``fwd_args`` / ``bwd_args`` / ``skinny_args`` on
contiguous, 16-byte aligned tensors whose sizes are multiples of 16), then reads
registers and stack from the cubin with triton's own ``cuobjdump``.

It fails (exit status 1) on a compile error, on any local-memory use (stack > 0: a spill),
on shared memory above the target's per-block limit, and where an sm_90 main-GEMM path
(16-bit dtypes, row tile >= 64) does not use ``wgmma``. It writes
``benchmarks/KERNEL_REPORT.md``.

    python benchmarks/compile_kernels.py [--jobs 2] [--report PATH] [--quick]

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
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional, Tuple

ROOT = Path(__file__).resolve().parents[1]
TARGETS = (80, 90)
SMEM_LIMIT = {80: 163 * 1024, 90: 227 * 1024}
# (x dtype, Theta dtype): every base dtype with its own Theta, and float32 Theta under a
# 16-bit base (the mixed-precision training setup)
DTYPES = (("fp32", "fp32"), ("fp16", "fp16"), ("fp16", "fp32"), ("bf16", "bf16"), ("bf16", "fp32"))
RANK_TILES = (16, 32, 64)


@dataclass(frozen=True)
class Job:
    kernel: str  # fwd | bwd | skinny
    target: int
    path: str  # split | fused  (skinny: t | B | dt)
    dtype: str
    theta: str
    bias: bool
    br: int
    bucket: str
    cfg: tuple  # the Config / SkinnyConfig fields

    def variant(self) -> str:
        b = "bias" if self.bias else "nobias"
        return f"{self.path}/{self.dtype}/theta_{self.theta}/{b}/r{self.br}"


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


def jobs(quick: bool = False, measured: bool = True) -> List[Job]:
    """Every (kernel, variant, configuration, target) the launchers can produce; with
    ``measured=False`` also the ones the measured table prunes (to re-measure them)."""
    from gift_kernels.ops.triton import configs as cf

    out: List[Job] = []
    elem = {"fp32": 4, "fp16": 2, "bf16": 2}
    for target in TARGETS:
        cap = (target // 10, target % 10)
        for dtype, theta in DTYPES:
            for fused in (False, True):
                path = "fused" if fused else "split"
                # split: one rank chunk whatever r; fused: the rank tile holds all of r
                rank_tiles = RANK_TILES if fused else (cf.SPLIT_R,)
                for kernel in ("fwd", "bwd"):
                    for br in rank_tiles:
                        seen = set()
                        # split also runs at decode sizes, once r exceeds the fused limit
                        for bucket in ("decode", "small", "large"):
                            for c in cf.all_candidates(kernel, cap, elem[dtype], elem[theta], br, fused, bucket,
                                                       measured):
                                if c in seen:
                                    continue
                                seen.add(c)
                                for bias in ((False, True) if kernel == "fwd" else (False,)):
                                    out.append(Job(kernel, target, path, dtype, theta, bias, br, bucket,
                                                   (c.block_m, c.block_n, c.block_k, c.num_warps, c.num_stages)))
            # t = x psi^T and B = W phi read Theta (theta dtype); dt = g B reads B (x dtype)
            for br in RANK_TILES:
                # the launcher takes the first kept tile; re-measuring tries them all
                skinny = cf.skinny_candidates(cap, elem[dtype], elem[theta], br, measured)
                for c in (skinny[:1] if measured else skinny):
                    cfg = (c.block_m, c.block_k, c.num_warps, c.num_stages)
                    # t reads psi^T, a transposed view (another specialisation); B reads phi
                    # and dt reads B contiguous (dt = the B kernel of the (dtype, dtype) entry)
                    out.append(Job("skinny", target, "t", dtype, theta, False, br, "-", cfg))
                    path = "B,dt" if theta == dtype else "B"
                    out.append(Job("skinny", target, path, dtype, theta, False, br, "-", cfg))
            # the input-side form: every configuration of every bucket, every rank tile it runs
            # with (the rank runs in chunks of the tile); the backward with dx (NEED_X), its
            # larger variant
            for kernel in cf.INPUT_KERNELS:
                for br in cf.input_rank_tiles(elem[dtype]):
                    seen = set()
                    for bucket in ("decode", "small", "large"):
                        for c in cf.all_input_candidates(kernel, cap, elem[dtype], elem[theta], br, bucket, measured):
                            if c not in seen:
                                seen.add(c)
                                out.append(Job(kernel, target, "input", dtype, theta, False, br, bucket,
                                               (c.block_m, c.block_k, c.num_warps, c.num_stages)))
    if quick:  # one configuration per (kernel, target, path, dtype): a fast smoke run
        firsts: Dict[tuple, Job] = {}
        for j in out:
            firsts.setdefault((j.kernel, j.target, j.path, j.dtype, j.theta, j.bias), j)
        out = list(firsts.values())
    return out


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


def _kernel_and_args(job: Job):
    """The kernel, its launch arguments (small tensors with the layout of a real call) and
    the launcher's constexprs + options."""
    import torch
    from gift_kernels.ops.dtypes import rank_dtype
    from gift_kernels.ops.triton import configs as cf
    from gift_kernels.ops.triton import launch as tg

    cd, th = _torch_dtype(job.dtype), _torch_dtype(job.theta)
    rd = rank_dtype(cd, th)  # t, B and dt as the launchers allocate them
    m, n, k, r = 32, 64, 64, job.br  # multiples of 16, like the standard shapes
    f32 = torch.float32

    def e(*shape, dtype=cd):
        return torch.empty(*shape, dtype=dtype)

    if job.kernel == "skinny":
        c = cf.SkinnyConfig(*job.cfg)
        b = e(r, k, dtype=th).t() if job.path == "t" else e(k, r, dtype=th)  # as the launcher passes it
        args = tg.skinny_args(e(m, k), b, e(m, r, dtype=rd))
        return tg._gift_skinny_kernel, args, tg.skinny_meta(c, job.br, cd)
    if job.kernel in cf.INPUT_KERNELS:
        c = cf.InputConfig(*job.cfg)
        x, phi, psi, t = e(m, k), e(k, r, dtype=th), e(r, k, dtype=th), e(m, r, dtype=rd)
        if job.kernel == "input_fwd":
            return tg._gift_input_fwd_kernel, tg.input_fwd_args(x, phi, psi, t, e(m, k)), tg.input_meta(c, job.br, cd)
        args = tg.input_bwd_args(e(m, k), x, t, phi, psi, e(m, r, dtype=rd), e(m, k), e(k, r, dtype=f32),
                                 e(r, k, dtype=f32))
        return tg._gift_input_bwd_kernel, args, tg.input_meta(c, job.br, cd, need_x=True)
    c = cf.Config(*job.cfg)
    fused = job.path == "fused"
    if job.kernel == "fwd":
        args = tg.fwd_args(e(m, k), e(n, k), e(n) if job.bias else None, e(k, r, dtype=th), e(r, k, dtype=th),
                           e(m, r, dtype=rd), e(n, r, dtype=rd), e(m, n))
        return tg._gift_fwd_kernel, args, tg.fwd_meta(c, job.br, job.bias, fused, cd)
    args = tg.bwd_args(e(m, n), e(n, k), e(n, r, dtype=rd), e(m, r, dtype=rd), e(m, r, dtype=rd), e(m, k),
                       e(r, k, dtype=th), e(m, k), e(k, r, dtype=f32), e(r, k, dtype=f32))
    return tg._gift_bwd_kernel, args, tg.bwd_meta(c, job.br, fused, cd)


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
        options = {"num_warps": meta.pop("num_warps"), "num_stages": meta.pop("num_stages")}
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
    if res.smem > SMEM_LIMIT[job.target]:
        res.errors.append(f"shared memory {res.smem} B > sm_{job.target} limit {SMEM_LIMIT[job.target]} B")
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
    if len(job.cfg) == 4:  # skinny and input-side tiles: rows x K step
        bm, bk, w, s = job.cfg
        return f"{bm}x{bk} w{w} s{s}"
    bm, bn, bk, w, s = job.cfg
    return f"{bm}x{bn}x{bk} w{w} s{s}"


PRUNED_PY = ROOT / "gift_kernels" / "ops" / "triton" / "pruned.py"


def _prune_key(job: Job) -> tuple:
    from gift_kernels.ops.triton import configs as cf

    elem = {"fp32": 4, "fp16": 2, "bf16": 2}
    if job.kernel in cf.INPUT_KERNELS:
        return cf.input_prune_key(job.kernel, (job.target // 10, 0), elem[job.dtype], elem[job.theta], job.br,
                                  cf.InputConfig(*job.cfg))
    cfg = cf.SkinnyConfig(*job.cfg) if job.kernel == "skinny" else cf.Config(*job.cfg)
    return cf.prune_key(job.kernel, job.path == "fused", (job.target // 10, 0), elem[job.dtype], elem[job.theta],
                        job.br, cfg)


def write_pruned(results: List[Result]) -> int:
    """Rewrite triton_pruned.py: every configuration that spilled or overflowed shared memory."""
    import triton

    bad = sorted({_prune_key(r.job) for r in results if not r.ok and not any("compile error" in e for e in r.errors)})
    lines = [
        '"""Tile configurations that spill registers or exceed shared memory, as measured by',
        "``python benchmarks/compile_kernels.py --update-pruned`` (generated: do not edit by hand).",
        "",
        f"Measured with triton {triton.__version__} for sm_80 and sm_90. Key: (kernel, path, arch,",
        "element bytes, Theta element bytes, rank tile, tile fields); see triton_configs.prune_key.",
        '"""',
        "",
        "PRUNED = frozenset({",
    ]
    lines += [f"    {k!r}," for k in bad]
    lines.append("})")
    PRUNED_PY.write_text("\n".join(lines) + "\n")
    return len(bad)


def report(results: List[Result], seconds: float, processes: int, path: Path, pruned: frozenset = frozenset()) -> str:
    import triton

    is_pruned = {id(r): _prune_key(r.job) in pruned for r in results}
    bad = [r for r in results if not r.ok and not is_pruned[id(r)]]
    kept = [r for r in results if not is_pruned[id(r)]]
    lines = [
        "# Triton kernel compile report",
        "",
        "Generated by `python benchmarks/compile_kernels.py` (do not edit by hand): every",
        "configuration the autotuner may pick (`triton_configs.all_candidates`), for every path,",
        "dtype, Theta dtype, bias and rank tile, compiled for sm_80 and sm_90 on a CPU-only",
        "machine with the launchers' own constexprs and argument specialisation (contiguous,",
        "aligned tensors, sizes multiples of 16). Registers and stack from `cuobjdump",
        "--dump-resource-usage`; shared memory = dynamic (`metadata.shared`) + static.",
        "A spill is any stack / local memory. wgmma: whether the sm_90 PTX uses it (required for",
        "the 16-bit main GEMM paths with a row tile >= 64; fp32 runs IEEE fp32 dots, which have",
        "no tensor-core path; the decode tile of 16 rows is below wgmma's 64).",
        "",
        "Rows marked `pruned` are candidates that `triton_configs.fits` removes because this",
        "measurement (`--update-pruned`) found them spilling or over the shared-memory limit in",
        "some variant; the autotuner never offers them. Every kept row must be clean.",
        "",
        f"triton {triton.__version__}; {len(results)} compilations ({len(kept)} kept) in {seconds:.0f} s with "
        f"{processes} processes ({sum(r.cpu_seconds for r in results):.0f} CPU-seconds in the compiler "
        f"processes); failures: {len(bad)}; max registers "
        f"{max((r.regs for r in kept), default=0)} and max stack {max((r.stack for r in kept), default=0)} B "
        "over the kept configurations.",
        "",
    ]
    if bad:
        lines += ["## Failures", ""]
        for r in bad:
            lines.append(f"- {r.job.kernel} {r.job.variant()} {_fmt_cfg(r.job)} sm_{r.job.target}: "
                         + "; ".join(r.errors))
        lines.append("")
    lines += [
        "## All configurations",
        "",
        "| kernel | path | dtype | Theta | bias | r tile | M bucket | config | target | registers | shared (KiB) | spills (B) | wgmma | kept | s |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    order = sorted(results, key=lambda r: (r.job.kernel, r.job.path, r.job.dtype, r.job.theta, r.job.bias,
                                           r.job.br, r.job.target, r.job.cfg))
    for r in order:
        j = r.job
        w = "-" if r.wgmma is None else ("yes" if r.wgmma else "no")
        lines.append(
            f"| {j.kernel} | {j.path} | {j.dtype} | {j.theta} | {'yes' if j.bias else 'no'} | {j.br} | {j.bucket} | "
            f"{_fmt_cfg(j)} | sm_{j.target} | {r.regs} | {r.smem / 1024:.1f} | {r.stack} | {w} | "
            f"{'pruned' if is_pruned[id(r)] else 'kept'} | {r.seconds:.1f} |"
        )
    text = "\n".join(lines) + "\n"
    path.write_text(text)
    return text


def _pruned_now() -> frozenset:
    import importlib

    from gift_kernels.ops.triton import pruned as triton_pruned

    return importlib.reload(triton_pruned).PRUNED


def main(argv: Optional[List[str]] = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--jobs", type=int, default=2, help="compiler processes (default 2)")
    ap.add_argument("--report", type=Path, default=ROOT / "benchmarks" / "KERNEL_REPORT.md")
    ap.add_argument("--quick", action="store_true", help="one configuration per kernel variant")
    ap.add_argument("--update-pruned", action="store_true",
                    help="compile every candidate, including the pruned ones, and rewrite triton_pruned.py")
    args = ap.parse_args(argv)
    sys.path.insert(0, str(ROOT))
    todo = jobs(quick=args.quick, measured=not args.update_pruned)
    t0 = time.perf_counter()
    results = run(todo, args.jobs)
    seconds = time.perf_counter() - t0
    pruned: frozenset = frozenset()
    if args.update_pruned:
        n = write_pruned(results)
        print(f"wrote {PRUNED_PY} ({n} pruned configurations)")
        pruned = _pruned_now()
    report(results, seconds, args.jobs, args.report, pruned)
    bad = [r for r in results if not r.ok and _prune_key(r.job) not in pruned]
    print(f"compiled {len(results)} kernel configurations in {seconds:.0f} s; {len(bad)} failed; "
          f"report: {args.report}")
    for r in bad:
        print(f"FAIL {r.job.kernel} {r.job.variant()} {_fmt_cfg(r.job)} sm_{r.job.target}: {'; '.join(r.errors)}")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
