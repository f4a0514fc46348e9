"""Build the CUDA C++ extension (csrc/) for real and check it, with or without a GPU.

    python scripts/build_cuda_extension.py          # CI: in .venv-cuda (torch 2.14.1, cu130)
    python scripts/build_cuda_extension.py --here   # this interpreter's torch (the GPU machine)

Without ``--here``: reuse ``.venv-cuda/`` when its torch is the wanted version, else create it
and ``pip install torch==2.14.1 ninja numpy`` (local wheels on the CI machines); then run
``--here`` inside it. The CPU torch wheel cannot compile a CUDA extension (it lacks the
c10/cuda headers), hence the separate venv.

``--here``: JIT-build csrc/ with ninja (:func:`gift_kernels.ops.cuda.build.jit_load`,
incremental: a second run only relinks what changed), load it through the ``cuda`` backend's
launcher module, and check that

- both ops are registered with the schemas of the Python ops they mirror, with CUDA kernels,
  and that no CUDA kernel was registered for ``gift_linear_fwd`` / ``gift_linear_bwd``;
- their fake implementations give the right shapes (meta tensors);
- CPU tensors get the clear NotImplementedError, not a crash;
- with a GPU: forward and every gradient match the float64 reference (bf16, fp16, fp32).

Prints one JSON line (``--json PATH`` also writes it): the checks, build and install times, disk
use. Exit status 0 only if the build and every check passed.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_VENV = ROOT / ".venv-cuda"
DEFAULT_TORCH = "2.14.1"


def _du_mib(path: Path) -> float:
    total = 0
    for dirpath, _, files in os.walk(path):
        for f in files:
            p = os.path.join(dirpath, f)
            if not os.path.islink(p):
                total += os.path.getsize(p)
    return round(total / 2**20, 1)


def _venv_torch(python: Path) -> str:
    if not python.exists():
        return ""
    res = subprocess.run(
        [str(python), "-c", "import torch; print(torch.__version__)"], capture_output=True, text=True, timeout=300
    )
    return res.stdout.strip() if res.returncode == 0 else ""


def in_venv(args) -> int:
    venv = Path(args.venv).resolve()
    python = venv / "bin" / "python"
    t0 = time.perf_counter()
    have = _venv_torch(python)
    installed = False
    if have.split("+")[0] != args.torch:
        print(f"[build_cuda_extension] creating {venv} with torch=={args.torch} (found {have or 'none'})", flush=True)
        if not python.exists():
            subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
        subprocess.run(
            [str(python), "-m", "pip", "install", "-q", f"torch=={args.torch}", "ninja", "numpy"], check=True
        )
        installed = True
    venv_s = time.perf_counter() - t0
    json_path = Path(args.json) if args.json else ROOT / "build" / "cuda_extension_check.json"
    cmd = [str(python), str(Path(__file__).resolve()), "--here", "--json", str(json_path)]
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    rc = subprocess.run(cmd, env=env).returncode
    if json_path.exists():
        summary = json.loads(json_path.read_text())
        summary.update(venv=str(venv), venv_installed=installed, venv_s=round(venv_s, 1), venv_mib=_du_mib(venv))
        json_path.write_text(json.dumps(summary, indent=1))
        print(json.dumps({k: summary[k] for k in ("venv", "venv_installed", "venv_s", "venv_mib")}))
    return rc


# ------------------------------------------------------------------------------ --here


def _check(results: dict, name: str, fn) -> None:
    try:
        fn()
        results[name] = "ok"
    except Exception as exc:  # every check reports, none stops the others
        results[name] = f"FAILED: {type(exc).__name__}: {exc}"


def here(args) -> int:
    import torch

    summary = {"torch": torch.__version__, "cuda": torch.version.cuda, "checks": {}}
    checks = summary["checks"]
    json_path = Path(args.json) if args.json else None

    def finish(rc: int) -> int:
        summary["ok"] = rc == 0 and all(v == "ok" for v in checks.values())
        if json_path is not None:
            json_path.parent.mkdir(parents=True, exist_ok=True)
            json_path.write_text(json.dumps(summary, indent=1))
        print(json.dumps(summary))
        return 0 if summary["ok"] else 1

    from gift_kernels.ops.cuda import build as cuda_build

    t0 = time.perf_counter()
    try:
        build_dir = cuda_build.jit_load(verbose=args.verbose)
    except Exception as exc:
        summary["build"] = f"FAILED: {type(exc).__name__}: {exc}"
        return finish(1)
    summary["build"] = "ok"
    summary["build_s"] = round(time.perf_counter() - t0, 1)
    summary["build_dir"] = build_dir
    summary["build_mib"] = _du_mib(Path(build_dir))
    summary["arch"] = cuda_build.arch_list()

    os.environ["GIFT_KERNELS_CUDA_JIT"] = "1"  # the launcher module loads the same build
    import gift_kernels
    from gift_kernels.ops import plan as backends
    from gift_kernels.ops.cuda import extension as cuda_gift
    from gift_kernels.ops.input import cuda as input_cuda  # noqa: F401  the kernels' fakes (the op's own)
    from gift_kernels.ops.linear import cuda as linear_cuda  # noqa: F401  the kernels' fakes (the op's own)

    ops = torch.ops.gift_kernels

    kernel_ops = [f"gift_{form}_{name}" for form in ("linear", "input") for name in ("fwd", "bwd")]

    def schemas():
        for op in kernel_ops:
            mine = str(getattr(ops, f"cuda_{op}").default._schema)
            theirs = str(getattr(ops, op).default._schema)
            want = theirs.replace(op, f"cuda_{op}")
            assert mine == want, f"schema {mine!r} != {want!r}"

    def dispatch_keys():
        for op in kernel_ops:
            has = torch._C._dispatch_has_kernel_for_dispatch_key
            assert has(f"gift_kernels::cuda_{op}", "CUDA"), f"no CUDA kernel for cuda_{op}"
            assert not has(f"gift_kernels::{op}", "CUDA"), f"a CUDA kernel was registered for {op}"

    def inputs(device, dtype=torch.float32, m=5, n=6, k=7, r=3):
        g = torch.Generator().manual_seed(0)
        mk = lambda *s: torch.randn(*s, generator=g, dtype=torch.float64).to(device=device, dtype=dtype)  # noqa: E731
        return mk(m, k), mk(n, k), mk(n), mk(k, r), mk(r, k), mk(m, n)

    def fakes():
        x, w, b, phi, psi, gy = inputs("meta")
        y, t, B = ops.cuda_gift_linear_fwd(x, w, b, phi, psi)
        assert (y.shape, t.shape, B.shape) == ((5, 6), (5, 3), (6, 3)), (y.shape, t.shape, B.shape)
        grads = ops.cuda_gift_linear_bwd(gy, x, t, B, w, phi, psi, [True, False, True, True, True])
        shapes = [tuple(g.shape) for g in grads]
        assert shapes == [(5, 7), (0,), (6,), (7, 3), (3, 7)], shapes
        # 16-bit x with a float32 Theta: the rank path (t, B) is held in float32
        x, w, b, gy = (a.to(torch.float16) for a in (x, w, b, gy))
        y, t, B = ops.cuda_gift_linear_fwd(x, w, b, phi, psi)
        assert (y.dtype, t.dtype, B.dtype) == (torch.float16, torch.float32, torch.float32), (y.dtype, t.dtype, B.dtype)
        grads = ops.cuda_gift_linear_bwd(gy, x, t, B, w, phi, psi, [True, False, True, True, True])
        dtypes = [g.dtype for g in grads]
        assert dtypes == [torch.float16, torch.float16, torch.float16, torch.float32, torch.float32], dtypes
        u, t = ops.cuda_gift_input_fwd(x, phi, psi)  # the input-side kernels: u like x, t float32
        assert (u.shape, u.dtype, t.shape, t.dtype) == ((5, 7), torch.float16, (5, 3), torch.float32), (u, t)
        grads = ops.cuda_gift_input_bwd(u, x, t, phi, psi, [True, False, True])
        assert [tuple(g.shape) for g in grads] == [(5, 7), (0,), (3, 7)], [g.shape for g in grads]

    def cpu_error():
        x, w, b, phi, psi, gy = inputs("cpu")
        for call in (
            lambda: ops.cuda_gift_linear_fwd(x, w, b, phi, psi),
            lambda: ops.cuda_gift_linear_bwd(gy, x, gy[:, :3], w[:, :3], w, phi, psi, [True] * 5),
            lambda: ops.cuda_gift_input_fwd(x, phi, psi),
            lambda: ops.cuda_gift_input_bwd(x, x, x[:, :3], phi, psi, [True] * 3),
        ):
            try:
                call()
            except NotImplementedError as exc:
                msg = str(exc)
                assert "CPU tensor" in msg and "runs only on CUDA tensors" in msg, msg
            else:
                raise AssertionError("a CPU tensor did not raise")

    def launcher_module():
        assert cuda_gift.unavailable_reason(torch.device("cpu")) is not None
        ok, why = backends.supports("cuda", torch.device("cuda"))
        assert ok == torch.cuda.is_available(), why
        line = [l for l in gift_kernels.explain(torch.device("cuda")).splitlines() if l.strip().startswith("cuda")]
        assert line and "could not be loaded" not in line[0], line

    def gpu_correctness():
        sys.path.insert(0, str(ROOT / "tests"))
        from gift_testing import check_against_reference, make_inputs

        for dtype in (torch.bfloat16, torch.float16, torch.float32):
            for m, n, k, r in ((1, 45, 70, 5), (300, 130, 257, 16), (517, 96, 64, 65)):
                inp = make_inputs(m, n, k, r, dtype=dtype, device="cuda", train_base=True)
                with gift_kernels.backend("cuda"):
                    check_against_reference(gift_kernels.gift_linear, inp, compute_dtype=dtype)
                    check_against_reference(lambda *a: gift_kernels.gift_linear(*a, form="input"), inp,
                                            compute_dtype=dtype)

    _check(checks, "schemas match the Python ops", schemas)
    _check(checks, "CUDA kernels registered, none for the Python ops", dispatch_keys)
    _check(checks, "fake implementations", fakes)
    _check(checks, "CPU tensors get a clear error", cpu_error)
    _check(checks, "launcher module", launcher_module)
    if torch.cuda.is_available():
        _check(checks, "GPU: forward and gradients vs float64 reference", gpu_correctness)
    summary["gpu"] = torch.cuda.get_device_name() if torch.cuda.is_available() else None
    return finish(0)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--here", action="store_true", help="build with this interpreter's torch (no venv)")
    parser.add_argument("--venv", default=str(DEFAULT_VENV), help="venv for the CUDA torch (default .venv-cuda)")
    parser.add_argument("--torch", default=DEFAULT_TORCH, help="torch version for the venv (a CUDA build)")
    parser.add_argument("--json", default=None, help="also write the summary here")
    parser.add_argument("--verbose", action="store_true", help="show the compiler commands")
    args = parser.parse_args(argv)
    if shutil.which("nvcc") is None and not os.environ.get("CUDA_HOME"):
        print("[build_cuda_extension] no nvcc on PATH and CUDA_HOME unset", file=sys.stderr)
        return 1
    return here(args) if args.here else in_venv(args)


if __name__ == "__main__":
    sys.exit(main())
