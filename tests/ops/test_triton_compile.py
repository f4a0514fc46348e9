"""Every Triton kernel configuration compiles for sm_80, sm_86, sm_89 and sm_90 without spilling.

Runs ``benchmarks/compile_kernels.py`` (2 compiler processes, a fresh Triton cache) with the
test venv's triton and fails with its failure list. In the default ``pytest`` run it is
``--quick`` (one configuration per kernel variant, and the mixed kernels' fixed tiles at their
widest rank tile, where a spill on one target was once found: ~1-2 min on 2 cores); the full matrix (~11 min)
is its own step of .ci/run (``GIFT_KERNELS_FULL_COMPILE=1`` selects it), with the test venv's
triton and again with the GPU machine's triton (3.6), whose prune table entry is its own
(docs/testing.md). Needs no GPU: triton compiles for a GPUTarget on the CPU and its own
cuobjdump reads the cubins (docs/triton.md).
"""

from __future__ import annotations

import importlib.util
import os
import subprocess
from dataclasses import replace
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "benchmarks" / "compile_kernels.py"
TIMEOUT_S = 2400  # four targets: about twice the two-target run
FULL_ENV = "GIFT_KERNELS_FULL_COMPILE"  # 1: the full matrix (.ci/run's own step), else --quick


def _load(name: str):
    """A module of benchmarks/ (not a package), registered so its dataclasses resolve."""
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, ROOT / "benchmarks" / f"{name}.py")
        mod = importlib.util.module_from_spec(spec)
        sys.modules[name] = mod
        spec.loader.exec_module(mod)
    return sys.modules[name]


def test_every_kernel_is_in_the_compile_matrix():
    from gift_kernels.ops.input import triton as triton_input
    from gift_kernels.ops.linear import triton as triton_linear
    from gift_kernels.ops.mixed import triton as triton_mixed

    ck = _load("compile_kernels")
    for module in (triton_linear, triton_input, triton_mixed):  # every @triton.jit kernel of the package
        kernels = {name for name, obj in vars(module).items()
                   if name.endswith("_kernel") and type(obj).__name__ in ("JITFunction", "InterpretedFunction")}
        table = {e.kernel for e in ck.KERNELS.values() if f"gift_kernels.ops.{e.module}" == module.__name__}
        assert kernels and kernels <= table, f"{module.__name__}: kernels missing from compile_kernels.KERNELS: {kernels}"
    jobs = ck.jobs()
    assert {j.kernel for j in jobs} == set(ck.KERNELS) == {"fwd", "bwd", "skinny", "input_fwd", "input_bwd",
                                                           "mixed_shrink", "mixed_expand", "mixed_grad"}
    mixed = {(j.kernel, j.path, j.dtype, j.br, j.bucket) for j in jobs if j.kernel.startswith("mixed")}
    assert {("mixed_shrink", p, "bf16", br, b) for p in ("fwd", "bwd") for br in (16, 32, 64)
            for b in ("decode", "prefill")} <= mixed
    inp = {(j.kernel, j.dtype, j.theta, j.br) for j in jobs if j.kernel.startswith("input")}
    assert {(k, d, t, br) for k in ("input_fwd", "input_bwd") for d, t in (("fp16", "fp32"), ("bf16", "fp32"),
                                                                        ("bf16", "bf16"))
            for br in (16, 32, 64)} | {(k, "fp32", "fp32", 16) for k in ("input_fwd", "input_bwd")} <= inp
    assert {("input_bwd", "fp32", "fp32", br) for br in (16, 32, 64)} <= inp  # fp32 backward: r up to 64 per window
    # the forward kernel also runs the backward's dt = du phi (u not written, phi^T as psi)
    assert {j.path for j in jobs if j.kernel == "input_fwd"} == {"u", "t"}
    # the consumer Ampere / Ada cards (99 KiB of shared memory per block) beside sm_80 and sm_90
    assert {j.target for j in jobs} == {80, 86, 89, 90}
    fwd = {(j.path, j.dtype, j.bias) for j in jobs if j.kernel == "fwd"}
    # fp32 always runs split (linear/triton.py uses_fused): no fused fp32 kernel to compile
    want = {(p, d, b) for p in ("split", "fused") for d in ("fp32", "fp16", "bf16") for b in (False, True)}
    assert fwd == want - {("fused", "fp32", False), ("fused", "fp32", True)}
    bwd = {(j.path, j.dtype, j.theta) for j in jobs if j.kernel == "bwd"}
    assert {("split", "bf16", "fp32"), ("fused", "bf16", "fp32"), ("fused", "fp16", "fp16")} <= bwd


def test_prune_table_is_per_triton_version():
    from gift_kernels.ops import tiles as configs
    from gift_kernels.ops.tiles import pruned

    assert {"3.6", "3.9"} <= set(pruned.PRUNED) and set(pruned.TARGETS) == set(pruned.PRUNED)
    assert {80, 86, 89, 90} <= set(pruned.TARGETS["3.9"])
    for v, table in pruned.PRUNED.items():  # keys name the target they were measured on
        assert {k[2] for k in table} <= set(pruned.TARGETS[v]), v
    assert configs.pruned_table() == pruned.PRUNED[configs.triton_version()]
    assert configs.pruned_table("3.6") == pruned.PRUNED["3.6"]
    union = configs.pruned_table("9.99")  # never measured: avoid what spilled anywhere
    assert union == frozenset().union(*pruned.PRUNED.values()) and union >= pruned.PRUNED["3.9"]


def test_odd_shape_specialisations_are_distinct_jobs():
    ck = _load("compile_kernels")
    kept = ck.jobs()
    odd = ck.odd_jobs(kept)
    assert {j.layout for j in odd} == {"odd", "strided"} and {j.target for j in odd} == {90}
    strided = next(j for j in odd if j.layout == "strided")
    _, args, _ = ck._kernel_and_args(strided)
    assert args[0].stride() == (128, 2)  # x, as a non-contiguous view: no constexpr unit stride
    odd_fwd = next(j for j in odd if j.layout == "odd" and j.kernel == "fwd")
    aligned = next(j for j in kept if j == replace(odd_fwd, layout="aligned"))

    def divisible(job):
        fn, args, meta = ck._kernel_and_args(job)
        meta = {k: v for k, v in meta.items() if k not in ("num_warps", "num_stages")}
        return len(ck._specialize(fn, args, meta)[2])

    assert divisible(odd_fwd) < divisible(aligned)  # sizes and strides lost their 16-divisibility


def test_all_configurations_compile_for_every_target(tmp_path):
    report = tmp_path / "KERNEL_REPORT.md"
    quick = [] if os.environ.get(FULL_ENV) == "1" else ["--quick"]
    proc = subprocess.run([sys.executable, str(SCRIPT), "--jobs", "2", "--report", str(report)] + quick,
                          cwd=ROOT, capture_output=True, text=True, timeout=TIMEOUT_S)
    assert proc.returncode == 0, f"compile check failed:\n{proc.stdout[-8000:]}\n{proc.stderr[-4000:]}"
    text = report.read_text()
    assert "failures: 0" in text
    assert all(f"| sm_{t} |" in text for t in (80, 86, 89, 90))
    assert "| yes |" in text  # wgmma seen on sm_90


def test_roofline_predictions_are_consistent():
    """The model the GPU check prints beside its timings: GIFT never below the frozen layer,
    the headline split prediction as written in benchmarks/NOTES.md, fused dearer at r 64."""
    rl = _load("roofline")
    for d_in, d_out in rl.SHAPES:
        for m in rl.TOKENS:
            for r in rl.RANKS:
                for path in ("split", "fused"):
                    p = rl.predict(m, d_in, d_out, r, path)
                    assert p["fwd"] >= p["frozen_fwd"] and p["bwd"] >= p["frozen_bwd"], (d_in, d_out, m, r, path)
    head = rl.predict(8192, 4096, 4096, 16, "split")
    assert 1.05 <= head["both_ratio"] <= 1.10, head
    assert rl.predict(8192, 4096, 4096, 64, "fused")["both_ratio"] > rl.predict(8192, 4096, 4096, 64, "split")["both_ratio"]
