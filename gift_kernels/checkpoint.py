"""Adapter-only checkpoints: the Thetas and the trainable heads, not the base model.

    save_gift(model, "out/")        # out/gift_adapter.safetensors + out/gift_config.json
    model = load_gift(fresh_base_model, "out/")

``gift_adapter.safetensors`` holds ``gift_thetas.<key>.<phi|psi|in_bias|out_bias>`` (each
shared Theta once, not once per layer) and ``<head>.<name>`` for every module in the config's
``trainable_modules``. ``gift_config.json`` is the :class:`~gift_kernels.adapter.GiftConfig`.

``load_gift`` applies the config to a fresh copy of the base model and copies the tensors in;
given the same base weights it reproduces the saved model's outputs exactly. Every key and
shape is checked against what the config builds on this model *before* the model is changed:
a checkpoint that does not fit raises an error naming the key, and leaves the model as it was.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Dict, Union

import torch
from torch import Tensor, nn

from .adapter import THETAS_ATTR, GiftConfig, _adapter_state, _execute, _make_theta, _plan

__all__ = ["ADAPTER_FILE", "CONFIG_FILE", "load_gift", "save_gift"]

ADAPTER_FILE = "gift_adapter.safetensors"
CONFIG_FILE = "gift_config.json"
_FORMAT = "gift_kernels.adapter.v1"

PathLike = Union[str, os.PathLike]


def _adapter_tensors(model: nn.Module, heads) -> Dict[str, Tensor]:
    tensors: Dict[str, Tensor] = {}
    for key, theta in getattr(model, THETAS_ATTR).items():
        for pname, p in theta.named_parameters():
            tensors[f"{THETAS_ATTR}.{key}.{pname}"] = p
    for head in heads:
        for pname, t in model.get_submodule(head).state_dict().items():
            tensors[f"{head}.{pname}"] = t
    return tensors


def _full(t: Tensor) -> Tensor:
    """A plain CPU copy; a sharded DTensor (FSDP2) is all-gathered first (a collective)."""
    t = t.detach()
    if hasattr(t, "full_tensor"):
        t = t.full_tensor()
    return t.to("cpu").contiguous().clone()


def save_gift(model: nn.Module, directory: PathLike) -> Path:
    """Write the adapter of ``model`` (adapted by :func:`~gift_kernels.apply_gift`) to ``directory``.

    Works merged or not (the Thetas do not change on merge). Under torch.distributed, call it
    on every rank: sharded Thetas (FSDP2) are gathered, and only rank 0 writes. Returns the
    directory.
    """
    from safetensors.torch import save_file

    state = _adapter_state(model, "save_gift")
    tensors = {k: _full(v) for k, v in _adapter_tensors(model, state.heads).items()}
    out = Path(directory)
    dist = torch.distributed
    if dist.is_available() and dist.is_initialized() and dist.get_rank() != 0:
        return out
    out.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(out / ADAPTER_FILE), metadata={"format": _FORMAT})
    (out / CONFIG_FILE).write_text(state.config.to_json() + "\n")
    return out


def _expected_shapes(model: nn.Module, plan) -> Dict[str, torch.Size]:
    expected: Dict[str, torch.Size] = {}
    for key, spec in plan.thetas.items():
        # built on the meta device: shapes only, nothing allocated, the RNG untouched
        meta = type(spec)(spec.key, spec.d_in, spec.dtype, torch.device("meta"), spec.users)
        for pname, p in _make_theta(meta, plan.config).named_parameters():
            expected[f"{THETAS_ATTR}.{key}.{pname}"] = p.shape
    for head in plan.heads:
        for pname, t in model.get_submodule(head).state_dict().items():
            expected[f"{head}.{pname}"] = t.shape
    return expected


def load_gift(model: nn.Module, directory: PathLike, *, strict: bool = True) -> nn.Module:
    """Apply the adapter saved in ``directory`` to ``model`` (a fresh base model) and return it.

    Raises, leaving ``model`` unchanged, if the model is already adapted, if the saved config
    does not fit the model (its targets match nothing, ...), or if the checkpoint's keys or
    shapes differ from what the config builds on this model. ``strict=False`` allows missing
    head tensors (the heads keep their current values); Theta tensors are always required.
    """
    from safetensors import safe_open

    src = Path(directory)
    cfg_path, ten_path = src / CONFIG_FILE, src / ADAPTER_FILE
    for p in (cfg_path, ten_path):
        if not p.is_file():
            raise FileNotFoundError(f"load_gift: {p} does not exist; expected {CONFIG_FILE} and {ADAPTER_FILE} in {src}")
    try:
        config = GiftConfig.from_dict(json.loads(cfg_path.read_text()))
    except (ValueError, TypeError) as exc:
        raise ValueError(f"load_gift: {cfg_path} is not a valid GiftConfig: {exc}") from exc

    plan = _plan(model, config, what=f"load_gift({src})")
    expected = _expected_shapes(model, plan)
    with safe_open(str(ten_path), framework="pt") as f:
        saved = {k: f.get_tensor(k) for k in f.keys()}

    unexpected = sorted(set(saved) - set(expected))
    if unexpected:
        raise ValueError(
            f"load_gift: {ten_path} holds key {unexpected[0]!r} that the config builds nowhere on "
            f"{type(model).__name__} ({len(unexpected)} unexpected key(s): {unexpected[:5]})"
        )
    missing = sorted(k for k in set(expected) - set(saved) if strict or k.startswith(THETAS_ATTR + "."))
    if missing:
        raise ValueError(
            f"load_gift: {ten_path} lacks key {missing[0]!r} ({len(missing)} missing key(s): {missing[:5]})"
        )
    for k, t in saved.items():
        if t.shape != expected[k]:
            raise ValueError(
                f"load_gift: {k!r} has shape {tuple(t.shape)} in {ten_path} but {tuple(expected[k])} on "
                f"{type(model).__name__}; the checkpoint was saved from a different model or config"
            )

    _execute(model, plan)
    current = _adapter_tensors(model, plan.heads)
    with torch.no_grad():
        for k, t in saved.items():
            current[k].copy_(t)
    return model
