"""``gift-kernels bench`` as a newcomer meets it: one thread unless asked, a warning on a busy
machine, every flag explained, the row names listed, ``--quick`` written beside (never over) a
full run's report, and the output says where the files went."""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

from gift_kernels import cli

ROOT = Path(__file__).resolve().parents[2]


def _bench_parser():
    sub = next(a for a in cli.build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    return sub.choices["bench"]


def test_every_bench_flag_has_help():
    parser = _bench_parser()
    flags = [a for a in parser._actions if a.option_strings and a.dest != "help"]
    assert {"--threads", "--quick", "--only", "--skip", "--list-rows", "--quiet"} <= {o for a in flags for o in a.option_strings}
    for action in flags:
        assert action.help and action.help != argparse.SUPPRESS, action.option_strings
    threads = next(a for a in flags if "--threads" in a.option_strings)
    assert "default 1" in threads.help


def test_busy_machine_warning(monkeypatch):
    monkeypatch.setattr(os, "cpu_count", lambda: 2)
    monkeypatch.setattr(os, "getloadavg", lambda: (5.3, 4.0, 3.0))
    text = cli._busy_warning(1)
    assert text and "load average 5.3 exceeds the 2 cores" in text
    monkeypatch.setattr(os, "getloadavg", lambda: (1.2, 1.0, 1.0))
    assert cli._busy_warning(1) is None


def _cli(*args, cwd):
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    env.pop("TRITON_INTERPRET", None)
    return subprocess.run([sys.executable, "-m", "gift_kernels.cli", "bench", *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=600)


def test_list_rows_names_what_only_and_skip_match(tmp_path):
    done = _cli("--list-rows", "--device", "cpu", cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-2000:]
    lines = done.stdout.splitlines()
    names = {ln.split()[0] for ln in lines[1:]}
    assert {"frozen", "authors", "peft-lora", "gift-torch-epilogue", "gift-torch-input"} <= names
    assert any(ln.strip().startswith("gift-triton-epilogue") and "not here" in ln for ln in lines)
    assert not list(tmp_path.iterdir())  # listing writes nothing


def test_quick_run_never_overwrites_a_full_report_and_says_where_it_wrote(tmp_path):
    out = tmp_path / "results"
    out.mkdir()
    (out / "bench.md").write_text("a full run's report\n")
    done = _cli("--quick", "--shape", "8,16,12,2", "--rounds", "1", "--only", "gift-torch-epilogue", "--quiet",
                "--device", "cpu", "--out", str(out), cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    assert (out / "bench.md").read_text() == "a full run's report\n"
    assert (out / "bench-quick.md").exists() and (out / "bench-quick.json").exists()
    assert f"wrote {out / 'bench-quick.json'}, {out / 'bench-quick.md'}" in done.stdout
    meta = json.loads((out / "bench-quick.json").read_text())["meta"]
    assert meta["machine"].endswith(", 1 threads")  # one thread unless asked
    rows = json.loads((out / "bench-quick.json").read_text())["results"][0]["rows"]
    assert [r["provider"] for r in rows] == ["frozen", "gift-torch-epilogue"]


def test_bad_counts_are_refused_by_name(capsys):
    for flag in ("--threads", "--rounds"):
        try:
            cli.main(["bench", flag, "0"])
        except SystemExit as exc:
            assert exc.code == 2
        else:
            raise AssertionError(f"{flag} 0 was accepted")
        assert f"argument {flag}: expected a whole number >= 1, got '0'" in capsys.readouterr().err
