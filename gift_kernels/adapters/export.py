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
  ``alpha_pattern``: vLLM and its relatives read one global ``r`` and ``lora_alpha``.
  ``uniform_rank=False`` writes each layer's own rank (smaller files) with PEFT's patterns.
- Trained heads (``trainable_modules``, a task head) are written as PEFT's ``modules_to_save``
  (PEFT loads them; vLLM refuses adapters with ``modules_to_save``).

Where GIFT is shared and LoRA is not, the export is larger: per layer ``(d_in + d_out) R``
numbers against GIFT's ``2 d_in r`` per layer *type* (see docs/serving.md for the sizes).

The files are written atomically (:func:`gift_kernels.adapters.checkpoint.write_files_atomically`:
tensors first, the commit point, then the config), and the tensor file's metadata records the
config's SHA-256 and the exporting version.
"""

from __future__ import annotations

import hashlib
import json
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import torch
from torch import Tensor, nn

from ..nn.merge import chunk_bounds
from ..nn.theta import GiftTheta, GiftThetaWithBias
from .checkpoint import PathLike, prepare_directory, write_files_atomically
from .model import _state, layer_thetas

__all__ = ["LoraLayer", "LORA_CONFIG_FILE", "LORA_WEIGHTS_FILE", "export_lora", "lora_factors", "lora_layers"]

LORA_CONFIG_FILE = "adapter_config.json"
LORA_WEIGHTS_FILE = "adapter_model.safetensors"
_PREFIX = "base_model.model."  # PEFT's key prefix for the base model's modules


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


# --------------------------------------------------------------------------- export


def export_lora(
    model: nn.Module,
    directory: PathLike,
    *,
    adapter_name: Optional[str] = None,
    dtype: torch.dtype = torch.float32,
    uniform_rank: bool = True,
    base_model_name_or_path: Optional[str] = None,
) -> Path:
    """Write one GIFT adapter of ``model`` as a PEFT LoRA adapter in ``directory`` and return it.

    ``model``: adapted by :func:`~gift_kernels.apply_gift` / :func:`~gift_kernels.load_gift`,
    merged or not (``adapter_name``: an added adapter, see :mod:`gift_kernels.adapters.multi`),
    or a PEFT model with GIFT adapters (``adapter_name``: which; default the active one). The
    result, loaded over the same base model with ``PeftModel.from_pretrained``, reproduces the
    GIFT model's outputs. ``dtype``: of the LoRA tensors (float32 keeps the export exact to
    float32 rounding). See the module docstring for ranks, biases, heads and quantized bases.
    """
    from safetensors.torch import save_file

    what = f"export_lora({directory})"
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise TypeError(f"{what}: dtype must be a floating torch.dtype, got {dtype!r}")
    root, layers, heads, task_type = lora_layers(model, adapter_name, what)
    if not layers:
        raise ValueError(f"{what}: the adapter has no adapted layer to export")
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
    out = prepare_directory(directory, what)
    write_files_atomically(out, [(out / LORA_WEIGHTS_FILE, lambda p: save_file(tensors, p, metadata=metadata)),
                                 (out / LORA_CONFIG_FILE, lambda p: Path(p).write_text(config_text))], what)
    return out
