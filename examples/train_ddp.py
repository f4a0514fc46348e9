"""Fine-tune a GIFT-adapted model with DistributedDataParallel, one process per device.

    torchrun --nproc_per_node 2 examples/train_ddp.py      # CPU: 2 processes on gloo
    torchrun --nproc_per_node 8 examples/train_ddp.py      # 8 GPUs: nccl, one GPU each
    python examples/train_ddp.py                           # one process, no launcher

The same file runs everywhere: the backend follows the hardware (nccl when CUDA is
available, gloo otherwise) and each process takes the GPU of its LOCAL_RANK.

The model is a small decoder-only transformer with a frozen random backbone; GIFT adapts
every q/k/v/o/up/down projection with one Theta per projection type shared by all blocks
(``apply_gift``'s default ``sharing="type"``). It learns a fixed next-token map on
synthetic data, so the loss falls within a few dozen steps.

What matters for DDP with a shared Theta (docs/distributed.md has the details):
- ``find_unused_parameters`` is not needed: every Theta is used in every step, and DDP
  reduces a shared Theta once, after all its uses have accumulated into its grad;
- reentrant activation checkpointing (``--checkpointing reentrant``) runs one backward
  pass per block, so a shared Theta's grad is completed over several passes: DDP then needs
  ``static_graph=True`` (without it the ranks silently diverge), and the frozen embeddings'
  output must require grad. Non-reentrant checkpointing needs neither.

At the end rank 0 checks that every rank holds the same Theta and, with ``--save DIR``,
writes the adapter (``gift_kernels.save_gift``: the Thetas and the config only; a failed save
raises on every rank, not only rank 0, so that none waits at the final barrier). Shutdown:
all ranks meet at a barrier, each destroys the process group (in a ``finally``), and a rank that
finished cleanly leaves with ``os._exit(0)`` after flushing its output, skipping the interpreter's
finalization: gloo's worker threads outlive ``destroy_process_group`` (torch keeps the group
alive once DDP has used it) and may still be releasing the last collective's tensors, which needs
the GIL; during finalization that kills the thread mid-destructor and the rank aborts (SIGABRT,
"terminate called without an active exception"). docs/distributed.md has the evidence.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP
from torch.utils.checkpoint import checkpoint
from torch.utils.data import DataLoader, DistributedSampler, TensorDataset

from gift_kernels.adapters import GiftConfig, apply_gift
from gift_kernels.adapters.checkpoint import save_gift

TARGETS = ["q", "k", "v", "o", "up", "down"]


class Block(nn.Module):
    def __init__(self, d: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.ln1, self.ln2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.q, self.k, self.v, self.o = (nn.Linear(d, d) for _ in range(4))
        self.up, self.down = nn.Linear(d, 4 * d), nn.Linear(4 * d, d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, s, d = x.shape
        h = self.ln1(x)

        def split(t):
            return t.view(b, s, self.heads, d // self.heads).transpose(1, 2)

        a = F.scaled_dot_product_attention(split(self.q(h)), split(self.k(h)), split(self.v(h)), is_causal=True)
        x = x + self.o(a.transpose(1, 2).reshape(b, s, d))
        return x + self.down(F.gelu(self.up(self.ln2(x))))


class TinyLM(nn.Module):
    def __init__(self, vocab: int, d: int, heads: int, n_layers: int) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, d)
        self.blocks = nn.ModuleList(Block(d, heads) for _ in range(n_layers))
        self.ln_f = nn.LayerNorm(d)
        self.head = nn.Linear(d, vocab, bias=False)
        self.checkpointing = "none"

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        x = self.embed(ids)
        for block in self.blocks:
            if self.checkpointing == "none":
                x = block(x)
            else:
                x = checkpoint(block, x, use_reentrant=self.checkpointing == "reentrant")
        return self.head(self.ln_f(x))


def build_model(args) -> nn.Module:
    """The same frozen backbone and the same initial Thetas on every rank (one seed)."""
    torch.manual_seed(args.seed)
    model = TinyLM(args.vocab, args.d_model, args.heads, args.layers)
    return apply_gift(model, GiftConfig(rank=args.rank, target_modules=TARGETS, theta_dtype="float32"))


def synthetic_data(args) -> TensorDataset:
    """Sequences where each token is a fixed random function of the one before."""
    g = torch.Generator().manual_seed(args.seed + 1)
    next_token = torch.randperm(args.vocab, generator=g)
    seqs = torch.empty(args.samples, args.seq_len + 1, dtype=torch.long)
    seqs[:, 0] = torch.randint(0, args.vocab, (args.samples,), generator=g)
    for i in range(args.seq_len):
        seqs[:, i + 1] = next_token[seqs[:, i]]
    return TensorDataset(seqs[:, :-1], seqs[:, 1:])


def setup():
    """Process group from torchrun's environment (or a 1-process group without torchrun)."""
    if "RANK" not in os.environ:  # plain `python train_ddp.py`
        os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1", MASTER_PORT="29511")
    if torch.cuda.is_available():
        local_rank = int(os.environ["LOCAL_RANK"])
        torch.cuda.set_device(local_rank)
        backend, device = "nccl", torch.device("cuda", local_rank)
    else:
        backend, device = "gloo", torch.device("cpu")
    dist.init_process_group(backend)
    return backend, device


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--batch-size", type=int, default=8, help="sequences per process per step")
    parser.add_argument("--seq-len", type=int, default=32)
    parser.add_argument("--samples", type=int, default=2048)
    parser.add_argument("--vocab", type=int, default=97)
    parser.add_argument("--d-model", type=int, default=64)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--rank", type=int, default=8, help="GIFT rank r")
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--checkpointing", choices=["none", "non_reentrant", "reentrant"], default="none")
    parser.add_argument("--bf16", action="store_true", help="torch.autocast to bfloat16 (Theta stays float32)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--save", default=None, help="directory for the adapter (rank 0 writes it)")
    args = parser.parse_args()

    backend, device = setup()
    try:
        train(args, backend, device)
        # every rank is done with collectives before any rank tears the group down
        dist.barrier()
    finally:
        dist.destroy_process_group()  # also after an error, so the launcher sees that rank exit


def train(args: argparse.Namespace, backend: str, device: torch.device) -> None:
    rank, world = dist.get_rank(), dist.get_world_size()
    log = print if rank == 0 else (lambda *a, **k: None)
    log(f"backend={backend} world={world} device={device.type}")

    model = build_model(args).to(device)
    model.checkpointing = args.checkpointing
    if args.checkpointing == "reentrant":
        # reentrant checkpointing drops the grads of everything inside a block whose input
        # does not require grad, and the embeddings are frozen: make their output require it
        model.embed.register_forward_hook(lambda _m, _i, out: out.requires_grad_(True))
    ddp = DDP(
        model,
        device_ids=[device.index] if device.type == "cuda" else None,
        # a shared Theta's grad completes over several reentrant backward passes
        static_graph=args.checkpointing == "reentrant",
    )
    trainable = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(trainable, lr=args.lr, weight_decay=0.0)
    log(f"trainable parameters: {sum(p.numel() for p in trainable):,} of {sum(p.numel() for p in model.parameters()):,}")

    data = synthetic_data(args)
    sampler = DistributedSampler(data, num_replicas=world, rank=rank, shuffle=True, seed=args.seed, drop_last=True)
    loader = DataLoader(data, batch_size=args.batch_size, sampler=sampler, drop_last=True)

    step, epoch, start = 0, 0, time.perf_counter()
    while step < args.steps:
        sampler.set_epoch(epoch)
        for ids, targets in loader:
            ids, targets = ids.to(device), targets.to(device)
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=args.bf16):
                logits = ddp(ids)
            loss = F.cross_entropy(logits.float().flatten(0, 1), targets.flatten())
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            step += 1
            if step == 1 or step % 10 == 0 or step == args.steps:
                mean_loss = loss.detach().clone()
                dist.all_reduce(mean_loss)
                log(f"step {step:4d}  loss {mean_loss.item() / world:.4f}")
            if step == args.steps:
                break
        epoch += 1
    log(f"{args.steps} steps in {time.perf_counter() - start:.1f}s")

    # every rank must hold the very same Theta: compare with rank 0's
    worst = torch.zeros((), device=device)
    for p in trainable:
        ref = p.detach().clone()
        dist.broadcast(ref, src=0)
        worst = torch.maximum(worst, (p.detach() - ref).abs().max())
    dist.all_reduce(worst, op=dist.ReduceOp.MAX)
    if worst.item() != 0.0:
        raise RuntimeError(f"ranks disagree on Theta: max |Theta_rank - Theta_0| = {worst.item():.3e}")
    log("ranks agree: max |Theta_rank - Theta_0| = 0")

    if args.save:
        save_on_rank0(model, args.save, rank, device, log)


def save_on_rank0(model: nn.Module, path: str, rank: int, device: torch.device, log) -> None:
    """Rank 0 writes the adapter; every rank learns whether it did (a broadcast), so that a
    failed save raises on every rank at once instead of leaving the others at the final barrier
    until the process group times out."""
    failed, error = torch.zeros((), device=device), None
    if rank == 0:
        try:
            log(f"adapter saved to {save_gift(model, path)}")
        except Exception as exc:  # re-raised below, after the other ranks know
            failed.fill_(1)
            error = exc
    dist.broadcast(failed, src=0)
    if error is not None:
        raise error
    if failed.item():
        raise RuntimeError(f"rank 0 could not save the adapter to {path} (its error is in rank 0's output)")


def exit_now() -> None:
    """Leave without the interpreter's finalization (see the module docstring): gloo's worker
    threads can still be dropping the last collective's tensors, which takes the GIL, and a thread
    that asks for the GIL while Python finalizes is killed inside a C++ destructor (SIGABRT)."""
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


if __name__ == "__main__":
    main()
    exit_now()  # only after a clean run: an exception above exits through Python, non-zero
