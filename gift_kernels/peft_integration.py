"""Former location of :mod:`gift_kernels.adapters.peft` (importing either registers "GIFT" with PEFT)."""

from .adapters.peft import GiftPeftConfig, GiftPeftLayer, GiftPeftModel, GiftPeftType, register  # noqa: F401

__all__ = ["GiftPeftConfig", "GiftPeftLayer", "GiftPeftModel", "GiftPeftType", "register"]
