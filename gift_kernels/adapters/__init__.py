"""Whole models: ``config`` (GiftConfig), ``planning`` (the one planner, shared with the PEFT
tuner), ``model`` (apply_gift, report, merge; the adapter store ``model.gift_thetas[adapter][key]``),
``checkpoint`` (adapter files: save_gift, reading and checking), ``loading`` (load_gift),
``training`` (FSDP2 plan, input grads for checkpointing), ``multi`` (several named adapters,
per-sample choice in one forward), ``export`` (exact export to PEFT LoRA) and ``peft`` (GIFT as a PEFT method;
imported explicitly, as it needs peft)."""

from .checkpoint import ADAPTER_FILE, CONFIG_FILE, save_gift
from .config import GiftConfig
from .export import export_lora
from .loading import load_gift
from .model import GiftReport, apply_gift, gift_report, is_adapted, merge_gift, print_trainable_parameters, unmerge_gift
from .multi import delete_gift_adapter, gift_adapter_names, mixed_adapters
from .training import enable_input_require_grads, fully_shard_gift, theta_parameters

__all__ = [
    "ADAPTER_FILE",
    "CONFIG_FILE",
    "GiftConfig",
    "GiftReport",
    "apply_gift",
    "delete_gift_adapter",
    "enable_input_require_grads",
    "export_lora",
    "fully_shard_gift",
    "gift_adapter_names",
    "gift_report",
    "is_adapted",
    "load_gift",
    "merge_gift",
    "mixed_adapters",
    "print_trainable_parameters",
    "save_gift",
    "theta_parameters",
    "unmerge_gift",
]
