"""The serving example, quick mode: N adapters loaded into one model answer a mixed batch, every
answer equal to its adapter served alone and (--export) to PEFT LoRA's mixed batch."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("transformers")
pytest.importorskip("peft")

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "examples"))

import serve_mixed_batch  # noqa: E402


def test_quick_run_answers_every_request_with_its_adapter(tmp_path, capsys):
    threads = torch.get_num_threads()
    try:
        assert serve_mixed_batch.main(["--quick", "--export", "--out", str(tmp_path)]) == 0
    finally:
        torch.set_num_threads(threads)
    out = capsys.readouterr().out
    assert "all answers match" in out and "MISMATCH" not in out
    assert out.count("; ok)") == 6
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        [f"tenant{k}" for k in range(3)] + [f"lora_tenant{k}" for k in range(3)])
