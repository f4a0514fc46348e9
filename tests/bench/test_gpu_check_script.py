"""The GPU check script runs end to end on the CPU (--dry-run), so the first GPU run only has to
measure: every code path but the CUDA timers, the graph replays and the build is exercised
here, with injected faults: a wrong row, a row that cannot be built, a fatal device error in a
worker and a hung row. The report must be rewritten after every shape and keep every finished
shape, and no GPU figure may be invented."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import bench_faults

ROOT = Path(__file__).resolve().parents[2]


def test_gpu_check_dry_run_survives_faults_and_writes_as_it_goes(tmp_path):
    cmd = [sys.executable, str(ROOT / "benchmarks" / "gpu_check.py"), "--dry-run", "--out", str(tmp_path),
           "--budget-s", "400", "--row-timeout-s", "15",
           "--inject-fault", "authors=wrong", "--inject-fault", "peft-lora=build",
           "--row-hook", bench_faults.HOOK]
    crashes = [{"shape": 1, "provider": "gift-torch-input", "how": "raise"},
               {"shape": 2, "provider": "gift-torch-epilogue", "how": "hang"}]
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env=bench_faults.env(crashes))
    report_path = tmp_path / "gpu_check_dry-run-cpu.json"
    seen_while_running = 0
    deadline = time.monotonic() + 500
    while proc.poll() is None and time.monotonic() < deadline:
        if report_path.exists():  # atomic rewrites: always a whole JSON document
            seen_while_running = max(seen_while_running, len(json.loads(report_path.read_text())["results"]))
        time.sleep(0.5)
    output = proc.communicate(timeout=60)[0]
    assert proc.returncode == 0, output[-4000:]
    assert seen_while_running >= 2, "the report was not rewritten shape by shape during the run"

    report = json.loads(report_path.read_text())
    assert report["dry_run"] is True and report["stopped"] is None
    results = report["results"]
    assert [r["label"] for r in results] == ["M=64 48x40 r=4", "M=1 48x40 r=4", "M=33 40x24 r=3"]
    for res in results:
        rows = {r["provider"]: r for r in res["rows"]}
        assert rows["frozen"]["valid"] and rows["frozen"]["fwd+bwd_ratio"] == 1.0
        assert rows["frozen"]["backend_fwd"] is None
        wrong = rows["authors"]
        assert not wrong["valid"] and "tolerance" in wrong["why"] and "fwd_ms" not in wrong
        assert "could not be built" in res["skipped"]["peft-lora"]
        assert "interpreter" in res["skipped"]["gift-triton-epilogue"]
        for name, row in rows.items():
            if row["valid"]:
                assert row["fwd_ms"] > 0 and row["fwd+bwd_ms"] > 0 and row["fwd+bwd_ratio"] > 0, name
                if name.startswith("gift-torch"):
                    assert row["backend_fwd"] == row["backend_bwd"] == "torch", name
                    assert row["errors"]["psi"] <= row["tol"], name
    first = {r["provider"]: r for r in results[0]["rows"]}
    assert first["gift-torch-input"]["valid"] and first["gift-torch-epilogue"]["valid"]
    # the fatal error took its worker down: the row is excluded from then on, the shape still finished
    assert "took its worker down (exit status 3)" in results[1]["skipped"]["gift-torch-input"]
    assert {r["provider"]: r for r in results[1]["rows"]}["gift-torch-epilogue"]["valid"]
    assert "hung for more than 15 s" in results[2]["skipped"]["gift-torch-epilogue"]
    restarts = report["sections"]["Worker restarts"]
    assert any("fatal device error in gift-torch-input" in line for line in restarts)

    assert all("not measured" in line for line in report["targets"])  # no GPU figure is invented
    md = (tmp_path / "gpu_check_dry-run-cpu.md").read_text()
    assert md.startswith("# GPU check") and "WRONG" in md and "## M=33 40x24 r=3" in md
    assert "rc 0" in md  # the GPU suite ran (and skipped itself: no CUDA)
