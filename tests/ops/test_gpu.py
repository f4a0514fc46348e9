"""Correctness of every backend present on a CUDA device, in bf16 / fp16 / fp32, against the
float64 reference. Runs on the GPU machine (benchmarks/gpu_check.py calls it); skipped
where there is no CUDA device (the CPU CI machines)."""

from __future__ import annotations

import functools

import pytest
import torch

import gift_kernels
from gift_kernels.ops import plan
from gift_testing import check_against_reference, make_inputs

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (GPU check only)")]

GPU_BACKENDS = [b for b in plan.BACKENDS]
SHAPES = [  # (M, d_out, d_in, r): tiny, odd, decode, block-crossing, a training-sized tile
    (1, 7, 5, 1),  # not 1x1x1: there W (1 + phi psi) can cancel to ~0 and a max-relative error is meaningless
    (1, 4096, 4096, 16),
    (16, 1024, 4096, 64),
    (37, 130, 77, 1),
    (0, 64, 32, 4),
    (333, 257, 129, 16),
    (2048, 1024, 1024, 16),
]
DTYPES = [
    (torch.bfloat16, torch.float32),
    (torch.bfloat16, torch.bfloat16),
    (torch.float16, torch.float32),
    (torch.float32, torch.float32),
]


def _require(name):
    ok, why = plan.supports(name, torch.device("cuda"))
    if not ok:
        pytest.fail(f"backend {name} is not available on this GPU machine: {why}")


@pytest.mark.parametrize("backend", GPU_BACKENDS)
@pytest.mark.parametrize("dtypes", DTYPES, ids=lambda d: f"{str(d[0])[6:]}-theta_{str(d[1])[6:]}")
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "M{}-N{}-K{}-r{}".format(*s))
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
@pytest.mark.parametrize("form", ["epilogue", "input"])
def test_backend_matches_reference_on_gpu(backend, dtypes, shape, bias, form):
    _require(backend)
    dtype, theta_dtype = dtypes
    inputs = make_inputs(*shape, dtype=dtype, theta_dtype=theta_dtype, bias=bias, device="cuda", train_base=shape[0] < 64)
    # a backend without a kernel of the form's op hands the call to torch, and says so
    op = "gift_input" if form == "input" else "gift_linear"
    want = backend if plan.launchers(backend, op) is not None else "torch"
    with gift_kernels.backend(backend):
        check_against_reference(functools.partial(gift_kernels.gift_linear, form=form), inputs, compute_dtype=dtype)
        assert gift_kernels.last_backend("cuda") == want


@pytest.mark.parametrize("backend", GPU_BACKENDS)
def test_non_contiguous_and_3d_on_gpu(backend):
    _require(backend)
    inputs = make_inputs(48, 96, 80, 8, dtype=torch.bfloat16, theta_dtype=torch.float32, device="cuda", lead=(3,))
    x = inputs["x"].detach()
    inputs["x"] = torch.cat([x, x], dim=-1)[..., ::2].detach().requires_grad_(True)
    assert not inputs["x"].is_contiguous()
    with gift_kernels.backend(backend):
        check_against_reference(gift_kernels.gift_linear, inputs, compute_dtype=torch.bfloat16)


@pytest.mark.parametrize("backend", GPU_BACKENDS)
def test_opcheck_on_gpu(backend):
    _require(backend)
    inputs = make_inputs(33, 40, 24, 4, dtype=torch.bfloat16, theta_dtype=torch.float32, device="cuda")
    args = tuple(inputs[n] for n in ("x", "weight", "bias", "phi", "psi"))
    with gift_kernels.backend(backend):
        torch.library.opcheck(torch.ops.gift_kernels.gift_linear_fwd.default, args)


@pytest.mark.parametrize("backend", GPU_BACKENDS)
def test_compile_fullgraph_on_gpu(backend):
    _require(backend)
    theta = gift_kernels.GiftTheta(64, 8, device="cuda")
    with torch.no_grad():
        theta.psi.normal_(0, 0.1)
    layer = gift_kernels.GiftLinear.from_linear(torch.nn.Linear(64, 48, device="cuda", dtype=torch.bfloat16), theta)
    x = torch.randn(4, 10, 64, device="cuda", dtype=torch.bfloat16)
    with gift_kernels.backend(backend):
        eager = layer(x)
        compiled = torch.compile(layer, fullgraph=True)(x)
    torch.testing.assert_close(compiled, eager)


# M > 16 (past the decode path): the fusion variant is a real choice; both must match the
# reference, including at odd sizes, a rank that is not a power of two and a rank tile of 64
FUSION_SHAPES = [(17, 96, 80, 8), (64, 130, 77, 33), (333, 257, 129, 16), (2048, 1024, 1024, 64)]


@pytest.mark.parametrize("fusion", ["fused", "split"])
@pytest.mark.parametrize("dtypes", DTYPES[:3], ids=lambda d: f"{str(d[0])[6:]}-theta_{str(d[1])[6:]}")
@pytest.mark.parametrize("shape", FUSION_SHAPES, ids=lambda s: "M{}-N{}-K{}-r{}".format(*s))
def test_triton_fusion_variants_above_decode_size(fusion, dtypes, shape):
    _require("triton")
    from gift_kernels.ops import tiles as configs
    from gift_kernels.ops.linear import triton as launch

    dtype, theta_dtype = dtypes
    m, n, k, r = shape
    inputs = make_inputs(m, n, k, r, dtype=dtype, theta_dtype=theta_dtype, device="cuda")
    cap = torch.cuda.get_device_capability()
    fusable = configs.can_fuse(cap, torch.finfo(dtype).bits // 8, torch.finfo(theta_dtype).bits // 8,
                               configs.block_r(r), m)
    with gift_kernels.backend("triton"), configs.fusion(fusion):
        # the variant asked for is the one that runs (fused only where a kept fused tile exists)
        assert launch.uses_fused(inputs["x"], inputs["phi"], m, r) == (fusion == "fused" and fusable)
        check_against_reference(functools.partial(gift_kernels.gift_linear, form="epilogue"), inputs,
                                compute_dtype=dtype)
        assert gift_kernels.last_backend("cuda") == "triton"
    assert configs.fusion_mode() == "auto"
