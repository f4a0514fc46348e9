"""GIFT under DDP and FSDP2: two processes on gloo (CPU), compared with one process on the
same global batch.

The model (tests/tiny_transformer.py) shares one Theta per layer type across its blocks,
which is what trips naive integrations: DDP sees a parameter whose grad is accumulated from
many layers (and, under reentrant checkpointing, from many backward passes), and FSDP2
cannot put one parameter into several per-block units.

All scenarios run in one launch of two spawned processes (tests/support/distributed_workers.py);
every join has a deadline, so a hung collective fails the test instead of hanging CI.
"""

from __future__ import annotations

import importlib.util
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import distributed_workers as workers
from gift_kernels.adapters.loading import load_gift
from gift_kernels.adapters.training import fully_shard_gift, theta_parameters
from gift_testing import TOL
from tiny_transformer import TinyLM, intra_op_threads, lm_loss, make_batch, make_model, theta_params

pytestmark = pytest.mark.skipif(
    not (dist.is_available() and dist.is_gloo_available()), reason="torch.distributed with gloo is not available"
)

REPO = Path(__file__).resolve().parents[2]
LAUNCH_TIMEOUT_S = 150
DDP_SCENARIOS = ("ddp", "ddp_static_graph", "ddp_non_reentrant", "ddp_reentrant_static_graph", "ddp_hand_built")
FSDP_SCENARIOS = ("fsdp2", "fsdp2_non_reentrant", "fsdp2_reentrant")
OTHER_SCENARIOS = ("fsdp2_bf16_params",)
# float32 summation order differs between one process and an all-reduce of two halves
RTOL, ATOL = 1e-5, 1e-6


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    with intra_op_threads(1):
        yield


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(names, out_dir: Path):
    """Run ``names`` on WORLD spawned processes; return each rank's results. Never hangs."""
    ctx = mp.get_context("spawn")
    port = _free_port()
    procs = [
        ctx.Process(target=workers.run, args=(rank, port, str(out_dir), list(names)), daemon=True)
        for rank in range(workers.WORLD)
    ]
    for p in procs:
        p.start()
    deadline = time.monotonic() + LAUNCH_TIMEOUT_S
    for p in procs:
        p.join(max(0.0, deadline - time.monotonic()))
    hung = [rank for rank, p in enumerate(procs) if p.is_alive()]
    for p in procs:
        if p.is_alive():
            p.kill()
            p.join(10)
    assert not hung, f"ranks {hung} still running after {LAUNCH_TIMEOUT_S}s (killed)"
    codes = [p.exitcode for p in procs]
    assert codes == [0] * workers.WORLD, f"worker exit codes {codes}"
    return [torch.load(out_dir / f"rank{rank}.pt") for rank in range(workers.WORLD)]


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    return launch(DDP_SCENARIOS + FSDP_SCENARIOS + OTHER_SCENARIOS, tmp_path_factory.mktemp("dist"))


@pytest.fixture(scope="module")
def single():
    return workers.train_single()


@pytest.fixture(scope="module")
def single_hand_built():
    return workers.train_single(adapter="hand")


def _result(results, name, rank):
    res = results[rank][name]
    assert "error" not in res, f"{name} failed on rank {rank}:\n{res['error']}"
    return res


def _assert_theta_equal(theta, ref, what):
    assert theta.keys() == ref.keys(), what
    for key in ref:
        torch.testing.assert_close(theta[key], ref[key], rtol=RTOL, atol=ATOL, msg=lambda m: f"{what} {key}: {m}")


def test_single_process_reference_trains(single):
    # the comparisons below can only fail if training moves Theta and changes the loss
    init = workers.theta_state(make_model())
    moved = min((single["theta"][k] - init[k]).abs().max().item() for k in init)
    assert moved > 1e-3, f"Theta barely moved in {workers.STEPS} steps ({moved:.2e}); the DDP/FSDP checks would be vacuous"
    assert len(set(single["losses"])) == workers.STEPS


@pytest.mark.parametrize("name", DDP_SCENARIOS)
def test_ddp_matches_single_process(results, single, single_hand_built, name):
    if name == "ddp_hand_built":
        single = single_hand_built
    for rank in range(workers.WORLD):
        res = _result(results, name, rank)
        torch.testing.assert_close(torch.tensor(res["losses"]), torch.tensor(single["losses"]), rtol=RTOL, atol=ATOL)
        _assert_theta_equal(res["theta"], single["theta"], f"{name} rank {rank}")
    # DDP all-reduces the grads, so the replicas stay bit-identical
    r0, r1 = (_result(results, name, rank)["theta"] for rank in (0, 1))
    for key in r0:
        assert torch.equal(r0[key], r1[key]), f"{name}: Theta {key} differs between ranks"


@pytest.mark.parametrize("name", FSDP_SCENARIOS)
def test_fsdp2_matches_single_process(results, single, name):
    for rank in range(workers.WORLD):
        res = _result(results, name, rank)
        torch.testing.assert_close(torch.tensor(res["losses"]), torch.tensor(single["losses"]), rtol=RTOL, atol=ATOL)
        _assert_theta_equal(res["theta"], single["theta"], f"{name} rank {rank} (gathered)")


def test_fsdp2_bf16_mixed_precision_keeps_float32_theta(results, single):
    # MixedPrecisionPolicy(param_dtype=bf16, reduce_dtype=float32): GIFT computes in bf16 with
    # bf16 Theta copies; the sharded master Theta and its grad reduction stay float32
    for rank in range(workers.WORLD):
        res = _result(results, "fsdp2_bf16_params", rank)
        assert set(res["layout"]["theta_dtype"].values()) == {torch.float32}
        assert all(t.dtype == torch.float32 for t in res["theta"].values())
        torch.testing.assert_close(torch.tensor(res["losses"]), torch.tensor(single["losses"]), rtol=TOL[torch.bfloat16], atol=0)
        for key, ref in single["theta"].items():
            err = ((res["theta"][key] - ref).abs().max() / ref.abs().max()).item()
            assert err < TOL[torch.bfloat16], f"rank {rank} {key}: relative error {err:.2e} after {workers.STEPS} bf16 steps"


def test_fsdp2_sharding_plan(results):
    for rank in range(workers.WORLD):
        layout = _result(results, "fsdp2", rank)["layout"]
        assert layout["theta_is_dtensor"], "the shared Thetas must be sharded (by the root unit)"
        assert layout["backbone_is_dtensor"], "the frozen blocks must be sharded (per-block units)"
        assert layout["backbone_frozen"], "fully_shard must keep the backbone frozen"
        assert layout["theta_shared"], "every block must still use the root's Theta module"
        for key, full in layout["theta_full_rows"].items():
            # dim-0 sharding over two ranks: each holds half the rows (all sizes here are even)
            assert layout["theta_local_rows"][key] == full // workers.WORLD, key


def test_fsdp2_adapter_state_dict_on_rank0_loads_into_single_process_model(results, single):
    sd0 = _result(results, "fsdp2", 0)["adapter_state_dict"]
    sd1 = _result(results, "fsdp2", 1)["adapter_state_dict"]
    assert sd1 == {}, "with cpu_offload the full state dict lives on rank 0 only"
    assert all(isinstance(v, torch.Tensor) and type(v) is torch.Tensor for v in sd0.values()), "expected plain tensors"

    model = make_model(seed=7)  # a different init, so loading must overwrite Theta
    missing, unexpected = model.load_state_dict(sd0, strict=False)
    assert unexpected == []
    trainable = {id(p) for p in theta_params(model).values()}
    named = dict(model.named_parameters(remove_duplicate=False))
    assert not any(id(named[k]) in trainable for k in missing if k in named), "a Theta key is missing"
    # ignore_frozen_params leaves only Theta, under every path that reaches a shared Theta
    assert all(id(named[k]) in trainable for k in sd0), "a frozen parameter leaked into the adapter state dict"
    _assert_theta_equal(workers.theta_state(model), single["theta"], "loaded adapter")

    reference = make_model(seed=7)
    reference.gift_thetas["default"].load_state_dict(single["theta"])
    ids, targets = make_batch(3, seed=5)
    with torch.no_grad():
        torch.testing.assert_close(lm_loss(model, ids, targets), lm_loss(reference, ids, targets), rtol=RTOL, atol=ATOL)


def test_fsdp2_save_gift_gathers_and_rank0_writes(results, single):
    """save_gift on a sharded model: every rank calls it, the Thetas are all-gathered, rank 0
    writes, and load_gift puts the trained Theta into a fresh single-process base model."""
    from gift_kernels.adapters.checkpoint import ADAPTER_FILE
    from gift_kernels.adapters.loading import load_gift

    directory = Path(_result(results, "fsdp2", 0)["adapter_dir"])
    assert (directory / ADAPTER_FILE).is_file()
    torch.manual_seed(7)
    model = load_gift(TinyLM(), directory)
    _assert_theta_equal(workers.theta_state(model), single["theta"], "save_gift on FSDP2")


def _load_example():
    spec = importlib.util.spec_from_file_location("train_ddp_example", REPO / "examples" / "train_ddp.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_train_ddp_example_runs_with_torchrun(tmp_path):
    """examples/train_ddp.py under ``torchrun --standalone --nproc_per_node 2`` on gloo, and
    its adapter loads back into a fresh base model."""
    out = tmp_path / "adapter"
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
        str(REPO / "examples" / "train_ddp.py"), "--steps", "5", "--save", str(out),
    ]  # fmt: skip
    env = dict(os.environ, OMP_NUM_THREADS="1")
    # a session of its own, so that on timeout torchrun and its workers are killed together
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=tmp_path,
                            start_new_session=True)  # fmt: skip
    try:
        stdout, stderr = proc.communicate(timeout=LAUNCH_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        stdout, stderr = proc.communicate()
        pytest.fail(f"torchrun still running after {LAUNCH_TIMEOUT_S}s (killed):\n{stdout}\n{stderr}")
    assert proc.returncode == 0, f"torchrun failed ({proc.returncode}):\n{stdout}\n{stderr}"
    assert "backend=gloo world=2" in stdout, stdout
    assert "ranks agree" in stdout, stdout

    example = _load_example()
    args = example.argparse.Namespace(seed=0, vocab=97, d_model=64, heads=4, layers=2, rank=8)
    initial = example.build_model(args)
    loaded = load_gift(example.TinyLM(args.vocab, args.d_model, args.heads, args.layers), out)
    assert loaded.gift_thetas["default"].keys() == initial.gift_thetas["default"].keys()
    for key, theta in initial.gift_thetas["default"].items():
        trained = loaded.gift_thetas["default"][key]
        assert torch.isfinite(trained.phi).all() and torch.isfinite(trained.psi).all(), key
        # psi starts at zero and phi at the seeded init: a trained, saved adapter moved both
        assert trained.psi.abs().max() > 0 and not torch.equal(trained.phi, theta.phi), f"Theta {key} not trained"


def test_train_ddp_example_save_failure_raises_on_every_rank(tmp_path, monkeypatch):
    """The example's save: rank 0 writes, and the outcome is broadcast, so a failed save raises
    on every rank (a rank left at the final barrier would wait for the group's timeout). The
    collective is stood in for: rank 0's view with a real failure (a file where the directory
    should go), then rank 1's view of that broadcast."""
    example = _load_example()
    args = example.argparse.Namespace(seed=0, vocab=97, d_model=64, heads=4, layers=2, rank=8)
    model = example.build_model(args)
    sent = []
    monkeypatch.setattr(example.dist, "broadcast", lambda t, src: sent.append(float(t)))
    blocker = tmp_path / "file"
    blocker.write_text("")
    with pytest.raises(Exception) as rank0:
        example.save_on_rank0(model, str(blocker / "adapter"), 0, torch.device("cpu"), lambda *a: None)
    assert sent == [1.0] and "could not save" not in str(rank0.value)
    monkeypatch.setattr(example.dist, "broadcast", lambda t, src: t.fill_(1))
    with pytest.raises(RuntimeError, match="rank 0 could not save the adapter"):
        example.save_on_rank0(model, str(tmp_path / "ok"), 1, torch.device("cpu"), lambda *a: None)
    sent.clear()
    monkeypatch.setattr(example.dist, "broadcast", lambda t, src: sent.append(float(t)))
    example.save_on_rank0(model, str(tmp_path / "ok"), 0, torch.device("cpu"), lambda *a: None)
    assert sent == [0.0] and (tmp_path / "ok").exists()


def test_fully_shard_gift_refuses_a_bad_plan_before_sharding():
    model = make_model()
    with pytest.raises(ValueError, match="blocks is empty"):
        fully_shard_gift(model, [])
    with pytest.raises(ValueError, match="cannot be the model itself"):
        fully_shard_gift(model, [model])
    # each shared Theta parameter counted once, however many layers use it
    assert len(theta_parameters(model)) == 12 and theta_parameters(model) == set(theta_params(model).values())
