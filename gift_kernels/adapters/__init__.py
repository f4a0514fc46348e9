"""Whole models: ``config`` (GiftConfig), ``planning`` (the one planner, shared with the PEFT
tuner), ``model`` (apply_gift, report, merge), ``checkpoint`` (save_gift / load_gift),
``training`` (FSDP2 plan, input grads for checkpointing) and ``peft`` (GIFT as a PEFT method;
imported explicitly, as it needs peft)."""

from .checkpoint import ADAPTER_FILE, CONFIG_FILE, load_gift, save_gift
from .config import GiftConfig
from .model import GiftReport, apply_gift, gift_report, is_adapted, merge_gift, print_trainable_parameters, unmerge_gift
from .training import enable_input_require_grads, fully_shard_gift, theta_parameters

__all__ = [
    "ADAPTER_FILE",
    "CONFIG_FILE",
    "GiftConfig",
    "GiftReport",
    "apply_gift",
    "enable_input_require_grads",
    "fully_shard_gift",
    "gift_report",
    "is_adapted",
    "load_gift",
    "merge_gift",
    "print_trainable_parameters",
    "save_gift",
    "theta_parameters",
    "unmerge_gift",
]
