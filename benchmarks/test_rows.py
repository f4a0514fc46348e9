"""The benchmark's rows as a pytest-benchmark suite (the same providers, problems and
validation as ``gift-kernels bench`` and the GPU check):

    pytest benchmarks/ --benchmark-only                      # one group per shape
    GIFT_KERNELS_BENCH_SHAPES="4096,1024,1024,16;16,1024,1024,16" pytest benchmarks/ --benchmark-only

Each test validates its row against the reference first (a wrong row fails, untimed), then
times one mode (fwd, fwd+bwd, infer) on the host clock (synchronised on a GPU). Shapes: the
variable above, else the CPU bench's shapes on the CPU and the headline shapes on CUDA. Not in
the default test run (testpaths = tests); tests/bench runs it on a tiny shape.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from gift_kernels import bench  # noqa: E402

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
DTYPE = torch.bfloat16 if DEVICE.type == "cuda" else torch.float32
TIMED_MODES = ("fwd", "fwd+bwd", "infer")


def _shapes():
    text = os.environ.get("GIFT_KERNELS_BENCH_SHAPES", "").strip()
    if text:
        return [bench.parse_shape(s) for s in text.split(";") if s.strip()]
    return list(bench.HEADLINE if DEVICE.type == "cuda" else bench.CPU_SHAPES)


class _Built:
    """One shape's problem, rows and references, built once (at collection)."""

    def __init__(self, shape):
        self.problem = bench.Problem(shape, DTYPE, DEVICE)
        provs, self.skipped = bench.build(self.problem)
        self.providers = {p.name: p for p in provs}
        self.refs = bench.References()
        self.checked = {}

    def validated(self, name):
        if name not in self.checked:
            self.checked[name] = bench.check(self.providers[name], self.problem.inputs(), self.refs)
        return self.checked[name]


BUILT = {shape: _Built(shape) for shape in _shapes()}
CASES = [(shape, name, mode) for shape, b in BUILT.items() for name in b.providers for mode in TIMED_MODES]


@pytest.mark.parametrize("case", CASES, ids=[f"{s.m}x{s.d_in}x{s.d_out}r{s.r}-{n}-{m}" for s, n, m in CASES])
def test_row(benchmark, case):
    shape, name, mode = case
    built = BUILT[shape]
    check = built.validated(name)
    if not check["valid"]:
        pytest.fail(f"{name} at {shape} is wrong: {check['why']}")
    prov, inp = built.providers[name], built.problem.inputs()
    benchmark.group = str(shape)
    benchmark.extra_info.update(provider=name, mode=mode, backend_fwd=check["backend_fwd"],
                                backend_bwd=check["backend_bwd"], max_error=max(check["errors"].values()))
    benchmark(bench.mode_call(prov, inp, mode))
    built.problem.clear_grads()
