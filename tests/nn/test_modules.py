"""GiftTheta and GiftLinear: init, drop-in behaviour, sharing, dtypes, merge/unmerge."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from gift_kernels import GiftLinear, GiftTheta
from gift_kernels.nn.mixed import SampleIds
from gift_kernels.ops import gift_linear_ref, gift_weight_ref
from gift_testing import TOL, rel_err


def _randomize(theta: GiftTheta, seed: int = 0) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        theta.psi.copy_(torch.randn(theta.psi.shape, generator=g) / math.sqrt(theta.in_features))


def test_theta_init_matches_the_authors():
    torch.manual_seed(0)
    theta = GiftTheta(96, 8)
    assert theta.phi.shape == (96, 8) and theta.psi.shape == (8, 96)
    assert torch.count_nonzero(theta.psi) == 0
    bound = 1 / math.sqrt(96)
    assert theta.phi.abs().max() <= bound
    assert theta.phi.abs().max() > 0.9 * bound  # uniform over the whole range, not a tiny init
    torch.manual_seed(0)
    ref = nn.Linear(96, 8, bias=False)  # the same distribution as nn.Linear's default
    assert ref.weight.abs().max() <= bound


def test_adapted_layer_starts_at_the_pretrained_layer():
    linear = nn.Linear(40, 24)
    layer = GiftLinear.from_linear(linear, GiftTheta(40, 4))
    x = torch.randn(3, 7, 40)
    assert torch.equal(layer(x), linear(x))


def test_from_linear_shares_and_freezes_the_weights():
    linear = nn.Linear(10, 6)
    layer = GiftLinear.from_linear(linear, GiftTheta(10, 2))
    assert layer.weight is linear.weight and layer.bias is linear.bias
    assert not layer.weight.requires_grad and not layer.bias.requires_grad
    trainable = {n for n, p in layer.named_parameters() if p.requires_grad}
    assert trainable == {"theta.phi", "theta.psi"}


def test_state_dict_keys_stay_those_of_nn_linear():
    linear = nn.Linear(10, 6)
    layer = GiftLinear.from_linear(linear, GiftTheta(10, 2))
    assert set(layer.state_dict()) == {"weight", "bias", "theta.phi", "theta.psi"}
    fresh = GiftLinear(10, 6, GiftTheta(10, 2))
    result = fresh.load_state_dict(linear.state_dict(), strict=False)
    assert set(result.missing_keys) == {"theta.phi", "theta.psi"} and not result.unexpected_keys
    assert torch.equal(fresh.weight, linear.weight)


def test_forward_matches_reference_and_nn_linear_semantics():
    theta = GiftTheta(33, 5)
    _randomize(theta)
    layer = GiftLinear(33, 17, theta, bias=False)
    x = torch.randn(4, 33)
    assert layer.bias is None
    expected = gift_linear_ref(x, layer.weight, None, theta.phi, theta.psi)
    assert rel_err(layer(x), expected) <= TOL[torch.float32]


def test_one_theta_shared_by_three_layers():
    theta = GiftTheta(16, 3)
    _randomize(theta)
    layers = [GiftLinear.from_linear(nn.Linear(16, n), theta) for n in (16, 8, 30)]
    x = torch.randn(5, 16)
    sum(l(x).pow(2).sum() for l in layers).backward()
    grads = [theta.phi.grad.clone(), theta.psi.grad.clone()]
    per_layer = [torch.zeros_like(g) for g in grads]
    for l in layers:
        theta.zero_grad()
        l(x).pow(2).sum().backward()
        per_layer[0] += theta.phi.grad
        per_layer[1] += theta.psi.grad
    for got, want in zip(grads, per_layer):
        assert torch.allclose(got, want, rtol=1e-5, atol=1e-6)
    # parameters() deduplicates the shared Theta
    model = nn.Sequential(*layers)
    assert sum(p.requires_grad for p in model.parameters()) == 2


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_float32_theta_with_low_precision_layer(dtype):
    theta = GiftTheta(24, 4, dtype=torch.float32)
    _randomize(theta)
    layer = GiftLinear.from_linear(nn.Linear(24, 12).to(dtype), theta)
    x = torch.randn(6, 24, dtype=dtype, requires_grad=True)
    y = layer(x)
    assert y.dtype == dtype
    y.float().sum().backward()
    assert theta.phi.grad.dtype == torch.float32 and theta.psi.grad.dtype == torch.float32
    assert x.grad.dtype == dtype
    ref = gift_linear_ref(x.detach(), layer.weight, layer.bias, theta.phi, theta.psi)
    assert rel_err(y, ref) <= TOL[dtype]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64], ids=["f32", "bf16", "f64"])
def test_merge_then_unmerge_is_bit_exact(dtype):
    theta = GiftTheta(20, 4, dtype=torch.float32)
    _randomize(theta)
    linear = nn.Linear(20, 14).to(dtype)
    original = linear.weight.detach().clone()
    layer = GiftLinear.from_linear(linear, theta)
    x = torch.randn(9, 20, dtype=dtype)
    unmerged_out = layer(x)

    layer.merge()
    assert layer.merged
    merged_out = layer(x)
    ref_weight = gift_weight_ref(original, theta.phi, theta.psi)
    assert rel_err(layer.weight, ref_weight) <= TOL[dtype]
    assert rel_err(merged_out, unmerged_out.double()) <= 2 * TOL[dtype]
    # merged forward is the plain linear layer
    assert torch.equal(merged_out, F.linear(x, layer.weight, layer.bias))
    with pytest.raises(RuntimeError, match="already merged"):
        layer.merge()

    layer.unmerge()
    assert not layer.merged
    assert torch.equal(layer.weight, original)
    assert torch.equal(layer(x), unmerged_out)
    with pytest.raises(RuntimeError, match="not merged"):
        layer.unmerge()


def test_merge_keeps_state_dict_keys_and_to_linear():
    theta = GiftTheta(12, 2)
    _randomize(theta)
    layer = GiftLinear.from_linear(nn.Linear(12, 5), theta)
    x = torch.randn(3, 12)
    plain = layer.to_linear()
    assert type(plain) is nn.Linear
    assert rel_err(plain(x), gift_linear_ref(x, layer.weight, layer.bias, theta.phi, theta.psi)) <= TOL[torch.float32]
    layer.merge()
    assert set(layer.state_dict()) == {"weight", "bias", "theta.phi", "theta.psi"}


def test_theta_mismatch_is_a_clear_error():
    with pytest.raises(ValueError, match=r"in_features=8.*in_features=10"):
        GiftLinear.from_linear(nn.Linear(10, 4), GiftTheta(8, 2))
    with pytest.raises(TypeError, match="nn.Linear"):
        GiftLinear.from_linear(nn.Conv1d(3, 3, 1), GiftTheta(3, 1))
    with pytest.raises(ValueError, match="rank"):
        GiftTheta(10, 0)


def test_mixed_mode_runs_each_sample_through_its_bank_entry():
    torch.manual_seed(0)
    linear = nn.Linear(13, 11).double()
    own, a, b = GiftTheta(13, 3), GiftTheta(13, 2), GiftTheta(13, 3)
    for i, t in enumerate((own, a, b)):
        t.double()
        _randomize(t, seed=i + 1)
    layer = GiftLinear.from_linear(linear, own)
    x = torch.randn(4, 5, 13, dtype=torch.float64)
    ids = SampleIds(torch.tensor([1, -1, 0, 1]))  # b, the base, a, b
    with pytest.raises(TypeError, match="test layer: sample_ids must be a gift_kernels.nn.mixed.SampleIds"):
        layer.set_mixed([[a, b]], ids.sample_ids, "test layer")
    assert not layer.mixed
    layer.set_mixed([[a, b]], ids, "test layer")
    assert layer.mixed
    got = layer(x)
    with pytest.raises(RuntimeError, match="GiftLinear.merge: .* mixed mode"):
        layer.merge()
    with pytest.raises(RuntimeError, match="test layer: the layer is already in mixed mode"):
        layer.set_mixed(None, ids, "test layer")
    layer.clear_mixed()
    for i, theta in enumerate((b, None, a, b)):
        want = linear(x[i]) if theta is None else gift_linear_ref(x[i], linear.weight, linear.bias, theta.phi, theta.psi)
        torch.testing.assert_close(got[i], want, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(layer(x), gift_linear_ref(x, linear.weight, linear.bias, own.phi, own.psi),
                               rtol=1e-12, atol=1e-12)  # back to its own Theta
    layer.merge()
    with pytest.raises(RuntimeError, match="test layer: the layer is merged"):
        layer.set_mixed(None, ids, "test layer")


def test_mixed_mode_compiles_in_one_graph():
    """A layer in mixed mode traces without a graph break (its per-forward bookkeeping stays
    out of the graph) and gives eager's values."""
    torch.manual_seed(0)
    layer = GiftLinear.from_linear(nn.Linear(16, 8), GiftTheta(16, 2))
    a, b = GiftTheta(16, 2), GiftTheta(16, 3)
    for i, t in enumerate((a, b)):
        _randomize(t, seed=i + 1)
    layer.set_mixed([[a, b]], SampleIds(torch.tensor([1, -1, 0])), "test layer")
    x = torch.randn(3, 4, 16)
    want = layer(x)
    torch._dynamo.reset()
    try:
        got = torch.compile(layer, fullgraph=True, backend="eager")(x)
    finally:
        torch._dynamo.reset()
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)


def test_several_thetas_on_one_weight_never_narrow_a_theta():
    """Active adapters of different dtypes: the concatenated rank path takes the widest dtype
    (a float32 Theta after a bf16 one is not rounded to bf16)."""
    from gift_kernels.nn.stacked import concat_thetas

    low, high = GiftTheta(8, 2).to(torch.bfloat16), GiftTheta(8, 3)
    with torch.no_grad():
        high.psi.normal_()
        high.psi.add_(1e-3)  # values bf16 cannot hold exactly
    phi, psi = concat_thetas([low, high])
    assert phi.dtype == psi.dtype == torch.float32
    assert torch.equal(psi[2:], high.psi) and torch.equal(phi[:, 2:], high.phi)
