"""Clocks: interleaved rounds on the host clock (the CPU bench) and CUDA events on the GPU.

Both time every provider inside its context (:meth:`Provider.context`), forward and backward
alike. A timer has ``prepare(provider, inputs) -> state`` (warm-up, calibration) and
``sample(provider, inputs, state) -> {mode: seconds}``; :mod:`run` interleaves the providers
round by round (the order rotates each round) and takes medians of per-round ratios to
``frozen``, which cancels most of a shared machine's drift.

- :class:`HostTimer`: forward and backward timed within the same calls (forward, sync,
  backward, sync), each provider's repetitions calibrated to a time budget.
- :class:`DeviceTimer`: ``triton.testing.do_bench`` medians (CUDA events around each call,
  L2 flushed before each: W is read from DRAM as in a real step), a few interleaved rounds.
  ``bwd`` = ``fwd+bwd`` - ``fwd``; ``host``: the host time to enqueue one fwd+bwd (a row whose
  host time reaches its GPU time is host-bound: it times Python, not kernels).
- :func:`graph_replay`: decode-sized inference forwards replayed from one CUDA graph (launch
  overhead out of the number), cycling through the problem's distinct weights so that W
  comes from DRAM, not L2 (a graph replay flushes nothing).
"""

from __future__ import annotations

import math
import statistics
import time
from typing import Callable, Dict, Optional

import torch

from .problems import Inputs, Problem
from .providers import Provider


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _fwd_bwd(prov: Provider, inp: Inputs) -> Callable[[], None]:
    leaves = None

    def run():
        nonlocal leaves
        leaves = leaves or list(prov.leaves(inp).values())
        for t in leaves:
            t.grad = None
        with prov.context():
            prov.fn(inp).backward(inp.grad_out)

    return run


def _fwd(prov: Provider, inp: Inputs) -> Callable[[], None]:
    def run():
        with prov.context():
            prov.fn(inp)

    return run


def _infer(prov: Provider, inp: Inputs) -> Callable[[], None]:
    def run():
        with prov.context(), torch.no_grad():
            prov.fn(inp)

    return run


def mode_call(prov: Provider, inp: Inputs, mode: str) -> Callable[[], None]:
    """One call of ``mode`` (``fwd``, ``fwd+bwd`` or ``infer``) inside the provider's context,
    synchronised on a GPU (for host-clock timers such as pytest-benchmark)."""
    fn = {"fwd": _fwd, "fwd+bwd": _fwd_bwd, "infer": _infer}[mode](prov, inp)
    dev = inp.x.device

    def run():
        fn()
        sync(dev)

    return run


class HostTimer:
    """Host clock (perf_counter, synchronised on a GPU); repetitions calibrated per provider."""

    name = "host clock, interleaved rounds"

    def __init__(self, budget_s: float):
        self.budget_s = budget_s

    @staticmethod
    def _once(prov: Provider, inp: Inputs, reps: int):
        """Seconds per call of the forward and of the backward, measured in the same calls."""
        dev = inp.x.device
        fwd = bwd = 0.0
        leaves = list(prov.leaves(inp).values())
        for _ in range(reps):
            for t in leaves:
                t.grad = None
            with prov.context():
                sync(dev)
                t0 = time.perf_counter()
                y = prov.fn(inp)
                sync(dev)
                t1 = time.perf_counter()
                y.backward(inp.grad_out)
                sync(dev)
                t2 = time.perf_counter()
            fwd += t1 - t0
            bwd += t2 - t1
        return fwd / reps, bwd / reps

    def prepare(self, prov: Provider, inp: Inputs) -> int:
        """Warm up (allocator, oneDNN / cuBLAS plans) and return the repetitions per sample."""
        self._once(prov, inp, 2)
        f, b = self._once(prov, inp, 1)
        return max(1, min(1000, math.ceil(self.budget_s / max(f + b, 1e-7))))

    def sample(self, prov: Provider, inp: Inputs, reps: int) -> Dict[str, float]:
        f, b = self._once(prov, inp, reps)
        dev = inp.x.device
        with prov.context(), torch.no_grad():
            sync(dev)
            t0 = time.perf_counter()
            for _ in range(reps):
                prov.fn(inp)
            sync(dev)
            infer = (time.perf_counter() - t0) / reps
        return {"fwd": f, "bwd": b, "fwd+bwd": f + b, "infer": infer, "host": f + b}


class DeviceTimer:
    """CUDA events via ``triton.testing.do_bench`` (the median of each sample; L2 flushed
    before each call)."""

    name = "CUDA events (triton.testing.do_bench medians, L2 flushed before each call), interleaved rounds"

    def __init__(self, warmup_ms: float = 5.0, rep_ms: float = 25.0):
        self.warmup_ms, self.rep_ms = warmup_ms, rep_ms

    def _bench(self, fn) -> float:
        from triton.testing import do_bench

        return do_bench(fn, warmup=self.warmup_ms, rep=self.rep_ms, return_mode="median") * 1e-3

    def prepare(self, prov: Provider, inp: Inputs) -> None:
        _fwd_bwd(prov, inp)()  # compiles and autotuning happened in validation; one more warm call
        return None

    @staticmethod
    def _host(fn, dev: torch.device, calls: int = 5) -> float:
        """Seconds of host time per call to enqueue ``fn`` (the GPU idle at the start of each):
        the Python and launch cost a step pays whether or not the GPU is busy."""
        total = 0.0
        for _ in range(calls):
            sync(dev)
            t0 = time.perf_counter()
            fn()
            total += time.perf_counter() - t0
        sync(dev)
        return total / calls

    def sample(self, prov: Provider, inp: Inputs, state) -> Dict[str, float]:
        f = self._bench(_fwd(prov, inp))
        fb_fn = _fwd_bwd(prov, inp)
        fb = self._bench(fb_fn)
        return {"fwd": f, "bwd": max(fb - f, 0.0), "fwd+bwd": fb, "infer": self._bench(_infer(prov, inp)),
                "host": self._host(fb_fn, inp.x.device)}


def graph_replay(prov: Provider, problem: Problem, target_s: float = 2e-3, replays: int = 7) -> Optional[float]:
    """Seconds per inference forward, replayed from one CUDA graph that cycles through every
    weight of ``problem`` (None off CUDA). The calls are captured inside the provider's context."""
    dev = problem.device
    if dev.type != "cuda":
        return None
    inps = problem.all_inputs()
    with prov.context(), torch.no_grad():
        side = torch.cuda.Stream(dev)
        side.wait_stream(torch.cuda.current_stream(dev))
        with torch.cuda.stream(side):  # warm up off the capture (compiles, autotuning, plans)
            for inp in inps:
                prov.fn(inp)
            sync(dev)
            t0 = time.perf_counter()
            for inp in inps:
                prov.fn(inp)
            sync(dev)
            per_call = (time.perf_counter() - t0) / len(inps)
        torch.cuda.current_stream(dev).wait_stream(side)
        loops = max(1, min(256, math.ceil(target_s / max(per_call, 1e-6) / len(inps))))
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            for _ in range(loops):
                for inp in inps:
                    prov.fn(inp)
    graph.replay()
    sync(dev)
    times = []
    for _ in range(replays):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) * 1e-3 / (loops * len(inps)))
    del graph
    return statistics.median(times)
