"""Benchmarks of GIFT against its references (the frozen layer, the authors' formulation,
PEFT LoRA); ``gift-kernels bench`` and ``benchmarks/gpu_check.py`` drive it."""
