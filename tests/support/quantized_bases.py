"""Quantized base layers for the tests: one factory per supported kind, each quantizing a given
``nn.Linear`` the way its library's users do, plus a float64 GIFT reference built from the
base's own dequantized weight and an autograd-graph memory count.

Shapes: bitsandbytes and torchao int8 take any shape; torchao's int4 (``PerGroup(32)``) needs
``d_in % 32 == 0``; torchao's NF4 config (block 64, scaler block 256) needs
``d_in * d_out % 16384 == 0``. Each kind names the shape its tests use.
"""

from __future__ import annotations

import copy
import logging
import warnings
from dataclasses import dataclass
from typing import Callable, Dict, Optional, Tuple

import pytest
import torch
from torch import Tensor, nn

logging.getLogger("bitsandbytes").setLevel(logging.ERROR)


@dataclass(frozen=True)
class Kind:
    name: str
    library: str
    shape: Tuple[int, int]  # (d_in, d_out) the tests use
    quantize: Callable[[nn.Linear], nn.Module]


def _bnb():
    return pytest.importorskip("bitsandbytes", reason="bitsandbytes is a test extra (pyproject)")


def _ao():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return pytest.importorskip("torchao", reason="torchao is a test extra (pyproject)")


def bnb_int8(lin: nn.Linear) -> nn.Module:
    bnb = _bnb()
    q = bnb.nn.Linear8bitLt(lin.in_features, lin.out_features, bias=lin.bias is not None, has_fp16_weights=False)
    q.load_state_dict(lin.state_dict())
    return q.to(lin.weight.device)  # bitsandbytes quantizes here


def bnb_4bit(quant_type: str, compute_dtype=torch.float32):
    def make(lin: nn.Linear) -> nn.Module:
        bnb = _bnb()
        # float32 compute: bf16 4-bit matmuls are ~40x slower on CPUs without avx512bf16
        q = bnb.nn.Linear4bit(lin.in_features, lin.out_features, bias=lin.bias is not None,
                              compute_dtype=compute_dtype, quant_type=quant_type)
        q.load_state_dict(lin.state_dict())
        return q.to(lin.weight.device)

    return make


# bitsandbytes' two CPU paths for a 4-bit layer: "unpacked" (dequantize + matmul, differentiable)
# and "packed" (on CPUs with avx512_bf16 the layer's first eval-mode no_grad forward repacks its
# weight for a gemv kernel that gives its input no gradient). The CPU feature decides which one a
# layer takes, through its instance flag ``support_avx512bf16_for_cpu``; the tests force each.
BNB_CPU_PATHS = ("unpacked", "packed")
PACKABLE_SHAPE = (64, 64)  # (d_in, d_out): the packing needs d_out % 32 == 0 and d_in a multiple of the block (64)


def bnb_cpu_has_avx512_bf16() -> bool:
    _bnb()
    from bitsandbytes.functional import has_avx512bf16

    return bool(has_avx512bf16())


def force_bnb_cpu_path(model: nn.Module, path: str) -> nn.Module:
    """Make every bitsandbytes 4-bit layer of ``model`` take ``path`` (BNB_CPU_PATHS) on CPU; the
    packed path needs the CPU feature its kernel is built for, so it is skipped (named) without."""
    assert path in BNB_CPU_PATHS
    if path == "packed" and not bnb_cpu_has_avx512_bf16():
        pytest.skip("bitsandbytes' packed 4-bit CPU path needs a CPU with avx512_bf16; this one lacks it")
    layers = [m for m in model.modules() if type(m).__name__ in ("Linear4bit", "LinearNF4", "LinearFP4")]
    assert layers and all(hasattr(m, "support_avx512bf16_for_cpu") for m in layers)
    for m in layers:
        m.support_avx512bf16_for_cpu = path == "packed"
    return model


def bnb_4bit_is_packed(module: nn.Module) -> bool:
    return bool(getattr(module.weight.quant_state, "packing_format_for_cpu", False))


def torchao_config(name: str):
    _ao()
    from torchao.quantization import (Int4WeightOnlyConfig, Int8DynamicActivationInt8WeightConfig,
                                      Int8DynamicActivationIntxWeightConfig, Int8WeightOnlyConfig,
                                      IntxWeightOnlyConfig, PerGroup)
    from torchao.prototype._nf4tensor_api import NF4WeightOnlyConfig

    return {
        "int8": lambda: Int8WeightOnlyConfig(),
        "int4": lambda: IntxWeightOnlyConfig(weight_dtype=torch.int4, granularity=PerGroup(32)),
        "nf4": lambda: NF4WeightOnlyConfig(),
        "int4-tinygemm": lambda: Int4WeightOnlyConfig(group_size=32),
        "int8-dynamic": lambda: Int8DynamicActivationInt8WeightConfig(),
        "int4-dynamic": lambda: Int8DynamicActivationIntxWeightConfig(weight_dtype=torch.int4,
                                                                      weight_granularity=PerGroup(32)),
    }[name]()


def torchao(name: str):
    def make(lin: nn.Linear) -> nn.Module:
        _ao()
        from torchao.quantization import quantize_

        q = copy.deepcopy(lin)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            quantize_(q, torchao_config(name))
        return q

    return make


KINDS: Dict[str, Kind] = {k.name: k for k in (
    Kind("bnb-int8", "bitsandbytes", (45, 37), bnb_int8),
    Kind("bnb-nf4", "bitsandbytes", (45, 37), bnb_4bit("nf4")),
    Kind("bnb-fp4", "bitsandbytes", (45, 37), bnb_4bit("fp4")),
    Kind("torchao-int8", "torchao", (45, 37), torchao("int8")),
    Kind("torchao-int4", "torchao", (64, 37), torchao("int4")),
    Kind("torchao-nf4", "torchao", (128, 128), torchao("nf4")),
)}


def make_base(kind: str, *, bias: bool = True, seed: int = 0, shape: Optional[Tuple[int, int]] = None):
    """``(quantized base, the nn.Linear it was quantized from)``."""
    d_in, d_out = shape or KINDS[kind].shape
    g = torch.Generator().manual_seed(seed)
    lin = nn.Linear(d_in, d_out, bias=bias)
    with torch.no_grad():
        lin.weight.copy_(torch.randn(d_out, d_in, generator=g) * d_in ** -0.5)
        if bias:
            lin.bias.copy_(torch.randn(d_out, generator=g))
    return KINDS[kind].quantize(lin), lin


def same(a: Tensor, b: Tensor) -> bool:
    """Bit-equality that also compares tensor subclasses (torchao weights) by their inner tensors."""
    if type(a) is not type(b):
        return False
    if hasattr(a, "__tensor_flatten__") and type(a) not in (Tensor, nn.Parameter):
        names, meta = a.__tensor_flatten__()
        names_b, meta_b = b.__tensor_flatten__()
        return names == names_b and a.shape == b.shape and all(same(getattr(a, n), getattr(b, n)) for n in names)
    return a.dtype == b.dtype and a.shape == b.shape and torch.equal(a, b)


def same_state(a: Dict[str, Tensor], b: Dict[str, Tensor]) -> bool:
    return list(a) == list(b) and all(same(a[k], b[k]) for k in a)


def quantize_linears(model: nn.Module, kind: str, names) -> nn.Module:
    """Replace the ``nn.Linear`` modules whose last name part is in ``names`` by ``kind``'s
    quantized layer, in place (what transformers' quantizers do when loading)."""
    for full, module in list(model.named_modules()):
        if isinstance(module, nn.Linear) and full.rsplit(".", 1)[-1] in names:
            parent, _, child = full.rpartition(".")
            setattr(model.get_submodule(parent), child, KINDS[kind].quantize(module).train(module.training))
    return model


def gift_reference(x: Tensor, w: Tensor, b: Optional[Tensor], thetas_rows, *, grad_out: Tensor):
    """float64 output and grads (x, then each Theta's parameters in order) of GIFT over the
    dense weight ``w`` (``(d_out, d_in)``, the base's dequantized weight), from the formula

        W_hat_c = W_c + (W_c phi + b1) psi + b2,  y = x W_hat^T + b

    ``thetas_rows``: ``[(theta, start, stop)]`` per row chunk."""
    xd = x.detach().double().requires_grad_(True)
    params = []
    rows = []
    wd = w.detach().double()
    for theta, start, stop in thetas_rows:
        ps = {n: p.detach().double().requires_grad_(True) for n, p in theta.named_parameters()}
        params.extend(ps[n] for n, _ in theta.named_parameters())
        wc = wd[start:stop]
        gen = wc @ ps["phi"]
        if "in_bias" in ps:
            gen = gen + ps["in_bias"]
        w_hat = wc + gen @ ps["psi"]
        if "out_bias" in ps:
            w_hat = w_hat + ps["out_bias"]
        rows.append(w_hat)
    w_hat = torch.cat(rows, dim=0)
    y = xd @ w_hat.t()
    if b is not None:
        y = y + b.detach().double()
    grads = torch.autograd.grad(y, [xd] + params, grad_out.double())
    return y.detach(), grads


def graph_storage_bytes(y: Tensor, exclude=()) -> Dict[int, int]:
    """``{storage pointer: bytes}`` of every tensor the autograd graph of ``y`` keeps alive:
    tensors saved by built-in nodes (``_saved_*``) and tensors a custom Function keeps as ctx
    attributes (bitsandbytes stores its input that way, invisible to saved_tensors_hooks),
    one level into plain objects there (bitsandbytes' MatmulLtState). Storages of ``exclude``
    (parameters, buffers, the caller's input) are left out."""
    skip = {t.untyped_storage().data_ptr() for t in exclude if isinstance(t, Tensor) and t.device.type != "meta"}
    found: Dict[int, int] = {}

    def add(t):
        if isinstance(t, Tensor) and type(t) in (Tensor, nn.Parameter) and t.numel():
            s = t.untyped_storage()
            if s.data_ptr() not in skip:
                found[s.data_ptr()] = s.nbytes()

    seen, todo = set(), [y.grad_fn]
    while todo:
        node = todo.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        for attr in dir(node):
            if attr.startswith("__") or attr in ("next_functions", "metadata", "saved_variables"):
                continue
            try:
                v = getattr(node, attr)
            except Exception:  # freed or not a tensor attribute
                continue
            if callable(v) and not isinstance(v, Tensor):
                continue
            for item in (v if isinstance(v, (tuple, list)) else [v]):
                add(item)
                if hasattr(item, "__dict__") and not isinstance(item, (Tensor, nn.Module)):
                    for inner in vars(item).values():
                        add(inner)
        todo.extend(n for n, _ in node.next_functions)
    return found


def module_tensors(module: nn.Module):
    """Every tensor a module owns (parameters, buffers, bitsandbytes state), for exclusion."""
    out = list(module.parameters()) + list(module.buffers())
    for m in module.modules():
        state = getattr(m, "state", None)
        if state is not None and hasattr(state, "__dict__"):
            out.extend(v for v in vars(state).values() if isinstance(v, Tensor))
        for p in m.parameters(recurse=False):
            for a in ("CB", "SCB"):
                if isinstance(getattr(p, a, None), Tensor):
                    out.append(getattr(p, a))
            qs = getattr(p, "quant_state", None)  # bitsandbytes 4-bit: absmax, code, offset, nested state
            while qs is not None:
                out.extend(v for v in vars(qs).values() if isinstance(v, Tensor))
                qs = getattr(qs, "state2", None)
    return out
