"""PEFT's own generic suite (tests/test_custom_models.py of the installed peft's source package),
run on GIFT rows covering every config option; see tests/peft_suite/README.md.

The suite runs in a subprocess (2 pytest-xdist workers) and must report no failure and no error.
Its counts and skip reasons are written to build/peft-suite/summary.json (docs/peft.md explains
every skip). Getting the source package needs the package registry: in CI (``CI`` set) a failed
download fails the test; elsewhere it skips with the reason.
"""

from __future__ import annotations

import collections
import importlib.metadata
import importlib.util
import json
import os
import shutil
import subprocess
import sys
import tarfile
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

pytest.importorskip("peft")
pytest.importorskip("transformers")

ROOT = Path(__file__).resolve().parents[2]
HERE = ROOT / "tests" / "peft_suite"
CACHE = ROOT / "build" / "peft-suite"
SUITE_FILES = ("test_custom_models.py", "testing_common.py", "testing_utils.py")
OURS = {"suite_conftest.py": "conftest.py", "gift_rows.py": "gift_rows.py", "suite_main.py": "test_gift_custom_models.py"}
TIMEOUT_S = 1500


def _peft_tests(version: str) -> Path:
    """PEFT's tests/ folder from its sdist, downloaded once into build/."""
    dest = CACHE / f"peft-{version}-tests"
    if all((dest / f).is_file() for f in SUITE_FILES):
        return dest
    dl = CACHE / "download"
    dl.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "pip", "download", "--quiet", "--no-binary", ":all:", "--no-deps", "--no-build-isolation",
           f"peft=={version}", "-d", str(dl)]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    sdist = dl / f"peft-{version}.tar.gz"
    if res.returncode != 0 or not sdist.is_file():
        msg = f"could not download the peft {version} source package: {res.stderr[-800:]}"
        if os.environ.get("CI"):
            pytest.fail(msg)
        pytest.skip(msg)
    with tarfile.open(sdist) as tar:
        for f in SUITE_FILES:
            member = tar.getmember(f"peft-{version}/tests/{f}")
            dest.mkdir(parents=True, exist_ok=True)
            (dest / f).write_bytes(tar.extractfile(member).read())
    return dest


def _build_suite(where: Path, version: str) -> Path:
    tests = where / "tests"
    tests.mkdir(parents=True)
    for f in SUITE_FILES:
        shutil.copy(_peft_tests(version) / f, tests / f)
    (tests / "__init__.py").write_text("")  # the suite imports `from .testing_common import ...`
    for src, dst in OURS.items():
        shutil.copy(HERE / src, tests / dst)
    shutil.copy(HERE / "suite_pytest.ini", where / "pytest.ini")  # not the sdist's pyproject (--cov)
    return where


def _summary(junit: Path) -> dict:
    counts, skips, failures = collections.Counter(), collections.Counter(), []
    for case in ET.parse(junit).getroot().iter("testcase"):
        bad = case.find("failure") if case.find("failure") is not None else case.find("error")
        if bad is not None:
            counts["failed"] += 1
            failures.append(f"{case.get('name')}: {(bad.get('message') or '').splitlines()[0][:200] if bad.get('message') else ''}")
        elif case.find("skipped") is not None:
            counts["skipped"] += 1
            skips[(case.find("skipped").get("message") or "")[:160]] += 1
        else:
            counts["passed"] += 1
    return {"counts": dict(counts), "skip_reasons": dict(skips.most_common()), "failures": failures}


def test_peft_generic_suite_passes_on_every_gift_row(tmp_path):
    version = importlib.metadata.version("peft")
    suite = _build_suite(tmp_path / "suite", version)
    junit = tmp_path / "junit.xml"
    workers = ["-n", "2"] if importlib.util.find_spec("xdist") else []
    env = {k: v for k, v in os.environ.items() if not k.startswith("GIFT_KERNELS_")}
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")])
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *workers, "tests/test_gift_custom_models.py",
           "--gift-only", f"--junitxml={junit}"]
    proc = subprocess.run(cmd, cwd=suite, env=env, capture_output=True, text=True, timeout=TIMEOUT_S)
    assert junit.is_file(), f"the suite did not run (exit {proc.returncode}):\n{proc.stdout[-4000:]}\n{proc.stderr[-3000:]}"
    summary = {"peft": version, **_summary(junit)}
    CACHE.mkdir(parents=True, exist_ok=True)
    (CACHE / "summary.json").write_text(json.dumps(summary, indent=1))
    counts = summary["counts"]
    assert counts.get("failed", 0) == 0, f"{counts}; failures:\n" + "\n".join(summary["failures"][:40])
    assert proc.returncode == 0, proc.stdout[-4000:]
    assert counts.get("passed", 0) >= 1000, counts  # the GIFT rows really ran
