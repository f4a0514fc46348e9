"""The Triton backend, checked on CPU under the Triton interpreter.

``TRITON_INTERPRET=1`` only takes effect if it is set before triton is imported, and other
test files may import triton first in the same pytest process. So this file has two
halves:

* in the ordinary pytest process (TRITON_INTERPRET unset), ``test_interpreted_suite``
  runs this very file again in two subprocesses (one per core, each a shard of the
  cases) with TRITON_INTERPRET=1 and fails with their output if either fails; the tests
  that need no interpreter (the backend refusing CPU tensors, config parsing) run here;
* under TRITON_INTERPRET=1 the kernel tests below are defined and run: forward and every
  gradient against the float64 reference for both fused variants and the decode path, and
  for the input-side kernels (``gift_input``, ``gift_linear(..., form="input")``, a GiftLinear
  over a module base); the fp16 rank path held in float32 where t = x psi^T overflows fp16.

The interpreter multiplies bf16 ``tl.dot`` operands as their uint16 bit patterns (a bug of
the interpreter, docs/triton.md). The interpreted process here widens them to float32 first
(``gift_testing.exact_bf16_dot_in_interpreter``: exact, and what a tensor core's bf16
products into a float32 accumulator compute), so the bf16 kernels are checked like fp32 and
fp16; everything else of the interpreter is left as it is.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import gift_kernels
from gift_kernels.ops import tiles as configs
from gift_testing import (TOL, assert_close_to_ref, check_against_reference, exact_bf16_dot_in_interpreter,
                          make_inputs, overflow_inputs)

INTERPRETED = os.environ.get("TRITON_INTERPRET", "0") == "1"
SHARD_ENV = "GIFT_TRITON_TEST_SHARD"  # "i/n": this subprocess runs case i, i+n, i+2n, ...
_shard_i, _shard_n = (int(v) for v in os.environ.get(SHARD_ENV, "0/1").split("/"))
SHARDS = 2
SUITE_TIMEOUT_S = 900


# ------------------------------------------------------------ tests without the interpreter


def test_config_parsing(monkeypatch):
    monkeypatch.setenv(configs.CONFIG_ENV, "64,32,16,4,2")
    assert configs.fixed_config() == configs.Config(64, 32, 16, 4, 2)
    for bad in ("64,32,16", "64,48,16,4,2", "a,b,c,d,e", "64,32,16,3,2"):
        monkeypatch.setenv(configs.CONFIG_ENV, bad)
        with pytest.raises(ValueError, match=configs.CONFIG_ENV):
            configs.fixed_config()
    monkeypatch.setenv(configs.FUSION_ENV, "sideways")
    with pytest.raises(ValueError, match=configs.FUSION_ENV):
        configs.fusion_mode()


@pytest.mark.parametrize("r, expected", [(1, 16), (16, 16), (17, 32), (33, 64), (64, 64), (65, 64), (500, 64)])
def test_rank_tile(r, expected):
    assert configs.block_r(r) == expected


TARGETS = [(8, 0), (8, 6), (8, 9), (9, 0)]
TARGET_IDS = ["sm80", "sm86", "sm89", "sm90"]


@pytest.mark.parametrize("cap", TARGETS, ids=TARGET_IDS)
@pytest.mark.parametrize("elem", [2, 4], ids=["16bit", "fp32"])
@pytest.mark.parametrize("m", [1, 16, 17, 256, 257, 8192])
def test_candidates_fit_and_are_never_empty(cap, elem, m):
    """Split always has a kept tile; fused has one wherever can_fuse says so (never fp32);
    whatever is offered fits and is not in the measured prune table."""
    for br in (16, 32, 64):
        fusable = configs.can_fuse(cap, elem, 4, br, m)
        if elem == 4:
            assert not fusable
        for kernel in configs.KERNELS:
            for fused in (False, True):
                rt = configs.rank_tile(br, fused)
                if fused and not fusable:
                    continue
                for n, k in ((4096, 4096), (8, 8)):
                    cands = configs.candidates(kernel, cap, elem, 4, m, n, k, rt, fused)
                    assert cands, (kernel, fused, br, n)
                    for c in cands:
                        assert configs.fits(c, kernel, fused, elem, 4, rt, cap), c
                        assert not configs.is_pruned(configs.prune_key(kernel, fused, cap, elem, 4, rt, c))


@pytest.mark.parametrize("cap", TARGETS, ids=TARGET_IDS)
@pytest.mark.parametrize("elem, theta", [(2, 2), (2, 4), (4, 4)], ids=["16bit", "16bit-theta32", "fp32"])
def test_input_candidates_fit_and_are_never_empty(cap, elem, theta):
    assert configs.input_rank_tile(70, 4) == configs.INPUT_FP32_R and configs.input_rank_tile(70, 2) == 64
    assert configs.input_grad_rank_tile(70) == 64 and configs.input_grad_rank_tile(5) == 16
    for kernel in configs.INPUT_KERNELS:
        for br in configs.input_rank_tiles(kernel, elem):
            for m, k in ((1, 4096), (16, 24), (200, 4096), (8192, 4096), (8192, 8)):
                cands = configs.input_candidates(kernel, cap, elem, theta, br, m, k)
                assert cands, (kernel, br, m, k)
                for c in cands:
                    assert configs.input_smem_estimate(c, kernel, elem, theta, br) <= configs.smem_limit(cap), c
                    assert not configs.is_pruned(configs.input_prune_key(kernel, cap, elem, theta, br, c)), c


def test_decode_fuses_bf16_at_the_standard_ranks():
    """The decode path (fused, W read once) exists for 16-bit x with fp32 Theta at r 16 and 64."""
    for cap in ((8, 0), (9, 0)):
        for br in (16, 64):
            assert configs.can_fuse(cap, 2, 4, br, 1), (cap, br)


# ------------------------------------------- reductions, dot precision, per-device shared memory


def _kernel_sources():
    """(name, source) of every @triton.jit function of the package: the op folders' kernels and
    their helpers, and the shared device code (each where it is defined)."""
    import inspect

    from gift_kernels.ops.input import triton as triton_input
    from gift_kernels.ops.linear import triton as triton_linear
    from gift_kernels.ops.mixed import triton as triton_mixed
    from gift_kernels.ops.tiles import device

    out = []
    for module in (triton_linear, triton_input, triton_mixed, device):
        for name, obj in vars(module).items():
            if hasattr(obj, "fn") and obj.fn.__module__ == module.__name__:
                out.append((f"{module.__name__}.{name}", inspect.getsource(obj.fn)))
    return out


def test_no_kernel_reduces_with_atomics():
    """dphi / dpsi (and every other reduction) are per-program partials summed in a fixed
    order: no float atomics, so a gradient has the same bits on every run."""
    sources = _kernel_sources()
    assert len(sources) >= 8
    for name, src in sources:
        assert "tl.atomic" not in src, f"{name} uses atomics"


def test_every_dot_takes_the_launchers_precision():
    """No tl.dot falls back to triton's default (tf32 for float32 operands)."""
    for name, src in _kernel_sources():
        assert src.count("tl.dot(") == src.count("input_precision=DOT_PRECISION"), name


def test_float32_rank_path_is_not_plain_tf32():
    from gift_kernels.ops.tiles import runtime

    assert runtime.dot_precision(torch.float32) == "ieee"
    for dtype in (torch.float16, torch.bfloat16):  # their float32 operands: t, B, dt with a float32 Theta
        assert runtime.dot_precision(dtype) == "tf32x3"


@pytest.mark.parametrize("cap", [(8, 6), (8, 9), (8, 6, 101376), (12, 0)], ids=["sm86", "sm89", "sm86-read", "sm120"])
@pytest.mark.parametrize("elem, theta", [(2, 2), (2, 4), (4, 4)], ids=["16bit", "16bit-theta32", "fp32"])
def test_consumer_gpus_are_offered_only_tiles_that_fit(cap, elem, theta):
    """99 KiB per block on sm_86 / sm_89 / sm_120: every offered tile's estimate fits it, and
    there always is one (sm_80's 163 KiB tables hold tiles that would not)."""
    limit = 99 * 1024 if len(cap) == 2 else cap[2]
    assert configs.smem_limit(cap) == limit
    for m in (1, 200, 8192):
        for br in (16, 32, 64):
            for kernel in configs.KERNELS:
                for c in configs.candidates(kernel, cap, elem, theta, m, 4096, 4096, br, False):
                    assert configs.smem_estimate(c, kernel, False, elem, theta, br) <= limit, (kernel, c)
            for kernel in configs.INPUT_KERNELS:
                if br not in configs.input_rank_tiles(kernel, elem):
                    continue
                cands = configs.input_candidates(kernel, cap, elem, theta, br, m, 4096)
                assert cands, (kernel, br, m)
                for c in cands:
                    assert configs.input_smem_estimate(c, kernel, elem, theta, br) <= limit, (kernel, c)
    sm80 = configs.candidates("bwd", (8, 0), 2, 2, 8192, 4096, 4096, 16, False)
    assert any(configs.smem_estimate(c, "bwd", False, 2, 2, 16) > 99 * 1024 for c in sm80)


def test_device_limits_are_read_from_the_device_once(monkeypatch):
    """The launchers' target is (major, minor, shared memory per block) of the device itself,
    read on first use and cached (never at import: importing touches no device)."""
    from types import SimpleNamespace

    from gift_kernels.ops.tiles import runtime

    calls = []

    def props(idx):
        calls.append(idx)
        return SimpleNamespace(major=8, minor=6, shared_memory_per_block_optin=101376, multi_processor_count=84,
                               L2_cache_size=6 << 20)

    monkeypatch.setattr(torch.cuda, "get_device_properties", props)
    monkeypatch.setattr(runtime, "_capability", {})
    dev = torch.device("cuda", 3)
    assert runtime.device_capability(dev) == (8, 6, 101376)
    assert runtime.device_capability(dev) == (8, 6, 101376) and calls == [3]
    assert configs.smem_limit(runtime.device_capability(dev)) == 101376


def test_prune_table_applies_per_target():
    """A key measured for one target prunes only there; a target the table was not measured
    for (sm_87, sm_120) avoids what spilled on any measured target."""
    table, targets = configs._prune_state()
    assert {80, 90} <= set(targets)
    key = next(iter(sorted(table)))
    assert configs.is_pruned(key)
    others = [t for t in targets if (*key[:2], t, *key[3:]) not in table]
    for t in others:
        assert not configs.is_pruned((*key[:2], t, *key[3:]))
    assert configs.is_pruned((*key[:2], 87, *key[3:]))


if not INTERPRETED:

    def test_triton_refuses_cpu_tensors_without_interpreter():
        inputs = make_inputs(3, 4, 5, 2)
        with gift_kernels.backend("triton"):
            with pytest.raises(RuntimeError, match="TRITON_INTERPRET"):
                gift_kernels.gift_linear(inputs["x"], inputs["weight"], inputs["bias"], inputs["phi"], inputs["psi"])

    def test_launcher_reports_why_it_cannot_run_on_cpu():
        from gift_kernels.ops.tiles import runtime as triton_gift

        assert "TRITON_INTERPRET" in triton_gift.unavailable_reason(torch.device("cpu"))

    @pytest.mark.parametrize("op", ["gift_linear", "gift_input"])
    def test_launcher_declines_oversized_and_float64_calls(op):
        from gift_kernels.ops.tiles import runtime as triton_gift

        assert triton_gift.declines(op, torch.empty(4, 8), 8) is None
        big = torch.empty(2**16, 2**15 + 1, device="meta")  # shapes and strides only
        assert "32-bit offsets" in triton_gift.declines(op, big, big.shape[1])
        assert "32-bit offsets" in triton_gift.declines(op, big[:, :2].t(), 2**16)  # strides reach far
        assert "float64" in triton_gift.declines(op, torch.empty(4, 8, dtype=torch.float64), 8)
        if op == "gift_linear":  # a huge d_out: y and W beyond 32-bit offsets
            assert "32-bit offsets" in triton_gift.declines(op, torch.empty(4, 8), 2**30)

    @pytest.mark.interpreter
    def test_interpreted_suite():
        """Run this file's interpreted tests in subprocesses with TRITON_INTERPRET=1."""
        env = {k: v for k, v in os.environ.items() if not k.startswith(("GIFT_KERNELS_", "TRITON_"))}
        env["TRITON_INTERPRET"] = "1"
        env["PYTHONPATH"] = os.pathsep.join([str(Path(__file__).parents[1] / "support"), env.get("PYTHONPATH", "")])
        procs = []
        for i in range(SHARDS):
            cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", __file__]
            procs.append(subprocess.Popen(cmd, env={**env, SHARD_ENV: f"{i}/{SHARDS}"}, cwd=Path(__file__).parents[2],
                                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
        outs = [p.communicate(timeout=SUITE_TIMEOUT_S)[0] for p in procs]
        for i, (p, out) in enumerate(zip(procs, outs)):
            assert p.returncode == 0, f"interpreted shard {i}/{SHARDS} failed:\n{out[-6000:]}"
            assert " passed" in out and "skipped" not in out, f"shard {i}: unexpected summary:\n{out[-2000:]}"


# --------------------------------------------------------------- tests under the interpreter

if INTERPRETED:
    exact_bf16_dot_in_interpreter()
    from gift_kernels.ops.input import torch as torch_input
    from gift_kernels.ops.input import triton as triton_input
    from gift_kernels.ops.linear import torch as torch_gift
    from gift_kernels.ops.linear import triton as triton_gift
    from gift_kernels.ops.tiles import runtime as triton_runtime

    SMALL_TILES = "32,32,32,4,1"  # odd sizes below span several tiles in every dimension
    F32, F16, BF16 = torch.float32, torch.float16, torch.bfloat16

    def _case(id_, m, n, k, r, *, dtype=F32, theta=None, bias=True, fusion="split", tiles=SMALL_TILES,
              layout="contiguous", lead=(), train_base=False):
        return pytest.param(dict(m=m, n=n, k=k, r=r, dtype=dtype, theta=theta, bias=bias, fusion=fusion, tiles=tiles,
                                 layout=layout, lead=lead, train_base=train_base), id=id_)

    CASES = [
        # both fused variants, sizes larger than a tile and not multiples of it
        _case("split-f32-odd", 37, 45, 70, 5),
        _case("fused-f16-odd", 37, 45, 70, 5, dtype=F16, fusion="fused"),
        _case("split-f32-nobias", 50, 33, 40, 20, bias=False),
        _case("fused-f16-nobias", 50, 33, 40, 20, dtype=F16, bias=False, fusion="fused"),
        _case("split-f16-theta32", 50, 33, 40, 20, dtype=F16, theta=F32),
        _case("fused-f16-theta32", 50, 33, 40, 20, dtype=F16, theta=F32, fusion="fused"),
        _case("split-f16", 33, 70, 45, 16, dtype=F16, bias=False),
        _case("fused-f16", 33, 70, 45, 16, dtype=F16, fusion="fused"),
        # decode path (M <= 16: fused regardless of the switch), M = 1, r = 1; fp32 runs split
        _case("decode-m1-r1", 1, 45, 70, 1, dtype=F16, bias=False),
        _case("decode-f32-split", 1, 45, 70, 1, bias=False),
        _case("decode-m16-r64", 16, 30, 50, 64, dtype=F16, theta=F32),
        _case("decode-m16-f16-theta32", 16, 40, 50, 16, dtype=F16, theta=F32),
        _case("decode-m5-default-tiles", 5, 24, 40, 3, dtype=F16, tiles=None),
        # ranks above the fused limit take the split kernels' rank chunks, even at decode sizes
        _case("split-r70", 20, 24, 40, 70),
        _case("decode-r70", 3, 24, 40, 70, bias=False),
        # M = 0: empty output, zero Theta grads, no launch
        _case("m0", 0, 24, 40, 4),
        _case("m0-fused", 0, 24, 40, 4, fusion="fused"),
        # non-contiguous x: strided rows and columns, transposed, and extra leading dims
        _case("x-strided", 21, 30, 35, 6, layout="strided"),
        _case("x-transposed-fused", 21, 30, 35, 6, dtype=F16, layout="transposed", fusion="fused"),
        _case("x-3d", 10, 30, 35, 6, lead=(3,)),
        # the autotuner's own first candidates (no fixed config), tiles larger than the problem
        _case("default-tiles-small", 20, 24, 40, 3, tiles=None),
        _case("default-tiles-large", 300, 20, 24, 2, dtype=F16, tiles=None, fusion="fused"),
        # a trainable base layer: dW and db as well
        _case("train-base", 19, 26, 33, 4, train_base=True),
        # bf16 (the GPU's case), float32 Theta: split, fused, decode (one row block, W read once)
        _case("split-bf16-theta32", 50, 33, 40, 20, dtype=BF16, theta=F32),
        _case("fused-bf16-theta32", 37, 45, 70, 5, dtype=BF16, theta=F32, fusion="fused"),
        _case("decode-m16-bf16-theta32", 16, 40, 50, 16, dtype=BF16, theta=F32),
        _case("decode-m1-bf16-r64", 1, 30, 50, 64, dtype=BF16, theta=F32, bias=False),
        _case("fused-bf16-train-base", 19, 26, 33, 4, dtype=BF16, fusion="fused", train_base=True),
    ]

    @pytest.fixture
    def triton_env(monkeypatch):
        def setup(fusion, tiles):
            monkeypatch.setenv(configs.FUSION_ENV, fusion)
            if tiles is None:
                monkeypatch.delenv(configs.CONFIG_ENV, raising=False)
            else:
                monkeypatch.setenv(configs.CONFIG_ENV, tiles)

        return setup

    def _layout(inputs, layout, seed=3):
        """Replace x by a non-contiguous view with the same values' distribution."""
        x = inputs["x"]
        if layout == "contiguous":
            return inputs
        g = torch.Generator().manual_seed(seed)
        m, k = x.shape
        if layout == "strided":
            base = torch.randn(2 * m, 3 * k, generator=g).to(x.dtype)
            x2 = base[::2, 1::3]
        else:  # transposed: column-major storage
            x2 = torch.randn(k, m, generator=g).to(x.dtype).t()
        assert not x2.is_contiguous()
        inputs["x"] = x2.requires_grad_(True)
        return inputs

    @pytest.mark.parametrize("case", CASES[_shard_i::_shard_n])
    def test_matches_float64_reference(case, triton_env):
        triton_env(case["fusion"], case["tiles"])
        inputs = make_inputs(case["m"], case["n"], case["k"], case["r"], dtype=case["dtype"], theta_dtype=case["theta"],
                             bias=case["bias"], lead=case["lead"], train_base=case["train_base"])
        inputs = _layout(inputs, case["layout"])
        # the kernel variant the case is named for is the one that runs
        m, r = case["m"] * (case["lead"][0] if case["lead"] else 1), case["r"]
        want_fused = (case["dtype"] != F32 and r <= configs.MAX_FUSED_R
                      and (case["fusion"] == "fused" or m <= configs.DECODE_M))
        assert triton_gift.uses_fused(inputs["x"], inputs["phi"], m, r) == want_fused
        with gift_kernels.backend("triton"):
            check_against_reference(gift_kernels.gift_linear, inputs, compute_dtype=case["dtype"])
            assert gift_kernels.last_backend("cpu") == "triton"

    NEEDS = [
        pytest.param((True, False, False, False, False), id="x-only"),
        pytest.param((False, False, False, True, True), id="theta-only"),
        pytest.param((False, False, False, True, False), id="phi-only"),
        pytest.param((False, True, True, False, False), id="base-only"),
        pytest.param((True, True, True, True, True), id="all"),
    ]

    @pytest.mark.parametrize("fusion, dtype", [("split", F32), ("fused", F16), ("fused", BF16)],
                             ids=["split-f32", "fused-f16", "fused-bf16"])
    @pytest.mark.parametrize("needs", NEEDS[_shard_i::_shard_n])
    def test_backward_needs_match_torch_backend(needs, fusion, dtype, triton_env):
        """Each subset of wanted grads: the ones asked for match the torch backend's (in
        fp32 on the same t and B), the others are None."""
        triton_env(fusion, SMALL_TILES)
        inp = {k: (v.detach() if v is not None else None) for k, v in make_inputs(23, 29, 38, 7, dtype=dtype).items()}
        y, t, B = triton_gift.gift_fwd(inp["x"], inp["weight"], inp["bias"], inp["phi"], inp["psi"])
        g = torch.randn(y.shape, generator=torch.Generator().manual_seed(5)).to(dtype)
        args = (g, inp["x"], t, B, inp["weight"], inp["phi"], inp["psi"], needs)
        got = triton_gift.gift_bwd(*args)
        want = torch_gift.gift_bwd(*(a.float() if isinstance(a, torch.Tensor) else a for a in args))
        for name, need, a, b in zip(("x", "weight", "bias", "phi", "psi"), needs, got, want):
            if not need:
                assert a is None, name
            else:
                assert a.dtype == dtype, name
                assert_close_to_ref(a, b.double(), dtype, f"grad of {name}")

    if _shard_i == 0:

        def test_forward_returns_t_and_B():
            inp = {k: (v.detach() if v is not None else None) for k, v in make_inputs(9, 20, 30, 5).items()}
            y, t, B = triton_gift.gift_fwd(inp["x"], inp["weight"], inp["bias"], inp["phi"], inp["psi"])
            assert_close_to_ref(t, (inp["x"].double() @ inp["psi"].double().t()), F32, "t")
            assert_close_to_ref(B, (inp["weight"].double() @ inp["phi"].double()), F32, "B")

        def test_backend_selection_routes_cpu_through_triton():
            inputs = make_inputs(4, 6, 8, 2)
            args = (inputs["x"], inputs["weight"], inputs["bias"], inputs["phi"], inputs["psi"])
            with gift_kernels.backend("triton"):
                y = gift_kernels.gift_linear(*args)
                assert gift_kernels.last_backend("cpu") == "triton"
            with gift_kernels.backend("auto"):
                y_auto = gift_kernels.gift_linear(*args)
                assert gift_kernels.last_backend("cpu") == "torch"  # auto never picks the interpreter
            assert (y - y_auto).abs().max().item() <= TOL[F32] * y_auto.abs().max().item()
            assert triton_runtime.unavailable_reason(torch.device("cpu")) is None
            assert "CPU tensors only" in triton_runtime.unavailable_reason(torch.device("cuda"))

        def test_error_paths(monkeypatch):
            """Bad input is refused at the public boundary before any kernel; a bad tile
            override by the launcher, naming the variable."""
            inp = {k: (v.detach() if v is not None else None) for k, v in make_inputs(4, 6, 8, 2).items()}
            with gift_kernels.backend("triton"):
                with pytest.raises(ValueError, match="phi"):
                    torch.ops.gift_kernels.gift_linear_fwd(inp["x"], inp["weight"], inp["bias"], inp["phi"][:5], inp["psi"])
                with pytest.raises(ValueError, match="2-D"):
                    torch.ops.gift_kernels.gift_linear_fwd(inp["x"][None], inp["weight"], inp["bias"], inp["phi"], inp["psi"])
                with pytest.raises(TypeError, match="dtype"):
                    gift_kernels.gift_linear(inp["x"].half(), inp["weight"], inp["bias"], inp["phi"], inp["psi"])
            monkeypatch.setenv(configs.CONFIG_ENV, "64,64")
            with pytest.raises(ValueError, match=configs.CONFIG_ENV):
                triton_gift.gift_fwd(inp["x"], inp["weight"], inp["bias"], inp["phi"], inp["psi"])

        def test_float64_falls_back_to_torch_launchers():
            """float64 has no Triton kernel: the launchers hand it to the torch backend."""
            inputs = make_inputs(5, 7, 9, 3, dtype=torch.float64)
            with gift_kernels.backend("triton"):
                check_against_reference(gift_kernels.gift_linear, inputs, compute_dtype=torch.float64)

    # ------------------------------------------------------------ the input-side form

    def _input_case(id_, m, k, r, *, dtype=F32, theta=None, layout="contiguous", tiles=SMALL_TILES):
        return pytest.param(dict(m=m, k=k, r=r, dtype=dtype, theta=theta, layout=layout, tiles=tiles), id=id_)

    INPUT_CASES = [
        # odd sizes spanning several 32 x 32 tiles and several row blocks per program
        _input_case("f32-odd", 77, 70, 5),
        _input_case("f16-odd", 77, 70, 5, dtype=F16),
        _input_case("f16-theta32", 50, 45, 20, dtype=F16, theta=F32),
        # r above the rank tile: two chunks of 64
        _input_case("f32-r70", 20, 40, 70),
        _input_case("f16-theta32-r70", 3, 40, 70, dtype=F16, theta=F32),
        # non-contiguous x (and du, from the base's backward, is contiguous or not as autograd gives it)
        _input_case("f32-strided", 21, 35, 6, layout="strided"),
        _input_case("f16-transposed", 21, 35, 6, dtype=F16, theta=F32, layout="transposed"),
        _input_case("m0", 0, 24, 4),
        _input_case("f16-default-tiles", 5, 40, 3, dtype=F16, tiles=None),
        _input_case("bf16-theta32", 50, 45, 20, dtype=BF16, theta=F32),
        _input_case("bf16-theta32-r70", 3, 40, 70, dtype=BF16, theta=F32),
        _input_case("bf16-transposed", 21, 35, 6, dtype=BF16, layout="transposed"),
    ]

    def _input_inputs(m, k, r, dtype, theta, layout="contiguous", seed=0):
        inp = make_inputs(m, 1, k, r, dtype=dtype, theta_dtype=theta, bias=False, seed=seed)
        return _layout(inp, layout, seed)

    def _check_input_against_reference(fn, inp, dtype):
        """u = fn(x, phi, psi) and the grads of x, phi, psi against the float64 spec."""
        from gift_kernels.ops import gift_input_ref

        x, phi, psi = inp["x"], inp["phi"], inp["psi"]
        u = fn(x, phi, psi)
        assert u.dtype == x.dtype and u.shape == x.shape
        du = torch.randn(u.shape, generator=torch.Generator().manual_seed(1)).to(u.dtype)
        ref_in = [a.detach().double().requires_grad_(True) for a in (x, phi, psi)]
        u_ref = gift_input_ref(*ref_in)
        grads_ref = torch.autograd.grad(u_ref, ref_in, du.double())
        assert_close_to_ref(u, u_ref.detach(), dtype, "u")
        grads = torch.autograd.grad(u, [x, phi, psi], du)
        for name, a, g, g_ref in zip(("x", "phi", "psi"), (x, phi, psi), grads, grads_ref):
            assert g.dtype == a.dtype, f"grad of {name}: dtype {g.dtype} != {a.dtype}"
            assert_close_to_ref(g, g_ref, dtype, f"grad of {name}")

    @pytest.mark.parametrize("case", INPUT_CASES[_shard_i::_shard_n])
    def test_input_form_matches_float64_reference(case, triton_env):
        triton_env("auto", case["tiles"])
        inp = _input_inputs(case["m"], case["k"], case["r"], case["dtype"], case["theta"], case["layout"])
        with gift_kernels.backend("triton"):
            _check_input_against_reference(gift_kernels.gift_input, inp, case["dtype"])
            assert gift_kernels.last_backend("cpu") == "triton"

    INPUT_NEEDS = [
        pytest.param((True, False, False), id="x-only"),
        pytest.param((False, True, True), id="theta-only"),
        pytest.param((False, True, False), id="phi-only"),
        pytest.param((False, False, True), id="psi-only"),
        pytest.param((True, True, True), id="all"),
    ]

    @pytest.mark.parametrize("dtype, theta", [(F32, F32), (F16, F32), (BF16, F32)],
                             ids=["f32", "f16-theta32", "bf16-theta32"])
    @pytest.mark.parametrize("needs", INPUT_NEEDS[_shard_i::_shard_n])
    def test_input_backward_needs_match_torch_backend(needs, dtype, theta, triton_env):
        """Each subset of wanted grads, through the launchers: the ones asked for match the
        torch backend's (run in float32 on the same t), the others are None; t in the rank dtype."""
        triton_env("auto", SMALL_TILES)
        inp = {k_: v.detach() for k_, v in _input_inputs(45, 38, 7, dtype, theta).items() if v is not None}
        x, phi, psi = inp["x"], inp["phi"], inp["psi"]
        u, t = triton_input.input_fwd(x, phi, psi)
        assert t.dtype == torch.float32
        u_want, t_want = torch_input.input_fwd(x.float(), phi.float(), psi.float())
        assert_close_to_ref(u, u_want.double(), dtype, "u")
        assert_close_to_ref(t, t_want.double(), dtype, "t")
        du = torch.randn(u.shape, generator=torch.Generator().manual_seed(5)).to(dtype)
        got = triton_input.input_bwd(du, x, t, phi, psi, needs)
        want = torch_input.input_bwd(du.float(), x.float(), t.float(), phi.float(), psi.float(), needs)
        for name, need, a, b, like in zip(("x", "phi", "psi"), needs, got, want, (x, phi, psi)):
            if not need:
                assert a is None, name
            else:
                assert a.dtype == like.dtype and a.shape == like.shape, name
                assert_close_to_ref(a, b.double(), dtype, f"grad of {name}")

    # ------------------------------------------------------ deterministic reductions

    @pytest.mark.parametrize("dtype, theta", [pytest.param(F32, F32, id="f32"),
                                              pytest.param(F16, F32, id="f16-theta32")][_shard_i::_shard_n])
    def test_input_backward_is_deterministic_and_split_independent(dtype, theta, triton_env, monkeypatch):
        """Two runs give the same bits; one row split (no partial sums) and the default (two
        under the interpreter) agree to the dtype's tolerance; r 70 runs two rank windows."""
        from gift_kernels.ops.input import triton as triton_input

        triton_env("auto", SMALL_TILES)
        inp = {k_: v.detach() for k_, v in _input_inputs(70, 38, 70, dtype, theta).items() if v is not None}
        x, phi, psi = inp["x"], inp["phi"], inp["psi"]
        u, t = triton_input.input_fwd(x, phi, psi)
        du = torch.randn(u.shape, generator=torch.Generator().manual_seed(6)).to(dtype)
        runs = [triton_input.input_bwd(du, x, t, phi, psi, (True, True, True)) for _ in range(2)]
        assert all(torch.equal(a, b) for a, b in zip(*runs))
        assert triton_input.input_splits(x, 32, 32, 70, 38)[0] == 2
        monkeypatch.setattr(triton_input, "input_splits", lambda x_, bm, bk, m, k: (1, m))
        one = triton_input.input_bwd(du, x, t, phi, psi, (True, True, True))
        for name, a, b in zip(("x", "phi", "psi"), runs[0], one):
            assert_close_to_ref(a, b.double(), dtype, f"grad of {name}")

    @pytest.mark.parametrize("fusion", ["split", "fused"][_shard_i::_shard_n])
    def test_epilogue_backward_is_deterministic(fusion, triton_env):
        """The epilogue GEMM's dphi / dpsi: one partial per row block, summed in a fixed order."""
        from gift_kernels.ops.linear import triton as triton_linear

        triton_env(fusion, SMALL_TILES)
        inp = {k_: (v.detach() if v is not None else None)
               for k_, v in make_inputs(70, 40, 45, 20, dtype=F16, theta_dtype=F32).items()}
        x, w, b, phi, psi = (inp[n] for n in ("x", "weight", "bias", "phi", "psi"))
        y, t, B = triton_linear.gift_fwd(x, w, b, phi, psi)
        runs = [triton_linear.gift_bwd(y, x, t, B, w, phi, psi, (True, False, False, True, True)) for _ in range(2)]
        assert all((a is None and c is None) or torch.equal(a, c) for a, c in zip(*runs))

    if _shard_i == 0:

        def test_gift_linear_input_form_and_module_base_run_on_triton(triton_env):
            """The public paths of the input-side form: gift_linear(..., form="input") and a
            GiftLinear over a module base (a layer GIFT runs as a black box on u)."""
            triton_env("auto", SMALL_TILES)
            inputs = make_inputs(40, 27, 35, 6, dtype=F16, theta_dtype=F32)
            with gift_kernels.backend("triton"):
                check_against_reference(lambda *a: gift_kernels.gift_linear(*a, form="input"), inputs,
                                        compute_dtype=F16)
                assert gift_kernels.last_backend("cpu") == "triton"

            class Affine(torch.nn.Module):  # linear in its input, not an nn.Linear: a module base
                def __init__(self, weight, bias):
                    super().__init__()
                    self.out_features, self.in_features = weight.shape
                    self.register_buffer("a", weight)
                    self.register_buffer("b", bias)

                def forward(self, x):
                    return x @ self.a.t() + self.b

            inputs = make_inputs(30, 27, 35, 6)
            theta = gift_kernels.GiftTheta(35, 6)
            with torch.no_grad():
                theta.phi.copy_(inputs["phi"])
                theta.psi.copy_(inputs["psi"])
            layer = gift_kernels.GiftLinear.from_module(Affine(inputs["weight"], inputs["bias"]), [theta])
            assert layer.has_module_base
            inputs["phi"], inputs["psi"] = theta.phi, theta.psi
            with gift_kernels.backend("triton"):
                check_against_reference(lambda x, w, b, phi, psi: layer(x), inputs, compute_dtype=F32)
                assert gift_kernels.last_backend("cpu") == "triton"

    @pytest.mark.parametrize("form, fusion", [("epilogue", "split"), ("epilogue", "fused"), ("input", "auto")][_shard_i::_shard_n])
    def test_fp16_rank_path_does_not_overflow(form, fusion, triton_env):
        """t = x psi^T beyond fp16's range with a float32 Theta: the output and every gradient
        finite and within fp16's tolerance of the float64 reference."""
        triton_env(fusion, SMALL_TILES)
        inputs = overflow_inputs()
        with gift_kernels.backend("triton"):
            check_against_reference(lambda *a: gift_kernels.gift_linear(*a, form=form), inputs, compute_dtype=F16)
            assert gift_kernels.last_backend("cpu") == "triton"
