"""The GPU check: one prepared script that, on one H100/H200, times, builds and checks everything.

    PYTHONPATH=. python3 benchmarks/gpu_check.py [--out DIR] [--budget-s 300] [--no-cuda-ext]

A thin driver over :mod:`gift_kernels.bench`. Within one overall budget (default 300 s, so
that a 600 s device call, and one rerun within a 15-minute lease, have room), in the order
that answers the most if the run is cut short:

 1. starts the CUDA extension's build (the ``cuda`` backend) in the background, in its own
    process group (a late build is killed with its nvcc / ninja children);
 2. meanwhile, the headline training shapes' timings (the targets are checked on them), in
    worker processes (a dead CUDA context costs one row, not the run): every row validated
    against a float32 / float64 reference on the device before it is timed, the backends that
    ran its forward and backward recorded, its host microseconds per call beside its GPU time
    (host-bound rows flagged, not quoted); frozen F.linear, the authors' formulation, PEFT
    LoRA (float32 and bf16 adapters), GIFT per backend, form and Triton fusion variant;
 3. the decode shapes, also as CUDA-graph replays cycling distinct weights beyond L2;
 4. a trimmed correctness run (tests/ops/test_gpu.py, ``-v`` so that a cut run keeps every
    failure's name; the cuda backend's part once the build is in);
 5. the card's copy bandwidth and bf16 GEMM rate, then the rest of the grid while time is left;
 6. the performance targets (gift_kernels.bench.report.gpu_targets) on the valid rows.

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
from gift_kernels.ops import plan  # noqa: E402

GPU_SUITE = "tests/ops/test_gpu.py"
# the trimmed run: the no-bias variants are left to the CPU suites (bias is an epilogue add)
GPU_TRIM = "not nobias"


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
    """Verbose (a cut run keeps the name of every test that ran), parallel (pytest-xdist) and
    per-test timeouts (pytest-timeout) where installed; no -x: one failure must not hide the
    others."""
    args = ["-v", "-p", "no:cacheprovider", "-rfE"]
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


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=os.environ.get("OUT", str(ROOT / "benchmarks" / "results" / "gpu")))
    ap.add_argument("--budget-s", type=float, default=300.0, help="the whole run, build and tests included")
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
    return ap.parse_args(argv)


class Check:
    """One run's state: the clock, the device, the report (rewritten after every step)."""

    def __init__(self, args: argparse.Namespace):
        self.args = args
        self.clock = Clock(args.budget_s)
        self.dry = args.dry_run or not torch.cuda.is_available()
        self.dev = torch.device("cpu" if self.dry else "cuda")
        self.out = Path(args.out)
        self.out.mkdir(parents=True, exist_ok=True)
        env = bench.environment(self.dev)
        card = ("dry-run-cpu" if self.dry else env["machine"]).replace(" ", "_").replace("(", "").replace(")", "")
        self.stem = f"gpu_check_{card}"
        self.sections: dict = {}
        self.report = {"title": f"GPU check: {env['machine']}" + (" (dry run)" if self.dry else ""),
                       "meta": dict(env), "sections": self.sections, "results": [], "targets": [], "stopped": None,
                       "dry_run": self.dry, "budget_s": args.budget_s}
        self.done: List[dict] = []  # results of the finished benchmark phases
        self.tests: dict = {}
        log(f"environment: {env}")

    def save(self, results=None, stopped=None) -> None:
        if results is not None:
            for res in results:
                res.setdefault("roofline", roofline_line(bench.Shape(**res["shape"])))
            self.report["results"] = results
            self.report["targets"] = bench.gpu_targets(results)
            self.sections["Host-bound rows (time Python, not kernels: not quoted)"] = host_bound_lines(results)
        self.report["stopped"] = stopped
        self.report["meta"]["elapsed_s"] = self.clock.elapsed()
        bench.write_report(self.report, self.out, self.stem)


def host_bound_lines(results: List[dict]) -> List[str]:
    """One line per row whose host time per call reaches its GPU time (bench.run.HOST_BOUND)."""
    lines = []
    for res in results:
        for row in res["rows"]:
            if row.get("host_bound"):
                lines.append(f"- {res['label']} {row['provider']}: host {row['host_us']:.0f} us per fwd+bwd, "
                             f"GPU {row['fwd+bwd_ms'] * 1e3:.0f} us")
    return lines or ["- none"]


def bench_phase(check: Check, name: str, shapes: List[bench.Shape], reserve_s: float) -> None:
    """Time ``shapes`` in worker processes, leaving ``reserve_s`` of the budget for what follows;
    the report gains each shape as it finishes."""
    if not shapes or check.clock.left() - reserve_s < 10:
        return
    a = check.args
    spec = bench.Spec(shapes=shapes, device=str(check.dev), dtype="float32" if check.dry else "bfloat16",
                      rounds=2 if check.dry else 3, budget_s=0.002, timer="host" if check.dry else "device",
                      faults=_faults(a.inject_fault), row_hook=a.row_hook)
    check.report["meta"].update(dtype=spec.dtype, rounds=spec.rounds, timer=spec.make_timer().name)
    log(f"benchmark ({name}): {len(shapes)} shapes, {check.clock.left():.0f} s left")
    with open(check.out / f"bench_workers_{name}.log", "w") as worker_log:
        res = bench.run_isolated(spec, on_update=lambda results, stopped: check.save(check.done + results, stopped),
                                 time_limit_s=max(10.0, check.clock.left() - reserve_s), env=_env(), log=log,
                                 stdout=worker_log, row_timeout_s=a.row_timeout_s or (30.0 if check.dry else 150.0))
    if res["notes"]:
        check.sections.setdefault("Worker restarts", []).extend(f"- {n}" for n in res["notes"])
    check.done += res["results"]
    check.save(check.done, res["stopped"])


def test_phase(check: Check, build: Optional[subprocess.Popen]) -> None:
    """The trimmed correctness run; the cuda backend's part once its build is in."""
    a = check.args
    if not a.no_tests:
        cap = 90.0 if check.dry else min(100.0, check.clock.left() - 40)
        check.tests["gpu suite (torch, triton)"] = run_pytest([GPU_SUITE, "-k", f"not cuda and {GPU_TRIM}"], check.out,
                                                              "pytest_gpu", cap, workers=1 if check.dry else a.workers)
    build_res = wait_build(build, min(60.0, check.clock.left() - 60), "dry run" if check.dry else "--no-cuda-ext")
    check.sections["CUDA extension build"] = [f"- {build_res}"]
    if build_res.get("built") and not a.no_tests:
        check.tests["gpu suite (cuda)"] = run_pytest([GPU_SUITE, "-k", f"cuda and {GPU_TRIM}"], check.out,
                                                     "pytest_gpu_cuda", min(60.0, check.clock.left() - 20),
                                                     workers=a.workers)
    check.sections["Correctness (pytest -v)"] = [
        f"- {k}: rc {v['rc']}, {v['summary']} ({v['seconds']} s)" + "".join(f"\n  - {ln}" for ln in v["failed"])
        for k, v in check.tests.items()]
    check.save()


def plan_shapes(check: Check):
    """(headline training shapes, decode shapes, the rest) in the order they are timed."""
    a = check.args
    if a.shape:
        return list(a.shape), [], []
    if check.dry:
        return list(bench.DRY_SHAPES), [], []
    grid = list(bench.HEADLINE if a.shapes == "headline" else bench.gpu_order())
    head = [s for s in bench.HEADLINE if not s.decode]
    decode = [s for s in bench.HEADLINE if s.decode]
    return head, decode, [s for s in grid if s not in head and s not in decode]


def main(argv=None) -> int:
    check = Check(parse_args(argv))
    check.save()
    build = None if (check.dry or check.args.no_cuda_ext) else start_cuda_build(check.out)
    head, decode, rest = plan_shapes(check)
    bench_phase(check, "headline", head, reserve_s=150.0)  # the build runs meanwhile
    bench_phase(check, "decode", decode, reserve_s=110.0)
    test_phase(check, build)
    check.sections["Ceilings"] = [f"- {ceilings(check.dev)} (copy: bytes read + written; GEMM: 8192^3 bf16 on "
                                  f"random data)"]
    check.sections["Backends"] = ["```"] + plan.explain(check.dev).splitlines() + ["```"]
    check.save()
    bench_phase(check, "rest", rest, reserve_s=5.0)
    check.save(check.done, check.report["stopped"])
    md = (check.out / f"{check.stem}.md").read_text()
    print(md[-6000:])
    log(f"done in {check.clock.elapsed()} s: {check.out / check.stem}.{{json,md}}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
