"""Every Triton kernel configuration compiles for sm_80 and sm_90 without spilling.

Runs ``benchmarks/compile_kernels.py`` (2 compiler processes, a fresh Triton cache) and
fails with its failure list. Needs no GPU: triton compiles for a GPUTarget on the CPU
and its own cuobjdump reads the cubins (DESIGN.md section 4).
"""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "compile_kernels.py"
TIMEOUT_S = 1200


def _script():
    spec = importlib.util.spec_from_file_location("compile_kernels", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_every_kernel_is_in_the_compile_matrix():
    from gift_kernels.kernels import triton_gift

    kernels = {name for name, obj in vars(triton_gift).items()
               if name.endswith("_kernel") and type(obj).__name__ in ("JITFunction", "InterpretedFunction")}
    assert kernels == {"_gift_fwd_kernel", "_gift_bwd_kernel", "_gift_skinny_kernel"}, kernels
    jobs = _script().jobs()
    assert {j.kernel for j in jobs} == {"fwd", "bwd", "skinny"}
    assert {j.target for j in jobs} == {80, 90}
    fwd = {(j.path, j.dtype, j.bias) for j in jobs if j.kernel == "fwd"}
    assert fwd == {(p, d, b) for p in ("split", "fused") for d in ("fp32", "fp16", "bf16") for b in (False, True)}


def test_all_configurations_compile_for_sm80_and_sm90(tmp_path):
    report = tmp_path / "KERNEL_REPORT.md"
    proc = subprocess.run([sys.executable, str(SCRIPT), "--jobs", "2", "--report", str(report)],
                          cwd=ROOT, capture_output=True, text=True, timeout=TIMEOUT_S)
    assert proc.returncode == 0, f"compile check failed:\n{proc.stdout[-8000:]}\n{proc.stderr[-4000:]}"
    text = report.read_text()
    assert "failures: 0" in text
    assert "| sm_80 |" in text and "| sm_90 |" in text
    assert "| yes |" in text  # wgmma seen on sm_90
