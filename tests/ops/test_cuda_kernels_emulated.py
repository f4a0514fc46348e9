"""The CUDA backend's kernels and glue, run on the CPU by the SIMT emulator.

CI has no GPU. ``cuda_build.emulation_load()`` compiles the unchanged csrc/ sources with the
host compiler and GIFT_EMULATION defined: the same glue (checks, splits, rank windows,
cuBLAS-side ATen calls) and the same kernels, each CUDA thread a coroutine that yields at
``__syncthreads`` (csrc/emulation/simt_emulator.h), registered as
``torch.ops.gift_kernels_emulated.cuda_gift_linear_fwd`` / ``_bwd`` for CPU tensors, with the
op's fake implementations (gift_kernels/ops/linear/cuda.py); autograd is the package's own
(``GiftLinearFunction`` on a plan whose launchers are the emulated ones).

What this proves: the kernels' arithmetic, indexing, masking, split partials and barriers
(threads run in index order, and in reverse order with GIFT_EMULATION_REVERSE=1, so a missing
``__syncthreads`` shows as a wrong result), and that WMMA's alignment rules hold. What it
cannot: speed, and the tensor cores' own rounding (bf16/fp16 products are emulated in fp32,
as the hardware accumulates). The real nvcc build is tests/test_cuda_extension.py.

Set GIFT_KERNELS_SKIP_CUDA_EXTENSION_TEST=1 to skip locally (never in CI, where CI=true).
"""

from __future__ import annotations

import functools
import os

import pytest
import torch

from gift_kernels.ops.checks import check_gift_args
from gift_kernels.ops.cuda import build as cuda_build
from gift_kernels.ops.input import cuda as input_cuda
from gift_kernels.ops.input.op import GiftInputFunction
from gift_kernels.ops.input.torch import input_bwd as torch_input_bwd
from gift_kernels.ops.linear.cuda import bwd_with, fwd_with, register_fakes
from gift_kernels.ops.linear.op import GiftLinearFunction
from gift_kernels.ops.plan import Plan
from gift_kernels.ops.linear.torch import gift_bwd as torch_bwd
from gift_testing import FP16_MAX, assert_close_to_ref, check_against_reference, make_inputs, overflow_inputs

SKIP_ENV = "GIFT_KERNELS_SKIP_CUDA_EXTENSION_TEST"
if os.environ.get(SKIP_ENV) == "1" and os.environ.get("CI") != "true":
    pytest.skip(f"{SKIP_ENV}=1", allow_module_level=True)

DTYPES = (torch.float32, torch.float16, torch.bfloat16)


_registered = []


@pytest.fixture(scope="module")
def ops():
    if not _registered:
        cuda_build.emulation_load()  # a failed build fails every test here
        register_fakes("gift_kernels_emulated")
        input_cuda.register_fakes("gift_kernels_emulated")
        _registered.append(True)
    return torch.ops.gift_kernels_emulated


def gift_linear_with(ops):
    """gift_linear over the emulated kernels: flatten x, the package's autograd Function on a plan
    whose launchers are the cuda backend's over the emulated namespace."""
    plan = Plan("gift_linear", "epilogue", "cuda", "emulated", functools.partial(fwd_with, ops),
                functools.partial(bwd_with, ops))

    def fn(x, weight, bias, phi, psi):
        lead = x.shape[:-1]
        y = GiftLinearFunction.apply(x.reshape(lead.numel(), x.shape[-1]), weight, bias, phi, psi, plan)
        return y.view(*lead, weight.shape[0])

    return fn


# (m, n, k, r): below one 64-row tile, odd sizes, decode (m = 1), several tiles with ragged
# edges, rank windows of 16, 17 -> 32, 33 -> 64, exactly 64, and 65 / 130 (two and three windows)
SHAPES = [
    (37, 45, 70, 5),
    (1, 33, 17, 3),
    (1, 300, 129, 16),
    (130, 70, 96, 17),
    (200, 130, 90, 40),
    (65, 64, 64, 64),
    (70, 20, 30, 65),
    (33, 50, 41, 130),
]


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).split(".")[-1])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_forward_and_every_gradient(ops, dtype, shape):
    m, n, k, r = shape
    inputs = make_inputs(m, n, k, r, dtype=dtype, train_base=True, seed=sum(shape))
    check_against_reference(gift_linear_with(ops), inputs, compute_dtype=dtype)


@pytest.mark.parametrize("target_blocks", ["1", "4", "64"])
def test_split_partials_agree(ops, monkeypatch, target_blocks):
    """One block per tile (no split) and heavy splits of M and N give the same answer."""
    monkeypatch.setenv("GIFT_EMULATION_TARGET_BLOCKS", target_blocks)
    inputs = make_inputs(150, 100, 140, 20, dtype=torch.float32, train_base=True, seed=3)
    check_against_reference(gift_linear_with(ops), inputs, compute_dtype=torch.float32)


@pytest.mark.parametrize("dtype", (torch.float32, torch.bfloat16), ids=lambda d: str(d).split(".")[-1])
def test_threads_in_reverse_order(ops, monkeypatch, dtype):
    """Run every block's threads last-to-first: a missing barrier changes the result."""
    monkeypatch.setenv("GIFT_EMULATION_REVERSE", "1")
    inputs = make_inputs(90, 70, 75, 33, dtype=dtype, train_base=True, seed=4)
    check_against_reference(gift_linear_with(ops), inputs, compute_dtype=dtype)


@pytest.mark.parametrize("dtype", (torch.float16, torch.bfloat16), ids=lambda d: str(d).split(".")[-1])
@pytest.mark.parametrize("shape", [(70, 48, 40, 8), (33, 50, 41, 70)], ids=lambda s: "x".join(map(str, s)))
def test_float32_theta_with_16bit_activations(ops, dtype, shape):
    """The rank path held in float32 (t and B float32; fp16 multiplies it in float), one and
    two rank windows, a trainable base (dW through dB phi^T in float)."""
    m, n, k, r = shape
    inputs = make_inputs(m, n, k, r, dtype=dtype, theta_dtype=torch.float32, train_base=True, seed=5)
    check_against_reference(gift_linear_with(ops), inputs, compute_dtype=dtype)
    x, w, b, phi, psi = (inputs[n_].detach() for n_ in ("x", "weight", "bias", "phi", "psi"))
    _, t, B = ops.cuda_gift_linear_fwd(x, w, b, phi, psi)
    assert t.dtype == B.dtype == torch.float32
    assert_close_to_ref(t, x.double() @ psi.double().t(), dtype, "t")
    assert_close_to_ref(B, w.double() @ phi.double(), dtype, "B")


def test_fp16_rank_path_does_not_overflow(ops):
    """t = x psi^T beyond fp16's range, the merged layer's output and gradients inside it."""
    inputs = overflow_inputs()
    check_against_reference(gift_linear_with(ops), inputs, compute_dtype=torch.float16)
    x, w, b, phi, psi = (inputs[n].detach() for n in ("x", "weight", "bias", "phi", "psi"))
    y, t, B = ops.cuda_gift_linear_fwd(x, w, b, phi, psi)
    assert torch.isfinite(y).all() and torch.isfinite(t).all() and t.abs().max() > FP16_MAX
    grads = ops.cuda_gift_linear_bwd(torch.ones_like(y), x, t, B, w, phi, psi, [True] * 5)
    assert all(torch.isfinite(g).all() for g in grads)


def test_without_bias_and_with_leading_dims(ops):
    inputs = make_inputs(7, 40, 24, 6, dtype=torch.float16, bias=False, lead=(3,), seed=6)
    check_against_reference(gift_linear_with(ops), inputs, compute_dtype=torch.float16)


@pytest.mark.parametrize("shape", [(0, 20, 30, 4), (5, 0, 30, 4), (5, 20, 0, 4)], ids=["M0", "N0", "K0"])
def test_empty_dimensions(ops, shape):
    m, n, k, r = shape
    # make_inputs scales by k ** -0.5: build at k = 1 and cut to k = 0 for the d_in = 0 case
    inputs = make_inputs(m, n, max(k, 1), r, dtype=torch.float32, train_base=True)
    if k == 0:
        cut = {"x": (slice(None), slice(0, 0)), "weight": (slice(None), slice(0, 0)), "phi": (slice(0, 0),),
               "psi": (slice(None), slice(0, 0))}
        inputs = {n_: (t[cut[n_]].detach().clone().requires_grad_() if n_ in cut else t) for n_, t in inputs.items()}
    check_against_reference(gift_linear_with(ops), inputs, compute_dtype=torch.float32)


NEEDS = [
    (True, False, False, True, True),  # frozen base: x, Theta
    (False, False, False, False, True),  # psi only
    (False, False, False, True, False),  # phi only
    (True, False, False, False, False),  # x only
    (False, True, True, False, False),  # base only
    (False, False, True, False, False),  # bias only (db as the column of ones)
]


@pytest.mark.parametrize("needs", NEEDS, ids=lambda n: "".join("xwbfp"[i] if f else "-" for i, f in enumerate(n)))
@pytest.mark.parametrize("r", [12, 64])
def test_backward_needs_subsets(ops, needs, r):
    """Each subset of gradients, through the launcher: None exactly where not needed; values
    agree with the torch backend (r = 64 has no spare column for db: the g.sum path)."""
    inputs = make_inputs(45, 38, 29, r, dtype=torch.float32, seed=7)
    x, w, b, phi, psi = (inputs[n].detach() for n in ("x", "weight", "bias", "phi", "psi"))
    y, t, B = fwd_with(ops, x, w, b, phi, psi)
    g = torch.randn(y.shape, generator=torch.Generator().manual_seed(8))
    got = bwd_with(ops, g, x, t, B, w, phi, psi, needs)
    want = torch_bwd(g, x, t, B, w, phi, psi, needs)
    for name, a, e, n in zip("x weight bias phi psi".split(), got, want, needs):
        assert (a is None) == (not n), f"grad of {name}: needed={n} but got {None if a is None else a.shape}"
        if n:
            assert_close_to_ref(a, e, torch.float32, f"grad of {name}")


def test_deterministic(ops):
    inputs = make_inputs(150, 90, 80, 24, dtype=torch.bfloat16, train_base=True, seed=9)
    x, w, b, phi, psi = (inputs[n].detach() for n in ("x", "weight", "bias", "phi", "psi"))
    runs = []
    for _ in range(2):
        y, t, B = ops.cuda_gift_linear_fwd(x, w, b, phi, psi)
        runs.append((y, *ops.cuda_gift_linear_bwd(y, x, t, B, w, phi, psi, [True] * 5)))
    for a, b_ in zip(*runs):
        assert torch.equal(a, b_)


@pytest.mark.parametrize("dtype, theta", [(torch.float32, torch.float32), (torch.float16, torch.float32),
                                          (torch.bfloat16, torch.float32), (torch.float16, torch.float16)],
                         ids=["fp32", "fp16-theta32", "bf16-theta32", "fp16"])
def test_opcheck(ops, dtype, theta):
    """Fake and real agree (shapes and the rank-path dtype of t and B). The kernels carry no
    autograd of their own (the package's op does), so they are checked on inputs without grad."""
    inputs = make_inputs(20, 12, 18, 5, dtype=dtype, theta_dtype=theta, train_base=True)
    args = tuple(inputs[n].detach() for n in ("x", "weight", "bias", "phi", "psi"))
    torch.library.opcheck(ops.cuda_gift_linear_fwd.default, args)
    x, w, b, phi, psi = (a.detach() for a in args)
    y, t, B = ops.cuda_gift_linear_fwd(x, w, b, phi, psi)
    torch.library.opcheck(ops.cuda_gift_linear_bwd.default, (y, x, t, B, w, phi, psi, [True, False, True, True, True]))


# ------------------------------------------------------------------------------ bad input


def _bad_cases():
    def base(**over):
        d = dict(
            x=torch.randn(4, 6),
            weight=torch.randn(5, 6),
            bias=torch.randn(5),
            phi=torch.randn(6, 3),
            psi=torch.randn(3, 6),
        )
        d.update(over)
        return d

    return {
        "int x": base(x=torch.ones(4, 6, dtype=torch.int64)),
        "3-D x": base(x=torch.randn(2, 4, 6)),
        "1-D weight": base(weight=torch.randn(6)),
        "d_in mismatch": base(x=torch.randn(4, 7)),
        "1-D phi": base(phi=torch.randn(6)),
        "1-D psi": base(psi=torch.randn(6)),
        "phi rows": base(phi=torch.randn(5, 3)),
        "psi cols": base(psi=torch.randn(3, 5)),
        "rank mismatch": base(psi=torch.randn(2, 6)),
        "rank 0": base(phi=torch.randn(6, 0), psi=torch.randn(0, 6)),
        "bias shape": base(bias=torch.randn(4)),
        "x/weight dtype": base(weight=torch.randn(5, 6, dtype=torch.float64)),
        "bias dtype": base(bias=torch.randn(5, dtype=torch.float64)),
        "phi/psi dtype": base(phi=torch.randn(6, 3, dtype=torch.float64)),
    }


BAD = _bad_cases()


@pytest.mark.parametrize("case", list(BAD))
def test_cpp_checks_match_python_checks(ops, case):
    """The C++ op raises what check_gift_args raises, with the same words after the op name."""
    kw = BAD[case]
    with pytest.raises((TypeError, ValueError)) as py:
        check_gift_args(kw["x"], kw["weight"], kw["bias"], kw["phi"], kw["psi"], x_2d=True)
    with pytest.raises(py.type) as cpp:
        ops.cuda_gift_linear_fwd(kw["x"], kw["weight"], kw["bias"], kw["phi"], kw["psi"])
    body = lambda e: str(e.value).splitlines()[0].split(": ", 1)[1]  # noqa: E731
    assert body(cpp) == body(py)


def test_unsupported_compute_dtype(ops):
    x, w = torch.randn(3, 4, dtype=torch.float64), torch.randn(5, 4, dtype=torch.float64)
    with pytest.raises(TypeError, match=r"x dtype torch.float64 \(shape \(3, 4\)\) is not supported"):
        ops.cuda_gift_linear_fwd(x, w, None, torch.randn(4, 2), torch.randn(2, 4))


def test_backward_checks_name_the_tensor(ops):
    x, w, phi, psi = torch.randn(4, 6), torch.randn(5, 6), torch.randn(6, 3), torch.randn(3, 6)
    g, t, B = torch.randn(4, 5), torch.randn(4, 3), torch.randn(5, 3)
    with pytest.raises(ValueError, match=r"t must have shape \(M, r\) = \(4, 3\).*got t \(4, 2\)"):
        ops.cuda_gift_linear_bwd(g, x, t[:, :2], B, w, phi, psi, [True] * 5)
    with pytest.raises(ValueError, match=r"grad_y must have shape \(M, d_out\) = \(4, 5\)"):
        ops.cuda_gift_linear_bwd(g.t(), x, t, B, w, phi, psi, [True] * 5)
    with pytest.raises(ValueError, match="needs must have 5 flags"):
        ops.cuda_gift_linear_bwd(g, x, t, B, w, phi, psi, [True] * 4)
    with pytest.raises(TypeError, match="B dtype torch.float16 differs from the rank-path dtype torch.float32"):
        ops.cuda_gift_linear_bwd(g, x, t, B.half(), w, phi, psi, [True] * 5)
    with pytest.raises(TypeError, match="grad_y dtype torch.float16 differs from x dtype torch.float32"):
        ops.cuda_gift_linear_bwd(g.half(), x, t, B, w, phi, psi, [True] * 5)
    # fp16 x with a float32 Theta: t and B are float32, an fp16 t is refused
    xh, wh, gh = x.half(), w.half(), g.half()
    ops.cuda_gift_linear_bwd(gh, xh, t, B, wh, phi, psi, [True] * 5)
    with pytest.raises(TypeError, match=r"t dtype torch.float16 differs from the rank-path dtype torch.float32 "
                                        r"of x dtype torch.float16 with Theta dtype torch.float32"):
        ops.cuda_gift_linear_bwd(gh, xh, t.half(), B, wh, phi, psi, [True] * 5)



# ------------------------------------------------------------------------ input-side form


def gift_input_linear_with(ops):
    """F.linear on u = x + (x psi^T) phi^T, u from the package's autograd Function on a plan whose
    launchers are the cuda backend's over the emulated kernels: the same layer as gift_linear,
    so the same float64 reference checks every gradient."""
    plan = Plan("gift_input", "input", "cuda", "emulated", functools.partial(input_cuda.input_fwd_with, ops),
                functools.partial(input_cuda.input_bwd_with, ops))

    def fn(x, weight, bias, phi, psi):
        lead = x.shape[:-1]
        u = GiftInputFunction.apply(x.reshape(lead.numel(), x.shape[-1]), phi, psi, plan)
        return torch.nn.functional.linear(u, weight, bias).view(*lead, weight.shape[0])

    return fn


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).split(".")[-1])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_input_form_forward_and_every_gradient(ops, dtype, shape):
    m, n, k, r = shape
    inputs = make_inputs(m, n, k, r, dtype=dtype, seed=sum(shape) + 1)
    check_against_reference(gift_input_linear_with(ops), inputs, compute_dtype=dtype)


@pytest.mark.parametrize("dtype", (torch.float16, torch.bfloat16), ids=lambda d: str(d).split(".")[-1])
def test_input_form_float32_theta(ops, dtype):
    """t held in float32 under 16-bit x (fp16 multiplies the rank path in float); two rank windows."""
    inputs = make_inputs(70, 30, 41, 70, dtype=dtype, theta_dtype=torch.float32, seed=11)
    check_against_reference(gift_input_linear_with(ops), inputs, compute_dtype=dtype)
    x, phi, psi = (inputs[n_].detach() for n_ in ("x", "phi", "psi"))
    u, t = ops.cuda_gift_input_fwd(x, phi, psi)
    assert t.dtype == torch.float32 and u.dtype == dtype
    assert_close_to_ref(t, x.double() @ psi.double().t(), dtype, "t")


def test_input_form_fp16_rank_path_does_not_overflow(ops):
    inputs = overflow_inputs()
    check_against_reference(gift_input_linear_with(ops), inputs, compute_dtype=torch.float16)


@pytest.mark.parametrize("target_blocks", ["1", "64"])
def test_input_form_split_partials_agree(ops, monkeypatch, target_blocks):
    """No split and heavy splits of M and d_in (the reductions' per-split partials) agree."""
    monkeypatch.setenv("GIFT_EMULATION_TARGET_BLOCKS", target_blocks)
    inputs = make_inputs(150, 20, 140, 20, dtype=torch.float32, seed=12)
    check_against_reference(gift_input_linear_with(ops), inputs, compute_dtype=torch.float32)


def test_input_form_threads_in_reverse_order(ops, monkeypatch):
    monkeypatch.setenv("GIFT_EMULATION_REVERSE", "1")
    inputs = make_inputs(90, 20, 75, 33, dtype=torch.bfloat16, seed=13)
    check_against_reference(gift_input_linear_with(ops), inputs, compute_dtype=torch.bfloat16)


INPUT_NEEDS = [(True, True, True), (True, False, False), (False, True, False), (False, False, True),
               (False, True, True)]


@pytest.mark.parametrize("needs", INPUT_NEEDS, ids=lambda n: "".join("xfp"[i] if f else "-" for i, f in enumerate(n)))
def test_input_form_needs_subsets(ops, needs):
    """None exactly where not needed; values equal the torch backend's within tolerance."""
    inputs = make_inputs(45, 8, 29, 12, dtype=torch.float32, seed=14)
    x, phi, psi = (inputs[n].detach() for n in ("x", "phi", "psi"))
    u, t = input_cuda.input_fwd_with(ops, x, phi, psi)
    assert_close_to_ref(u, x.double() + (x.double() @ psi.double().t()) @ phi.double().t(), torch.float32, "u")
    du = torch.randn(u.shape, generator=torch.Generator().manual_seed(15))
    got = input_cuda.input_bwd_with(ops, du, x, t, phi, psi, needs)
    want = torch_input_bwd(du, x, t, phi, psi, needs)
    for name, a, e, n in zip(("x", "phi", "psi"), got, want, needs):
        assert (a is None) == (not n), f"grad of {name}: needed={n} but got {None if a is None else a.shape}"
        if n:
            assert_close_to_ref(a, e, torch.float32, f"grad of {name}")


def test_input_form_deterministic(ops):
    """The reductions over M are split partials summed in a fixed order: the same bits twice."""
    inputs = make_inputs(150, 8, 80, 24, dtype=torch.bfloat16, seed=16)
    x, phi, psi = (inputs[n].detach() for n in ("x", "phi", "psi"))
    runs = []
    for _ in range(2):
        u, t = ops.cuda_gift_input_fwd(x, phi, psi)
        runs.append((u, t, *ops.cuda_gift_input_bwd(u, x, t, phi, psi, [True] * 3)))
    for a, b_ in zip(*runs):
        assert torch.equal(a, b_)


@pytest.mark.parametrize("shape", [(0, 30, 4), (5, 0, 4)], ids=["M0", "K0"])
def test_input_form_empty_dimensions(ops, shape):
    m, k, r = shape
    x, phi, psi = torch.randn(m, k), torch.randn(k, r), torch.randn(r, k)
    u, t = ops.cuda_gift_input_fwd(x, phi, psi)
    assert u.shape == x.shape and torch.equal(t, torch.zeros(m, r))
    dx, dphi, dpsi = ops.cuda_gift_input_bwd(torch.randn(m, k), x, t, phi, psi, [True] * 3)
    assert torch.equal(dx, torch.zeros_like(x)) and torch.equal(dphi, torch.zeros_like(phi))
    assert torch.equal(dpsi, torch.zeros_like(psi))


@pytest.mark.parametrize("dtype, theta", [(torch.float32, torch.float32), (torch.float16, torch.float32),
                                          (torch.bfloat16, torch.bfloat16)], ids=["fp32", "fp16-theta32", "bf16"])
def test_input_form_opcheck(ops, dtype, theta):
    """Fake and real agree; checked on inputs without grad (the package's op owns autograd)."""
    inputs = make_inputs(20, 4, 18, 5, dtype=dtype, theta_dtype=theta)
    args = tuple(inputs[n].detach() for n in ("x", "phi", "psi"))
    torch.library.opcheck(ops.cuda_gift_input_fwd.default, args)
    x, phi, psi = (a.detach() for a in args)
    u, t = ops.cuda_gift_input_fwd(x, phi, psi)
    torch.library.opcheck(ops.cuda_gift_input_bwd.default, (u, x, t, phi, psi, [True, False, True]))


INPUT_BAD = {n: BAD[n] for n in ("int x", "3-D x", "1-D phi", "1-D psi", "phi rows", "psi cols", "rank mismatch",
                                 "rank 0", "phi/psi dtype")}


@pytest.mark.parametrize("case", list(INPUT_BAD))
def test_input_form_cpp_checks_match_python_checks(ops, case):
    from gift_kernels.ops.checks import check_input_args

    kw = INPUT_BAD[case]
    with pytest.raises((TypeError, ValueError)) as py:
        check_input_args(kw["x"], kw["phi"], kw["psi"], x_2d=True)
    with pytest.raises(py.type) as cpp:
        ops.cuda_gift_input_fwd(kw["x"], kw["phi"], kw["psi"])
    body = lambda e: str(e.value).splitlines()[0].split(": ", 1)[1]  # noqa: E731
    assert body(cpp) == body(py)


def test_input_form_backward_checks_name_the_tensor(ops):
    x, phi, psi, du, t = torch.randn(4, 6), torch.randn(6, 3), torch.randn(3, 6), torch.randn(4, 6), torch.randn(4, 3)
    with pytest.raises(ValueError, match=r"t must have shape \(M, r\) = \(4, 3\).*got t \(4, 2\)"):
        ops.cuda_gift_input_bwd(du, x, t[:, :2], phi, psi, [True] * 3)
    with pytest.raises(ValueError, match=r"grad_u must have the shape of x \(4, 6\), got grad_u \(6, 4\)"):
        ops.cuda_gift_input_bwd(du.t(), x, t, phi, psi, [True] * 3)
    with pytest.raises(ValueError, match="needs must have 3 flags"):
        ops.cuda_gift_input_bwd(du, x, t, phi, psi, [True] * 5)
    with pytest.raises(TypeError, match="t dtype torch.float16 differs from the rank-path dtype torch.float32 "
                                        "of x dtype torch.float16 with Theta dtype torch.float32"):
        ops.cuda_gift_input_bwd(du.half(), x.half(), t.half(), phi, psi, [True] * 3)
