"""The report: targets, markdown, JSON and the plot, written atomically (a kill mid-write
leaves the previous complete file), so a report can be rewritten after every shape.

A report is a dict: ``title``, ``meta`` (machine, versions, timer, ...), optional
``sections`` (name -> list of lines: the GPU check's tests and build), ``results`` (one per
shape, from :func:`run.bench_shape`), ``targets`` (lines) and ``stopped`` (why the run ended
early, or None). Only valid, timed rows are read by a target.
"""

from __future__ import annotations

import json
import math
import os
import platform
import statistics
import sys
from dataclasses import asdict
from pathlib import Path
from typing import Dict, List, Optional, Sequence

import torch

from .providers import MODES
from .shapes import CPU_DECODE, CPU_HEADLINE, DECODE_HEADLINE, HEADLINE_R16, HEADLINE_R64, Shape


# ------------------------------------------------------------------ the machine


def machine_name(device) -> str:
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"{platform.processor() or platform.machine()} CPU, {torch.get_num_threads()} threads"


def environment(device) -> dict:
    """Versions and the device's facts, for the report's header."""
    device = torch.device(device)
    env = {"machine": machine_name(device), "python": sys.version.split()[0], "torch": torch.__version__}
    try:
        from importlib.metadata import version

        env["triton"] = version("triton")
    except Exception as exc:  # triton missing: the torch backend still runs
        env["triton"] = f"missing ({type(exc).__name__})"
    if device.type == "cpu" and hasattr(os, "getloadavg"):  # a shared machine: how busy it was
        env["load average at start"] = " ".join(f"{v:.1f}" for v in os.getloadavg())
    if device.type == "cuda":
        p = torch.cuda.get_device_properties(device)
        env.update(capability=f"{p.major}.{p.minor}", sms=p.multi_processor_count,
                   memory_gib=round(p.total_memory / 2**30, 1),
                   l2_mib=round(getattr(p, "L2_cache_size", 0) / 2**20, 1))
    return env


# ------------------------------------------------------------------ reading results


def rows_of(results: Sequence[dict], shape: Shape) -> Dict[str, dict]:
    """``{provider: row}`` of the valid, timed rows of ``shape`` (empty if not measured)."""
    for res in results:
        if res["shape"] == asdict(shape):
            return {r["provider"]: r for r in res["rows"] if r.get("valid") and "fwd_ms" in r}
    return {}


def best(rows: Dict[str, dict], prefix: str, key: str) -> Optional[dict]:
    """The row named ``prefix*`` with the smallest ``key`` (None if none has it)."""
    cands = [r for n, r in rows.items() if n.startswith(prefix) and r.get(key) is not None]
    return min(cands, key=lambda r: r[key]) if cands else None


def paired_ratio(a: Optional[dict], b: Optional[dict], mode: str = "fwd+bwd"):
    """``(median, [q1, q3])`` of the per-round ratios ``a / b`` of two rows timed in the same
    rounds (``<mode>_samples_ms``), or None when either lacks them. The rows are interleaved
    round by round, so a round's ratio cancels what slowed that round for both."""
    if a is None or b is None:
        return None
    sa, sb = a.get(f"{mode}_samples_ms"), b.get(f"{mode}_samples_ms")
    if not sa or not sb:
        return None
    ratios = [x / y for x, y in zip(sa, sb) if y > 0]
    if not ratios:
        return None
    q = statistics.quantiles(ratios, n=4, method="inclusive") if len(ratios) >= 2 else [ratios[0]] * 3
    return statistics.median(ratios), [q[0], q[2]]


def verdict(value: float, op: str, bound: float, iqr: Optional[Sequence[float]] = None) -> str:
    """``met`` / ``MISSED``, or ``tie within noise`` when the interquartile range of the
    per-round ratios straddles the bound (without a range: the median alone decides)."""
    lo, hi = iqr if iqr is not None else (value, value)
    if op == "<=":
        return "met" if hi <= bound else "MISSED" if lo > bound else "tie within noise"
    return "met" if lo >= bound else "MISSED" if hi < bound else "tie within noise"


def _noise(iqr: Optional[Sequence[float]]) -> str:
    return "" if iqr is None else f" [IQR {iqr[0]:.3f}-{iqr[1]:.3f}]"


class Targets:
    """Lines ``- what: value [IQR lo-hi] (target op bound) met|MISSED|tie within noise`` or
    ``not measured``: one verdict per target, read with its noise (:func:`verdict`)."""

    def __init__(self):
        self.lines: List[str] = []

    def check(self, label: str, value: Optional[float], op: str, bound: float, detail: str = "",
              iqr: Optional[Sequence[float]] = None) -> None:
        if value is None or (isinstance(value, float) and math.isnan(value)):
            self.lines.append(f"- {label}: not measured")
            return
        extra = f"; {detail}" if detail else ""
        self.lines.append(f"- {label}: {value:.3f}{_noise(iqr)} (target {op} {bound}{extra}) "
                          f"{verdict(value, op, bound, iqr)}")

    def check_ratio(self, label: str, a: Optional[dict], b: Optional[dict], op: str, bound: float,
                    detail: str = "", key: str = "fwd+bwd_ms") -> None:
        """Target on ``a / b``: per-round ratios with their noise when both rows have samples,
        else the ratio of the two medians."""
        paired = paired_ratio(a, b, key[:-len("_ms")])
        if paired is not None:
            self.check(label, paired[0], op, bound, detail, paired[1])
        else:
            self.check(label, _ratio(a, b, key), op, bound, detail)

    def check_frozen(self, label: str, row: Optional[dict], op: str, bound: float, detail: str = "",
                     mode: str = "fwd+bwd") -> None:
        """Target on a row's ratio to ``frozen`` (median of per-round ratios, with its IQR)."""
        self.check(label, row and row.get(f"{mode}_ratio"), op, bound, detail, row and row.get(f"{mode}_ratio_iqr"))


def _ratio(a: Optional[dict], b: Optional[dict], key: str) -> Optional[float]:
    if a is None or b is None or not a.get(key) or not b.get(key):
        return None
    return a[key] / b[key]


def cpu_targets(results: Sequence[dict], headline: Shape = CPU_HEADLINE, decode: Shape = CPU_DECODE) -> List[str]:
    """The CPU targets (torch backend), each on its own shape ("not measured" if that shape
    was not run): at the headline shape fwd+bwd <= 1.10x frozen, >= 1.5x faster than the
    authors' formulation, and ``form=auto`` no worse than the epilogue; the training step at
    decode size with ``form=auto`` <= 1.25x frozen."""
    t = Targets()
    rows = rows_of(results, headline)
    res = {r["label"]: r for r in results}
    auto = res.get(str(headline), {}).get("auto_form", {}).get("torch")
    gift = rows.get(f"gift-torch-{auto}") if auto else None
    epi = rows.get("gift-torch-epilogue")
    t.check_frozen(f"gift-torch (form=auto: {auto}) fwd+bwd / frozen, {headline}", gift, "<=", 1.10)
    t.check_ratio(f"authors / gift-torch (auto) fwd+bwd, {headline}", rows.get("authors"), gift, ">=", 1.5)
    if gift is not None and gift is epi:  # auto picks the epilogue form: the same row, nothing to compare
        t.lines.append(f"- gift-torch auto / epilogue fwd+bwd, {headline}: 1 (auto picks the epilogue form) met")
    else:
        t.check_ratio(f"gift-torch auto / epilogue fwd+bwd, {headline}", gift, epi, "<=", 1.0,
                      "no worse than the epilogue form")
    lora = rows.get("peft-lora")
    if lora and gift:
        t.lines.append(f"- peft-lora / gift-torch (auto) fwd+bwd, {headline}: {lora['fwd+bwd_ms'] / gift['fwd+bwd_ms']:.2f}x")
    drows = rows_of(results, decode)
    dauto = res.get(str(decode), {}).get("auto_form", {}).get("torch")
    dgift = drows.get(f"gift-torch-{dauto}") if dauto else None
    t.check_frozen(f"gift-torch (form=auto: {dauto}) fwd+bwd / frozen, {decode}", dgift, "<=", 1.25)
    return t.lines


def gpu_targets(results: Sequence[dict]) -> List[str]:
    """The Triton / CUDA issues' targets, each read from the valid rows only: at M 8192,
    4096 x 4096, bf16: fwd+bwd <= 1.15x frozen at r 16 and <= 1.20x at r 64 (best Triton row),
    >= 1.3x faster than PEFT LoRA (its faster row), >= 1.8x faster than the authors'; decode
    forward (graph replay) <= 1.10x frozen at M 1 and 16; cuda within 1.3x of triton."""
    t = Targets()
    for shape, bound in ((HEADLINE_R16, 1.15), (HEADLINE_R64, 1.20)):
        rows = rows_of(results, shape)
        tri = best(rows, "gift-triton", "fwd+bwd_ms")
        t.check_frozen(f"triton fwd+bwd / frozen, {shape}", tri, "<=", bound, tri["provider"] if tri else "")
    rows = rows_of(results, HEADLINE_R16)
    tri = best(rows, "gift-triton", "fwd+bwd_ms")
    lora = best(rows, "peft-lora", "fwd+bwd_ms")
    t.check_ratio(f"fastest peft-lora / triton fwd+bwd, {HEADLINE_R16}", lora, tri, ">=", 1.3,
                  lora["provider"] if lora else "")
    t.check_ratio(f"authors / triton fwd+bwd, {HEADLINE_R16}", rows.get("authors"), tri, ">=", 1.8)
    for shape in DECODE_HEADLINE:
        drows = rows_of(results, shape)
        dtri = best(drows, "gift-triton", "graph_ms")
        t.check(f"triton decode forward (graph replay) / frozen, {shape}", dtri and dtri.get("graph_ratio"), "<=", 1.10,
                dtri["provider"] if dtri else "")
    cuda = best(rows, "gift-cuda", "fwd+bwd_ms")
    t.check_ratio(f"cuda / triton fwd+bwd, {HEADLINE_R16}", cuda, tri, "<=", 1.3)
    return t.lines


def form_choice(results: Sequence[dict]) -> List[str]:
    """Per shape and backend: its fastest epilogue row against the input-side form (its own
    row, else the fastest input row of any backend: the base GEMM + that backend's transform,
    which ``auto`` could pick instead), beside what ``form=auto`` picks. One verdict with its
    noise: the faster form, or a tie when the per-round ratios' IQR straddles 1 (either pick is
    right); ``auto picks the slower form`` only when the other is faster beyond the noise."""
    lines = []
    for res in results:
        rows = {r["provider"]: r for r in res["rows"] if r.get("valid") and "fwd+bwd_ms" in r}
        inputs = {n: r for n, r in rows.items() if n.startswith("gift-") and n.endswith("-input")}
        for be, auto in sorted(res.get("auto_form", {}).items()):
            epi = best(rows, f"gift-{be}-epilogue", "fwd+bwd_ms")
            inp = rows.get(f"gift-{be}-input") or best(inputs, "gift-", "fwd+bwd_ms")
            if epi is None or inp is None:
                continue
            paired = paired_ratio(inp, epi)
            value, iqr = paired if paired is not None else (inp["fwd+bwd_ms"] / epi["fwd+bwd_ms"], None)
            call = verdict(value, "<=", 1.0, iqr)  # met: the input form is faster beyond the noise
            faster = {"met": "input", "MISSED": "epilogue"}.get(call, call)
            pick = f"auto picks {auto}" + (" (the slower form)" if faster in ("input", "epilogue") and faster != auto
                                           else "")
            lines.append(f"- {res['label']}, {be}: {inp['provider']} / {epi['provider']} fwd+bwd = "
                         f"{value:.3f}{_noise(iqr)}; faster: {faster}; {pick}")
    return lines


# ------------------------------------------------------------------ markdown


def _f(v, fmt="{:.3f}") -> str:
    return "-" if v is None else fmt.format(v)


def _errors(r: dict) -> str:
    errs = r.get("errors")
    if not errs:
        return "-"
    worst = max(errs.values())
    return f"{worst:.1e}" + ("" if r.get("valid") else " WRONG")


def shape_table(res: dict) -> List[str]:
    out = [f"## {res['label']}", ""]
    extra = []
    if res.get("auto_form"):
        extra.append("form=auto picks " + ", ".join(f"{b}: {f}" for b, f in sorted(res["auto_form"].items())))
    if res.get("n_weights", 1) > 1:
        extra.append(f"graph replays cycle {res['n_weights']} distinct weights")
    extra.append(f"{res.get('seconds', 0):.0f} s")
    out += ["; ".join(extra) + ".", ""]
    if res.get("roofline"):
        out += [res["roofline"] + ".", ""]
    out += ["| provider | ran fwd/bwd | max err | fwd ms | bwd ms | fwd+bwd ms | host us | infer ms | fwd x | bwd x | "
            "fwd+bwd x [IQR] | infer x | graph x | TFLOP/s | saved MiB |",
            "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in res["rows"]:
        ran = "-" if r.get("backend_fwd") is None and r.get("backend_bwd") is None else \
            f"{r.get('backend_fwd')}/{r.get('backend_bwd')}"
        if not r.get("valid") or "fwd_ms" not in r:
            out.append(f"| {r['provider']} | {ran} | {_errors(r)} | not timed: {r.get('why', 'no samples')[:300]} "
                       "||||||||||||")
            continue
        iqr = r.get("fwd+bwd_ratio_iqr") or [None, None]
        fb = _f(r.get("fwd+bwd_ratio")) + (f" [{iqr[0]:.2f}-{iqr[1]:.2f}]" if iqr[0] is not None else "")
        saved = r.get("saved_bytes")
        host = _f(r.get("host_us"), "{:.0f}") + (" HOST-BOUND" if r.get("host_bound") else "")
        out.append(
            f"| {r['provider']} | {ran} | {_errors(r)} | {_f(r['fwd_ms'])} | {_f(r['bwd_ms'])} | {_f(r['fwd+bwd_ms'])} | "
            f"{host} | "
            f"{_f(r['infer_ms'])} | {_f(r.get('fwd_ratio'), '{:.2f}')} | {_f(r.get('bwd_ratio'), '{:.2f}')} | {fb} | "
            f"{_f(r.get('infer_ratio'), '{:.2f}')} | {_f(r.get('graph_ratio'))} | "
            f"{_f(r.get('fwd+bwd_tflop_s'), '{:.3g}')} | {_f(saved / 2**20 if saved is not None else None, '{:.2f}')} |")
    if res.get("skipped"):
        out += [""] + [f"- not run: {n}: {why}" for n, why in res["skipped"].items()]
    out.append("")
    return out


def to_markdown(report: dict) -> str:
    meta = report.get("meta", {})
    out = [f"# {report['title']}", ""]
    out += ["; ".join(f"{k}: {v}" for k, v in meta.items()) + ".", ""]
    out += ["Times are medians; ratios are medians of per-round ratios to `frozen` (interquartile range in "
            "brackets); a target or a form comparison is read from the per-round ratios of the two rows it "
            "compares: met / MISSED when the whole interquartile range is on one side of the target, "
            "`tie within noise` when it straddles it; fwd/bwd: a training step (x and Theta require grad; bwd = input and Theta grads); "
            "host us: host time to enqueue one fwd+bwd (HOST-BOUND: it reaches the GPU time, so the row times "
            "Python, not kernels; not quoted); infer: forward under no_grad; graph: decode-sized inference forwards replayed from a CUDA graph; "
            "max err: the largest of the output's and the gradients' errors against the reference "
            "(max|out - ref| / max|ref|); a WRONG row is not timed and no target reads it; "
            "saved = bytes autograd keeps for backward, the layer's weights excluded.", ""]
    if report.get("stopped"):
        out += [f"**Stopped early: {report['stopped']}**", ""]
    for name, lines in report.get("sections", {}).items():
        out += [f"## {name}", ""] + list(lines) + [""]
    if report.get("targets"):
        out += ["## Targets", ""] + list(report["targets"]) + [""]
    forms = form_choice(report.get("results", []))
    if forms:
        out += ["## Which form is faster", ""] + forms + [""]
    for res in report.get("results", []):
        out += shape_table(res)
    return "\n".join(out)


# ------------------------------------------------------------------ files


def _atomic_write(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def write(report: dict, out_dir, stem: str, plot_png: bool = False) -> Dict[str, Path]:
    """``<out>/<stem>.json`` and ``.md`` (and ``.png``), each replaced atomically."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {"json": out / f"{stem}.json", "md": out / f"{stem}.md"}
    _atomic_write(paths["json"], json.dumps(report, indent=1, default=str))
    _atomic_write(paths["md"], to_markdown(report))
    if plot_png:
        try:
            plot(report, out / f"{stem}.png")
            paths["png"] = out / f"{stem}.png"
        except ImportError:  # matplotlib is an optional extra
            pass
    return paths


def plot(report: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    results = [r for r in report["results"] if any("fwd_ratio" in row for row in r["rows"])]
    if not results:
        return
    fig, axes = plt.subplots(1, len(results), figsize=(5.5 * len(results), 4.2), squeeze=False)
    for ax, res in zip(axes[0], results):
        rows = [r for r in res["rows"] if "fwd_ratio" in r]
        names = [r["provider"] for r in rows]
        width = 0.8 / len(MODES)
        for i, mode in enumerate(MODES):
            ax.bar([j + i * width for j in range(len(names))], [r.get(f"{mode}_ratio") or 0 for r in rows], width,
                   label=mode)
        ax.axhline(1.0, color="black", linewidth=0.8)
        ax.set_xticks([j + 1.5 * width for j in range(len(names))])
        ax.set_xticklabels(names, rotation=30, ha="right")
        ax.set_title(res["label"])
        ax.set_ylabel("time / frozen F.linear")
    axes[0][0].legend()
    fig.suptitle(f"gift_kernels vs references — {report.get('meta', {}).get('machine', '')}")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)

