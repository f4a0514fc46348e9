"""Export a GIFT adapter as a standard PEFT LoRA adapter, exactly, for the engines that load
only LoRA (vLLM, SGLang, LoRAX, TGI, PEFT itself).

    export_lora(model, "lora/")     # adapter_config.json + adapter_model.safetensors
    peft_model = PeftModel.from_pretrained(fresh_base_model, "lora/")   # the same outputs

Why it is exact: ``x W_hat^T = x W^T + (x psi^T)(W phi)^T``, so a GIFT layer *is* a rank-r
LoRA layer with ``lora_A = psi`` (shared by the layers of a type; repeated per layer in the
LoRA file) and ``lora_B = W phi`` (per layer), scaling 1 (``lora_alpha = r``, no dropout).

- A stacked projection (GPT-2's ``c_attn``: row chunks with their own Thetas) is one LoRA of
  rank ``sum`` of its distinct Thetas' ranks: ``lora_A`` stacks their psis, ``lora_B`` is block
  diagonal (chunk c's rows get ``W_c phi_j`` in the columns of its Theta j, zeros elsewhere).
- GIFT's projection biases (:class:`~gift_kernels.nn.GiftThetaWithBias`) add
  ``(x psi^T) b1 + x . b2`` to every output of a chunk, a *per-token* scalar. PEFT's
  ``lora_bias`` adds a constant per output, which cannot hold it. Both terms are low-rank
  nonetheless: ``b1`` folds into ``lora_B`` (``W_c phi + 1 b1^T``), and ``b2`` is one more rank-1
  component (``lora_A`` row ``b2``, ``lora_B`` column of ones over the chunk's rows). Exact.
- A quantized (module) base: ``lora_B = W_q phi`` from the dequantized weight the base
  computes with (:func:`gift_kernels.nn.bases.dense_weight`); exact wherever the base is linear
  in its input with that weight. A base without a registered dequantize is refused.
- ``uniform_rank=True`` (the default) zero-pads every layer to the largest rank (exact: the
  padded rows and columns add nothing), so the config needs no ``rank_pattern`` /
  ``alpha_pattern``: every engine reads one global ``r`` and ``lora_alpha``.
  ``uniform_rank=False`` writes each layer's own rank (smaller files) with PEFT's patterns,
  which only PEFT and vLLM read: llama.cpp applies one ``lora_alpha`` over each tensor's own
  rank (silently wrong outputs) and SGLang fails to load it. It warns when the ranks differ.
- Trained heads (``trainable_modules``, a task head) are written as PEFT's ``modules_to_save``
  (``include_heads=False`` leaves them out). What each engine does with them differs (vLLM:
  only ``classifier`` / ``score`` on a classification model, it refuses ``lm_head``; SGLang
  drops them silently; llama.cpp's converter refuses them): the export warns, per engine.
- The effective rank (what engines call ``r``: Theta ranks, +1 for an ``out_bias``, summed over
  a stacked layer's distinct Thetas) decides vLLM's ``--max-lora-rank``: the result
  (:class:`LoraExport`) and the log say which value the adapter needs.
- ``task_type``: the config's, else ``"CAUSAL_LM"`` for a causal language model (PEFT then
  builds a ``PeftModelForCausalLM``, with ``generate``).

Where GIFT is shared and LoRA is not, the export is larger: per layer ``(d_in + d_out) R``
numbers against GIFT's ``2 d_in r`` per layer *type* (see docs/serving.md for the sizes).

The files are written atomically (:func:`gift_kernels.adapters.checkpoint.write_files_atomically`:
tensors first, the commit point, then the config), and the tensor file's metadata records the
config's SHA-256 and the exporting version.
"""

from __future__ import annotations

import hashlib
import json
import logging
import sys
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import torch
from torch import Tensor, nn

from ..nn.merge import chunk_bounds
from ..nn.theta import GiftTheta, GiftThetaWithBias
from .checkpoint import PathLike, prepare_directory, write_files_atomically
from .model import _state, layer_thetas

__all__ = ["LoraExport", "LoraLayer", "LORA_CONFIG_FILE", "LORA_WEIGHTS_FILE", "VLLM_MAX_LORA_RANKS", "export_lora",
           "lora_factors", "lora_layers", "vllm_max_lora_rank"]

LORA_CONFIG_FILE = "adapter_config.json"
LORA_WEIGHTS_FILE = "adapter_model.safetensors"
_PREFIX = "base_model.model."  # PEFT's key prefix for the base model's modules
# the values vLLM's --max-lora-rank accepts (vLLM 0.34's engine arguments)
VLLM_MAX_LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)
# the only modules_to_save vLLM loads, and only on a classification model
_VLLM_HEADS = ("classifier", "score")
_ENGINES = ("peft", "vllm", "sglang", "llama.cpp")
logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class LoraExport:
    """What :func:`export_lora` wrote.

    ``path``: the folder. ``rank``: the effective LoRA rank, the ``r`` engines see (the largest
    layer's; with ``uniform_rank`` every layer's). ``ranks``: per adapted layer, before padding.
    ``vllm_max_lora_rank``: the smallest ``--max-lora-rank`` vLLM accepts that holds ``rank``
    (None: above 512, vLLM cannot serve it). ``heads``: the trained heads written as
    ``modules_to_save``; ``heads_left_out``: those ``include_heads=False`` did not write.
    ``engines``: per engine (``peft``, ``vllm``, ``sglang``, ``llama.cpp``), what it will do
    with this adapter, in one sentence."""

    path: Path
    rank: int
    ranks: Dict[str, int]
    vllm_max_lora_rank: Optional[int]
    task_type: Optional[str]
    heads: Tuple[str, ...]
    heads_left_out: Tuple[str, ...]
    engines: Dict[str, str]


def vllm_max_lora_rank(rank: int) -> Optional[int]:
    """The smallest value of vLLM's ``--max-lora-rank`` that serves a LoRA of rank ``rank``
    (an adapter of rank 9 or 12 needs 16), or None above vLLM's largest (512)."""
    return next((r for r in VLLM_MAX_LORA_RANKS if r >= rank), None)


@dataclass
class LoraLayer:
    """One adapted layer, in what the export needs: its name under the base model, its
    (unmerged, dequantized) weight rows ``(d_out, d_in)``, the row chunks and each chunk's Theta."""

    name: str
    weight_rows: Tensor
    splits: Tuple[int, ...]
    chunk_thetas: List[GiftTheta]
    conv1d: bool


def lora_factors(layer: LoraLayer, dtype: torch.dtype = torch.float32) -> Tuple[Tensor, Tensor]:
    """``(lora_A (R, d_in), lora_B (d_out, R))`` with ``x W_hat^T = x W^T + (x A^T) B^T`` exactly
    (computed in float64, returned in ``dtype``); see the module docstring."""
    w = layer.weight_rows.detach().double()
    distinct: List[GiftTheta] = list({id(t): t for t in layer.chunk_thetas}.values())
    a_rows, columns = [], {}  # columns[id(theta)] = (first column of its psi rows, first column of its b2 row or None)
    col = 0
    for theta in distinct:
        a_rows.append(theta.psi.detach().double())
        b2_col = None
        if isinstance(theta, GiftThetaWithBias) and theta.out_bias is not None:
            a_rows.append(theta.out_bias.detach().double()[None])
            b2_col = col + theta.rank
        columns[id(theta)] = (col, b2_col)
        col += theta.rank + (b2_col is not None)
    lora_a = torch.cat(a_rows).to(w.device)
    lora_b = w.new_zeros(w.shape[0], col)
    for (start, stop), theta in zip(chunk_bounds(layer.splits), layer.chunk_thetas):
        c0, b2_col = columns[id(theta)]
        block = w[start:stop] @ theta.phi.detach().double().to(w.device)
        if isinstance(theta, GiftThetaWithBias) and theta.in_bias is not None:
            block = block + theta.in_bias.detach().double().to(w.device)  # (x psi^T) b1 on every output
        lora_b[start:stop, c0:c0 + theta.rank] = block
        if b2_col is not None:
            lora_b[start:stop, b2_col] = 1.0  # x . b2 on every output
    return lora_a.to(dtype), lora_b.to(dtype)


# --------------------------------------------------------------------------- finding the layers


def _rows(layer, where: str) -> Tensor:
    try:
        return layer.weight_rows(original=True)
    except TypeError as exc:  # a module base without a registered dequantize
        raise TypeError(f"{where}: cannot export to LoRA: lora_B = W phi needs the base weight as a dense matrix; "
                        f"{exc}") from exc


def _from_apply_gift(model: nn.Module, adapter_name: Optional[str], what: str):
    from .multi import adapter_thetas

    state = _state(model)
    thetas = layer_thetas(model, what)
    chosen = thetas if adapter_name is None else adapter_thetas(model, adapter_name, what)
    key_of = {id(t): k for k, t in thetas.items()}
    layers = []
    for entry in state.entries:
        adapted = entry.adapted
        rows = _rows(adapted, f"{what}: layer {entry.name!r}")
        chunk = [chosen[key_of[id(t)]] for t in adapted.chunk_thetas]
        conv1d = not adapted.has_module_base and adapted.transposed
        layers.append(LoraLayer(entry.name, rows, tuple(adapted.splits), chunk, conv1d))
    heads = {h: model.get_submodule(h).state_dict() for h in state.heads}
    return model, layers, heads, state.config.task_type


def _from_peft(model: nn.Module, adapter_name: Optional[str], what: str):
    from .peft import GiftPeftLayer, GiftPeftModel  # only reached when gift_kernels.adapters.peft is imported

    tuner = next((m for m in model.modules() if isinstance(m, GiftPeftModel)), None)
    if tuner is None:
        raise ValueError(f"{what}: {type(model).__name__} holds no GIFT adapter (neither apply_gift nor GIFT through PEFT)")
    names = list(tuner.gift_thetas.keys())
    if adapter_name is None:
        active = [a for a in tuner.active_adapters if a in names]
        if len(active) != 1:
            raise ValueError(f"{what}: the PEFT model has active GIFT adapter(s) {active}; pass adapter_name= (one of "
                             f"{names}): a LoRA file holds one adapter")
        adapter_name = active[0]
    if adapter_name not in names:
        raise ValueError(f"{what}: the PEFT model has no GIFT adapter {adapter_name!r}; it has {names}")
    root = tuner.model
    layers, heads = [], {}
    for name, module in root.named_modules():
        if isinstance(module, GiftPeftLayer) and adapter_name in module.gift_theta:
            layers.append(LoraLayer(name, module.weight_rows(original=True), module.gift_splits[adapter_name],
                                    list(module.gift_theta[adapter_name]), module.transposed))
        saved = getattr(module, "modules_to_save", None)  # PEFT's ModulesToSaveWrapper
        if isinstance(saved, nn.ModuleDict) and adapter_name in saved:
            heads[name] = saved[adapter_name].state_dict()
    return root, layers, heads, tuner.peft_config[adapter_name].task_type


def lora_layers(model: nn.Module, adapter_name: Optional[str] = None, what: str = "lora_layers"):
    """``(base root, [LoraLayer], {head name: state_dict}, task_type)`` of one GIFT adapter of
    ``model``: adapted by :func:`~gift_kernels.apply_gift` / :func:`~gift_kernels.load_gift`
    (``adapter_name``: None for the one in ``model.gift_thetas``, or an added adapter), or a
    PEFT model with GIFT adapters (``adapter_name``: None for the active one)."""
    if _state(model) is not None:
        return _from_apply_gift(model, adapter_name, what)
    if "gift_kernels.adapters.peft" in sys.modules:
        return _from_peft(model, adapter_name, what)
    raise ValueError(f"{what}: {type(model).__name__} was not adapted with apply_gift/load_gift (and no GIFT PEFT "
                     f"model: gift_kernels.adapters.peft is not imported)")


def _target_modules(root: nn.Module, names: Sequence[str]) -> List[str]:
    """The adapted layers' last name components if they pick out exactly those layers (what
    engines expect, e.g. ``["q_proj", "v_proj"]``), else their full names."""
    suffixes = sorted({n.rsplit(".", 1)[-1] for n in names})
    # (the adapter store's Thetas are keyed by type too: never layers)
    picked = {n for n, m in root.named_modules() if n and n.rsplit(".", 1)[-1] in suffixes
              and not isinstance(m, GiftTheta)}
    return suffixes if picked == set(names) else sorted(names)


def _task_type(root: nn.Module, task_type: Optional[str]) -> Optional[str]:
    """The config's task type, else ``CAUSAL_LM`` for a transformers causal LM (by its class, as
    transformers' auto mapping names it; a ``generate`` method is not enough: encoders have one)."""
    if task_type is not None:
        return task_type
    try:
        from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES
    except ImportError:
        return None
    return "CAUSAL_LM" if type(root).__name__ in set(MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.values()) else None


def _engine_notes(rank: int, own_ranks: bool, heads: Sequence[str], left_out: Sequence[str],
                  task_type: Optional[str]) -> Dict[str, str]:
    """Per engine, what it does with the adapter (the facts of docs/serving.md)."""
    vllm_rank = vllm_max_lora_rank(rank)
    heads_text = ", ".join(heads)
    notes = {"peft": "PeftModel.from_pretrained loads it" + ("" if left_out else ": the GIFT model's outputs")
                     + (" (with the trained heads)" if heads else "")}
    non_vllm = [h for h in heads if h.rsplit(".", 1)[-1] not in _VLLM_HEADS]
    if vllm_rank is None:
        notes["vllm"] = f"refuses it: rank {rank} is above vLLM's largest --max-lora-rank ({VLLM_MAX_LORA_RANKS[-1]})"
    elif non_vllm or (heads and task_type != "SEQ_CLS"):
        notes["vllm"] = (f"refuses it: modules_to_save {heads_text} (vLLM loads only {'/'.join(_VLLM_HEADS)} "
                         f"heads, on a classification model); export with include_heads=False")
    else:
        notes["vllm"] = (f"loads it with --max-lora-rank {vllm_rank} (or more)"
                         + (" and its classification head" if heads else ""))
    if own_ranks:
        notes["sglang"] = "fails to load it (per-layer ranks: 'Sizes of tensors must match'); export with uniform_rank=True"
    else:
        notes["sglang"] = (f"loads it (--max-lora-rank {rank} or more)"
                           + (f" but drops the trained heads {heads_text} silently: outputs differ" if heads else ""))
    if heads:  # the converter stops at the first tensor that is not a LoRA factor
        notes["llama.cpp"] = "convert_lora_to_gguf.py refuses it (modules_to_save); export with include_heads=False"
    elif own_ranks:
        notes["llama.cpp"] = ("serves WRONG outputs: its converter applies one lora_alpha over each tensor's own rank; "
                              "export with uniform_rank=True")
    else:
        notes["llama.cpp"] = "convert_lora_to_gguf.py converts it and llama.cpp serves it"
    if left_out:
        notes = {e: n + f"; the trained heads {', '.join(left_out)} were left out: it serves the base model's heads"
                 for e, n in notes.items()}
    return notes


# --------------------------------------------------------------------------- export


def export_lora(
    model: nn.Module,
    directory: PathLike,
    *,
    adapter_name: Optional[str] = None,
    dtype: torch.dtype = torch.float32,
    uniform_rank: bool = True,
    include_heads: bool = True,
    base_model_name_or_path: Optional[str] = None,
) -> LoraExport:
    """Write one GIFT adapter of ``model`` as a PEFT LoRA adapter in ``directory``; return what
    was written (:class:`LoraExport`: the folder, the effective rank, vLLM's ``--max-lora-rank``,
    and per engine what it will do with the adapter), also logged at INFO.

    ``model``: adapted by :func:`~gift_kernels.apply_gift` / :func:`~gift_kernels.load_gift`,
    merged or not (``adapter_name``: an added adapter, see :mod:`gift_kernels.adapters.multi`),
    or a PEFT model with GIFT adapters (``adapter_name``: which; default the active one). The
    result, loaded over the same base model with ``PeftModel.from_pretrained``, reproduces the
    GIFT model's outputs. ``dtype``: of the LoRA tensors (float32 keeps the export exact to
    float32 rounding). ``uniform_rank=False``: each layer's own rank (PEFT and vLLM only; warns).
    ``include_heads=False``: leave the trained heads out (for vLLM on a causal LM, llama.cpp,
    SGLang; the config then has no head task type, which would make PEFT expect the head). See the module docstring for ranks, biases, heads and quantized bases.
    """
    from safetensors.torch import save_file

    what = f"export_lora({directory})"
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise TypeError(f"{what}: dtype must be a floating torch.dtype, got {dtype!r}")
    root, layers, heads, task_type = lora_layers(model, adapter_name, what)
    if not layers:
        raise ValueError(f"{what}: the adapter has no adapted layer to export")
    left_out: Tuple[str, ...] = ()
    if not include_heads and heads:
        # PEFT's task models (SEQ_CLS, ...) wrap their head as modules_to_save and refuse a file without it
        left_out, heads, task_type = tuple(sorted(heads)), {}, None
    task_type = _task_type(root, task_type)
    factors = {layer.name: lora_factors(layer, dtype) for layer in layers}
    ranks = {name: a.shape[0] for name, (a, _) in factors.items()}
    rank = max(ranks.values())
    tensors: Dict[str, Tensor] = {}
    for name, (a, b) in factors.items():
        if uniform_rank and a.shape[0] < rank:
            a = torch.cat([a, a.new_zeros(rank - a.shape[0], a.shape[1])])
            b = torch.cat([b, b.new_zeros(b.shape[0], rank - b.shape[1])], dim=1)
        tensors[f"{_PREFIX}{name}.lora_A.weight"] = a.detach().to("cpu").contiguous()
        tensors[f"{_PREFIX}{name}.lora_B.weight"] = b.detach().to("cpu").contiguous()
    for head, state in heads.items():
        for pname, t in state.items():
            tensors[f"{_PREFIX}{head}.{pname}"] = t.detach().to("cpu").contiguous().clone()
    if uniform_rank:
        base_rank, patterns = rank, {}
    else:
        base_rank = max(set(ranks.values()), key=list(ranks.values()).count)
        patterns = {name: r for name, r in ranks.items() if r != base_rank}
    config = {
        "peft_type": "LORA",
        "task_type": task_type,
        "base_model_name_or_path": base_model_name_or_path,
        "r": base_rank,
        "lora_alpha": base_rank,  # scaling alpha / r = 1
        "rank_pattern": patterns,
        "alpha_pattern": dict(patterns),
        "target_modules": _target_modules(root, [layer.name for layer in layers]),
        "lora_dropout": 0.0,
        "bias": "none",
        "fan_in_fan_out": any(layer.conv1d for layer in layers),
        "modules_to_save": sorted(heads) or None,
        "use_rslora": False,
        "use_dora": False,
        "lora_bias": False,
        "init_lora_weights": True,
        "inference_mode": True,
        "layers_to_transform": None,
        "layers_pattern": None,
    }
    config_text = json.dumps(config, indent=2, sort_keys=True) + "\n"
    from .. import __version__

    metadata = {"format": "pt", "exported_by": f"gift_kernels {__version__} export_lora",
                "config_sha256": hashlib.sha256(config_text.encode()).hexdigest()}
    own_ranks = bool(patterns)
    notes = _engine_notes(rank, own_ranks, sorted(heads), left_out, task_type)
    out = prepare_directory(directory, what)
    write_files_atomically(out, [(out / LORA_WEIGHTS_FILE, lambda p: save_file(tensors, p, metadata=metadata)),
                                 (out / LORA_CONFIG_FILE, lambda p: Path(p).write_text(config_text))], what)
    result = LoraExport(path=out, rank=rank, ranks=ranks, vllm_max_lora_rank=vllm_max_lora_rank(rank),
                        task_type=task_type, heads=tuple(sorted(heads)), heads_left_out=left_out, engines=notes)
    _report(result, what, warn=own_ranks or bool(heads) or bool(left_out))
    return result


def _report(result: LoraExport, what: str, warn: bool) -> None:
    """Log what was written; warn (per engine) where an engine would refuse it or serve it wrong."""
    summary = (f"{what}: LoRA rank {result.rank} (vLLM: --max-lora-rank {result.vllm_max_lora_rank})"
               if result.vllm_max_lora_rank is not None else f"{what}: LoRA rank {result.rank}")
    per_engine = "\n".join(f"  {engine}: {result.engines[engine]}" for engine in _ENGINES)
    logger.info("%s\n%s", summary, per_engine)
    if warn:
        warnings.warn(f"{summary}; per engine:\n{per_engine}", UserWarning, stacklevel=3)
