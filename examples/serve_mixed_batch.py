"""Serve many GIFT adapters from one model: every request in one batch picks its own adapter.

What it does, offline and on CPU in seconds:

1. builds a small causal LM (a Llama-shaped ``transformers`` model with random weights: the
   base model stands in for a pretrained one; nothing is downloaded);
2. trains N tiny GIFT adapters ("tenants"), adapter k taught to answer every prompt with its
   own token ``FIRST_ANSWER + k``, and saves each with ``save_gift`` (a few KiB each: one Theta
   per layer type);
3. loads them all into one serving model (``load_gift(..., adapter_name=...)``) and answers a
   mixed batch of requests, each naming its adapter (or ``"__base__"``), with one
   ``model.generate`` call inside ``mixed_adapters``: every adapted layer runs one segmented
   GIFT call for all adapters of the batch, then one base GEMM for every request;
4. checks every answer against the same request served by a model holding only its adapter,
   and (``--export``) against PEFT LoRA's own mixed batch over the adapters exported with
   ``export_lora`` (the format vLLM / SGLang / LoRAX / TGI load).

    python examples/serve_mixed_batch.py              # 8 adapters, 16 requests
    python examples/serve_mixed_batch.py --quick      # 3 adapters, 6 requests (CI)

Returns 0 when every check passes.
"""

from __future__ import annotations

import argparse
import copy
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import List, Optional

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

import gift_kernels  # noqa: E402
from gift_kernels import GiftConfig, apply_gift, load_gift, mixed_adapters, save_gift  # noqa: E402

VOCAB = 64
FIRST_ANSWER = 40  # adapter k answers with token FIRST_ANSWER + k
PROMPT_LEN = 6
TARGETS = ["q_proj", "v_proj", "o_proj"]


def base_model(seed: int = 0, hidden: int = 64):
    import transformers

    torch.manual_seed(seed)
    cfg = transformers.LlamaConfig(vocab_size=VOCAB, hidden_size=hidden, intermediate_size=2 * hidden,
                                   num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                   max_position_embeddings=64, pad_token_id=0, bos_token_id=1, eos_token_id=2)
    return transformers.LlamaForCausalLM(cfg).eval()


def prompts(n: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, FIRST_ANSWER, (n, PROMPT_LEN), generator=g)


def train_adapter(base, k: int, rank: int, steps: int):
    """Adapter k: after any prompt, the next token is FIRST_ANSWER + k."""
    model = apply_gift(copy.deepcopy(base), GiftConfig(rank=rank, target_modules=TARGETS, init_weights=False))
    opt = torch.optim.Adam(model.gift_thetas.parameters(), lr=3e-2)
    target = torch.tensor(FIRST_ANSWER + k)
    model.train()
    for step in range(steps):
        ids = prompts(16, seed=1000 * k + step)
        logits = model(ids).logits[:, -1]
        loss = torch.nn.functional.cross_entropy(logits, target.expand(len(ids)))
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model.eval()


def generate(model, ids: torch.Tensor, new_tokens: int) -> torch.Tensor:
    with torch.no_grad():
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens, do_sample=False,
                             pad_token_id=0)
    return out[:, ids.shape[1]:]


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--adapters", type=int, default=8)
    parser.add_argument("--requests", type=int, default=16)
    parser.add_argument("--rank", type=int, default=4)
    parser.add_argument("--steps", type=int, default=40, help="training steps per adapter")
    parser.add_argument("--new-tokens", type=int, default=2)
    parser.add_argument("--export", action="store_true", help="also compare with PEFT LoRA's mixed batch")
    parser.add_argument("--out", default=None, help="folder for the adapters (default: a temporary one)")
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's; 1 with "
                        "--quick: tiny matrices gain nothing from more, and lose a lot on a shared machine)")
    parser.add_argument("--quick", action="store_true", help="3 adapters, 6 requests, 30 steps, 1 thread (CI)")
    args = parser.parse_args(argv)
    if args.quick:
        args.adapters, args.requests, args.steps = 3, 6, 30
        args.threads = args.threads or 1
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    base = base_model()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(args.out or tmp)
        names = [f"tenant{k}" for k in range(args.adapters)]
        t0 = time.perf_counter()
        for k, name in enumerate(names):
            save_gift(train_adapter(base, k, args.rank, args.steps), root / name)
        size = sum(p.stat().st_size for p in (root / names[0]).iterdir())
        print(f"trained and saved {len(names)} adapters in {time.perf_counter() - t0:.1f} s "
              f"({size / 1024:.1f} KiB each on disk)")

        # the serving model: one base, every adapter loaded by name
        server = load_gift(copy.deepcopy(base), root / names[0], adapter_name=names[0])
        for name in names[1:]:
            load_gift(server, root / name, adapter_name=name)
        choice = [names[i % len(names)] if i % 5 != 4 else "__base__" for i in range(args.requests)]
        perm = torch.randperm(args.requests, generator=torch.Generator().manual_seed(1))
        choice = [choice[i] for i in perm]
        ids = prompts(args.requests, seed=7)
        t0 = time.perf_counter()
        with mixed_adapters(server, choice):
            answers = generate(server, ids, args.new_tokens)
        print(f"answered {args.requests} requests for {len(set(choice))} adapters in one batch "
              f"({time.perf_counter() - t0:.2f} s)")

        failures = 0
        for i, name in enumerate(choice):  # the same request, served by a model holding only its adapter
            alone = base if name == "__base__" else load_gift(copy.deepcopy(base), root / name)
            want = generate(alone, ids[i:i + 1], args.new_tokens)[0]
            expect = "-" if name == "__base__" else FIRST_ANSWER + names.index(name)
            ok = torch.equal(answers[i], want) and (name == "__base__" or int(answers[i, 0]) == expect)
            failures += not ok
            print(f"  request {i:2d}  {name:<9} -> {answers[i].tolist()}  (adapter's token {expect}; "
                  f"{'ok' if ok else 'MISMATCH'})")

        if args.export:
            failures += compare_with_peft_lora(server, base, names, choice, ids, root)
    print("all answers match" if not failures else f"{failures} check(s) FAILED")
    return 1 if failures else 0


def compare_with_peft_lora(server, base, names, choice, ids, root) -> int:
    """PEFT LoRA, with the same adapters exported, answering the same mixed batch."""
    from peft import PeftModel

    for name in names:
        gift_kernels.export_lora(server, root / f"lora_{name}", adapter_name=name)
    lora = PeftModel.from_pretrained(copy.deepcopy(base), root / f"lora_{names[0]}", adapter_name=names[0])
    for name in names[1:]:
        lora.load_adapter(root / f"lora_{name}", adapter_name=name)
    with torch.no_grad():
        want = lora(ids, adapter_names=choice).logits
        with mixed_adapters(server, choice):
            got = server(ids).logits
    err = ((got - want).abs().max() / want.abs().max()).item()
    gift_kb = sum(p.stat().st_size for p in (root / names[0]).iterdir()) / 1024
    lora_kb = sum(p.stat().st_size for p in (root / f"lora_{names[0]}").iterdir()) / 1024
    print(f"PEFT LoRA mixed batch over the exported adapters: max relative logit difference {err:.1e} "
          f"(LoRA adapter {lora_kb:.1f} KiB vs GIFT {gift_kb:.1f} KiB on disk)")
    return int(err > 1e-5)


if __name__ == "__main__":
    sys.exit(main())
