"""Training adapted models at scale: what shared Thetas need from checkpointing and FSDP2.

    enable_input_require_grads(model)      # before reentrant activation checkpointing
    fully_shard_gift(model, model.blocks)  # FSDP2 plan: blocks sharded alone, Thetas at the root

Both work on any model whose GIFT layers use :class:`~gift_kernels.nn.GiftTheta`
modules (``apply_gift`` or built by hand). docs/distributed.md says why each is needed and
what was verified where.
"""

from __future__ import annotations

from typing import Iterable, Optional, Set

from torch import nn
from torch.utils.hooks import RemovableHandle

from ..nn.theta import GiftTheta

__all__ = ["enable_input_require_grads", "fully_shard_gift", "theta_parameters"]


def theta_parameters(model: nn.Module) -> Set[nn.Parameter]:
    """Every parameter of every Theta in ``model``, each once (however many layers share it)."""
    return {p for m in model.modules() if isinstance(m, GiftTheta) for p in m.parameters()}


def _input_embeddings(model: nn.Module) -> nn.Module:
    get = getattr(model, "get_input_embeddings", None)
    if callable(get):
        try:
            emb = get()
        except NotImplementedError:
            emb = None
        if emb is not None:
            return emb
    for module in model.modules():
        if isinstance(module, nn.Embedding):
            return module
    raise ValueError(
        f"enable_input_require_grads: {type(model).__name__} has no get_input_embeddings() and no nn.Embedding; "
        "pass the module whose output feeds the first checkpointed block as embeddings="
    )


def enable_input_require_grads(model: nn.Module, embeddings: Optional[nn.Module] = None) -> RemovableHandle:
    """Make the (frozen) input embeddings' output require grad, as reentrant checkpointing needs.

    ``torch.utils.checkpoint(..., use_reentrant=True)`` runs the block's forward under
    ``no_grad`` and reaches the block's parameters only through its tensor inputs: when none of
    them requires grad -- the input embeddings are frozen, as in every GIFT fine-tune -- the
    block's Theta grads are lost (an error if every block is checkpointed, silently if
    something trainable follows). Non-reentrant checkpointing does not need this.

    The same as transformers' ``PreTrainedModel.enable_input_require_grads`` (which
    transformers calls itself in ``gradient_checkpointing_enable``), for any model.
    ``embeddings`` defaults to ``model.get_input_embeddings()``, else the first
    ``nn.Embedding``. Returns the hook's handle (``.remove()`` undoes it).
    """
    module = embeddings if embeddings is not None else _input_embeddings(model)

    def _require_grad(_module, _inputs, output):
        output.requires_grad_(True)

    return module.register_forward_hook(_require_grad)


def fully_shard_gift(model: nn.Module, blocks: Iterable[nn.Module], **fully_shard_kwargs) -> nn.Module:
    """Shard an adapted model with FSDP2: each block on its own, the shared Thetas at the root.

    A parameter can belong to one FSDP unit only. A Theta shared by every block would be
    claimed by the first block's unit, and sharding the second block then fails inside torch
    (it finds an already-sharded DTensor). So each block is sharded with the Theta parameters
    in ``ignored_params``, and the root unit shards the Thetas with the rest of the root's
    parameters (embeddings, head): FSDP2 gathers them before the first block runs and
    reduce-scatters their summed grads after the last block's backward. The frozen backbone
    keeps ``requires_grad=False`` (FSDP2 shards per parameter, so frozen and trainable
    parameters can share a unit).

    ``fully_shard_kwargs`` (``mesh``, ``reshard_after_forward``, ``mp_policy``, ...) go to every
    ``fully_shard`` call; ``ignored_params`` given here are ignored everywhere. Returns
    ``model`` (now an ``FSDPModule``).
    """
    from torch.distributed.fsdp import fully_shard

    user_ignored = set(fully_shard_kwargs.pop("ignored_params", None) or ())
    thetas = theta_parameters(model)
    blocks = list(blocks)
    if not blocks:
        raise ValueError("fully_shard_gift: blocks is empty; pass the model's transformer blocks (e.g. model.layers)")
    for block in blocks:
        if block is model:
            raise ValueError("fully_shard_gift: a block cannot be the model itself; the root holds the Thetas")
        fully_shard(block, ignored_params=thetas | user_ignored, **fully_shard_kwargs)
    fully_shard(model, ignored_params=user_ignored or None, **fully_shard_kwargs)
    return model
