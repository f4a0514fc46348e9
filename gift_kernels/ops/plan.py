"""The one chooser: which backend runs a GIFT op, in which form, decided once per kind of call
and cached; the one place that falls back; the form rule.

Backends. ``with gift_kernels.backend(name):`` > ``GIFT_KERNELS_BACKEND`` > ``auto``. A
backend (``torch``, ``triton``, ``cuda``) is two things (:class:`Backend`): a runtime that says
whether it can run on a device and whether it takes a call, and, per op, a launcher module
``gift_kernels.ops.<op folder>.<backend>`` (an op without one has no kernel there). Optional
backends are imported on first use; a failure to load is remembered and reported by
:func:`explain`, never raised at import. An explicitly requested backend that cannot run on
the device raises; one that runs there but declines a call (a dtype without a kernel, tensors
beyond 32-bit offsets, an op it has no kernel for) hands that call to the torch backend, and
:func:`last_backend` / :func:`explain` then name ``torch`` and say why. ``auto`` skips what
cannot run or declines.

Plans. :func:`choose` returns a :class:`Plan` -- backend, form, launchers, and why -- keyed on
what decides it: the op, the device, the dtypes of x and Theta, the shape bucket (M rounded up
to a power of two; d_out, d_in, r), grad mode, the requested backend and form. The first call
of a key decides; every later one is a dictionary lookup (no table walk, no import, no package
metadata); :func:`known` finds it for a call whose validated signature was seen with the key,
before the call is checked. The eager autograd Functions carry their plan to backward. Kernel
configurations are picked by the launchers from the cached tile tables
(:mod:`gift_kernels.ops.tiles`) and tuned once per tile key (:mod:`gift_kernels.ops.tiles.runtime`).

The form rule of ``gift_linear`` (``form="auto"``; an explicit form is always honoured):

- fp16 activations: ``epilogue``. The input-side form holds ``u = x + (x psi^T) phi^T`` in
  fp16, which can overflow where the merged layer is finite; the epilogue form never forms u.
- CPU, training: the torch backend's cost rule (:func:`torch_prefers_input`); without grad:
  the cheaper association (:func:`torch_infer_input`).
- CUDA: by measurement. The first call of a key times the candidate paths there (forms x
  backends that take the call, a few iterations each, CUDA events) and keeps the fastest for
  the process; :func:`explain` says what was timed and what won. Inside a CUDA-graph capture
  or a ``torch.compile`` trace nothing is timed: the cached choice, else the default -- the
  input-side form, cuBLAS (``F.linear``) on u and the first backend that takes ``gift_input``.
- A graph being traced takes :func:`traced_form` (pure arithmetic on possibly symbolic sizes).

The override is process-wide, not per thread: autograd runs CUDA backward passes on its own
worker threads, which must see the choice the forward saw. Contexts entered by several threads
may close in any order: each exit removes its own entry, and the most recently entered open
context wins.

Testing hooks: :func:`stubbed_kernels` (launches become no-ops: host cost), :func:`measuring`
(inject a timer, and measure on CPU too), :func:`clear` (forget every plan).
"""

from __future__ import annotations

import contextlib
import importlib
import logging
import os
import threading
from dataclasses import dataclass
from types import ModuleType
from typing import Callable, Dict, Iterator, List, Optional, Sequence, Tuple

import torch

from .checks import exceeds_offsets, n_rows

logger = logging.getLogger("gift_kernels")

ENV_VAR = "GIFT_KERNELS_BACKEND"
BACKENDS: Tuple[str, ...] = ("torch", "triton", "cuda")
CHOICES: Tuple[str, ...] = ("auto",) + BACKENDS
FORMS: Tuple[str, ...] = ("auto", "epilogue", "input")


class Backend:
    """What a backend provides.

    Its runtime (``_RUNTIMES``; the torch backend's is :class:`_TorchRuntime`):
        ``unavailable_reason(device) -> str | None``: why it cannot run on ``device``.
        ``declines(op, x, n) -> str | None``: why it cannot take one call of ``op`` with
        input ``x (..., d_in)`` and output width ``n`` (inputs already validated).
    Per op, a module ``gift_kernels.ops.<folder>.<backend>`` with the op's launchers
    (``_LAUNCHERS``); each op's contract is stated once, in its ``op.py``:
        ``gift_linear``: ``gift_fwd(x, W, b, phi, psi) -> (y, t, B)``,
        ``gift_bwd(g, x, t, B, W, phi, psi, needs) -> (dx, dW, db, dphi, dpsi)``
        ``gift_input``: ``input_fwd(x, phi, psi) -> (u, t)``, ``input_bwd(du, x, t, phi, psi, needs)``
        ``gift_mixed``: ``mixed_fwd(x, phis, psis, ids) -> (u, t)``, ``mixed_bwd(du, x, t, phis, psis, ids, needs)``
    """


# op -> (folder, forward launcher, backward launcher)
_LAUNCHERS = {
    "gift_linear": ("linear", "gift_fwd", "gift_bwd"),
    "gift_input": ("input", "input_fwd", "input_bwd"),
    "gift_mixed": ("mixed", "mixed_fwd", "mixed_bwd"),
}
_RUNTIMES = {
    "triton": "gift_kernels.ops.tiles.runtime",
    "cuda": "gift_kernels.ops.cuda.extension",
}


class _TorchRuntime:
    """The torch backend runs wherever ATen does and takes every validated call."""

    @staticmethod
    def unavailable_reason(device: torch.device) -> Optional[str]:
        return None

    @staticmethod
    def declines(op: str, x: torch.Tensor, n: int) -> Optional[str]:
        return None


_lock = threading.RLock()
_loaded: Dict[str, object] = {"torch": _TorchRuntime}
_load_errors: Dict[str, str] = {}
_launchers: Dict[Tuple[str, str], Optional[ModuleType]] = {}
_launcher_errors: Dict[Tuple[str, str], str] = {}
_override: List[Tuple[object, str]] = []  # (token, name), innermost last
_last: Dict[str, Tuple[str, str]] = {}  # device type -> (backend, why)
_fallback_logged: set = set()


def _check_name(name, source: str) -> str:
    if not isinstance(name, str):
        raise TypeError(f"gift_kernels: backend name from {source} must be a str, one of {CHOICES}; got {name!r}")
    name = name.strip().lower()
    if name not in CHOICES:
        raise ValueError(f"gift_kernels: unknown backend {name!r} from {source}; choose one of {CHOICES}")
    return name


def requested() -> str:
    """The backend asked for: the innermost open ``backend()`` context, else the env var (read
    on every call), else ``auto``."""
    if _override:
        with _lock:
            if _override:
                return _override[-1][1]
    env = os.environ.get(ENV_VAR)
    if env is None:
        return "auto"
    name = _env_names.get(env)
    if name is None:
        name = _env_names[env] = _check_name(env, f"${ENV_VAR}")
    return name


_env_names: Dict[str, str] = {}  # the env var's values seen, checked once each


@contextlib.contextmanager
def backend(name: str) -> Iterator[str]:
    """Run GIFT ops inside the block on backend ``name`` (``auto``, ``torch``, ``triton``, ``cuda``)."""
    name = _check_name(name, "gift_kernels.backend()")
    token = object()
    with _lock:
        _override.append((token, name))
    try:
        yield name
    finally:
        with _lock:  # remove this context's own entry, wherever it is now
            for i in range(len(_override) - 1, -1, -1):
                if _override[i][0] is token:
                    del _override[i]
                    break


# ------------------------------------------------------------------ availability


def load(name: str):
    """Import backend ``name``'s runtime, or return None and remember why not."""
    if name in _loaded:
        return _loaded[name]
    if name in _load_errors:
        return None
    with _lock:
        if name in _loaded:
            return _loaded[name]
        try:
            mod = importlib.import_module(_RUNTIMES[name])
        except Exception as exc:  # any failure to load is a reason to report, not to crash
            _load_errors[name] = f"{type(exc).__name__}: {exc}"
            return None
        _loaded[name] = mod
        return mod


def launchers(name: str, op: str) -> Optional[ModuleType]:
    """Backend ``name``'s launcher module for ``op`` (None: it has no kernel for the op, or the
    module failed to load; :func:`_no_kernel` says which)."""
    key = (name, op)
    if key in _launchers:
        return _launchers[key]
    folder = _LAUNCHERS[op][0]
    path = f"gift_kernels.ops.{folder}.{name}"
    with _lock:
        try:
            mod = importlib.import_module(path)
        except ModuleNotFoundError as exc:
            if exc.name != path:
                _launcher_errors[key] = f"{type(exc).__name__}: {exc}"
            mod = None
        except Exception as exc:
            _launcher_errors[key] = f"{type(exc).__name__}: {exc}"
            mod = None
        _launchers[key] = mod
    return mod


def _no_kernel(name: str, op: str) -> str:
    err = _launcher_errors.get((name, op))
    return f"its {op} launchers failed to load ({err})" if err else f"it has no {op} kernel"


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def supports(name: str, device: torch.device) -> Tuple[bool, str]:
    """Whether backend ``name`` can run on ``device``; if not, why."""
    device = torch.device(device)
    if name == "triton" and device.type == "cpu" and not _interpreting():
        return False, "triton runs CPU tensors only under TRITON_INTERPRET=1 (set before triton is imported)"
    if name == "cuda" and device.type != "cuda":
        return False, f"the CUDA extension runs only on cuda tensors, not {device.type}"
    if name == "triton" and device.type not in ("cuda", "cpu"):
        return False, f"triton does not run on {device.type} tensors"
    runtime = load(name)
    if runtime is None:
        return False, f"could not be loaded ({_load_errors[name]})"
    reason = runtime.unavailable_reason(device)
    if reason:
        return False, reason
    return True, "always available" if name == "torch" else "available"


def _declines(name: str, op: str, x: torch.Tensor, n: int) -> Optional[str]:
    if launchers(name, op) is None:
        return _no_kernel(name, op)
    return _loaded[name].declines(op, x, n)


def _auto_order(device: torch.device) -> Tuple[str, ...]:
    return ("triton", "cuda", "torch") if device.type == "cuda" else ("torch",)


def _pick_backend(op: str, x: torch.Tensor, n: int, req: str) -> Tuple[str, str, Optional[str]]:
    """(backend, why, a fallback note to log once or None) for ``op``'s launchers."""
    device = x.device
    if req != "auto":
        ok, why = supports(req, device)
        if not ok:
            raise RuntimeError(f"gift_kernels: backend {req!r} was requested but cannot run on {device}: {why}")
        declined = _declines(req, op, x, n)
        if declined is None:
            return req, "requested", None
        note = f"backend {req!r} declined this {op} call ({declined}); the torch backend ran it"
        return "torch", note, note
    skipped = []
    for name in _auto_order(device):
        ok, why = supports(name, device)
        if ok:
            why = _declines(name, op, x, n)
            if why is None:
                detail = "; ".join(skipped) if skipped else f"first choice for {device.type}"
                note = f"using backend {name!r} on {device} because {'; '.join(skipped)}" if skipped else None
                return name, "auto: " + detail, note
            why = f"declined this call: {why}"
        skipped.append(f"{name} skipped ({why})")
    raise AssertionError("the torch backend takes every call")  # pragma: no cover


def _candidate_backends(op: str, x: torch.Tensor, n: int) -> List[str]:
    """Every backend that can run ``op`` on x's device and takes this call, in auto's order."""
    return [name for name in _auto_order(x.device)
            if supports(name, x.device)[0] and _declines(name, op, x, n) is None]


# ------------------------------------------------------------------ the form rule


# FLOP-equivalents per element of a new M x d_in buffer (allocated, first touched, written in
# full and read back): what the input-side form pays twice per training step beyond the frozen
# layer (u in forward, dx in backward) where the epilogue adds into y and dx in place. Fitted to
# one square shape's crossover on the development CPU (benchmarks/NOTES.md).
ALLOC_FLOPS = 16


def torch_prefers_input(m, n, k, r) -> bool:
    """Whether the input-side form is cheaper than the epilogue form for a training step on the
    torch backend. Extra FLOPs over the frozen layer (forward + input and Theta grads):
    epilogue ``2r (3MK + 3MN + 2NK)``, input-side ``2r * 6MK``. The epilogue's ``2NK`` terms are
    ``B = W phi`` and ``dphi = W^T dB``, full passes over W that cost as much as the frozen GEMM
    when M ~ r; the input-side form never reads W, but allocates two new M x K buffers (u, and
    dx: the epilogue updates y and dx in place), each :data:`ALLOC_FLOPS` per element. Input side
    when ``12rMK + 2 ALLOC_FLOPS MK < 2r (3MK + 3MN + 2NK)``: at small M and for square layers up
    to M ~ 2rK / ALLOC_FLOPS (2K at r 16), the epilogue beyond, and for wide-in, narrow-out layers
    at large M. Pure arithmetic: sizes may be symbolic."""
    return 12 * r * m * k + 2 * ALLOC_FLOPS * m * k < 2 * r * (3 * m * k + 3 * m * n + 2 * n * k)


def torch_infer_input(m, n, k, r) -> bool:
    """Without grad nothing is saved, so take the cheaper association: input-side
    ``(x + (x psi^T) phi^T) W^T`` costs 4MKr extra FLOPs and needs no ``B = W phi``; the
    epilogue costs 2r(MK + NK + MN). At decode sizes (M ~ r) the input side avoids B's full
    pass over W, which costs as much as the frozen GEMM itself."""
    return m * k < n * (k + m)


def traced_form(device_type: str, x_dtype: torch.dtype, m, n, k, r, training: bool) -> str:
    """``form="auto"`` for a graph being traced by ``torch.compile``: pure arithmetic on
    (possibly symbolic) sizes, so Dynamo guards on the outcome; the backend stays a run-time
    decision inside the registered ops. CUDA takes the default (no timing in a trace)."""
    if x_dtype == torch.float16:
        return "epilogue"
    if device_type != "cpu":
        return "input"
    return "input" if cpu_rule(m, n, k, r, training) else "epilogue"


def cpu_rule(m, n, k, r, training: bool) -> bool:
    """Whether the CPU form rule (:func:`torch_prefers_input` in training, else
    :func:`torch_infer_input`) takes the input side, evaluated at M's bucket (M rounded up to a
    power of two) as the plan's key is: an eager call and a traced graph of the same sizes decide
    alike. Both rules hold below a crossover in M (their difference is linear in M), so while
    tracing, where M may be symbolic (dynamic shapes), this finds the largest bucket the rule
    takes and compares M with it: one guard on M, no specialization on its value."""
    rule = torch_prefers_input if training else torch_infer_input
    if not torch.compiler.is_compiling():  # (a traced M may be symbolic; Dynamo shows it as an int)
        return rule(_bucket(m), n, k, r)
    last, p = 0, 1
    while p <= 1 << 40 and rule(p, n, k, r):
        last, p = p, 2 * p
    return m <= last


# below this many rows a training call over a base that keeps its input stays input-side: the
# epilogue's two extra dequantizations (passes over d_out x d_in) are then a large share of a
# small GEMM (2 M d_out d_in), and the u it would save the base from keeping is small
EPILOGUE_MIN_ROWS = 256


def module_form(form: str, *, can_dequantize: bool, keeps_input: bool, n_chunks: int, rows: int,
                training: bool) -> str:
    """The form rule for a module base run as a black box (a quantized layer,
    :func:`gift_kernels.nn.linear.module_form`). ``"auto"``, when the base's kind can
    dequantize: epilogue for several row chunks (one base call instead of one per chunk), and
    for a training call of at least :data:`EPILOGUE_MIN_ROWS` rows over a base that keeps its
    whole input (the base then keeps x, alive anyway, not a new u); otherwise input (it never
    reads the weight). An explicit form is returned as is."""
    if form != "auto":
        return form
    keeps = can_dequantize and keeps_input and training and rows >= EPILOGUE_MIN_ROWS
    return "epilogue" if can_dequantize and (n_chunks > 1 or keeps) else "input"


# ------------------------------------------------------------------ plans


@dataclass(frozen=True)
class Plan:
    """One decision: ``op`` runs in ``form`` on ``backend`` through ``fwd`` / ``bwd`` (the
    launchers of the form's op: for ``gift_linear`` in the input-side form, ``gift_input``'s,
    and the caller applies ``F.linear`` to u). ``timed``: what ``auto`` measured, if anything."""

    op: str
    form: str
    backend: str
    why: str
    fwd: Callable
    bwd: Callable
    timed: Tuple[Tuple[str, float], ...] = ()

    @property
    def label(self) -> str:
        return f"{self.form}/{self.backend}"


_plans: Dict[tuple, Plan] = {}
# (op, validated signature, M bucket, training, requested, form, exceeds) -> (plan, device type, _last's entry)
_validated: Dict[tuple, Tuple[Plan, str, Tuple[str, str]]] = {}
_measured: Dict[tuple, str] = {}  # plan key -> what explain() says about the measurement


def _bucket(m: int) -> int:
    """The M bucket of a plan key: M rounded up to a power of two."""
    return 1 << (m - 1).bit_length() if m > 1 else m


def _form_op(op: str, form: str) -> str:
    return "gift_input" if op == "gift_linear" and form == "input" else op


def _make(op: str, form: str, name: str, why: str, timed=()) -> Plan:
    form_op = _form_op(op, form)
    mod = launchers(name, form_op)
    _, fwd, bwd = _LAUNCHERS[form_op]
    return Plan(op, form, name, why, getattr(mod, fwd), getattr(mod, bwd), timed)


def _static_form(op: str, x: torch.Tensor, n: int, r: int, training: bool, form: str, req: str) -> Tuple[str, str]:
    """(form, why) without measurement."""
    if op != "gift_linear":
        return "input", "the op's only form"
    if form != "auto":
        return form, "requested"
    if x.dtype == torch.float16:
        return "epilogue", "fp16 activations: u = x + (x psi^T) phi^T could overflow fp16"
    m, k = n_rows(x), x.shape[-1]
    if x.device.type != "cuda":
        return ("input" if cpu_rule(m, n, k, r, training) else "epilogue"), "the torch cost rule"
    if req != "auto" and supports(req, x.device)[0] and launchers(req, "gift_input") is None:
        return "epilogue", f"backend {req!r} was requested and has no input-side kernel"
    return "input", "the CUDA default (cuBLAS on u)"


Trial = Callable[[Plan], None]  # runs one call (forward, and backward when training) on a plan


def choose(op: str, x: torch.Tensor, n: int, theta: torch.Tensor, *, training: bool, form: str = "auto",
           trial: Optional[Trial] = None, signature: Optional[tuple] = None) -> Plan:
    """The plan of one call of ``op`` on ``x (..., d_in)`` with output width ``n`` and Theta ``theta``
    (``phi`` or the bank ``phis``: its dtype and rank). ``trial`` lets ``auto`` time the
    candidates on CUDA (without it, or where nothing may be timed, the default is taken).
    ``signature``: the call's validated signature (:mod:`gift_kernels.ops.checks`); a cached
    plan is then also found by :func:`known`, before any check."""
    req = requested()
    m, k = n_rows(x), x.shape[-1]
    device = x.device
    bucket, exceeds = _bucket(m), exceeds_offsets(op, x, n, m)
    key = (op, device, x.dtype, theta.dtype, bucket, n, k, theta.shape[-1], training, req, form, exceeds)
    plan = _plans.get(key)
    if plan is None:
        with _lock:
            plan = _plans.get(key)
            if plan is None:
                plan = _decide(key, op, x, n, theta.shape[-1], training, form, req, trial)
                if plan is not None:
                    _plans[key] = plan
        if plan is None:  # a capture or trace before the key was measured: default, not cached
            plan = _default(op, x, n, theta.shape[-1], training, form, req)
            signature = None
    if signature is not None:
        with _lock:  # only while the plan is still cached: a clear() since must not be outlived
            if _plans.get(key) is plan:
                _validated[(op, signature, bucket, training, req, form, exceeds)] = (
                    plan, device.type, (plan.backend, plan.why))
    _last[device.type] = (plan.backend, plan.why)
    return plan


def known(op: str, signature: Optional[tuple], x: torch.Tensor, n: int, *, training: bool,
          form: str = "auto") -> Optional[Plan]:
    """The cached plan of a call whose validated signature was seen with this plan key (None
    otherwise: the caller checks the call, then asks :func:`choose`). One tuple and one
    dictionary lookup: a call of a kind already run skips its checks and the plan key's own
    construction, which cost more host time than the rest of the package's Python per call."""
    if signature is None:
        return None
    m = n_rows(x)
    hit = _validated.get((op, signature, _bucket(m), training, requested(), form, exceeds_offsets(op, x, n, m)))
    if hit is None:
        return None
    _last[hit[1]] = hit[2]
    return hit[0]


def _default(op, x, n, r, training, form, req) -> Plan:
    chosen, why = _static_form(op, x, n, r, training, form, req)
    name, bwhy, note = _pick_backend(_form_op(op, chosen), x, n, req)
    if note and (x.device.type, note) not in _fallback_logged:
        _fallback_logged.add((x.device.type, note))
        logger.warning("gift_kernels: %s", note)
    return _make(op, chosen, name, f"{bwhy}; form {chosen}: {why}" if op == "gift_linear" else bwhy)


def _decide(key, op, x, n, r, training, form, req, trial) -> Optional[Plan]:
    if not _should_measure(x.device, req, form, trial):
        return _default(op, x, n, r, training, form, req)
    if _no_timing_now(x.device):
        return None
    if op != "gift_linear":
        forms: Tuple[str, ...] = ("input",)
    else:  # fp16: the epilogue only (the form rule)
        forms = ("epilogue",) if x.dtype == torch.float16 else ("input", "epilogue")
    cands = [(f, name) for f in forms for name in _candidate_backends(_form_op(op, f), x, n)]
    if len(cands) < 2:
        return _default(op, x, n, r, training, form, req)
    times = []
    for f, name in cands:
        plan = _make(op, f, name, "")
        times.append((plan.label, _timer[0](lambda p=plan: trial(p), plan.label)))
    best = min(range(len(cands)), key=lambda i: times[i][1])
    f, name = cands[best]
    summary = ", ".join(f"{label} {ms:.3f} ms" for label, ms in times)
    why = f"auto: measured {summary}; {times[best][0]} won"
    _measured[key] = why
    return _make(op, f, name, why, tuple(times))


# ------------------------------------------------------------------ measurement


def _event_timer(fn: Callable[[], None], label: str = "", iters: int = 3) -> float:
    """Milliseconds per call of ``fn`` on the current CUDA stream (one warm-up call, which
    also tunes the kernels, then ``iters`` timed with CUDA events)."""
    fn()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(iters):
        fn()
    end.record()
    end.synchronize()
    return start.elapsed_time(end) / iters


Timer = Callable[[Callable[[], None], str], float]  # (run one call, "form/backend") -> milliseconds
_timer: List[Timer] = [_event_timer]
_measure_devices: List[Tuple[str, ...]] = [("cuda",)]


def _should_measure(device: torch.device, req: str, form: str, trial) -> bool:
    return trial is not None and req == "auto" and form == "auto" and device.type in _measure_devices[0]


def _no_timing_now(device: torch.device) -> bool:
    """Inside a CUDA-graph capture or a torch.compile trace: nothing may synchronise or time."""
    if torch.compiler.is_compiling():
        return True
    return device.type == "cuda" and torch.cuda.is_current_stream_capturing()


@contextlib.contextmanager
def measuring(timer: Timer, devices: Sequence[str] = ("cuda", "cpu")) -> Iterator[None]:
    """Testing hook: ``auto`` measures with ``timer(run, label) -> milliseconds`` on ``devices``
    (CPU included, so the decision logic is tested without a GPU; ``label`` is the candidate's
    ``form/backend``). Plans are forgotten on entry and exit."""
    prev = _timer[0], _measure_devices[0]
    _timer[0], _measure_devices[0] = timer, tuple(devices)
    clear()
    try:
        yield
    finally:
        _timer[0], _measure_devices[0] = prev
        clear()


@contextlib.contextmanager
def stubbed_kernels() -> Iterator[None]:
    """Testing hook (host cost): every Triton kernel launch of the package is skipped, so a
    call runs all of the package's Python -- plans, tiles, buffers, grids -- and no kernel.
    Outputs are correctly shaped, their values undefined. Used with ``TRITON_INTERPRET=1`` on
    CPU to measure and test the host cost of the Triton paths
    (:mod:`gift_kernels.bench.host_cost`)."""
    from .tiles import runtime

    with runtime.skipped_kernel_runs():
        yield


def clear() -> None:
    """Forget every plan and measurement (tests; after the environment changed)."""
    with _lock:
        _plans.clear()
        _validated.clear()
        _measured.clear()


# ------------------------------------------------------------------ reporting


def ran(plan: Plan, device_type: str) -> None:
    """Record that ``plan`` ran a pass on ``device_type`` (the eager backward passes, which
    reuse their forward's plan, say so here for :func:`last_backend`)."""
    _last[device_type] = (plan.backend, plan.why)


def last_backend(device_type: str = "cpu") -> Optional[str]:
    """The backend that ran the most recent GIFT op on ``device_type`` (None if none ran)."""
    entry = _last.get(device_type)
    return None if entry is None else entry[0]


def explain(device: Optional[torch.device] = None) -> str:
    """A human-readable report: what was requested, what can run where, what last ran and why,
    and what ``auto`` measured."""
    lines = [f"requested: {requested()} (context > ${ENV_VAR} > auto)"]
    devices = [torch.device(device)] if device is not None else [torch.device("cpu")]
    if device is None and torch.cuda.is_available():
        devices.append(torch.device("cuda"))
    for dev in devices:
        lines.append(f"{dev.type}:")
        for name in BACKENDS:
            ok, why = supports(name, dev)
            lines.append(f"  {name:<7} {'yes' if ok else 'no '}  {why}")
        if dev.type in _last:
            name, why = _last[dev.type]
            lines.append(f"  last ran: {name} ({why})")
        for key, why in list(_measured.items()):
            if key[1].type == dev.type:
                op, _, xd, td, mb, n, k, r, training = key[:9]
                what = f"{op} M<={mb} d_in {k} -> d_out {n} r {r} {str(xd).replace('torch.', '')}"
                lines.append(f"  {what} {'train' if training else 'infer'}: {why}")
    return "\n".join(lines)
