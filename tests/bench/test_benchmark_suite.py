"""``pytest benchmarks/ --benchmark-only`` collects and runs (outside the default test run): a
quick run on one tiny shape, one group per shape, every row validated first."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_benchmark_suite_runs_one_group_per_shape(tmp_path):
    out = tmp_path / "bench.json"
    env = dict(os.environ, GIFT_KERNELS_BENCH_SHAPES="24,20,12,3;1,20,12,3")
    cmd = [sys.executable, "-m", "pytest", "benchmarks/", "-q", "-p", "no:cacheprovider", "--benchmark-only",
           "--benchmark-min-rounds=1", "--benchmark-max-time=0.0001", "--benchmark-warmup=off",
           f"--benchmark-json={out}", "-k", "frozen or gift-torch"]
    res = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-2000:]
    data = json.loads(out.read_text())
    groups = {b["group"] for b in data["benchmarks"]}
    assert groups == {"M=24 20x12 r=3", "M=1 20x12 r=3"}
    names = {(b["group"], b["extra_info"]["provider"], b["extra_info"]["mode"]) for b in data["benchmarks"]}
    for group in groups:
        for row in ("frozen", "gift-torch-epilogue", "gift-torch-input"):
            assert {(group, row, m) for m in ("fwd", "fwd+bwd", "infer")} <= names
    torch_rows = [b for b in data["benchmarks"] if b["extra_info"]["provider"].startswith("gift-torch")]
    assert all(b["extra_info"]["backend_fwd"] == b["extra_info"]["backend_bwd"] == "torch" for b in torch_rows)
