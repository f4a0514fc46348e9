"""The GPU check: one prepared script that, on one H100/H200, builds, checks and times everything.

    PYTHONPATH=. python3 benchmarks/gpu_check.py [--out DIR] [--budget-s 360] [--no-cuda-ext]

A thin driver over :mod:`gift_kernels.bench`. Within one overall budget (default 360 s, so
that a 600 s device call, and one rerun within a 15-minute lease, have room):

 1. starts the CUDA extension's build (the ``cuda`` backend) in its own process group, so a
    late build is killed with its nvcc / ninja children;
 2. runs the GPU correctness suite (tests/ops/test_gpu.py, torch and triton backends) with
    pytest-xdist (``-n 8``), a per-test timeout and no ``-x``; after the build, its cuda part;
 3. measures the card's copy bandwidth and bf16 GEMM rate (the ceilings, not datasheet);
 4. benchmarks the shapes, headline shapes first, in worker processes (a dead CUDA context
    costs one row, not the run): every row is validated against a float32 / float64
    reference on the device before it is timed, with the backends that ran its forward and
    backward recorded; frozen F.linear, the authors' formulation, PEFT LoRA (its default
    float32 adapter and a bf16 adapter), GIFT per backend, form and Triton fusion variant;
    decode shapes also as CUDA-graph replays cycling distinct weights beyond L2;
 5. checks the performance targets (gift_kernels.bench.report.gpu_targets) on the valid rows.

``gpu_check_<card>.{json,md}`` are rewritten in --out after every step and every shape, so a
run cut short (the budget, a kill at the command's limit) keeps what it finished.

``--dry-run`` runs the same code paths on the CPU (tiny shapes, float32, host clock; the
pytest step runs the GPU suite, which skips itself without CUDA): tests/bench tests it in CI,
with injected faults (``--inject-fault ROW=build|call|wrong``; crashes and hangs through a test
module's row hook, ``--row-hook bench_faults:inject``).
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import List, Optional

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

import torch  # noqa: E402

from gift_kernels import bench  # noqa: E402
from gift_kernels.ops import backends  # noqa: E402

GPU_SUITE = "tests/ops/test_gpu.py"


class Clock:
    def __init__(self, budget_s: float):
        self.start = time.monotonic()
        self.budget_s = budget_s

    def left(self) -> float:
        return self.budget_s - (time.monotonic() - self.start)

    def elapsed(self) -> float:
        return round(time.monotonic() - self.start, 1)


def log(msg: str) -> None:
    print(f"[gpu_check {time.strftime('%H:%M:%S')}] {msg}", flush=True)


def _env() -> dict:
    """The checkout first on the path of every child (the GPU machine does not install it)."""
    path = os.environ.get("PYTHONPATH", "")
    return dict(os.environ, PYTHONPATH=str(ROOT) + (os.pathsep + path if path else ""), PYTHONUNBUFFERED="1")


# ---------------------------------------------------------------------------- build + tests


def start_cuda_build(out: Path) -> subprocess.Popen:
    """``setup.py build_ext --inplace`` in the background, in its own session (process group)."""
    cmd = [sys.executable, "setup.py", "build_ext", "--inplace"]
    env = dict(_env(), GIFT_KERNELS_FORCE_CUDA_BUILD="1",
               GIFT_KERNELS_CUDA_ARCH_LIST=os.environ.get("GIFT_KERNELS_CUDA_ARCH_LIST", "9.0"),
               MAX_JOBS=os.environ.get("MAX_JOBS", "8"))
    log("starting the CUDA extension build: " + " ".join(cmd))
    return subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=open(out / "cuda_build.log", "w"), stderr=subprocess.STDOUT,
                            start_new_session=True)


def wait_build(proc: Optional[subprocess.Popen], timeout_s: float, why_none: str) -> dict:
    if proc is None:
        return {"built": False, "why": why_none}
    t0 = time.monotonic()
    try:
        rc = proc.wait(timeout=max(1.0, timeout_s))
    except subprocess.TimeoutExpired:
        bench.kill_group(proc)  # nvcc and ninja too
        return {"built": False, "why": f"build did not finish within {timeout_s:.0f} s: killed with its process group"}
    return {"built": rc == 0, "why": f"setup.py exited {rc}", "waited_s": round(time.monotonic() - t0, 1)}


def pytest_args(workers: int, per_test_s: int) -> List[str]:
    """Parallel (pytest-xdist) and per-test timeouts (pytest-timeout) where installed; no -x:
    one failure must not hide the others."""
    args = ["-q", "-p", "no:cacheprovider", "-rfE"]
    if workers > 1 and importlib.util.find_spec("xdist") is not None:
        args += ["-n", str(workers)]
    if importlib.util.find_spec("pytest_timeout") is not None:
        args += [f"--timeout={per_test_s}"]
    return args


def run_pytest(select: List[str], out: Path, name: str, timeout_s: float, workers: int, per_test_s: int = 60) -> dict:
    cmd = [sys.executable, "-m", "pytest", *pytest_args(workers, per_test_s), *select]
    log(f"{' '.join(cmd[1:])} (cap {timeout_s:.0f} s)")
    t0 = time.monotonic()
    logf = out / f"{name}.log"
    with open(logf, "w") as f:
        proc = subprocess.Popen(cmd, cwd=ROOT, env=_env(), stdout=f, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            rc = proc.wait(timeout=max(5.0, timeout_s))
        except subprocess.TimeoutExpired:
            bench.kill_group(proc)
            rc = "timeout"
    text = logf.read_text(errors="replace")
    lines = text.strip().splitlines()
    summary = [ln for ln in lines if any(w in ln for w in (" passed", " failed", " error", " skipped", "no tests ran"))]
    failed = [ln for ln in lines if ln.startswith(("FAILED", "ERROR"))]
    return {"rc": rc, "summary": summary[-1] if summary else text[-300:], "seconds": round(time.monotonic() - t0, 1),
            "failed": failed[:40]}


# ---------------------------------------------------------------------------- ceilings


def ceilings(dev: torch.device) -> dict:
    """The card's copy bandwidth and bf16 GEMM rate on random data, measured now."""
    if dev.type != "cuda":
        return {"copy_tb_s": None, "bf16_tflop_s": None}
    from triton.testing import do_bench

    g = torch.Generator(device=dev).manual_seed(0)
    src = torch.randn(2**28, device=dev, dtype=torch.bfloat16, generator=g)  # 512 MiB
    dst = torch.empty_like(src)
    t = do_bench(lambda: dst.copy_(src), warmup=5, rep=30, return_mode="median") * 1e-3
    copy = 2 * src.numel() * 2 / t / 1e12
    a = torch.randn(8192, 8192, device=dev, dtype=torch.bfloat16, generator=g)
    b = torch.randn(8192, 8192, device=dev, dtype=torch.bfloat16, generator=g)
    t = do_bench(lambda: a @ b, warmup=5, rep=50, return_mode="median") * 1e-3
    del src, dst, a, b
    torch.cuda.empty_cache()
    return {"copy_tb_s": round(copy, 2), "bf16_tflop_s": round(2 * 8192**3 / t / 1e12, 1)}


def roofline_line(shape: bench.Shape) -> Optional[str]:
    try:
        import roofline as rl  # benchmarks/roofline.py

        parts = [f"{p} {rl.predict(shape.m, shape.d_in, shape.d_out, shape.r, p)['both_ratio']:.3f}"
                 for p in ("split", "fused")]
        return "roofline prediction (H100 ceilings), fwd+bwd / frozen: " + ", ".join(parts)
    except Exception as exc:  # the prediction is optional beside the measurement
        return f"roofline prediction unavailable ({type(exc).__name__}: {exc})"


# ---------------------------------------------------------------------------- main


def _faults(items: List[str]) -> dict:
    out = {}
    for item in items or ():
        row, _, how = item.partition("=")
        out[row] = how
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=os.environ.get("OUT", str(ROOT / "benchmarks" / "results" / "gpu")))
    ap.add_argument("--budget-s", type=float, default=360.0, help="the whole run, build and tests included")
    ap.add_argument("--shapes", choices=("all", "headline"), default="all", help="the grid (headline first) or the headline shapes")
    ap.add_argument("--shape", type=bench.parse_shape, action="append", help="M,d_in,d_out,r instead (repeatable)")
    ap.add_argument("--no-cuda-ext", action="store_true")
    ap.add_argument("--no-tests", action="store_true")
    ap.add_argument("--workers", type=int, default=8, help="pytest-xdist workers for the GPU suite")
    ap.add_argument("--dry-run", action="store_true", help="CPU, tiny shapes, host clock: tests the script itself")
    ap.add_argument("--inject-fault", action="append", help=argparse.SUPPRESS)
    ap.add_argument("--row-timeout-s", type=float, default=None,
                    help="kill a worker silent that long inside one row (default 150 s; dry run 30 s)")
    ap.add_argument("--row-hook", default=None, help=argparse.SUPPRESS)  # tests: bench.Spec.row_hook
    args = ap.parse_args(argv)

    clock = Clock(args.budget_s)
    dry = args.dry_run or not torch.cuda.is_available()
    dev = torch.device("cpu" if dry else "cuda")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    env = bench.environment(dev)
    card = ("dry-run-cpu" if dry else env["machine"]).replace(" ", "_").replace("(", "").replace(")", "")
    stem = f"gpu_check_{card}"
    sections: dict = {}
    report = {"title": f"GPU check: {env['machine']}" + (" (dry run)" if dry else ""), "meta": dict(env),
              "sections": sections, "results": [], "targets": [], "stopped": None, "dry_run": dry,
              "budget_s": args.budget_s}

    def save(results=None, stopped=None):
        if results is not None:
            for res in results:
                res.setdefault("roofline", roofline_line(bench.Shape(**res["shape"])))
            report["results"] = results
            report["targets"] = bench.gpu_targets(results)
        report["stopped"] = stopped
        report["meta"]["elapsed_s"] = clock.elapsed()
        bench.write_report(report, out, stem)

    log(f"environment: {env}")
    save()

    build = None
    if not (dry or args.no_cuda_ext):
        build = start_cuda_build(out)
    tests = {}
    sections["Correctness (pytest)"] = []
    if not args.no_tests:
        cap = 90.0 if dry else min(120.0, clock.left() - 200)
        tests["gpu suite (torch, triton)"] = run_pytest([GPU_SUITE, "-k", "not cuda"], out, "pytest_gpu", cap,
                                                        workers=1 if dry else args.workers)
    why_none = "dry run" if dry else "--no-cuda-ext"
    build_res = wait_build(build, min(90.0, clock.left() - 150), why_none)
    sections["CUDA extension build"] = [f"- {build_res}"]
    if build_res.get("built") and not args.no_tests:
        tests["gpu suite (cuda)"] = run_pytest([GPU_SUITE, "-k", "cuda"], out, "pytest_gpu_cuda",
                                               min(60.0, clock.left() - 130), workers=args.workers)
    sections["Correctness (pytest)"] = [f"- {k}: rc {v['rc']}, {v['summary']} ({v['seconds']} s)"
                                        + "".join(f"\n  - {ln}" for ln in v["failed"]) for k, v in tests.items()]
    sections["Ceilings"] = [f"- {ceilings(dev)} (copy: bytes read + written; GEMM: 8192^3 bf16 on random data)"]
    sections["Backends"] = ["```"] + backends.explain(dev).splitlines() + ["```"]
    save()

    if args.shape:
        shapes = list(args.shape)
    elif dry:
        shapes = list(bench.DRY_SHAPES)
    else:
        shapes = list(bench.HEADLINE if args.shapes == "headline" else bench.gpu_order())
    spec = bench.Spec(shapes=shapes, device=str(dev), dtype="float32" if dry else "bfloat16",
                      rounds=2 if dry else 3, budget_s=0.002, timer="host" if dry else "device",
                      faults=_faults(args.inject_fault), row_hook=args.row_hook)
    report["meta"].update(dtype=spec.dtype, rounds=spec.rounds, timer=spec.make_timer().name)
    reserve = 5.0
    log(f"benchmark: {len(shapes)} shapes, {clock.left():.0f} s left")
    worker_log = open(out / "bench_workers.log", "w")
    wenv = _env()
    res = bench.run_isolated(spec, on_update=lambda results, stopped: save(results, stopped),
                             time_limit_s=max(10.0, clock.left() - reserve), env=wenv, log=log,
                             stdout=worker_log, row_timeout_s=args.row_timeout_s or (30.0 if dry else 150.0))
    worker_log.close()
    if res["notes"]:
        sections["Worker restarts"] = [f"- {n}" for n in res["notes"]]
    save(res["results"], res["stopped"])
    md = (out / f"{stem}.md").read_text()
    print(md[-6000:])
    log(f"done in {clock.elapsed()} s: {out / stem}.{{json,md}}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
