"""What a base layer is: the one place that knows which modules GIFT can adapt, and how.

Two kinds of base:

- **dense**: an ``nn.Linear`` or a transformers ``Conv1D`` holding a plain floating-point
  weight. GIFT reads the weight (either form: :func:`gift_kernels.gift_linear`) and merges by
  writing ``W_hat`` into it.
- **module**: any other layer linear in its input -- a quantized linear (bitsandbytes,
  torchao, ...), another library's layer. GIFT never reads its weight to train: it runs the
  layer on the transformed input, ``base(x + (x psi^T) phi^T)`` (:func:`gift_kernels.gift_input`).
  Such a base must have integer ``in_features`` and ``out_features`` and a forward
  ``y = x A^T + b`` for some matrix A, differentiable in x (the rule for any module; see
  docs/quantized.md). Merging it, the clustering head and export need A as a dense matrix: a
  :class:`BaseKind` registered here for that layer type says how (``dequantize``), and how to
  write a merged weight back (``requantize``) and put the original back exactly
  (``snapshot`` / ``restore``).

Registered kinds (the libraries are never imported here: a layer of theirs can only exist
once they are):

=====================  ==========================================  ====================
kind                   layers                                      dequantize (float32)
=====================  ==========================================  ====================
``bnb-int8``           ``bitsandbytes.nn.Linear8bitLt``            ``CB * (SCB / 127)``
``bnb-4bit``           ``bitsandbytes.nn.Linear4bit`` (NF4, FP4)   ``dequantize_4bit``
``torchao``            ``nn.Linear`` with a torchao weight         ``weight.dequantize()``
                       (Int8Tensor, IntxUnpackedToInt8Tensor,      (NF4:
                       NF4Tensor; any other with ``dequantize``)   ``get_original_weight``)
=====================  ==========================================  ====================

Refused, naming the module: torchao weights with dynamic activation quantization
(``Int8DynamicActivation*Config``: torchao quantizes the input without a backward, so the
input gets no gradient and neither would Theta), bitsandbytes 4-bit layers not yet quantized,
and bitsandbytes 4-bit layers in its CPU inference packing. That packing (bitsandbytes >= 0.49
on CPUs with avx512_bf16) is switched on by the layer's own forward in eval mode under
``no_grad``; the packed matmul gives its input no gradient, so Theta would silently get zero
gradients from then on, and bitsandbytes' unpacking is not exact (it keeps the block scales
rounded to bfloat16). So every 4-bit layer of a model being adapted (frozen ones too: the
gradients of earlier Thetas pass through them) and every 4-bit base has that switch turned off
(:func:`adopt`: eval forwards use the unpacked kernel), a model holding a packed one is refused
at adaptation (:func:`grad_blocker`), and a training forward through a base packed since is
refused (:func:`check_trainable`).
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Tuple

import torch
from torch import Tensor, nn

_PLAIN_TENSORS = (torch.Tensor, nn.Parameter)


class LossyMergeWarning(UserWarning):
    """Merging into a quantized base re-quantizes ``W_hat``: the merged layer computes with
    ``Q(W_hat)``, which differs from ``W_hat`` by the quantization error (the warning says by
    how much). Unmerging is exact all the same."""


def is_conv1d(module: nn.Module) -> bool:
    """A transformers ``Conv1D`` (GPT-2): a linear map whose weight is stored ``(d_in, d_out)``.

    Recognised by name and shape so transformers need not be imported."""
    return (
        type(module).__name__ == "Conv1D"
        and isinstance(getattr(module, "weight", None), Tensor)
        and module.weight.dim() == 2
        and getattr(module, "nf", None) == module.weight.shape[1]
    )


def is_dense(module: nn.Module) -> bool:
    """An ``nn.Linear`` or ``Conv1D`` whose weight is a plain floating-point tensor (not a
    quantized parameter or tensor subclass: bitsandbytes' and torchao's layers are
    ``nn.Linear`` subclasses or instances with such weights)."""
    if not (isinstance(module, nn.Linear) or is_conv1d(module)):
        return False
    w = module.weight
    return type(w) in _PLAIN_TENSORS and w.dtype.is_floating_point and w.dim() == 2


@dataclass(frozen=True)
class BaseKind:
    """How GIFT handles one type of module base (see the module docstring).

    ``dequantize(module) -> (d_out, d_in)`` float32 tensor: the weight the forward multiplies
    by (before any rounding to the compute dtype). ``snapshot(module) -> state``: references
    to the objects that make up the weight (no copy; cheap). ``restore(module, state)``: put
    them back. ``requantize(module, w_hat)``: write a merged dense weight into the module in
    its own format, as new objects (a snapshot taken before stays valid). ``refuse(module)``:
    why GIFT cannot be trained through this instance, or None. ``merge_refusal(module)``: why
    it cannot be merged into, or None. ``compute_dtype(module)``: the dtype it computes in,
    Theta's default. ``state_key(module)``: hashable, changes when the weight does (the
    clustering head caches the dequantized weight by it). ``load_state(module, state_dict,
    prefix)``: prepare the module to load ``state_dict`` (for formats whose own loader cannot).
    ``adopt(module)``: called once when a GIFT layer takes the module as its base, and on every
    such layer of a model when it is adapted (after every check passed), to turn off what the
    layer would otherwise do that breaks training through it. ``blocks_grad(module)``: why the
    layer, in its current state, gives its input no gradient (refused anywhere in a model being
    adapted: gradients to earlier Thetas pass through frozen layers too), or None.
    ``keeps_input``: the layer's backward keeps its whole input (bitsandbytes 8-bit), so GIFT's
    input-side form would make it keep ``u``, a new ``M x d_in`` tensor; large training calls
    then take the dequantized epilogue form (:func:`gift_kernels.nn.module_base.module_form`).
    """

    name: str
    matches: Callable[[nn.Module], bool]
    dequantize: Optional[Callable[[nn.Module], Tensor]] = None
    snapshot: Optional[Callable[[nn.Module], object]] = None
    restore: Optional[Callable[[nn.Module, object], None]] = None
    requantize: Optional[Callable[[nn.Module, Tensor], None]] = None
    refuse: Optional[Callable[[nn.Module], Optional[str]]] = None
    merge_refusal: Optional[Callable[[nn.Module], Optional[str]]] = None
    compute_dtype: Optional[Callable[[nn.Module], Optional[torch.dtype]]] = None
    state_key: Optional[Callable[[nn.Module], tuple]] = None
    load_state: Optional[Callable[[nn.Module, Dict[str, Tensor], str], None]] = None
    adopt: Optional[Callable[[nn.Module], None]] = None
    blocks_grad: Optional[Callable[[nn.Module], Optional[str]]] = None
    keeps_input: bool = False

    @property
    def can_merge(self) -> bool:
        return None not in (self.dequantize, self.snapshot, self.restore, self.requantize)


_KINDS: List[BaseKind] = []


def register_base_kind(kind: BaseKind) -> BaseKind:
    """Teach GIFT a module base type (first match wins; later registrations are tried first)."""
    _KINDS.insert(0, kind)
    return kind


def kind_of(module: nn.Module) -> Optional[BaseKind]:
    """The registered kind of a module base, or None (a generic linear module)."""
    for kind in _KINDS:
        if kind.matches(module):
            return kind
    return None


def module_features(module: nn.Module) -> Optional[Tuple[int, int]]:
    """``(in_features, out_features)`` of a module base, or None if it does not say."""
    d_in, d_out = getattr(module, "in_features", None), getattr(module, "out_features", None)
    ok = all(isinstance(v, int) and not isinstance(v, bool) and v >= 1 for v in (d_in, d_out))
    return (d_in, d_out) if ok else None


def features(module: nn.Module) -> Tuple[int, int]:
    """``(in_features, out_features)`` of any base GIFT accepts."""
    if is_dense(module):
        w = module.weight
        return (w.shape[0], w.shape[1]) if is_conv1d(module) else (w.shape[1], w.shape[0])
    f = module_features(module)
    if f is None:
        raise TypeError(describe_rule(module))
    return f


def is_supported(module: nn.Module) -> bool:
    return is_dense(module) or module_features(module) is not None


def refusal(module: nn.Module) -> Optional[str]:
    """Why GIFT cannot be trained through this (otherwise supported) module base, or None."""
    if is_dense(module):
        return None
    kind = kind_of(module)
    why = kind.refuse(module) if kind is not None and kind.refuse is not None else None
    if why or kind is not None:
        return why
    for name, inner in module.named_modules():  # a generic base runs its layers: a quantized one inside counts
        inner_kind = kind_of(inner) if name and not is_dense(inner) else None
        why = inner_kind.refuse(inner) if inner_kind is not None and inner_kind.refuse is not None else None
        if why:
            return f"its {type(inner).__name__} {name!r}: {why}"
    return None


def check_trainable(module: nn.Module, where: str) -> None:
    """Raise if a module base has entered a state GIFT cannot train through since it was adapted
    (:func:`refusal`; a training forward calls this)."""
    why = refusal(module)
    if why:
        raise RuntimeError(f"{where}: cannot train through this {type(module).__name__} base: {why}")


def grad_blocker(model: nn.Module) -> Optional[Tuple[str, str]]:
    """``(name, why)`` of the first registered layer anywhere in ``model`` that, in its current
    state, gives its input no gradient (would silently cut every Theta before it off), or None."""
    for name, m in model.named_modules():
        kind = None if is_dense(m) else kind_of(m)
        why = kind.blocks_grad(m) if kind is not None and kind.blocks_grad is not None else None
        if why:
            return name or "<root>", f"this {type(m).__name__} {why}"
    return None


def adopt(module: nn.Module) -> None:
    """Run the kind's ``adopt`` on every registered layer in ``module`` (itself included): a base
    a GIFT layer has just taken, the layers inside a generic base, or a whole model being adapted
    (frozen layers too: training sends the gradients of earlier Thetas through them)."""
    for m in module.modules():
        kind = None if is_dense(m) else kind_of(m)
        if kind is not None and kind.adopt is not None:
            kind.adopt(m)


def merge_refusal(module: nn.Module) -> Optional[str]:
    """Why a merged weight cannot be written into this module base, or None (dense: None)."""
    if is_dense(module):
        return None
    kind = kind_of(module)
    name = type(module).__name__
    if kind is None or not kind.can_merge:
        return (f"cannot merge into a {name} base: gift_kernels.nn.bases has no registered way to write a merged "
                f"weight into it (register a BaseKind with dequantize/snapshot/restore/requantize); export a "
                f"dense copy with GiftLinear.to_linear() instead")
    return kind.merge_refusal(module) if kind.merge_refusal is not None else None


def describe_rule(module: nn.Module) -> str:
    return (f"a {type(module).__name__} is not a layer GIFT can adapt: it needs an nn.Linear or transformers Conv1D, "
            f"a quantized linear layer (bitsandbytes, torchao), or any module with integer in_features and "
            f"out_features whose forward is linear in its input (docs/quantized.md)")


def theta_defaults(module: nn.Module) -> Tuple[torch.dtype, torch.device]:
    """The dtype and device a Theta takes by default for this base: its weight's for a dense
    base; for a module base, its compute dtype (the kind's, else ``compute_dtype``, else its
    first plain floating parameter's or buffer's, else float32) and its weight's device."""
    w = getattr(module, "weight", None)
    device = w.device if isinstance(w, Tensor) else next((p.device for p in module.parameters()), torch.device("cpu"))
    if is_dense(module):
        return module.weight.dtype, device
    kind = kind_of(module)
    dtype = kind.compute_dtype(module) if kind is not None and kind.compute_dtype is not None else None
    if not isinstance(dtype, torch.dtype):
        dtype = getattr(module, "compute_dtype", None)
    if not isinstance(dtype, torch.dtype):
        dtype = next((t.dtype for t in list(module.parameters()) + list(module.buffers())
                      if t.dtype.is_floating_point and type(t) in _PLAIN_TENSORS), torch.float32)
    return dtype, device


def dense_weight(module: nn.Module, where: str) -> Tensor:
    """The base's weight as a dense ``(d_out, d_in)`` tensor: a view for dense bases, the
    dequantized weight (float32, a new tensor) for a registered module kind; a clear error
    otherwise."""
    if is_dense(module):
        return module.weight.t() if is_conv1d(module) else module.weight
    kind = kind_of(module)
    if kind is None or kind.dequantize is None:
        raise TypeError(f"{where}: {type(module).__name__} does not expose its weight as a dense matrix (no "
                        f"registered dequantize for it in gift_kernels.nn.bases)")
    return kind.dequantize(module)


def state_key(module: nn.Module) -> Optional[tuple]:
    """A key that changes whenever a module base's weight does (None: unknown, do not cache)."""
    kind = kind_of(module)
    if kind is None or kind.state_key is None:
        return None
    return kind.state_key(module)


def _key_of(*tensors) -> tuple:
    return tuple(None if t is None else (id(t), t.data_ptr(), t._version) for t in tensors)


# --------------------------------------------------------------------------- bitsandbytes


def _bnb_class(name: str):
    bnb = sys.modules.get("bitsandbytes")  # a bitsandbytes layer exists only once it is imported
    return getattr(getattr(bnb, "nn", None), name, None) if bnb is not None else None


def _is_instance(module: nn.Module, cls_name: str) -> bool:
    cls = _bnb_class(cls_name)
    return cls is not None and isinstance(module, cls)


def _bnb8_codes(m: nn.Module) -> Tuple[Optional[Tensor], Optional[Tensor]]:
    """``(CB, SCB)``: int8 rows and their absmax scales. ``Linear8bitLt.forward`` moves them
    from the weight to ``m.state`` on its first call."""
    w = m.weight
    cb = getattr(w, "CB", None)
    scb = getattr(w, "SCB", None)
    if cb is None or scb is None:
        cb, scb = m.state.CB, m.state.SCB
    return cb, scb


def _bnb8_quantized(m: nn.Module) -> bool:
    return m.weight.dtype == torch.int8 and not m.state.has_fp16_weights


def _bnb8_dequantize(m: nn.Module) -> Tensor:
    # as bitsandbytes' MatMul8bitFp (the CPU/XPU training path) and MatMul8bitLt's backward:
    # CB.to(dtype) * (SCB * (1/127)); a float weight is quantized the way the forward will
    if _bnb8_quantized(m):
        cb, scb = _bnb8_codes(m)
    else:
        import bitsandbytes.functional as bnbf

        cb, scb, _ = bnbf.int8_vectorwise_quant(m.weight.detach().contiguous().to(torch.float16))
    return cb.to(torch.float32) * (scb.unsqueeze(1) * (1.0 / 127.0))


def _bnb8_snapshot(m: nn.Module):
    cb, scb = _bnb8_codes(m)
    return (m.weight, cb, scb)


def _bnb8_restore(m: nn.Module, state) -> None:
    weight, cb, scb = state
    m.weight = weight
    weight.CB, weight.SCB = cb, scb
    m.state.reset_grads()  # the next forward moves CB/SCB into m.state again (init_8bit_state)


def _bnb8_requantize(m: nn.Module, w_hat: Tensor) -> None:
    import bitsandbytes as bnb

    device = m.weight.device
    # Int8Params.to(device) quantizes a CPU float tensor (via fp16, as bitsandbytes always does)
    new = bnb.nn.Int8Params(w_hat.detach().to("cpu", torch.float32).contiguous(), requires_grad=False,
                            has_fp16_weights=False).to(device)
    m.weight = new
    m.state.reset_grads()


def _bnb8_merge_refusal(m: nn.Module) -> Optional[str]:
    if m.state.has_fp16_weights:
        return (f"cannot merge into this {type(m).__name__}: it has has_fp16_weights=True (a float weight re-quantized "
                f"on every forward); merge into a layer with has_fp16_weights=False")
    if m.weight.dtype != torch.int8:
        return (f"cannot merge into this {type(m).__name__}: its weight is not quantized yet ({m.weight.dtype}); "
                f"bitsandbytes quantizes it on .to(device) or on the first forward")
    return None


def _bnb8_state_key(m: nn.Module) -> tuple:
    cb, scb = _bnb8_codes(m)
    return ("bnb-int8", id(m.weight)) + _key_of(m.weight, cb, scb)


def _bnb8_dtype(m: nn.Module) -> Optional[torch.dtype]:
    b = getattr(m, "bias", None)  # an 8-bit layer computes in its input's dtype; the bias tells the model's
    return b.dtype if isinstance(b, Tensor) and b.dtype.is_floating_point else None


def _bnb8_load_state(m: nn.Module, state_dict: Dict[str, Tensor], prefix: str) -> None:
    """``Linear8bitLt._load_from_state_dict`` copies ``SCB`` into ``weight.SCB``, which its first
    forward moved to ``m.state`` (it then refuses, calling the layer not quantized): put the
    codes back on the weight, where the next forward takes them from again."""
    w = m.weight
    if prefix + "SCB" in state_dict and getattr(w, "SCB", None) is None and m.state.SCB is not None:
        w.CB, w.SCB = m.state.CB, m.state.SCB


register_base_kind(BaseKind(
    name="bnb-int8",
    matches=lambda m: _is_instance(m, "Linear8bitLt"),
    dequantize=_bnb8_dequantize,
    snapshot=_bnb8_snapshot,
    restore=_bnb8_restore,
    requantize=_bnb8_requantize,
    merge_refusal=_bnb8_merge_refusal,
    compute_dtype=_bnb8_dtype,
    state_key=_bnb8_state_key,
    load_state=_bnb8_load_state,
    keeps_input=True,  # MatMul8bitFp keeps ctx.A, MatMul8bitLt (CAt, subA, A), though no weight grad is needed
))


def _bnb4_refuse(m: nn.Module) -> Optional[str]:
    w = m.weight
    if not getattr(w, "bnb_quantized", False) or getattr(w, "quant_state", None) is None:
        return (f"this {type(m).__name__} is not quantized yet (bitsandbytes quantizes a 4-bit layer on .to(device)); "
                f"move it to its device before adapting it")
    why = _bnb4_blocks_grad(m)
    return f"it {why}" if why else None


def _bnb4_blocks_grad(m: nn.Module) -> Optional[str]:
    if not _bnb4_packed(m):
        return None
    return (f"has its weight in bitsandbytes' CPU inference packing (switched on by an eval-mode forward under "
            f"no_grad on a CPU with avx512_bf16), whose matmul gives its input no gradient, so Theta would silently "
            f"get zero gradients, and which bitsandbytes cannot unpack exactly. Adapt the model before any "
            f"eval-mode no_grad forward (GIFT then keeps its 4-bit layers unpacked), or reload the base model; "
            f"outside GIFT, setting the layer's support_avx512bf16_for_cpu = False before such a forward prevents "
            f"the packing")


def _bnb4_packed(m: nn.Module) -> bool:
    return bool(getattr(getattr(m.weight, "quant_state", None), "packing_format_for_cpu", False))


def _bnb4_adopt(m: nn.Module) -> None:
    # bitsandbytes packs the weight on the first eval-mode no_grad CPU forward when this is
    # True: a one-way switch that drops input gradients (module docstring)
    if hasattr(m, "support_avx512bf16_for_cpu"):
        m.support_avx512bf16_for_cpu = False


def _bnb4_dequantize(m: nn.Module) -> Tensor:
    import bitsandbytes.functional as bnbf

    w = m.weight
    qs = w.quant_state
    if _bnb4_packed(m):
        raise TypeError(f"{type(m).__name__}: its weight is in bitsandbytes' CPU inference packing (avx512_bf16, set by "
                        f"an eval-mode no_grad forward); GIFT cannot dequantize that format. Adapt the model before "
                        f"any eval-mode no_grad forward (GIFT then keeps the layer unpacked), or reload it")
    # the matrix MatMul4Bit multiplies by (it then rounds it to the compute dtype)
    return bnbf.dequantize_4bit(w.data, qs).to(torch.float32)


def _bnb4_snapshot(m: nn.Module):
    return (m.weight, m.weight.quant_state)


def _bnb4_restore(m: nn.Module, state) -> None:
    weight, qs = state
    weight.quant_state = qs
    weight.module = m  # a deep-copied Params4bit still points to the original module
    m.weight = weight
    m.quant_state = qs


def _bnb4_requantize(m: nn.Module, w_hat: Tensor) -> None:
    import bitsandbytes as bnb

    old = m.weight
    qs = old.quant_state
    # a new Params4bit (never the old one's __dict__: the snapshot must stay intact);
    # .to(device) quantizes it and, through module=, sets m.quant_state
    new = bnb.nn.Params4bit(w_hat.detach().to("cpu", qs.dtype).contiguous(), requires_grad=False,
                            blocksize=old.blocksize, compress_statistics=old.compress_statistics,
                            quant_type=old.quant_type, quant_storage=old.quant_storage, module=m)
    m.weight = new.to(old.device)
    m.quant_state = m.weight.quant_state


def _bnb4_state_key(m: nn.Module) -> tuple:
    qs = m.weight.quant_state
    return ("bnb-4bit", id(m.weight), id(qs)) + _key_of(m.weight, getattr(qs, "absmax", None))


def _bnb4_dtype(m: nn.Module) -> Optional[torch.dtype]:
    cd = getattr(m, "compute_dtype", None)
    if isinstance(cd, torch.dtype):
        return cd
    qs = getattr(m.weight, "quant_state", None)
    return getattr(qs, "dtype", None)


def _bnb4_load_state(m: nn.Module, state_dict: Dict[str, Tensor], prefix: str) -> None:
    """bitsandbytes saves a 4-bit weight's quant state as ``weight.<item>`` keys but its
    ``load_state_dict`` refuses them: rebuild the weight from them (bit-exact) and drop them,
    leaving ``weight`` (the packed data, copied into the rebuilt weight) and ``bias``."""
    import bitsandbytes as bnb

    stem = prefix + "weight."
    items = {k[len(stem):]: v for k, v in state_dict.items() if k.startswith(stem)}
    if not items or prefix + "weight" not in state_dict:
        return
    data = state_dict[prefix + "weight"]
    new = bnb.nn.Params4bit.from_prequantized(data, dict(items), requires_grad=False, device=m.weight.device,
                                              module=m)
    m.weight = new
    for k in items:
        del state_dict[stem + k]


register_base_kind(BaseKind(
    name="bnb-4bit",
    matches=lambda m: _is_instance(m, "Linear4bit"),
    dequantize=_bnb4_dequantize,
    snapshot=_bnb4_snapshot,
    restore=_bnb4_restore,
    requantize=_bnb4_requantize,
    refuse=_bnb4_refuse,
    compute_dtype=_bnb4_dtype,
    state_key=_bnb4_state_key,
    load_state=_bnb4_load_state,
    adopt=_bnb4_adopt,
    blocks_grad=_bnb4_blocks_grad,
))


# --------------------------------------------------------------------------- torchao


def _ao_weight(m: nn.Module) -> Optional[Tensor]:
    w = getattr(m, "weight", None)
    return w if isinstance(w, Tensor) and type(w).__module__.startswith("torchao.") else None


def _ao_refuse(m: nn.Module) -> Optional[str]:
    w = _ao_weight(m)
    act = getattr(w, "act_quant_kwargs", None) or getattr(w, "activation_quantization", None)
    if act is not None:
        return (f"its torchao weight ({type(w).__name__}) quantizes the layer's input dynamically ({act}); torchao "
                f"gives no gradient through that quantization, so the input (and GIFT's Theta) would silently get "
                f"none. Use a weight-only config (Int8WeightOnlyConfig, IntxWeightOnlyConfig, NF4WeightOnlyConfig)")
    return None


def _is_nf4(w: Tensor) -> bool:
    return type(w).__name__ == "NF4Tensor" and callable(getattr(w, "get_original_weight", None))


def _ao_dequantize(m: nn.Module) -> Tensor:
    w = _ao_weight(m)
    if _is_nf4(w):
        dense = w.get_original_weight()
    elif callable(getattr(w, "dequantize", None)):
        dense = w.dequantize()
    else:
        raise TypeError(f"{type(m).__name__}: its torchao weight {type(w).__name__} has no dequantize()")
    dense = dense.to(torch.float32)
    pre = getattr(w, "act_pre_scale", None)  # AWQ / SmoothQuant: the forward multiplies x by it first
    if pre is not None:
        dense = dense * pre.to(torch.float32).reshape(1, -1)
    return dense


def _ao_snapshot(m: nn.Module):
    return m.weight  # torchao tensors are never updated in place: the object is the state


def _ao_restore(m: nn.Module, weight) -> None:
    m.weight = weight


def _ao_requantize_tensor(w: Tensor, w_hat: Tensor) -> Tensor:
    """``w_hat`` quantized as ``w`` is (the type, block size, bit width and symmetry of ``w``,
    with torchao's default parameter choice: what ``quantize_`` with ``w``'s config gives)."""
    from torchao.quantization import MappingType

    w_hat = w_hat.detach().to(device=w.device, dtype=w.dtype).contiguous()
    name = type(w).__name__
    if _is_nf4(w):
        from torchao.quantization.quantize_.workflows.nf4.nf4_tensor import to_nf4

        return to_nf4(w_hat, w.block_size, w.scaler_block_size)
    if name == "Int8Tensor":
        from torchao.quantization import PerGroup, PerRow, PerTensor

        n, k = w.shape
        block = list(w.block_size)
        gran = PerRow() if block == [1, k] else PerTensor() if block == [n, k] else PerGroup(block[-1])
        return type(w).from_hp(w_hat, granularity=gran, reduce_range=bool(getattr(w, "reduce_range", False)))
    if name == "IntxUnpackedToInt8Tensor":
        symmetric = w.zero_point is None or not bool(w.zero_point.ne(0).any())
        mapping = MappingType.SYMMETRIC if symmetric else MappingType.ASYMMETRIC
        return type(w).from_hp(w_hat, tuple(w.block_size), w.target_dtype, mapping_type=mapping)
    raise TypeError(name)


def _ao_requantize(m: nn.Module, w_hat: Tensor) -> None:
    m.weight = nn.Parameter(_ao_requantize_tensor(_ao_weight(m), w_hat), requires_grad=False)


def _ao_merge_refusal(m: nn.Module) -> Optional[str]:
    w = _ao_weight(m)
    if not (_is_nf4(w) or type(w).__name__ in ("Int8Tensor", "IntxUnpackedToInt8Tensor")):
        return (f"cannot merge into this {type(m).__name__}: GIFT knows how to re-quantize torchao's Int8Tensor, "
                f"IntxUnpackedToInt8Tensor and NF4Tensor weights, not {type(w).__name__}; export a dense copy with "
                f"GiftLinear.to_linear() instead")
    if getattr(w, "act_pre_scale", None) is not None:
        return (f"cannot merge into this {type(m).__name__}: its {type(w).__name__} weight has an activation "
                f"pre-scale (AWQ / SmoothQuant), which a re-quantized weight would not carry")
    return None


def _ao_state_key(m: nn.Module) -> tuple:
    w = _ao_weight(m)
    inner = [getattr(w, n, None) for n in ("qdata", "quantized_data", "scale", "quantized_scalers")]
    return ("torchao", id(w)) + _key_of(*[t for t in inner if isinstance(t, Tensor)])


register_base_kind(BaseKind(
    name="torchao",
    matches=lambda m: isinstance(m, nn.Linear) and _ao_weight(m) is not None,
    dequantize=_ao_dequantize,
    snapshot=_ao_snapshot,
    restore=_ao_restore,
    requantize=_ao_requantize,
    refuse=_ao_refuse,
    merge_refusal=_ao_merge_refusal,
    compute_dtype=lambda m: _ao_weight(m).dtype,
    state_key=_ao_state_key,
))
