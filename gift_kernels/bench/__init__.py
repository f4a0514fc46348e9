"""Benchmarks of GIFT against its references (the frozen layer, the authors' formulation,
PEFT LoRA): one module set that ``gift-kernels bench`` (the CPU bench), the GPU check
(``benchmarks/gpu_check.py``) and the pytest-benchmark suite (``pytest benchmarks/
--benchmark-only``) drive.

    shapes     the shapes (CPU list, GPU grid, headline shapes)
    problems   inputs drawn on the device; distinct weights for graph replays
    providers  the rows (frozen, authors, peft-lora, gift-<backend>-<form>[-<fusion>])
    validate   each row against a reference on the device; the tolerance table per dtype
    timing     host clock and CUDA-event timers, CUDA-graph replays
    run        shape by shape (in process, or in worker processes that survive a dead CUDA context)
    worker     the worker process (``python -m gift_kernels.bench.worker``)
    report     targets, markdown / JSON (rewritten after every shape), the plot
"""

from .problems import Inputs, Problem, flops, l2_bytes, min_bytes, weights_beyond_l2
from .providers import FORMS, FUSIONS, MODES, Provider, Selection, StepResult, auto_forms, build, saved_bytes, step
from .report import (Targets, cpu_targets, environment, form_choice, gpu_targets, machine_name, paired_ratio,
                     rows_of, to_markdown, verdict)
from .report import write as write_report
from .run import DTYPES, FatalDeviceError, Spec, bench_shape, is_fatal, kill_group, run, run_isolated
from .shapes import (CPU_DECODE, CPU_HEADLINE, CPU_SHAPES, DECODE_HEADLINE, DRY_SHAPES, GPU_SHAPES, HEADLINE, HEADLINE_R16, HEADLINE_R64,
                     LAYERS, QUICK_SHAPES, RANKS, TOKENS, Shape, gpu_order, parse_shape)
from .timing import DeviceTimer, HostTimer, graph_replay, mode_call
from .validate import TOL, References, check, reference, rel_err

__all__ = [
    "CPU_DECODE", "CPU_HEADLINE", "CPU_SHAPES", "DECODE_HEADLINE", "DRY_SHAPES", "DTYPES", "DeviceTimer", "FORMS", "FUSIONS", "FatalDeviceError",
    "GPU_SHAPES", "HEADLINE", "HEADLINE_R16", "HEADLINE_R64", "HostTimer", "Inputs", "LAYERS", "MODES", "Problem",
    "Provider", "QUICK_SHAPES", "RANKS", "References", "Selection", "Shape", "Spec", "StepResult", "TOKENS", "TOL",
    "Targets", "auto_forms", "bench_shape", "build", "check", "cpu_targets", "environment", "flops", "form_choice",
    "gpu_order", "gpu_targets", "graph_replay", "is_fatal", "kill_group", "l2_bytes", "machine_name", "min_bytes", "mode_call",
    "paired_ratio", "parse_shape", "reference", "rel_err", "rows_of", "run", "run_isolated", "saved_bytes", "step", "to_markdown",
    "verdict", "weights_beyond_l2", "write_report",
]
