"""The GPU check script runs end to end on the CPU (--dry-run), so the first GPU run only
has to measure: every code path but the CUDA timers is exercised here."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_gpu_check_dry_run_writes_a_report(tmp_path):
    cmd = [sys.executable, str(ROOT / "benchmarks" / "gpu_check.py"), "--dry-run", "--out", str(tmp_path), "--budget-s", "200"]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-2000:]
    (report_path,) = tmp_path.glob("gpu_check_*.json")
    report = json.loads(report_path.read_text())
    assert report["dry_run"] is True
    assert len(report["results"]) == 2
    for res_ in report["results"]:
        rows = res_["rows"]
        assert {"frozen", "authors", "peft-lora", "gift-torch"} <= set(rows)
        for name, row in rows.items():
            assert "error" not in row, (name, row)
            assert row["fwd"] > 0 and row["fwd+bwd"] > 0
            assert row["fwd+bwd_x"] > 0
    assert any("not measured" in line for line in report["targets"])  # no GPU figure is invented
    assert (tmp_path / report_path.name.replace(".json", ".md")).read_text().startswith("# GPU check")
