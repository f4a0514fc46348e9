"""``load_gift``: a saved adapter applied to a model, in one of two plain ways.

    model = load_gift(fresh_base_model, "out/")                 # adapts the base model with it
    load_gift(model, "out/legal", adapter_name="legal")         # adds it to an adapted model

On a model that is not adapted, the checkpoint's config is planned on it and applied, and the
saved Thetas (and heads) are loaded: the result reproduces the saved model. On a model already
adapted (``apply_gift`` / ``load_gift``), an ``adapter_name`` is required and the adapter is
*added* beside the ones it holds, frozen, for per-sample choice in one forward
(:mod:`gift_kernels.adapters.multi`); its layers keep the Thetas they hold. The files are read
and checked by :mod:`gift_kernels.adapters.checkpoint` before the model is touched.
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import torch
from torch import nn

from .checkpoint import PathLike, adapter_tensors, check_base, check_saved_tensors, read_checkpoint
from .model import _state, execute, plan_adapter
from .multi import add_adapter, check_adapter_name
from .planning import THETAS_ATTR

__all__ = ["load_gift"]


def load_gift(model: nn.Module, directory: PathLike, *, strict: bool = True,
              adapter_name: Optional[str] = None) -> nn.Module:
    """Load the adapter saved in ``directory`` into ``model`` and return it.

    - ``model`` not adapted: adapt it with the saved config and load the saved Thetas and heads;
      ``adapter_name`` (default ``"default"``) names the adapter in ``model.gift_thetas``.
    - ``model`` already adapted: with ``adapter_name``, add the adapter under that name beside
      the ones it holds (:func:`gift_kernels.adapters.multi.add_adapter`, the checks there);
      without it, refused (a second ``load_gift`` does not replace the adapter it holds).

    Raises, leaving ``model`` unchanged, if the files are missing, corrupt, of another format
    version or fail their checksums, if the directory holds a PEFT adapter (the error points to
    ``PeftModel.from_pretrained``), if the saved config does not fit the model (its targets match
    nothing, ...), if the model's adapted layers are not the ones the adapter was saved from, or
    if the checkpoint's keys, shapes or dtypes differ from what the config builds on this model.
    ``strict=False`` allows missing head tensors (the heads keep their current values); Theta
    tensors are always required.
    """
    src = Path(directory)
    what = f"load_gift({src})"
    if adapter_name is not None:
        check_adapter_name(adapter_name, what)
    if _state(model) is not None:
        if adapter_name is None:
            raise ValueError(f"{what}: {type(model).__name__} is already adapted; to add this adapter beside the ones "
                             f"it holds pass adapter_name=..., or load it into a fresh copy of the base model")
        return add_adapter(model, src, adapter_name, strict=strict)
    config, saved, ten_path, base = read_checkpoint(src, what)
    ap = plan_adapter(model, config, what=what)
    expected = {f"{THETAS_ATTR}.{k}": v for k, v in ap.plan.theta_shapes().items()}
    for head in ap.heads:
        for pname, t in model.get_submodule(head).state_dict().items():
            expected[f"{head}.{pname}"] = (t.shape, t.dtype)

    check_saved_tensors(saved, expected, ten_path, model, config, strict, what)
    # what the keys and shapes cannot tell apart (one more layer sharing a Theta, ...)
    check_base(base, {t.name: (t.d_in, t.d_out) for t in ap.plan.targets}, ten_path, model, what)

    execute(model, ap, adapter_name or "default")
    current = adapter_tensors(model, ap.heads, what)
    with torch.no_grad():
        for k, t in saved.items():
            current[k].copy_(t)
    return model
