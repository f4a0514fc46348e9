"""The package's main job: benchmark GIFT against its references on whatever device is here.

Providers (same shapes, same process):
    frozen      F.linear(x, W, b): the floor (forward + input gradient)
    authors     the authors' formulation: dense delta = (W phi) psi every step + a 2nd GEMM
    peft-lora   PEFT LoRA at the same rank (base(x) + lora_B(lora_A(x)) * scale)
    gift-<be>   this package, one row per backend that can run here (torch, triton, cuda)

Timing: providers are interleaved round by round (the order rotates each round) and
each figure is the median over rounds; ratios to ``frozen`` are medians of per-round
ratios, which cancels most of the drift of a shared, noisy machine. Forward and backward
are timed within the same call (forward, sync, backward, sync). Saved bytes are what
autograd keeps for backward (unique storages, parameters excluded).

Results go to ``<out>/bench.{json,md,png}``.
"""

from __future__ import annotations

import json
import math
import platform
import statistics
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Dict, List, Optional

import torch
import torch.nn.functional as F
from torch import nn

from ..ops import backends
from ..ops.functional import gift_linear
from ..ops.reference import gift_linear_authors

MODES = ("fwd", "bwd", "fwd+bwd", "infer")  # infer: forward under torch.no_grad()


@dataclass(frozen=True)
class Shape:
    m: int  # tokens
    d_in: int
    d_out: int
    r: int

    def __str__(self) -> str:
        return f"M={self.m} {self.d_in}x{self.d_out} r={self.r}"


# CPU: the headline target shape first, then a decode shape and a wider layer.
CPU_SHAPES = (Shape(4096, 1024, 1024, 16), Shape(16, 1024, 1024, 16), Shape(2048, 1024, 4096, 64))
# GPU (DESIGN.md section 3): Llama-style layers, training and decode token counts.
GPU_SHAPES = tuple(
    Shape(m, d_in, d_out, r)
    for (d_in, d_out) in ((4096, 4096), (4096, 1024), (4096, 14336), (14336, 4096))
    for m in (1, 16, 2048, 8192)
    for r in (16, 64)
)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class _Problem:
    """Inputs for one shape: random (never zeros), Theta and LoRA non-trivial."""

    def __init__(self, shape: Shape, dtype: torch.dtype, device: torch.device, seed: int = 0):
        g = torch.Generator(device="cpu").manual_seed(seed)

        def rnd(*s, scale=1.0):
            return (torch.randn(*s, generator=g) * scale).to(device=device, dtype=dtype)

        k, n, r = shape.d_in, shape.d_out, shape.r
        self.shape, self.device = shape, device
        self.x = rnd(shape.m, k).requires_grad_(True)
        self.weight = rnd(n, k, scale=k**-0.5)
        self.bias = rnd(n)
        # Theta in float32 (master weights), as a user keeps it
        self.phi = (torch.randn(k, r, generator=g) * k**-0.5).to(device).requires_grad_(True)
        self.psi = (torch.randn(r, k, generator=g) * k**-0.5).to(device).requires_grad_(True)
        self.grad_out = rnd(shape.m, n)


def _peft_lora(p: _Problem) -> Optional[Callable[[], torch.Tensor]]:
    try:
        from peft import LoraConfig, get_peft_model
    except ImportError:
        return None
    k, n = p.shape.d_in, p.shape.d_out
    base = nn.Sequential()
    base.add_module("proj", nn.Linear(k, n, device=p.device, dtype=p.weight.dtype))
    with torch.no_grad():
        base.proj.weight.copy_(p.weight)
        base.proj.bias.copy_(p.bias)
    model = get_peft_model(base, LoraConfig(r=p.shape.r, lora_alpha=p.shape.r, target_modules=["proj"], lora_dropout=0.0))
    layer = model.base_model.model.proj
    with torch.no_grad():  # PEFT starts lora_B at zero; time a trained adapter
        for w in layer.lora_B.values():
            w.weight.normal_(0, 0.02)
    return lambda: layer(p.x)


def providers(p: _Problem) -> Dict[str, Callable[[], torch.Tensor]]:
    """name -> a closure computing the layer's output (with autograd) on problem ``p``."""
    out: Dict[str, Callable[[], torch.Tensor]] = {
        "frozen": lambda: F.linear(p.x, p.weight, p.bias),
        "authors": lambda: gift_linear_authors(p.x, p.weight, p.bias, p.phi, p.psi),
    }
    lora = _peft_lora(p)
    if lora is not None:
        out["peft-lora"] = lora
    for name in backends.BACKENDS:
        if name == "triton" and p.device.type == "cpu":
            continue  # the interpreter is a correctness tool, not a provider to time
        if backends.supports(name, p.device)[0]:
            out[f"gift-{name}"] = _with_backend(name, p)
    return out


def _with_backend(name: str, p: _Problem) -> Callable[[], torch.Tensor]:
    def run():
        with backends.backend(name):
            return gift_linear(p.x, p.weight, p.bias, p.phi, p.psi)

    return run


def saved_bytes(fn: Callable[[], torch.Tensor], params) -> int:
    """Bytes autograd keeps for backward: unique storages, parameters excluded."""
    storages = {}
    skip = {t.untyped_storage().data_ptr() for t in params}

    def pack(t):
        s = t.untyped_storage()
        if s.data_ptr() not in skip:
            storages[s.data_ptr()] = s.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return sum(storages.values())


def _clear_grads(p: _Problem) -> None:
    for t in (p.x, p.phi, p.psi):
        t.grad = None


def _time_infer(fn, p: _Problem, reps: int) -> float:
    """Seconds per inference forward (no autograd graph, the decode / serving case)."""
    with torch.no_grad():
        _sync(p.device)
        t0 = time.perf_counter()
        for _ in range(reps):
            fn()
        _sync(p.device)
    return (time.perf_counter() - t0) / reps


def _time_once(fn, p: _Problem, reps: int):
    """Seconds per call for forward and backward, measured in the same calls."""
    fwd = bwd = 0.0
    for _ in range(reps):
        _clear_grads(p)
        _sync(p.device)
        t0 = time.perf_counter()
        y = fn()
        _sync(p.device)
        t1 = time.perf_counter()
        y.backward(p.grad_out)
        _sync(p.device)
        t2 = time.perf_counter()
        fwd += t1 - t0
        bwd += t2 - t1
    return fwd / reps, bwd / reps


def _calibrate(fn, p: _Problem, budget_s: float) -> int:
    f, b = _time_once(fn, p, 1)
    return max(1, min(1000, math.ceil(budget_s / max(f + b, 1e-7))))


def bench_shape(shape: Shape, dtype, device, rounds: int, budget_s: float, progress=None) -> dict:
    p = _Problem(shape, dtype, device)
    fns = providers(p)
    names = list(fns)
    params = [p.weight, p.bias, p.phi, p.psi]
    for fn in fns.values():  # warm up (allocator, oneDNN/cuBLAS plans, Triton compiles)
        _time_once(fn, p, 2)
    reps = {n: _calibrate(fns[n], p, budget_s) for n in names}
    samples = {n: {m: [] for m in MODES} for n in names}
    for rnd in range(rounds):
        order = names[rnd % len(names):] + names[: rnd % len(names)]
        for n in order:
            f, b = _time_once(fns[n], p, reps[n])
            samples[n]["fwd"].append(f)
            samples[n]["bwd"].append(b)
            samples[n]["fwd+bwd"].append(f + b)
            samples[n]["infer"].append(_time_infer(fns[n], p, reps[n]))
        if progress is not None:
            progress.update(1)
    rows = []
    for n in names:
        row = {"provider": n, "saved_bytes": saved_bytes(fns[n], params), "reps": reps[n]}
        for m in MODES:
            row[f"{m}_ms"] = statistics.median(samples[n][m]) * 1e3
            ratios = [a / b for a, b in zip(samples[n][m], samples["frozen"][m])]
            row[f"{m}_ratio"] = statistics.median(ratios)
            q = statistics.quantiles(ratios, n=4) if len(ratios) >= 2 else [ratios[0]] * 3
            row[f"{m}_ratio_iqr"] = [q[0], q[2]]
        rows.append(row)
    _clear_grads(p)
    return {"shape": asdict(shape), "label": str(shape), "rows": rows}


def machine_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"{platform.processor() or platform.machine()} CPU, {torch.get_num_threads()} threads"


def targets(results: List[dict]) -> List[str]:
    """The issue's CPU targets, checked on the headline shape when it was measured."""
    lines = []
    for res in results:
        rows = {r["provider"]: r for r in res["rows"]}
        if res["shape"] != asdict(CPU_SHAPES[0]) or "gift-torch" not in rows:
            continue
        gift = rows["gift-torch"]["fwd+bwd_ratio"]
        authors = rows["authors"]["fwd+bwd_ratio"] / gift
        lines.append(f"- gift-torch fwd+bwd / frozen = {gift:.3f}x (target <= 1.15x): {'met' if gift <= 1.15 else 'MISSED'}")
        lines.append(f"- authors / gift-torch fwd+bwd = {authors:.2f}x faster (target >= 1.5x): {'met' if authors >= 1.5 else 'MISSED'}")
        if "peft-lora" in rows:
            lora = rows["peft-lora"]["fwd+bwd_ratio"] / gift
            lines.append(f"- peft-lora / gift-torch fwd+bwd = {lora:.2f}x")
    return lines


def to_markdown(report: dict) -> str:
    out = [
        f"# gift_kernels benchmark ({report['device']})",
        "",
        f"Machine: {report['machine']}; torch {report['torch']}; dtype {report['dtype']}; "
        f"{report['rounds']} interleaved rounds; times are medians, ratios are medians of per-round "
        "ratios to `frozen` (interquartile range in brackets); fwd/bwd: a training step (x and Theta "
        "require grad); infer: forward under no_grad; saved = bytes autograd keeps for backward, "
        "parameters excluded.",
        "",
    ]
    for res in report["results"]:
        out += [f"## {res['label']}", "",
                "| provider | fwd ms | bwd ms | fwd+bwd ms | infer ms | fwd x | bwd x | fwd+bwd x | infer x | saved MiB |",
                "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
        for r in res["rows"]:
            iqr = r["fwd+bwd_ratio_iqr"]
            out.append(
                f"| {r['provider']} | {r['fwd_ms']:.3f} | {r['bwd_ms']:.3f} | {r['fwd+bwd_ms']:.3f} | {r['infer_ms']:.3f} | "
                f"{r['fwd_ratio']:.2f} | {r['bwd_ratio']:.2f} | {r['fwd+bwd_ratio']:.3f} [{iqr[0]:.2f}-{iqr[1]:.2f}] | "
                f"{r['infer_ratio']:.2f} | {r['saved_bytes'] / 2**20:.2f} |"
            )
        out.append("")
    if report["targets"]:
        out += ["## Targets", ""] + report["targets"] + [""]
    return "\n".join(out)


def plot(report: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    results = report["results"]
    fig, axes = plt.subplots(1, len(results), figsize=(5 * len(results), 4), squeeze=False)
    for ax, res in zip(axes[0], results):
        names = [r["provider"] for r in res["rows"]]
        width = 0.8 / len(MODES)
        for i, mode in enumerate(MODES):
            ax.bar([j + i * width for j in range(len(names))], [r[f"{mode}_ratio"] for r in res["rows"]], width, label=mode)
        ax.axhline(1.0, color="black", linewidth=0.8)
        ax.set_xticks([j + width for j in range(len(names))])
        ax.set_xticklabels(names, rotation=30, ha="right")
        ax.set_title(res["label"])
        ax.set_ylabel("time / frozen F.linear")
    axes[0][0].legend()
    fig.suptitle(f"gift_kernels vs references — {report['machine']}")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def run(out_dir: str = "results", rounds: Optional[int] = None, shapes=None, budget_s: Optional[float] = None,
        device: Optional[str] = None, quiet: bool = False) -> dict:
    dev = torch.device(device) if device else torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.bfloat16 if dev.type == "cuda" else torch.float32
    shapes = list(shapes or (GPU_SHAPES if dev.type == "cuda" else CPU_SHAPES))
    rounds = rounds or (25 if dev.type == "cuda" else 11)
    budget_s = budget_s if budget_s is not None else (0.02 if dev.type == "cuda" else 0.05)
    torch.manual_seed(0)

    from tqdm import tqdm

    results = []
    with tqdm(total=rounds * len(shapes), desc="gift-kernels bench", unit="round", disable=quiet) as bar:
        for shape in shapes:
            bar.set_postfix_str(str(shape))
            results.append(bench_shape(shape, dtype, dev, rounds, budget_s, progress=bar))
    report = {
        "device": dev.type,
        "machine": machine_name(dev),
        "torch": torch.__version__,
        "dtype": str(dtype).replace("torch.", ""),
        "rounds": rounds,
        "results": results,
        "targets": targets(results),
        "backends": backends.explain(dev),
    }
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "bench.json").write_text(json.dumps(report, indent=1))
    md = to_markdown(report)
    (out / "bench.md").write_text(md)
    try:
        plot(report, out / "bench.png")
    except ImportError:  # matplotlib is an optional extra
        pass
    if not quiet:
        print(md)
    return report
