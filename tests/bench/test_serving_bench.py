"""The serving benchmark module: a quick run writes its report; the Llama-7B sizes from shapes."""

from __future__ import annotations

import json

import pytest
import torch

pytest.importorskip("transformers")
pytest.importorskip("peft")

from gift_kernels.bench import serving  # noqa: E402


def test_llama7b_sizes_from_shapes():
    s = serving.llama7b_sizes()
    assert s["gift_params"] == 2 * 2 * 4096 * 16  # q and v: one (phi, psi) each
    assert s["lora_params"] == 32 * 2 * (4096 + 4096) * 16
    assert s["ratio"] == 32  # the number of layers
    assert abs(s["gift_bank_gib"] - 1000 * 262144 * 2 / 2**30) < 1e-9


def test_quick_run_writes_json_and_markdown(tmp_path):
    threads = torch.get_num_threads()
    try:
        report = serving.run(str(tmp_path), quick=True, parts=("model", "op"), quiet=True)
    finally:
        torch.set_num_threads(threads)
    saved = json.loads((tmp_path / "serving.json").read_text())
    assert [r["adapters"] for r in saved["model"]] == [1, 4] == [r["adapters"] for r in saved["op"]]
    for row in saved["model"]:
        assert row["gift_vs_lora_rel_err"] < 1e-5  # the providers compute the same thing
        assert set(row["timing"]) == {"frozen", "single adapter", "mixed (GIFT)", "loop over adapters",
                                      "PEFT LoRA mixed"}
        assert row["timing"]["single adapter"]["cpu_ratio"] == 1.0
    md = (tmp_path / "serving.md").read_text()
    assert "## Mixed batch, model level" in md and "## Mixed batch, one layer" in md
    assert report["machine"].endswith("1 intra-op thread(s)")
