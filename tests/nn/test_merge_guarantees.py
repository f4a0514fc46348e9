"""GiftTheta / GiftLinear guarantees: clear errors for bad sizes, state dicts that are always
unmerged, and weights shared by two layers that cannot be folded twice."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from gift_kernels import GiftLinear, GiftTheta
from gift_testing import randomize_thetas


@pytest.mark.parametrize("rank", [2.0, "4", True, None])
def test_theta_sizes_must_be_ints(rank):
    with pytest.raises(TypeError, match=r"GiftTheta: rank must be an int"):
        GiftTheta(8, rank)
    with pytest.raises(TypeError, match=r"GiftTheta: in_features must be an int"):
        GiftTheta(rank, 2)


def test_init_weights_false_starts_away_from_the_base():
    torch.manual_seed(0)
    theta = GiftTheta(12, 3, init_weights=False)
    assert theta.psi.abs().min() > 0 and theta.psi.abs().max() <= 12**-0.5
    lin = nn.Linear(12, 5)
    assert not torch.allclose(GiftLinear.from_linear(lin, theta)(torch.randn(4, 12)), lin(torch.randn(4, 12)))


def _layer(seed=0):
    torch.manual_seed(seed)
    theta = GiftTheta(10, 3)
    randomize_thetas(nn.ModuleDict({"t": theta}), seed=seed)
    return GiftLinear.from_linear(nn.Linear(10, 7), theta)


def test_state_dict_of_a_merged_layer_holds_the_original_weight():
    layer = _layer()
    x = torch.randn(4, 10)
    y = layer(x)
    original = layer.weight.detach().clone()
    layer.merge()
    sd = layer.state_dict()
    assert torch.equal(sd["weight"], original)  # not W_hat: a fresh layer would apply Theta twice
    fresh = GiftLinear.from_linear(nn.Linear(10, 7), GiftTheta(10, 3))
    fresh.load_state_dict(sd)
    assert torch.equal(fresh(x), y)


def test_loading_into_a_merged_layer_is_refused_and_changes_nothing():
    layer = _layer()
    donor = _layer(seed=1)
    layer.merge()
    before = {k: v.detach().clone() for k, v in layer.named_parameters()}
    with pytest.raises(RuntimeError, match=r"GiftLinear.load_state_dict: .*merged; call unmerge\(\)"):
        layer.load_state_dict(donor.state_dict())
    assert all(torch.equal(p, before[k]) for k, p in layer.named_parameters())
    layer.unmerge()
    layer.load_state_dict(donor.state_dict())
    assert torch.equal(layer.weight, donor.weight)


def test_two_layers_sharing_one_weight_cannot_both_fold_into_it():
    shared = nn.Linear(10, 7)
    original = shared.weight.detach().clone()
    a = GiftLinear.from_linear(shared, GiftTheta(10, 2))
    b = GiftLinear.from_linear(shared, GiftTheta(10, 2))
    randomize_thetas(nn.ModuleDict({"a": a.theta, "b": b.theta}))
    a.merge()
    with pytest.raises(RuntimeError, match="already merged into"):
        b.merge()
    assert not b.merged
    a.unmerge()
    assert torch.equal(shared.weight, original)
    b.merge()  # free again once a has restored it
    b.unmerge()
    assert torch.equal(shared.weight, original)


def test_deepcopy_of_a_merged_layer_unmerges_to_the_original():
    layer = _layer()
    original = layer.weight.detach().clone()
    layer.merge()
    twin = copy.deepcopy(layer)
    twin.unmerge()
    assert torch.equal(twin.weight, original)
    layer.unmerge()
    assert torch.equal(layer.weight, original)
