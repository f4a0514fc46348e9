"""GIFT's token-clustering head on real reviews: all-MiniLM-L6-v2, GIFT on query/value.

1. Takes the best GIFT model of the comparison (``finetune_minilm.py``): from its merged result
   (``--result``, default ``examples/results/finetune_minilm.json``; a part's JSON works too)
   the float-base GIFT run (r = 16 or a rank-sweep variant) with the highest validation
   accuracy, loaded from the adapter its part saved (``gift_kernels.save_gift`` /
   ``load_gift``, ``<parts-dir>/adapters/<method>-seed<n>``) or, where that adapter is missing,
   trained again with the run's method, seed, rate and budget. Its validation accuracy is
   checked against the recorded one before anything is drawn.
2. Runs a few **held-out** reviews (from the validation split, never trained on; the first
   ``--per-label`` of each label whose length is within ``--min-tokens``..``--max-tokens``,
   in the split's fixed order, whatever the model predicts) once, recording the cluster scores
   of the chosen layers with ``gift_kernels.interpret.record_cluster_scores`` (no second
   forward), prints each token's hard assignment, and writes one PNG per recorded layer (a
   token x cluster heat map per review) plus ``cluster_maps_minilm.png`` with every layer, a
   row each (``gift_kernels.interpret.plotting.plot_token_clusters``).

    python examples/cluster_maps_minilm.py --out-dir cluster_maps

Needs the examples extra (``pip install -e ".[examples]"``). Defaults follow the authors' view:
each map min-max normalised over the review's word pieces ([CLS]/[SEP] dropped, as they drop a
ViT's class token), values <= 0.5 dropped.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402

import minilm_task as mt  # noqa: E402
from finetune_minilm import PARTS_DIR, RESULTS, ROOT, raw_splits  # noqa: E402
from gift_kernels import load_gift  # noqa: E402
from gift_kernels.interpret import record_cluster_scores  # noqa: E402
from gift_kernels.interpret.plotting import plot_token_clusters  # noqa: E402
from minilm_task import REVIEW_LABELS, encode  # noqa: E402

FLOAT_GIFT = ("gift", "gift-r4", "gift-r8", "gift-r32", "gift-all")  # GIFT on the float32 base


def best_gift_run(rec: dict, source: Path):
    """``(method key, run)``: the float-base GIFT run of a result with the highest validation
    accuracy (ties: the method listed first, then the lower seed)."""
    if "variants" not in rec or "budget" not in rec:
        raise SystemExit(f"cluster_maps_minilm: {source} is not a result of finetune_minilm.py --merge or --part "
                         "(no 'variants' / 'budget'); run the GIFT part and merge first")
    runs = [(k, r) for k in FLOAT_GIFT if rec["variants"].get(k, {}).get("status") == "ok"
            for r in rec["variants"][k]["runs"]]
    if not runs:
        raise SystemExit(f"cluster_maps_minilm: {source} has no finished float-base GIFT run ({', '.join(FLOAT_GIFT)})")
    return max(runs, key=lambda kr: (kr[1]["val_accuracy"], -FLOAT_GIFT.index(kr[0]), -kr[1]["seed"]))


def gift_model(key: str, run: dict, budget: dict, adapters: Path, val_enc, progress: bool):
    """The run's trained model: its saved adapter on a fresh base, else trained again; refused
    if its validation accuracy is not the recorded one (another model than the run's)."""
    method = mt.METHODS[key]
    saved = adapters / f"{key}-seed{run['seed']}"
    if saved.is_dir():
        model, _ = mt.build_classifier(run["seed"])
        load_gift(model, saved)
        how = f"loaded from {saved}"
    else:
        tok = mt._pretrained()[1]
        train = encode(tok, raw_splits(budget)[0]["train"], budget["max_length"])
        model, _ = mt.train_method(method, train, lr=run["lr"], seed=run["seed"], epochs=budget["epochs"],
                                   batch_size=budget["batch_size"], warmup=budget["warmup"], progress=progress)
        how = f"trained again ({saved} not found)"
    model.eval()
    val = mt.evaluate(method, model, val_enc)
    if abs(val - run["val_accuracy"]) > 2 / len(val_enc):
        raise SystemExit(f"cluster_maps_minilm: the {key} seed-{run['seed']} model {how} scores {100 * val:.1f} % on "
                         f"the validation split, the result recorded {100 * run['val_accuracy']:.1f} %: not that run's model")
    return model, how, val


def pick_reviews(reviews, tokenizer, per_label: int, min_tokens: int, max_tokens: int):
    """``[(text, label)]``: for each label, the first ``per_label`` reviews (in order) whose
    tokenised length ([CLS]/[SEP] included) is within ``min_tokens``..``max_tokens``."""
    shown = []
    for label in (1, 0):
        found = [ex for ex in reviews if ex[1] == label
                 and min_tokens <= len(tokenizer(ex[0])["input_ids"]) <= max_tokens][:per_label]
        if len(found) < per_label:
            raise SystemExit(f"cluster_maps_minilm: only {len(found)} held-out {REVIEW_LABELS[label]!r} reviews of "
                             f"{min_tokens}..{max_tokens} tokens: widen --min-tokens/--max-tokens")
        shown += found
    return shown


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out-dir", type=Path, default=Path("cluster_maps"))
    p.add_argument("--result", type=Path, default=RESULTS / "finetune_minilm.json",
                   help="the comparison's merged result (or a part's JSON) to take the best GIFT run from")
    p.add_argument("--adapters", type=Path, default=None,
                   help="where the parts saved GIFT's adapters (default: <parts dir>/adapters, the parts dir being "
                        "the part JSON's folder or the one the merged result names)")
    p.add_argument("--per-label", type=int, default=2, help="held-out reviews shown per label")
    p.add_argument("--min-tokens", type=int, default=14)
    p.add_argument("--max-tokens", type=int, default=30)
    p.add_argument("--layers", nargs="+", default=["encoder.layer.5.attention.self.value", "encoder.layer.5.attention.self.query"],
                   help="GiftLinear names (or suffixes such as 'value') to record")
    p.add_argument("--threshold", type=float, default=0.5, help="drop normalised values <= this (the authors' 0.5; -1 keeps all)")
    p.add_argument("--mark", choices=["raw", "normalized", "none"], default="raw",
                   help="dot on each token's best column: raw-score argmax (the hard assignment) or after normalisation")
    p.add_argument("--keep-special", action="store_true",
                   help="keep [CLS]/[SEP] in the maps (dropped by default, as the authors drop a ViT's class token)")
    p.add_argument("--size", type=int, nargs=2, default=(1800, 760), metavar=("W", "H"), help="PNG size per layer in pixels")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--no-progress", action="store_true")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    start = time.perf_counter()
    rec = json.loads(args.result.read_text())
    key, run = best_gift_run(rec, args.result)
    budget = rec["budget"]
    parts_dir = args.result.parent if "part" in rec else ROOT / rec.get("parts_dir", PARTS_DIR)  # ROOT / absolute = absolute
    adapters = args.adapters or parts_dir / "adapters"
    tok = mt._pretrained()[1]
    validation = raw_splits(budget)[0]["val"]
    model, how, val = gift_model(key, run, budget, adapters, encode(tok, validation, budget["max_length"]),
                                 not args.no_progress)
    shown = pick_reviews(validation, tok, args.per_label, args.min_tokens, args.max_tokens)
    trainable, _ = mt.trainable_parameters(model)
    print(f"best GIFT run of {args.result}: {mt.METHODS[key].label}, seed {run['seed']}, lr {run['lr']:g} "
          f"({trainable:,} trainable parameters), {how}; validation accuracy {100 * val:.1f} % "
          f"(recorded {100 * run['val_accuracy']:.1f} %), test {100 * run['test_accuracy']:.1f} %")

    enc = encode(tok, shown, args.max_tokens)
    with torch.no_grad(), record_cluster_scores(model, args.layers) as rec:
        predicted = model(enc.ids, enc.mask).argmax(-1)
    lengths = enc.lengths.tolist()
    # [CLS] ... [SEP] then padding: keep the word pieces (or everything up to the padding)
    spans = [(0, n) if args.keep_special else (1, n - 1) for n in lengths]
    tokens = [tok.convert_ids_to_tokens(row[a:b]) for row, (a, b) in zip(enc.ids.tolist(), spans)]
    titles = [f"true {REVIEW_LABELS[y]}, predicted {REVIEW_LABELS[k]}"
              for y, k in zip(enc.labels.tolist(), predicted.tolist())]
    for (text, _), t in zip(shown, titles):
        print(f"{t}: {text}")

    args.out_dir.mkdir(parents=True, exist_ok=True)
    threshold = None if args.threshold < 0 else args.threshold
    mark = None if args.mark == "none" else args.mark
    all_scores, all_tokens, all_titles = [], [], []
    for name in rec.names:
        scores = rec.scores(name)  # (reviews, tokens, r), padding included
        per_review = [s[a:b] for s, (a, b) in zip(scores, spans)]  # each map is normalised over these tokens
        layer_no, kind = re.search(r"layer\.(\d+)\..*\.(\w+)$", name).groups()
        panel_titles = [f"layer {layer_no} {kind}\n{t}" for t in titles]
        out = plot_token_clusters(per_review, tokens, args.out_dir / f"cluster_maps_minilm_layer{layer_no}_{kind}.png",
                                  size=tuple(args.size), titles=panel_titles, threshold=threshold, mark=mark)
        all_scores += per_review
        all_tokens += tokens
        all_titles += panel_titles
        best = rec.assignments(name)  # the hard assignment: argmax over the raw scores
        for toks, b, (a, e) in zip(tokens, best, spans):
            print(f"layer {layer_no} {kind}, best column per token (raw): " + " ".join(f"{t}/{c}" for t, c in zip(toks, b[a:e].tolist())))
        print(f"wrote {out}")
    # every recorded layer in one picture, a row per layer
    out = plot_token_clusters(all_scores, all_tokens, args.out_dir / "cluster_maps_minilm.png", ncols=len(shown),
                              size=(args.size[0], args.size[1] * len(rec.names)), titles=all_titles, threshold=threshold, mark=mark)
    print(f"wrote {out}")
    print(f"whole run: {time.perf_counter() - start:.1f} s")


if __name__ == "__main__":
    main()
