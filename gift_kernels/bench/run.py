"""Running the benchmark: shape by shape, validate every row, time the valid ones, report.

:func:`bench_shape` is one shape: the problem (drawn on the device), the rows
(:func:`providers.build`), a warm-up and a validation call of each row inside its context
(:func:`validate.check`), then interleaved timing rounds of the valid rows, CUDA-graph replays
of the decode forwards, and the derived ratios. Each row is isolated: an exception in one row
(building, validating, timing) is that row's result.

:func:`run` runs the shapes in this process (the CPU bench) and calls ``on_update`` with every
finished shape, so reports are written as it goes. :func:`run_isolated` runs them in worker
processes (``python -m gift_kernels.bench.worker``): a worker whose CUDA context died
(a sticky CUDA error, a crash) is replaced by a fresh one that goes on from the shape it was
on, without the row that took it down; a time limit kills the worker's process group and
keeps what was finished. Both stop cleanly after a fatal device error and keep every
finished shape.
"""

from __future__ import annotations

import importlib
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence

import torch

from .problems import Problem, flops, l2_bytes, min_bytes, weights_beyond_l2
from .providers import MODES, Provider, Selection, auto_forms, build, saved_bytes, step
from .shapes import Shape
from .timing import DeviceTimer, HostTimer, graph_replay, sync
from .validate import References, check

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
FATAL_EXIT = 3  # a worker's exit status after a fatal device error (gift_kernels.bench.worker)


class FatalDeviceError(RuntimeError):
    """The device (CUDA context) is unusable: nothing more can run in this process."""

    def __init__(self, provider: Optional[str], message: str):
        super().__init__(message)
        self.provider = provider


def is_fatal(exc: BaseException) -> bool:
    """Whether ``exc`` leaves the CUDA context unusable (sticky errors), as opposed to a
    recoverable failure of one call (out of memory, a Python error, a declined input)."""
    if isinstance(exc, torch.cuda.OutOfMemoryError):
        return False
    text = f"{type(exc).__name__}: {exc}"
    marks = ("CUDA error", "cudaError", "CUBLAS_STATUS", "illegal memory access", "AcceleratorError",
             "unspecified launch failure", "device-side assert", "CUDA driver error")
    return any(m in text for m in marks)


@dataclass
class Spec:
    """What to run: shapes, device, dtype, timing, which rows; JSON-able for the workers."""

    shapes: Sequence[Shape]
    device: str = "cpu"
    dtype: str = "float32"
    rounds: int = 11
    budget_s: float = 0.05  # host timer: seconds per provider per sample
    timer: str = "host"  # "host" | "device"
    graph: bool = True  # decode shapes: CUDA-graph replays (CUDA only)
    include: Sequence[str] = ()
    exclude: Sequence[str] = ()
    backends: Optional[Sequence[str]] = None
    fusions: Sequence[str] = ("split", "fused")
    forms: Sequence[str] = ("epilogue", "input")
    lora: bool = True
    excluded: Dict[str, str] = field(default_factory=dict)  # row -> why (crashed a worker)
    faults: Dict[str, str] = field(default_factory=dict)  # row -> "build" | "call" | "wrong" (tests)
    # "module:function", imported where the shape runs (the worker too) and called as
    # hook(shape_index, row, phase) before each row's validation: what the tests use to make a
    # row crash its worker or hang (tests/support/bench_faults.py); None in real runs
    row_hook: Optional[str] = None
    deadline: Optional[float] = None  # wall clock (time.time()) after which no new shape starts
    shape_ids: Optional[List[int]] = None  # the shapes' indices in the caller's list (workers)

    def to_json(self) -> str:
        d = asdict(self)
        d["shapes"] = [asdict(s) for s in self.shapes]
        return json.dumps(d)

    @classmethod
    def from_json(cls, text: str) -> "Spec":
        d = json.loads(text)
        d["shapes"] = [Shape(**s) for s in d["shapes"]]
        return cls(**d)

    def selection(self) -> Selection:
        from ..ops import plan as backends

        return Selection(include=tuple(self.include), exclude=tuple(self.exclude),
                         backends=tuple(self.backends or backends.BACKENDS), forms=tuple(self.forms),
                         fusions=tuple(self.fusions), lora=self.lora, faults=dict(self.faults))

    def make_timer(self):
        return DeviceTimer() if self.timer == "device" else HostTimer(self.budget_s)

    def load_row_hook(self) -> Optional[Callable[[int, str, str], None]]:
        if not self.row_hook:
            return None
        module, _, name = self.row_hook.partition(":")
        if not name:
            raise ValueError(f"Spec.row_hook: expected 'module:function', got {self.row_hook!r}")
        return getattr(importlib.import_module(module), name)


# a row whose host time per call reaches this share of its GPU time times Python, not kernels
HOST_BOUND = 0.8


def _emit(events: Optional[Callable[[dict], None]], **event) -> None:
    if events is not None:
        events(event)


def _row_base(p: Provider) -> dict:
    return {"provider": p.name, "kind": p.kind, "backend": p.backend, "form": p.form, "fusion": p.fusion,
            "note": p.note}


def _median_ratios(mine: List[float], ref: List[float]):
    ratios = [a / b for a, b in zip(mine, ref) if b > 0]
    if not ratios:
        return None, None
    q = statistics.quantiles(ratios, n=4, method="inclusive") if len(ratios) >= 2 else [ratios[0]] * 3
    return statistics.median(ratios), [q[0], q[2]]


class _Guard:
    """Runs one row's step of one shape: a failure is that row's result (``why``); a fatal
    device error stops the shape (:class:`FatalDeviceError`, after emitting it)."""

    def __init__(self, spec: Spec, index: int, rows: Dict[str, dict], events, device: torch.device):
        self.spec, self.index, self.rows, self.events, self.device = spec, index, rows, events, device
        self.hook = spec.load_row_hook()

    def __call__(self, p: Provider, phase: str, fn):
        _emit(self.events, event="start", shape=self.index, provider=p.name, phase=phase)
        try:
            if phase == "validate" and self.hook is not None:
                self.hook(self.index, p.name, phase)
            return fn()
        except Exception as exc:
            msg = f"{type(exc).__name__}: {exc}".strip()[:600]
            if is_fatal(exc):
                _emit(self.events, event="fatal", shape=self.index, provider=p.name, phase=phase, error=msg)
                raise FatalDeviceError(p.name, f"{phase} of {p.name}: {msg}") from exc
            self.rows[p.name].update(valid=False, why=f"{phase} raised {msg}")
            if self.device.type == "cuda":
                torch.cuda.empty_cache()
            return None


def _rows_to_run(problem: Problem, spec: Spec):
    """The providers of this shape (without the rows a crash excluded) and the skipped ones."""
    provs, skipped = build(problem, spec.selection())
    for name, why in spec.excluded.items():
        if any(p.name == name for p in provs):
            skipped[name] = why
    return [p for p in provs if p.name not in spec.excluded], skipped


def _validate(provs: List[Provider], inp, rows: Dict[str, dict], guard: _Guard) -> List[Provider]:
    """Warm-up (compiles, autotuning) and validation, row by row: the valid rows."""
    refs = References()
    valid: List[Provider] = []
    for p in provs:
        if guard(p, "warm-up", lambda: step(p, inp)) is None and "why" in rows[p.name]:
            continue
        res = guard(p, "validate", lambda: check(p, inp, refs))
        if res is None:
            continue
        rows[p.name].update(res)
        if res["valid"]:
            valid.append(p)
    return valid


def _time_rounds(valid: List[Provider], inp, spec: Spec, rows: Dict[str, dict], guard: _Guard, progress):
    """Interleaved timing rounds (each round starts at the next row, so no row always runs
    first): ``(rows timed in every round they ran, {row: {mode: [seconds per round]}})``."""
    timer = spec.make_timer()
    states, timed = {}, []
    for p in valid:
        st = guard(p, "prepare", lambda: (timer.prepare(p, inp),))
        if st is not None:
            states[p.name] = st[0]
            timed.append(p)
    samples = {p.name: {m: [] for m in MODES + ("host",)} for p in timed}
    for rnd in range(spec.rounds):
        order = timed[rnd % len(timed):] + timed[: rnd % len(timed)] if timed else []
        for p in order:
            if "why" in rows[p.name]:
                continue  # failed in an earlier round
            s = guard(p, "time", lambda: timer.sample(p, inp, states[p.name]))
            if s is None:
                continue
            for m in MODES + ("host",):
                samples[p.name][m].append(s[m])
        if progress is not None:
            progress(rnd)
        if spec.deadline is not None and time.time() > spec.deadline and rnd >= 1:
            break
    return [p for p in timed if "why" not in rows[p.name] and samples[p.name]["fwd"]], samples


def _row_numbers(p: Provider, row: dict, s: Dict[str, List[float]], frozen: Optional[Dict[str, List[float]]],
                 shape: Shape, dtype: torch.dtype) -> None:
    """Medians, per-round samples, ratios to frozen with their IQR, and throughput of one row."""
    row["rounds"] = len(s["fwd"])
    for m in MODES:
        row[f"{m}_ms"] = statistics.median(s[m]) * 1e3
        row[f"{m}_samples_ms"] = [v * 1e3 for v in s[m]]  # per round: ratios between any two rows, with noise
        if frozen is not None:
            row[f"{m}_ratio"], row[f"{m}_ratio_iqr"] = _median_ratios(s[m], frozen[m])
    if p.kind != "gift":
        return
    fl, by = flops(shape), min_bytes(shape, torch.finfo(dtype).bits // 8)
    for m in ("fwd", "fwd+bwd"):
        sec = statistics.median(s[m])
        if sec > 0:
            row[f"{m}_tflop_s"] = fl[m] / sec / 1e12
            row[f"{m}_tb_s"] = by[m] / sec / 1e12


def _drop_failed_timings(provs: List[Provider], rows: Dict[str, dict]) -> None:
    """Rows that failed after validation are not timings."""
    for p in provs:
        if "why" in rows[p.name]:
            rows[p.name]["valid"] = False
            for key in [k for k in rows[p.name] if k.endswith(("_ms", "_ratio", "_iqr", "_s", "_us", "_bound"))]:
                del rows[p.name][key]


def bench_shape(shape: Shape, spec: Spec, index: int = 0, events=None, progress=None) -> dict:
    """One shape: build, validate, time. Raises :class:`FatalDeviceError` (after emitting it)
    when the device became unusable; every other failure is a row's result."""
    t_start = time.monotonic()
    dev = torch.device(spec.device)
    dtype = DTYPES[spec.dtype]
    decode_graphs = dev.type == "cuda" and spec.graph and shape.decode
    n_w = weights_beyond_l2(shape, dtype, l2_bytes(dev)) if decode_graphs else 1
    problem = Problem(shape, dtype, dev, n_weights=n_w)
    provs, skipped = _rows_to_run(problem, spec)
    rows: Dict[str, dict] = {p.name: _row_base(p) for p in provs}
    inp = problem.inputs()
    guard = _Guard(spec, index, rows, events, dev)

    valid = _validate(provs, inp, rows, guard)
    problem.clear_grads()
    for p in valid:
        for t in p.leaves(inp).values():
            t.grad = None
    if dev.type == "cuda":
        torch.cuda.empty_cache()

    timed, samples = _time_rounds(valid, inp, spec, rows, guard, progress)  # frozen must be valid for any ratio
    problem.clear_grads()
    # decode: graph replays cycling through the distinct weights
    graph = {}
    for p in timed if decode_graphs else ():
        t = guard(p, "graph", lambda: graph_replay(p, problem))
        if t is not None:
            graph[p.name] = t

    frozen = samples["frozen"] if any(p.name == "frozen" for p in timed) else None
    for p in timed:
        row = rows[p.name]
        _row_numbers(p, row, samples[p.name], frozen, shape, dtype)
        host, gpu = statistics.median(samples[p.name]["host"]), statistics.median(samples[p.name]["fwd+bwd"])
        row["host_us"] = host * 1e6  # host time per fwd+bwd call, beside its GPU time
        row["host_bound"] = dev.type == "cuda" and host >= HOST_BOUND * gpu
        if p.name in graph:
            row["graph_ms"] = graph[p.name] * 1e3
            if "frozen" in graph:
                row["graph_ratio"] = graph[p.name] / graph["frozen"]
        sb = guard(p, "saved-bytes", lambda: saved_bytes(p, inp))
        if sb is not None:
            row["saved_bytes"] = sb
    _drop_failed_timings(provs, rows)
    result = {
        "shape": asdict(shape), "label": str(shape), "rows": list(rows.values()), "skipped": skipped,
        "auto_form": auto_forms(problem, provs), "n_weights": n_w, "seconds": round(time.monotonic() - t_start, 1),
    }
    del problem
    if dev.type == "cuda":
        sync(dev)
        torch.cuda.empty_cache()
    return result


def run(spec: Spec, on_update: Optional[Callable[[List[dict], Optional[str]], None]] = None,
        progress=None, events=None) -> dict:
    """The shapes in this process. ``on_update(results, stopped)`` after every shape;
    returns ``{"results": [...], "stopped": why or None}``."""
    results: List[dict] = []
    stopped = None
    for j, shape in enumerate(spec.shapes):
        i = spec.shape_ids[j] if spec.shape_ids else j
        if spec.deadline is not None and time.time() > spec.deadline:
            stopped = f"time budget: stopped before {shape}"
            break
        try:
            res = bench_shape(shape, spec, i, events=events, progress=progress)
        except FatalDeviceError as exc:
            stopped = f"fatal device error at {shape}: {exc}"
            break
        results.append(res)
        _emit(events, event="shape", shape=i, result=res)
        if on_update is not None:
            on_update(results, None)
    if on_update is not None:
        on_update(results, stopped)
    return {"results": results, "stopped": stopped}


# ------------------------------------------------------------------ worker processes


def kill_group(proc: subprocess.Popen, grace_s: float = 5.0) -> None:
    """End a process started with ``start_new_session=True`` and everything it started."""
    if proc.poll() is not None:
        return
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(timeout=grace_s)
            return
        except subprocess.TimeoutExpired:
            continue


class _Watch:
    """What one worker reported: finished shapes, the row in flight, fatal errors (notes)."""

    def __init__(self, events_path: Path, spec: Spec, by_index: Dict[int, dict], notes: List[str], on_shape):
        self.path, self.spec, self.by_index, self.notes, self.on_shape = events_path, spec, by_index, notes, on_shape
        self.pos = 0
        self.in_flight = None  # (index into spec.shapes, row) of the last "start" event
        self.last_event = time.time()

    def read(self) -> None:
        """The events written since the last read (a partial last line is read next time)."""
        with open(self.path) as f:
            f.seek(self.pos)
            chunk = f.read()
        lines = chunk.split("\n")
        self.pos += len(chunk) - len(lines[-1])
        for line in lines[:-1]:
            if line.strip():
                self._event(json.loads(line))

    def _event(self, ev: dict) -> None:
        self.last_event = time.time()
        idx = ev["shape"]
        if ev["event"] == "start":
            self.in_flight = (idx, ev["provider"])
        elif ev["event"] == "shape":
            self.by_index[idx] = ev["result"]
            self.in_flight = None
            self.on_shape()
        elif ev["event"] == "fatal":
            self.notes.append(f"{self.spec.shapes[idx]}: fatal device error in {ev['provider']} ({ev['phase']}): "
                              f"{ev['error']}")


def _watch_worker(proc: subprocess.Popen, watch: _Watch, hard_deadline: Optional[float],
                  row_timeout_s: Optional[float]) -> Optional[str]:
    """Follow a worker until it exits (None), passes the hard deadline ("killed") or stays
    silent inside one row longer than ``row_timeout_s`` ("hung"); the last two kill its group."""
    while True:
        alive = proc.poll() is None
        watch.read()
        if not alive:
            return None
        if hard_deadline is not None and time.time() > hard_deadline:
            kill_group(proc)
            return "killed"
        if row_timeout_s is not None and watch.in_flight is not None and time.time() - watch.last_event > row_timeout_s:
            kill_group(proc)
            return "hung"
        time.sleep(0.2)


def _start_worker(spec: Spec, todo: List[int], excluded: Dict[str, str], hard_deadline: Optional[float],
                  tmp: Path, attempt: int, env, stdout):
    """A worker process on the shapes ``todo`` (indices into ``spec.shapes``): ``(proc, events path)``."""
    wspec = Spec(**{**asdict(spec), "shapes": [spec.shapes[i] for i in todo], "excluded": excluded,
                    "shape_ids": list(todo)})
    if hard_deadline is not None:
        wspec.deadline = min(spec.deadline or hard_deadline, hard_deadline - 5)
    spec_path, events_path = tmp / "spec.json", tmp / f"events{attempt}.jsonl"
    spec_path.write_text(wspec.to_json())
    events_path.write_text("")
    cmd = [sys.executable, "-m", "gift_kernels.bench.worker", str(spec_path), str(events_path)]
    proc = subprocess.Popen(cmd, env=env, start_new_session=True, stdout=stdout,
                            stderr=subprocess.STDOUT if stdout is not None else None)
    return proc, events_path


def run_isolated(spec: Spec, on_update: Optional[Callable[[List[dict], Optional[str]], None]] = None,
                 time_limit_s: Optional[float] = None, max_restarts: int = 4, env: Optional[dict] = None,
                 log: Callable[[str], None] = lambda msg: None, stdout=None,
                 row_timeout_s: Optional[float] = None) -> dict:
    """The shapes in worker processes, with a fresh worker after a fatal device error or a
    crash (the row in flight is excluded from then on) and a hard time limit (the worker's
    process group is killed; finished shapes are kept). Same return value as :func:`run`,
    plus ``notes`` (the restarts and why). ``stdout``: where the workers' output goes;
    ``row_timeout_s``: a worker silent that long inside one row is killed (a hung kernel costs
    that row, not the run)."""
    hard_deadline = time.time() + time_limit_s if time_limit_s is not None else None
    by_index: Dict[int, dict] = {}
    excluded = dict(spec.excluded)
    todo = list(range(len(spec.shapes)))
    stopped = None
    notes: List[str] = []
    restarts = 0

    def results():
        return [by_index[i] for i in sorted(by_index)]

    def on_shape():
        if on_update is not None:
            on_update(results(), None)

    with tempfile.TemporaryDirectory(prefix="gift_bench_") as tmp:
        while todo:
            proc, events_path = _start_worker(spec, todo, excluded, hard_deadline, Path(tmp), restarts, env, stdout)
            watch = _Watch(events_path, spec, by_index, notes, on_shape)
            ended = _watch_worker(proc, watch, hard_deadline, row_timeout_s)
            todo = [i for i in todo if i not in by_index]
            if ended == "killed":
                stopped = "time limit: the worker was stopped" + (f" at {spec.shapes[todo[0]]}" if todo else "")
                break
            if proc.returncode == 0:
                if todo:  # the worker's own deadline stopped it
                    stopped = f"time budget: stopped before {spec.shapes[todo[0]]}"
                break
            # a crash or a fatal device error: go on without the row in flight
            restarts += 1
            if watch.in_flight is not None:
                idx, row = watch.in_flight
                how = f"hung for more than {row_timeout_s:.0f} s" if ended == "hung" else f"exit status {proc.returncode}"
                why = f"took its worker down ({how}) at {spec.shapes[idx]}; excluded from the later shapes"
                excluded[row] = why
                notes.append(f"{spec.shapes[idx]}: {row} {why}")
                log(f"worker exited {proc.returncode} in {row} at {spec.shapes[idx]}; restarting without it")
            elif todo:
                notes.append(f"{spec.shapes[todo[0]]}: the worker exited {proc.returncode} outside any row; shape skipped")
                todo = todo[1:]
            if restarts > max_restarts:
                stopped = f"gave up after {restarts} worker restarts"
                break
    out = {"results": results(), "stopped": stopped, "notes": notes}
    if on_update is not None:
        on_update(out["results"], stopped)
    return out
