"""What the benchmark times: one :class:`Provider` per row, built for one :class:`Problem`.

    frozen                 F.linear(x, W, b): the floor
    authors                the authors' formulation (dense delta = (W phi) psi, a 2nd GEMM)
    peft-lora              PEFT LoRA at the same rank, PEFT's defaults (a 16-bit base gets a
                           float32 adapter: ``autocast_adapter_dtype=True``)
    peft-lora-<dtype>      the same with the adapter in the base's dtype (16-bit bases only)
    gift-<backend>-<form>[-<fusion>]
                           this package: every backend that runs here (torch, triton, cuda),
                           each form (``epilogue``: y = x W^T + (x psi^T)(W phi)^T + b;
                           ``input``: the base GEMM on u = x + (x psi^T) phi^T, i.e. cuBLAS /
                           oneDNN + the input transform) and, for the Triton epilogue kernels,
                           each fusion variant (split, fused) where they differ.

A provider's call runs inside :meth:`Provider.context` (its backend and its Triton fusion
variant, both as context managers: nothing is left set behind it), and so must its backward:
:func:`step` runs both inside it and reads :func:`gift_kernels.last_backend` right after each.
Building a provider never raises: a failure (peft missing, an adapter that will not build) is
a reason in ``skipped``.
"""

from __future__ import annotations

import contextlib
import fnmatch
from dataclasses import dataclass, field
from typing import Callable, Dict, Iterator, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from ..ops import plan as backends
from ..ops.functional import gift_linear
from ..ops.linear.reference import gift_linear_authors
from ..ops import tiles as triton_configs
from .problems import Inputs, Problem
from .shapes import Shape

MODES = ("fwd", "bwd", "fwd+bwd", "infer")  # infer: forward under torch.no_grad()
FORMS = ("epilogue", "input")
FUSIONS = ("split", "fused")


@dataclass
class Provider:
    name: str
    kind: str  # what it computes: "frozen", "gift" (GIFT, any formulation) or "lora"
    fn: Callable[[Inputs], torch.Tensor]  # forward (autograd when enabled)
    leaves: Callable[[Inputs], Dict[str, torch.Tensor]]  # tensors whose grads are validated
    backend: Optional[str] = None  # the GIFT backend that must run forward and backward
    form: Optional[str] = None
    fusion: Optional[str] = None
    note: str = ""
    lora: Optional[Tuple[torch.Tensor, torch.Tensor, float]] = None  # (A, B, scale) for its reference

    @contextlib.contextmanager
    def context(self) -> Iterator[None]:
        """The provider's backend and fusion variant, entered for forward and backward alike."""
        with contextlib.ExitStack() as stack:
            if self.backend is not None:
                stack.enter_context(backends.backend(self.backend))
            if self.fusion is not None:
                stack.enter_context(triton_configs.fusion(self.fusion))
            yield


@dataclass
class StepResult:
    y: torch.Tensor
    backend_fwd: Optional[str]
    backend_bwd: Optional[str]


def _forget_last_backend(device_type: str) -> None:
    # so that a row whose call ran no GIFT op reads None, not the previous row's backend
    backends._last.pop(device_type, None)


def step(prov: Provider, inp: Inputs, backward: bool = True) -> StepResult:
    """One forward (and backward with ``inp.grad_out``) inside the provider's context,
    recording which GIFT backend ran each (None: no GIFT op ran)."""
    dev = inp.x.device.type
    _forget_last_backend(dev)
    with prov.context():
        y = prov.fn(inp)
        fwd = backends.last_backend(dev)
        bwd = None
        if backward:
            _forget_last_backend(dev)
            y.backward(inp.grad_out)
            bwd = backends.last_backend(dev)
    return StepResult(y, fwd, bwd)


def backend_mismatch(prov: Provider, res: StepResult, backward: bool = True) -> Optional[str]:
    """Why the backends that ran differ from the provider's label (None: they match)."""
    want = prov.backend
    got = [("forward", res.backend_fwd)] + ([("backward", res.backend_bwd)] if backward else [])
    bad = [f"{what} ran on {ran!r}" for what, ran in got if ran != want]
    if bad:
        return f"labelled backend {want!r} but " + ", ".join(bad)
    return None


# ------------------------------------------------------------------ the rows


def _gift_leaves(inp: Inputs) -> Dict[str, torch.Tensor]:
    return {"x": inp.x, "phi": inp.phi, "psi": inp.psi}


def _x_leaf(inp: Inputs) -> Dict[str, torch.Tensor]:
    return {"x": inp.x}


def _frozen(inp: Inputs) -> torch.Tensor:
    return F.linear(inp.x, inp.weight, inp.bias)


def _authors(inp: Inputs) -> torch.Tensor:
    return gift_linear_authors(inp.x, inp.weight, inp.bias, inp.phi, inp.psi)


def _gift(form: str) -> Callable[[Inputs], torch.Tensor]:
    def call(inp: Inputs) -> torch.Tensor:
        return gift_linear(inp.x, inp.weight, inp.bias, inp.phi, inp.psi, form=form)

    return call


def peft_lora(problem: Problem, adapter_dtype_from_base: bool) -> Provider:
    """PEFT LoRA at the problem's rank over the problem's (frozen) weight; lora_B is drawn
    non-zero (PEFT starts it at zero: time a trained adapter). ``adapter_dtype_from_base``:
    ``autocast_adapter_dtype=False`` (the adapter in the base's dtype) instead of PEFT's
    default (a 16-bit base gets a float32 adapter)."""
    from peft import LoraConfig, get_peft_model  # an optional dependency: ImportError -> skipped

    shape, dev = problem.shape, problem.device
    base = nn.Sequential()
    base.add_module("proj", nn.utils.skip_init(nn.Linear, shape.d_in, shape.d_out, device=dev, dtype=problem.dtype))
    base.proj.weight = nn.Parameter(problem.weight, requires_grad=False)
    base.proj.bias = nn.Parameter(problem.bias, requires_grad=False)
    cfg = LoraConfig(r=shape.r, lora_alpha=shape.r, target_modules=["proj"], lora_dropout=0.0)
    model = get_peft_model(base, cfg, autocast_adapter_dtype=not adapter_dtype_from_base)
    layer = model.base_model.model.proj
    g = torch.Generator(device=dev).manual_seed(1)
    with torch.no_grad():
        for w in layer.lora_B.values():
            w.weight.normal_(0, 0.02, generator=g)
    a, b = layer.lora_A["default"].weight, layer.lora_B["default"].weight
    params: Dict[int, nn.Parameter] = {id(problem.weight): layer.base_layer.weight}
    bparams: Dict[int, nn.Parameter] = {id(problem.bias): layer.base_layer.bias}

    def call(inp: Inputs) -> torch.Tensor:
        if layer.base_layer.weight is not params.get(id(inp.weight)):  # another of the rotated weights
            layer.base_layer.weight = params.setdefault(id(inp.weight), nn.Parameter(inp.weight, requires_grad=False))
            layer.base_layer.bias = bparams.setdefault(id(inp.bias), nn.Parameter(inp.bias, requires_grad=False))
        return layer(inp.x)

    def leaves(inp: Inputs) -> Dict[str, torch.Tensor]:
        return {"x": inp.x, "lora_A": a, "lora_B": b}

    name = "peft-lora" if not adapter_dtype_from_base else f"peft-lora-{str(problem.dtype).replace('torch.', '')}"
    note = f"adapter {str(a.dtype).replace('torch.', '')}"
    return Provider(name, "lora", call, leaves, note=note, lora=(a, b, float(layer.scaling["default"])))


def triton_fusions(shape: Shape, dtype: torch.dtype, theta_dtype: torch.dtype, device) -> Tuple[Tuple[str, ...], str]:
    """The Triton fusion variants that differ for this problem, and why only one when so:
    decode sizes always run the fused kernel; fp32 and ranks without a kept fused tile split."""
    device = torch.device(device)
    cap = torch.cuda.get_device_capability(device) if device.type == "cuda" else (9, 0)
    elem = torch.finfo(dtype).bits // 8
    theta_elem = torch.finfo(theta_dtype).bits // 8
    fusable = triton_configs.fusable(cap, elem, theta_elem, shape.r, shape.m)
    if shape.m <= triton_configs.DECODE_M:
        return ("auto",), "decode: one kernel whatever the variant" + ("" if fusable else " (split: no fused tile)")
    if not fusable:
        return ("auto",), "always split here (no kept fused tile)"
    return FUSIONS, ""


def _selected(name: str, include: Sequence[str], exclude: Sequence[str]) -> bool:
    if include and not any(fnmatch.fnmatchcase(name, pat) for pat in include):
        return False
    return not any(fnmatch.fnmatchcase(name, pat) for pat in exclude)


@dataclass
class Selection:
    """Which rows to build: glob patterns over provider names, and the GIFT axes."""

    include: Sequence[str] = ()
    exclude: Sequence[str] = ()
    backends: Sequence[str] = backends.BACKENDS
    forms: Sequence[str] = FORMS
    fusions: Sequence[str] = FUSIONS
    lora: bool = True
    # triton on the CPU is the interpreter: a correctness tool, not a provider to time
    triton_on_cpu: bool = False
    faults: Dict[str, str] = field(default_factory=dict)  # provider name -> "build" | "call" | "wrong" (tests)


def _faulty(prov: Provider, fault: str) -> Provider:
    """Inject a fault into one row (the dry run's proof that one bad row spoils nothing else)."""
    if fault == "build":
        raise RuntimeError(f"injected fault: building {prov.name} failed")
    inner = prov.fn
    if fault == "call":
        def call(inp):
            raise RuntimeError(f"injected fault: {prov.name} raised")
    elif fault == "wrong":
        def call(inp):
            return inner(inp) * 1.01  # 1 % off: beyond every dtype's tolerance
    else:
        raise ValueError(f"unknown injected fault {fault!r} for {prov.name}")
    prov.fn = call
    return prov


def build(problem: Problem, sel: Optional[Selection] = None) -> Tuple[List[Provider], Dict[str, str]]:
    """The providers for ``problem`` (frozen first) and ``{name: why not}`` for those skipped."""
    sel = sel or Selection()
    dev = problem.device
    theta_dtype = problem.phi.dtype
    provs: List[Provider] = []
    skipped: Dict[str, str] = {}
    makers: List[Tuple[str, Callable[[], Provider]]] = [
        ("frozen", lambda: Provider("frozen", "frozen", _frozen, _x_leaf)),
        ("authors", lambda: Provider("authors", "gift", _authors, _gift_leaves)),
    ]
    if sel.lora:
        makers.append(("peft-lora", lambda: peft_lora(problem, adapter_dtype_from_base=False)))
        if problem.dtype in (torch.float16, torch.bfloat16):
            name = f"peft-lora-{str(problem.dtype).replace('torch.', '')}"
            makers.append((name, lambda: peft_lora(problem, adapter_dtype_from_base=True)))
    for be in sel.backends:
        for form in sel.forms:
            base = f"gift-{be}-{form}"
            if be == "triton" and dev.type == "cpu" and not sel.triton_on_cpu:
                skipped[base] = "triton on the CPU is the interpreter (a correctness tool, not timed)"
                continue
            ok, why = backends.supports(be, dev)
            if not ok:
                skipped[base] = why
                continue
            if form == "input" and backends.launchers(be, "gift_input") is None:
                skipped[base] = f"backend {be} has no input-side kernel (gift-torch-input is the base GEMM + torch's transform)"
                continue
            fusions: Tuple[Optional[str], ...] = (None,)
            note = ""
            if be == "triton" and form == "epilogue":
                variants, note = triton_fusions(problem.shape, problem.dtype, theta_dtype, dev)
                fusions = tuple(v for v in variants if v == "auto" or v in sel.fusions)
            for fu in fusions:
                name = base + (f"-{fu}" if fu not in (None, "auto") else "")
                makers.append((name, lambda be=be, form=form, fu=fu, name=name, note=note: Provider(
                    name, "gift", _gift(form), _gift_leaves, backend=be, form=form, fusion=fu, note=note)))
    for name, make in makers:
        if not _selected(name, sel.include, sel.exclude) and name != "frozen":
            continue
        try:
            prov = make()
            if name in sel.faults:
                prov = _faulty(prov, sel.faults[name])
        except Exception as exc:  # any failure to build a row is that row's result
            skipped[name] = f"could not be built: {type(exc).__name__}: {exc}"[:500]
            continue
        provs.append(prov)
    return provs, skipped


def auto_forms(problem: Problem, provs: Sequence[Provider]) -> Dict[str, str]:
    """``{backend: form}``: the form the plan picks for ``gift_linear(form="auto")`` in a training
    call of this problem on each GIFT backend present (without timing: on CUDA, the default)."""
    x = problem.x.detach()
    out = {}
    for be in sorted({p.backend for p in provs if p.backend}):
        with backends.backend(be):
            out[be] = backends.choose("gift_linear", x, problem.shape.d_out, problem.phi, training=True).form
    return out


def saved_bytes(prov: Provider, inp: Inputs) -> int:
    """Bytes autograd keeps for backward: unique storages, the layer's own weights excluded."""
    storages: Dict[int, int] = {}
    skip = {t.untyped_storage().data_ptr() for t in (inp.weight, inp.bias, inp.phi, inp.psi) if t is not None}
    skip |= {t.untyped_storage().data_ptr() for name, t in prov.leaves(inp).items() if name != "x"}

    def pack(t):
        s = t.untyped_storage()
        if s.data_ptr() not in skip:
            storages[s.data_ptr()] = s.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), prov.context():
        prov.fn(inp)
    return sum(storages.values())
