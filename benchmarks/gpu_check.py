"""The GPU check: one script that, on one H100/H200, builds, checks and times everything.

    PYTHONPATH=. python3 benchmarks/gpu_check.py [--out DIR] [--budget-s 420] [--no-cuda-ext]

Steps, each within one overall time budget (default 420 s, so a 600 s device call has room):
 1. starts the CUDA extension's build in a background process (the `cuda` backend);
 2. runs the GPU correctness suite (tests/test_gpu.py: every backend present, bf16 / fp16 /
    fp32, opcheck, torch.compile) and the CPU-free parts of the rest of the suite;
 3. times forward, backward and both with `triton.testing.do_bench` (median, inputs rotated
    over more than the L2 cache, never zeros) for the standard shapes of DESIGN.md section 3,
    headline shapes first, for frozen F.linear, the authors' formulation, PEFT LoRA at the
    same rank and every GIFT backend / Triton fusion variant; decode shapes also as CUDA-graph
    replays of the inference forward; reports TFLOP/s and achieved bandwidth against the
    card's ceilings measured in the same run, beside the roofline prediction;
 4. checks the issues' targets and writes `gpu_check_<card>.{json,md}` to --out and to
    benchmarks/results/ (commit those).

`--dry-run` runs the same code paths on the CPU with tiny shapes and a host timer, so the
script is tested in CI without a GPU (tests/test_gpu_check_script.py).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from dataclasses import asdict
from pathlib import Path
from typing import Callable, Dict, List, Optional

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

import gift_kernels  # noqa: E402
from gift_kernels.ops import backends  # noqa: E402
from gift_kernels.bench.harness import Shape, _peft_lora, _Problem  # noqa: E402
from gift_kernels.ops.reference import gift_linear_authors  # noqa: E402

# headline shapes first, so a run cut short by the budget still answers the targets
HEADLINE = [Shape(8192, 4096, 4096, 16), Shape(8192, 4096, 4096, 64), Shape(1, 4096, 4096, 16), Shape(16, 4096, 4096, 16)]
STANDARD = [
    Shape(m, d_in, d_out, r)
    for (d_in, d_out) in ((4096, 4096), (4096, 1024), (4096, 14336), (14336, 4096))
    for m in (8192, 2048, 16, 1)
    for r in (16, 64)
]
DRY_SHAPES = [Shape(64, 48, 40, 4), Shape(1, 48, 40, 4)]
TRITON_FUSIONS = ("split", "fused")  # gift_kernels/ops/triton/configs.py FUSIONS, minus auto


class Clock:
    def __init__(self, budget_s: float):
        self.start = time.monotonic()
        self.budget_s = budget_s

    def left(self) -> float:
        return self.budget_s - (time.monotonic() - self.start)


def log(msg: str) -> None:
    print(f"[gpu_check] {msg}", flush=True)


# ---------------------------------------------------------------------------- environment


def environment(dev: torch.device) -> dict:
    env = {"torch": torch.__version__, "python": sys.version.split()[0]}
    try:
        import triton

        env["triton"] = triton.__version__
    except ImportError as exc:
        env["triton"] = f"missing ({exc})"
    if dev.type == "cuda":
        p = torch.cuda.get_device_properties(dev)
        env.update(device=p.name, sms=p.multi_processor_count, memory_gib=round(p.total_memory / 2**30, 1),
                   capability=f"{p.major}.{p.minor}")
    else:
        env["device"] = "cpu (dry run)"
    return env


def ceilings(dev: torch.device, timer) -> dict:
    """The card's copy bandwidth and bf16 GEMM rate, measured now (not datasheet)."""
    if dev.type != "cuda":
        return {"copy_tb_s": None, "bf16_tflop_s": None}
    src = torch.randn(2**28, device=dev, dtype=torch.bfloat16)  # 512 MiB
    dst = torch.empty_like(src)
    t = timer(lambda: dst.copy_(src))
    copy = 2 * src.numel() * 2 / t / 1e12
    a = torch.randn(8192, 8192, device=dev, dtype=torch.bfloat16)
    b = torch.randn(8192, 8192, device=dev, dtype=torch.bfloat16)
    t = timer(lambda: a @ b)
    del src, dst, a, b
    return {"copy_tb_s": round(copy, 2), "bf16_tflop_s": round(2 * 8192**3 / t / 1e12, 1)}


# ---------------------------------------------------------------------------- build + tests


def start_cuda_build(out: Path) -> Optional[subprocess.Popen]:
    """Build the extension in place (setup.py build_ext --inplace) in the background."""
    cmd = [sys.executable, "setup.py", "build_ext", "--inplace"]
    env = dict(os.environ, GIFT_KERNELS_FORCE_CUDA_BUILD="1", GIFT_KERNELS_CUDA_ARCH_LIST=os.environ.get("GIFT_KERNELS_CUDA_ARCH_LIST", "9.0"),
               MAX_JOBS=os.environ.get("MAX_JOBS", "16"))
    log("starting the CUDA extension build: " + " ".join(cmd))
    return subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=open(out / "cuda_build.log", "w"), stderr=subprocess.STDOUT)


def wait_build(proc: Optional[subprocess.Popen], clock: Clock, reserve_s: float) -> dict:
    if proc is None:
        return {"built": False, "why": "not requested"}
    t0 = time.monotonic()
    try:
        rc = proc.wait(timeout=max(1.0, clock.left() - reserve_s))
    except subprocess.TimeoutExpired:
        proc.kill()
        return {"built": False, "why": "build did not finish within the budget"}
    return {"built": rc == 0, "why": f"setup.py exited {rc}", "waited_s": round(time.monotonic() - t0, 1)}


def run_pytest(args: List[str], out: Path, name: str, timeout_s: float) -> dict:
    cmd = [sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", *args]
    log(f"pytest {' '.join(args)} (timeout {timeout_s:.0f}s)")
    t0 = time.monotonic()
    try:
        res = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=max(5.0, timeout_s))
        text, rc = res.stdout + res.stderr, res.returncode
    except subprocess.TimeoutExpired as exc:
        text, rc = (exc.stdout or b"").decode() if isinstance(exc.stdout, bytes) else (exc.stdout or ""), "timeout"
    (out / f"{name}.log").write_text(text)
    summary = [l for l in text.strip().splitlines() if " passed" in l or " failed" in l or "error" in l.lower()][-1:]
    return {"rc": rc, "summary": summary[0] if summary else text[-300:], "seconds": round(time.monotonic() - t0, 1)}


# ---------------------------------------------------------------------------- timing


def make_timer(dev: torch.device, dry: bool):
    if dev.type == "cuda":
        from triton.testing import do_bench

        return lambda fn: do_bench(fn, warmup=10, rep=40, return_mode="median") * 1e-3

    def host_timer(fn, reps=3):
        fn()
        ts = []
        for _ in range(reps):
            t0 = time.perf_counter()
            fn()
            ts.append(time.perf_counter() - t0)
        return sorted(ts)[len(ts) // 2]

    return host_timer


def graph_timer(dev: torch.device, fn: Callable, timer) -> Optional[float]:
    """Inference forward replayed from a CUDA graph: launch overhead out of the number."""
    if dev.type != "cuda":
        return None
    from triton.testing import do_bench_cudagraph

    with torch.no_grad():
        return do_bench_cudagraph(fn, rep=40, return_mode="median") * 1e-3


class Rotating:
    """Several problems (inputs and grads), cycled call by call so L2 never holds them."""

    def __init__(self, shape: Shape, dtype, dev: torch.device, l2_bytes: int = 60 * 2**20):
        per = (shape.m * (shape.d_in + shape.d_out)) * torch.finfo(dtype).bits // 8
        n = 1 if dev.type != "cuda" else max(1, min(4, -(-2 * l2_bytes // max(per, 1))))
        self.problems = [_Problem(shape, dtype, dev, seed=s) for s in range(n)]
        base = self.problems[0]
        for p in self.problems[1:]:  # one weight and Theta, many activations
            p.weight, p.bias, p.phi, p.psi = base.weight, base.bias, base.phi, base.psi
        self.i = 0

    def next(self) -> _Problem:
        self.i = (self.i + 1) % len(self.problems)
        return self.problems[self.i]


def providers(rot: Rotating, dev: torch.device) -> Dict[str, Callable[[_Problem], torch.Tensor]]:
    p0 = rot.problems[0]
    out = {
        "frozen": lambda p: F.linear(p.x, p.weight, p.bias),
        "authors": lambda p: gift_linear_authors(p.x, p.weight, p.bias, p.phi, p.psi),
    }
    lora = {}
    for p in rot.problems:
        fn = _peft_lora(p)
        if fn is None:
            break
        lora[id(p)] = fn
    if lora:
        out["peft-lora"] = lambda p: lora[id(p)]()
    for name in backends.BACKENDS:
        if dev.type == "cpu" and name == "triton" and not backends.supports(name, dev)[0]:
            continue
        if not backends.supports(name, dev)[0]:
            continue
        variants = TRITON_FUSIONS if name == "triton" else ("",)
        for v in variants:
            label = f"gift-{name}" + (f"-{v}" if v else "")
            out[label] = _gift(name, v)
    del p0
    return out


def _gift(name: str, fusion: str):
    def run(p):
        if fusion:
            os.environ["GIFT_KERNELS_TRITON_FUSION"] = fusion
        with gift_kernels.backend(name):
            return gift_kernels.gift_linear(p.x, p.weight, p.bias, p.phi, p.psi)

    return run


def time_provider(fn, rot: Rotating, timer, decode: bool, dev) -> dict:
    def fwd():
        return fn(rot.next())

    def fwd_bwd():
        p = rot.next()
        p.x.grad = p.phi.grad = p.psi.grad = None
        fn(p).backward(p.grad_out)

    res = {"fwd": timer(fwd), "fwd+bwd": timer(fwd_bwd)}
    res["bwd"] = max(res["fwd+bwd"] - res["fwd"], 0.0)
    if decode:
        p = rot.problems[0]
        res["fwd_infer_graph"] = graph_timer(dev, lambda: fn(p), timer)
    return res


def flops(shape: Shape) -> dict:
    m, n, k, r = shape.m, shape.d_out, shape.d_in, shape.r
    base = 2 * m * n * k
    return {"fwd": base + 2 * r * (m * k + n * k + m * n), "fwd+bwd": 2 * base + 2 * r * (3 * m * k + 3 * m * n + 2 * n * k)}


def min_bytes(shape: Shape, elem: int) -> dict:
    m, n, k = shape.m, shape.d_out, shape.d_in
    return {"fwd": elem * (m * k + n * k + m * n), "fwd+bwd": elem * 2 * (m * k + n * k + m * n)}


def roofline(shape: Shape) -> Optional[dict]:
    try:
        import roofline as rl  # benchmarks/roofline.py

        return rl.predict(shape.m, shape.d_in, shape.d_out, shape.r)
    except Exception as exc:  # the prediction is optional beside the measurement
        return {"unavailable": f"{type(exc).__name__}: {exc}"}


def bench(shapes: List[Shape], dev, dtype, timer, clock: Clock, reserve_s: float) -> List[dict]:
    results = []
    for shape in shapes:
        if clock.left() < reserve_s:
            log(f"budget: stopping before {shape} ({clock.left():.0f}s left)")
            break
        rot = Rotating(shape, dtype, dev)
        provs = providers(rot, dev)
        rows = {}
        for name, fn in provs.items():
            try:
                rows[name] = time_provider(fn, rot, timer, decode=shape.m <= 16, dev=dev)
            except Exception as exc:  # a provider that fails is reported, the rest still run
                rows[name] = {"error": f"{type(exc).__name__}: {exc}"[:500]}
        fl, by = flops(shape), min_bytes(shape, torch.finfo(dtype).bits // 8)
        for row in rows.values():
            if "error" in row:
                continue
            for mode in ("fwd", "fwd+bwd"):
                row[f"{mode}_tflop_s"] = fl[mode] / row[mode] / 1e12 if row[mode] else None
                row[f"{mode}_tb_s"] = by[mode] / row[mode] / 1e12 if row[mode] else None
        frozen = rows.get("frozen", {})
        for row in rows.values():
            if "error" in row or "error" in frozen:
                continue
            for mode in ("fwd", "bwd", "fwd+bwd", "fwd_infer_graph"):
                if row.get(mode) and frozen.get(mode):
                    row[f"{mode}_x"] = row[mode] / frozen[mode]
        results.append({"shape": asdict(shape), "label": str(shape), "rows": rows, "roofline": roofline(shape)})
        log(f"{shape}: " + ", ".join(f"{n} {r.get('fwd+bwd_x', float('nan')):.3f}x" for n, r in rows.items() if "error" not in r))
        del rot, provs
        if dev.type == "cuda":
            torch.cuda.empty_cache()
    return results


# ---------------------------------------------------------------------------- targets + report


def _row(results, shape: Shape, name: str) -> Optional[dict]:
    for res in results:
        if res["shape"] == asdict(shape):
            row = res["rows"].get(name)
            return row if row and "error" not in row else None
    return None


def best_gift(results, shape: Shape, family: str = "gift-triton") -> Optional[dict]:
    rows = [r for res in results if res["shape"] == asdict(shape) for n, r in res["rows"].items()
            if n.startswith(family) and "error" not in r]
    return min(rows, key=lambda r: r["fwd+bwd"]) if rows else None


def targets(results) -> List[str]:
    lines = []

    def check(label, value, op, bound):
        if value is None:
            lines.append(f"- {label}: not measured")
            return
        ok = value <= bound if op == "<=" else value >= bound
        lines.append(f"- {label}: {value:.3f} (target {op} {bound}) {'met' if ok else 'MISSED'}")

    h16, h64 = HEADLINE[0], HEADLINE[1]
    for shape, bound in ((h16, 1.10), (h64, 1.15)):
        tri = best_gift(results, shape)
        check(f"triton fwd+bwd / frozen, {shape}", tri and tri.get("fwd+bwd_x"), "<=", bound)
    tri, lora, authors = best_gift(results, h16), _row(results, h16, "peft-lora"), _row(results, h16, "authors")
    check(f"peft-lora / triton fwd+bwd, {h16}", tri and lora and lora["fwd+bwd"] / tri["fwd+bwd"], ">=", 1.3)
    check(f"authors / triton fwd+bwd, {h16}", tri and authors and authors["fwd+bwd"] / tri["fwd+bwd"], ">=", 1.8)
    for shape in HEADLINE[2:]:
        tri = best_gift(results, shape)
        check(f"triton decode fwd (graph replay) / frozen, {shape}", tri and tri.get("fwd_infer_graph_x"), "<=", 1.10)
    cuda = _row(results, h16, "gift-cuda")
    tri = best_gift(results, h16)
    check(f"cuda / triton fwd+bwd, {h16}", cuda and tri and cuda["fwd+bwd"] / tri["fwd+bwd"], "<=", 1.3)
    return lines


def to_markdown(report: dict) -> str:
    env = report["environment"]
    out = [f"# GPU check: {env.get('device')}", "",
           f"torch {env.get('torch')}, triton {env.get('triton')}; measured ceilings: {report['ceilings']}; "
           f"budget {report['budget_s']} s, used {report['elapsed_s']} s.", "",
           "## Correctness", ""]
    for name, res in report["tests"].items():
        out.append(f"- {name}: {res}")
    out += ["", f"CUDA extension build: {report['cuda_build']}", "", "## Targets", ""] + report["targets"] + [""]
    for res in report["results"]:
        out += [f"## {res['label']}", "", "| provider | fwd ms | bwd ms | fwd+bwd ms | fwd x | fwd+bwd x | fwd+bwd TFLOP/s | fwd+bwd TB/s (min bytes) | decode graph x |",
                "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
        for name, r in res["rows"].items():
            if "error" in r:
                out.append(f"| {name} | error: {r['error'][:120]} |||||||")
                continue
            fmt = lambda v, s="{:.3f}": s.format(v) if v is not None else "-"  # noqa: E731
            out.append(f"| {name} | {fmt(r['fwd'] * 1e3)} | {fmt(r['bwd'] * 1e3)} | {fmt(r['fwd+bwd'] * 1e3)} | "
                       f"{fmt(r.get('fwd_x'))} | {fmt(r.get('fwd+bwd_x'))} | {fmt(r.get('fwd+bwd_tflop_s'), '{:.0f}')} | "
                       f"{fmt(r.get('fwd+bwd_tb_s'), '{:.2f}')} | {fmt(r.get('fwd_infer_graph_x'))} |")
        if res.get("roofline"):
            out.append(f"\nRoofline prediction: `{json.dumps(res['roofline'])[:400]}`")
        out.append("")
    return "\n".join(out)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=os.environ.get("OUT", str(ROOT / "benchmarks" / "results")))
    ap.add_argument("--budget-s", type=float, default=420.0)
    ap.add_argument("--no-cuda-ext", action="store_true")
    ap.add_argument("--no-tests", action="store_true")
    ap.add_argument("--dry-run", action="store_true", help="CPU, tiny shapes, host timer: tests the script itself")
    args = ap.parse_args(argv)

    clock = Clock(args.budget_s)
    dry = args.dry_run or not torch.cuda.is_available()
    dev = torch.device("cpu" if dry else "cuda")
    dtype = torch.float32 if dry else torch.bfloat16
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    timer = make_timer(dev, dry)
    report = {"environment": environment(dev), "budget_s": args.budget_s, "dry_run": dry}
    log(f"environment: {report['environment']}")

    build = None if (dry or args.no_cuda_ext) else start_cuda_build(out)
    report["tests"] = {}
    if not args.no_tests and not dry:
        report["tests"]["gpu suite (torch, triton)"] = run_pytest(
            ["tests/test_gpu.py", "-k", "not cuda"], out, "pytest_gpu", min(150.0, clock.left() - 200))
    report["cuda_build"] = wait_build(build, clock, reserve_s=180)
    if report["cuda_build"].get("built"):
        report["tests"]["gpu suite (cuda)"] = run_pytest(["tests/test_gpu.py", "-k", "cuda"], out, "pytest_gpu_cuda",
                                                         min(90.0, clock.left() - 150))
        backends._load_errors.pop("cuda", None)  # built after import: load it now
    report["ceilings"] = ceilings(dev, timer)
    shapes = DRY_SHAPES if dry else HEADLINE + [s for s in STANDARD if s not in HEADLINE]
    report["results"] = bench(shapes, dev, dtype, timer, clock, reserve_s=15 if dry else 25)
    report["targets"] = targets(report["results"])
    report["backends"] = backends.explain(dev)
    report["elapsed_s"] = round(time.monotonic() - clock.start, 1)

    card = report["environment"].get("device", "cpu").replace(" ", "_").replace("(", "").replace(")", "")
    md = to_markdown(report)
    for folder in {out, ROOT / "benchmarks" / "results"} if not dry else {out}:
        folder.mkdir(parents=True, exist_ok=True)
        (folder / f"gpu_check_{card}.json").write_text(json.dumps(report, indent=1, default=str))
        (folder / f"gpu_check_{card}.md").write_text(md)
    print(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
