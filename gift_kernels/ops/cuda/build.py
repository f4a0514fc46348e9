"""How to compile the CUDA C++ extension in ``csrc/``: sources, flags, toolkit discovery.

The one place that knows it, used by ``setup.py`` (ahead-of-time build of ``gift_kernels._C``),
by :mod:`gift_kernels.ops.cuda.extension` (JIT build when ``GIFT_KERNELS_CUDA_JIT=1``), by
``scripts/build_cuda_extension.py`` (CI and the GPU machine) and by the tests (the CPU
emulation build). Importing it imports nothing but the standard library; ``setup.py`` loads
it by path, without importing the package.

Environment switches (documented in docs/cuda_extension.md):

    GIFT_KERNELS_FORCE_CUDA_BUILD=1  setup.py builds the extension or fails (default: build
                                     when torch is a CUDA build and nvcc is found, else skip)
    GIFT_KERNELS_SKIP_CUDA_BUILD=1   setup.py never builds it
    GIFT_KERNELS_CUDA_ARCH_LIST      target architectures, e.g. ``8.0;9.0`` (default) or
                                     ``9.0+PTX``; falls back to TORCH_CUDA_ARCH_LIST
    GIFT_KERNELS_NVCC_THREADS        nvcc ``--threads`` (per-architecture compiles in parallel,
                                     default 2)
    CUDA_HOME                        toolkit root; found from nvcc when unset (find_cuda_home)
    MAX_JOBS                         parallel compile jobs (read by torch's build helpers)
"""

from __future__ import annotations

import glob
import os
import re
import shutil
import subprocess
import sys
import sysconfig
import time
from pathlib import Path
from typing import Dict, List, Optional

ROOT = Path(__file__).resolve().parents[3]  # the source checkout (holds csrc/ when there is one)
CSRC = ROOT / "csrc"
EXTENSION_NAME = "gift_kernels._C"
DEFAULT_ARCH = "8.0;9.0"

CUDA_SOURCES = ("gift_ops.cpp", "gift_launch.cu")
EMULATION_SOURCES = ("gift_ops.cpp", "emulation/gift_launch_emulated.cpp")


def have_sources() -> bool:
    """Whether this is a source checkout with csrc/ (an installed wheel has none)."""
    return all((CSRC / s).is_file() for s in CUDA_SOURCES)


def sources(emulation: bool = False) -> List[str]:
    return [str(CSRC / s) for s in (EMULATION_SOURCES if emulation else CUDA_SOURCES)]


def _is_toolkit_root(path: Optional[str]) -> bool:
    return bool(path) and os.path.isfile(os.path.join(path, "bin", "nvcc")) and bool(
        glob.glob(os.path.join(path, "lib*", "libcudart.so*")) + glob.glob(os.path.join(path, "targets", "*", "lib", "libcudart.so*"))
    )


def find_cuda_home() -> Optional[str]:
    """The CUDA toolkit root, or None.

    ``CUDA_HOME`` when it points at a toolkit; else the root nvcc itself reports: the ``nvcc``
    on PATH may be a wrapper script, so its parent folder (torch's guess) can be wrong, but
    ``nvcc --dryrun`` prints the real root on its ``TOP=`` line.
    """
    env = os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH")
    if _is_toolkit_root(env):
        return env
    nvcc = shutil.which("nvcc")
    if nvcc is None:
        return None
    try:
        out = subprocess.run(
            [nvcc, "--dryrun", "-c", "-x", "cu", os.devnull], capture_output=True, text=True, timeout=60
        )
    except (OSError, subprocess.SubprocessError):
        return None
    match = re.search(r"^#\$ TOP=(.+)$", out.stdout + out.stderr, re.MULTILINE)
    if match:
        top = os.path.realpath(match.group(1).strip())
        if _is_toolkit_root(top):
            return top
    guess = os.path.dirname(os.path.dirname(os.path.realpath(nvcc)))
    return guess if _is_toolkit_root(guess) else None


def use_cuda_home() -> Optional[str]:
    """Find the toolkit and make torch's build helpers use it (they read CUDA_HOME at import)."""
    home = find_cuda_home()
    if home is not None:
        os.environ["CUDA_HOME"] = home
        cpp_ext = sys.modules.get("torch.utils.cpp_extension")
        if cpp_ext is not None:
            cpp_ext.CUDA_HOME = home
    return home


def arch_list() -> str:
    return os.environ.get("GIFT_KERNELS_CUDA_ARCH_LIST") or os.environ.get("TORCH_CUDA_ARCH_LIST") or DEFAULT_ARCH


def nvcc_threads() -> int:
    return int(os.environ.get("GIFT_KERNELS_NVCC_THREADS", "2"))


def extra_include_dirs() -> List[str]:
    """Headers torch's CUDA headers want that a bare toolkit may lack (cusparse.h): the ones the
    nvidia-* wheels installed beside torch ship."""
    dirs = []
    for site in {sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"]}:
        dirs += sorted(glob.glob(os.path.join(site, "nvidia", "cu[0-9]*", "include")))
        dirs += sorted(glob.glob(os.path.join(site, "nvidia", "cusparse", "include")))
    return dirs


def torch_include_dirs() -> List[str]:
    from torch.utils.cpp_extension import include_paths

    return include_paths()


def compile_flags(emulation: bool = False) -> Dict[str, List[str]]:
    """Flags for the project's own sources: warnings are errors. Third-party headers (torch,
    Python, the toolkit, nvidia wheels) are system includes, so their warnings are not ours."""
    system = torch_include_dirs() + extra_include_dirs()
    if emulation:
        home = find_cuda_home()
        if home is not None:
            system.append(os.path.join(home, "include"))  # cuda_fp16.h / cuda_bf16.h on the host
    isystem = [f for d in system for f in ("-isystem", d)]
    warn = ["-Wall", "-Wextra", "-Werror"]
    if emulation:
        # The kernels' CUDA pragmas mean nothing to the host compiler; the same no-implicit-
        # conversion macros as the real build keep the half/bfloat16 code honest.
        cxx = ["-O1"] + warn + isystem + [
            "-DGIFT_EMULATION",
            "-Wno-unknown-pragmas",
            "-D__CUDA_NO_HALF_OPERATORS__",
            "-D__CUDA_NO_HALF_CONVERSIONS__",
            "-D__CUDA_NO_BFLOAT16_CONVERSIONS__",
        ]
        return {"cxx": cxx, "nvcc": []}
    cxx = ["-O3"] + warn + isystem
    nvcc = [
        "-O3",
        "--threads",
        str(nvcc_threads()),
        "-Werror",
        "all-warnings",
        "-Xcompiler",
        ",".join(warn),
    ] + isystem
    return {"cxx": cxx, "nvcc": nvcc}


def build_directory(kind: str) -> str:
    """A build folder per torch version, so two venvs never share object files."""
    import torch

    cuda = torch.version.cuda or "cpu"
    path = ROOT / "build" / f"{kind}-torch{torch.__version__.split('+')[0]}-cu{cuda}"
    path.mkdir(parents=True, exist_ok=True)
    return str(path)


def _load(name: str, emulation: bool, verbose: bool) -> str:
    if not have_sources():
        raise ImportError(f"no csrc/ beside the package at {ROOT}: the JIT build needs a source checkout")
    import torch.utils.cpp_extension as cpp_ext

    flags = compile_flags(emulation)
    build_dir = build_directory(name)
    cpp_ext.load(
        name=name,
        sources=sources(emulation),
        extra_cflags=flags["cxx"],
        extra_cuda_cflags=flags["nvcc"],
        build_directory=build_dir,
        with_cuda=not emulation,
        is_python_module=False,
        verbose=verbose,
    )
    return build_dir


def jit_load(verbose: bool = False) -> str:
    """Build (ninja, incremental) and load the CUDA extension from csrc/; returns the build
    folder. Registers torch.ops.gift_kernels.cuda_gift_linear_fwd / _bwd."""
    import torch

    if torch.version.cuda is None:
        raise ImportError(f"torch {torch.__version__} is a CPU-only build: it cannot compile a CUDA extension")
    if use_cuda_home() is None:
        raise ImportError("no CUDA toolkit found (nvcc not on PATH and CUDA_HOME unset)")
    os.environ["TORCH_CUDA_ARCH_LIST"] = arch_list()
    return _load("gift_kernels_cuda", emulation=False, verbose=verbose)


def emulation_load(verbose: bool = False) -> str:
    """Build and load the CPU emulation of the extension (tests only): the same glue and
    kernels, run by csrc/emulation/simt_emulator.h, registered as
    torch.ops.gift_kernels_emulated.cuda_gift_linear_fwd / _bwd for CPU tensors."""
    if find_cuda_home() is None:
        raise ImportError("the emulation build needs the CUDA toolkit's headers (cuda_fp16.h); no toolkit found")
    return _load("gift_kernels_emulated", emulation=True, verbose=verbose)


def main(argv: Optional[List[str]] = None) -> int:
    """``python gift_kernels/ops/cuda/build.py [--emulation] [--verbose]``: build and load."""
    import argparse

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--emulation", action="store_true", help="the CPU emulation build (tests)")
    parser.add_argument("--verbose", action="store_true")
    args = parser.parse_args(argv)
    start = time.perf_counter()
    path = (emulation_load if args.emulation else jit_load)(verbose=args.verbose)
    print(f"built and loaded in {time.perf_counter() - start:.1f} s: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
