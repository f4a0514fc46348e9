"""What each process runs in tests/adapters/test_distributed.py: DDP and FSDP2 training of the tiny
GIFT-adapted transformer on gloo, and the single-process run it must equal.

Kept out of the test file so that ``spawn`` children import only this (and torch), not
pytest's collection. One launch runs every scenario in turn on one process group and
saves, per rank, a dict ``scenario -> result`` (or ``{"error": traceback}``) with
``torch.save``; the tests compare those with :func:`train_single`.
"""

from __future__ import annotations

import datetime
import os
import sys
import traceback
from typing import Callable, Dict, List, Optional

import torch
import torch.distributed as dist
from torch import nn

from gift_kernels.adapters.checkpoint import save_gift
from gift_kernels.adapters.training import enable_input_require_grads, fully_shard_gift
from tiny_transformer import lm_loss, make_batch, make_model, theta_params

WORLD = 2
STEPS = 3
GLOBAL_BATCH = 4  # sequences per step, split evenly over the ranks
LR = 0.5


def batches():
    return [make_batch(GLOBAL_BATCH, seed=100 + s) for s in range(STEPS)]


def make_optimizer(params) -> torch.optim.Optimizer:
    # momentum, so that a wrong grad in step 1 still shows in step 3's parameters
    return torch.optim.SGD(params, lr=LR, momentum=0.9)


def theta_state(model: nn.Module) -> Dict[str, torch.Tensor]:
    """The adapter's state: every Theta, named once, by its holder ``gift_thetas``."""
    return {k: v.detach().clone() for k, v in model.gift_thetas["default"].state_dict().items()}


def _model(checkpointing: Optional[str], adapter: str = "apply_gift") -> nn.Module:
    model = make_model(adapter=adapter)
    model.checkpointing = checkpointing
    if checkpointing == "reentrant":
        # the embeddings are frozen: without this, reentrant checkpointing loses Theta's grads
        enable_input_require_grads(model)
    return model


def train_single(checkpointing: Optional[str] = None, adapter: str = "apply_gift") -> dict:
    """The reference: one process, the whole global batch per step."""
    model = _model(checkpointing, adapter)
    opt = make_optimizer(theta_params(model).values())
    losses = []
    for ids, targets in batches():
        loss = lm_loss(model, ids, targets)
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    return {"losses": losses, "theta": theta_state(model)}


def _local(tensor: torch.Tensor, rank: int) -> torch.Tensor:
    per = GLOBAL_BATCH // WORLD
    return tensor[rank * per : (rank + 1) * per]


def _train_distributed(wrapped: nn.Module, params, rank: int) -> List[float]:
    """STEPS optimizer steps on this rank's share of each global batch; returns the global
    losses (the mean over ranks of the local means = the loss on the global batch)."""
    opt = make_optimizer(params)
    losses = []
    for ids, targets in batches():
        loss = lm_loss(wrapped, _local(ids, rank), _local(targets, rank))
        loss.backward()
        opt.step()
        opt.zero_grad()
        global_loss = loss.detach().clone()
        dist.all_reduce(global_loss)
        losses.append(global_loss.item() / WORLD)
    return losses


def scenario_ddp(
    rank: int, *, checkpointing: Optional[str] = None, static_graph: bool = False, adapter: str = "apply_gift"
) -> dict:
    from torch.nn.parallel import DistributedDataParallel as DDP

    model = _model(checkpointing, adapter)
    # find_unused_parameters stays False: every Theta is used in every step. Reentrant
    # checkpointing needs static_graph=True: a shared Theta's grad completes over one backward
    # pass per block, and without it DDP reduces the first partial grad (silently wrong)
    ddp = DDP(model, static_graph=static_graph)
    losses = _train_distributed(ddp, theta_params(model).values(), rank)
    return {"losses": losses, "theta": theta_state(model)}


def scenario_fsdp2(rank: int, *, checkpointing: Optional[str] = None, bf16_params: bool = False) -> dict:
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import DTensor

    model = _model(checkpointing)
    mesh = init_device_mesh("cpu", (WORLD,))
    kwargs = {}
    if bf16_params:  # FSDP2's mixed precision: bf16 compute and all-gathers, float32 master Theta and grad reduction
        from torch.distributed.fsdp import MixedPrecisionPolicy

        kwargs["mp_policy"] = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    # per-block units for the frozen backbone, the shared Thetas in the root's unit
    fully_shard_gift(model, model.blocks, mesh=mesh, **kwargs)
    thetas = dict(model.gift_thetas["default"].named_parameters())
    layout = {
        "theta_is_dtensor": all(isinstance(p, DTensor) for p in thetas.values()),
        "theta_local_rows": {n: p.to_local().shape[0] for n, p in thetas.items()},
        "theta_full_rows": {n: p.shape[0] for n, p in thetas.items()},
        "backbone_is_dtensor": isinstance(model.blocks[0].q.weight, DTensor),
        "backbone_frozen": not any(p.requires_grad for p in model.parameters() if all(p is not t for t in thetas.values())),
        # the layers still see the very Theta the root holds, not a copy
        "theta_shared": all(b.q.theta is model.gift_thetas["default"]["q"] for b in model.blocks),
        "theta_dtype": {n: p.dtype for n, p in thetas.items()},
    }
    losses = _train_distributed(model, theta_params(model).values(), rank)
    # adapter-only, full (unsharded) state dict, on rank 0 only, in CPU memory
    options = StateDictOptions(full_state_dict=True, cpu_offload=True, ignore_frozen_params=True)
    adapter_sd = get_model_state_dict(model, options=options)
    # the same Thetas gathered by hand, one all-gather per parameter (every rank joins)
    gathered = {n: p.full_tensor() for n, p in thetas.items()}
    # and through the adapter checkpoint: every rank calls it, rank 0 writes
    adapter_dir = os.path.join(OUT_DIR[0], f"adapter_{checkpointing}_{int(bf16_params)}")
    save_gift(model, adapter_dir)
    return {
        "adapter_dir": adapter_dir,
        "losses": losses,
        "layout": layout,
        "adapter_state_dict": adapter_sd,
        "theta": gathered,
    }


SCENARIOS: Dict[str, Callable[[int], dict]] = {
    "ddp": lambda rank: scenario_ddp(rank),
    "ddp_static_graph": lambda rank: scenario_ddp(rank, static_graph=True),
    "ddp_non_reentrant": lambda rank: scenario_ddp(rank, checkpointing="non_reentrant"),
    "ddp_reentrant_static_graph": lambda rank: scenario_ddp(rank, checkpointing="reentrant", static_graph=True),
    "ddp_hand_built": lambda rank: scenario_ddp(rank, adapter="hand"),
    "fsdp2": lambda rank: scenario_fsdp2(rank),
    "fsdp2_non_reentrant": lambda rank: scenario_fsdp2(rank, checkpointing="non_reentrant"),
    "fsdp2_reentrant": lambda rank: scenario_fsdp2(rank, checkpointing="reentrant"),
    "fsdp2_bf16_params": lambda rank: scenario_fsdp2(rank, bf16_params=True),
}


OUT_DIR: List[str] = [""]  # set by run(): where scenarios may write files


def run(rank: int, port: int, out_dir: str, names: List[str]) -> None:
    """Entry point of one spawned process."""
    OUT_DIR[0] = out_dir
    torch.set_num_threads(1)  # two processes share the two cores
    dist.init_process_group(
        "gloo",
        init_method=f"tcp://127.0.0.1:{port}",
        rank=rank,
        world_size=WORLD,
        # a collective that one rank never joins fails after this, instead of hanging the test
        timeout=datetime.timedelta(seconds=60),
    )
    results = {}
    try:
        for name in names:
            try:
                results[name] = SCENARIOS[name](rank)
            except Exception:
                results[name] = {"error": traceback.format_exc()}
            torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))
        # every rank is done with collectives before any rank tears the group down
        dist.barrier()
    finally:
        dist.destroy_process_group()
    # Leave without the interpreter's finalization (a spawn child ends with sys.exit): gloo's
    # worker threads outlive destroy_process_group once DDP has used the group, and one that is
    # still dropping the last collective's tensors needs the GIL; asking for it while Python
    # finalizes kills the thread inside a C++ destructor and the rank aborts (SIGABRT). The
    # results are on disk already. docs/distributed.md, "Shut down in order".
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)
