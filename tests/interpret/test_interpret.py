"""GIFT's token-clustering head: scores, normalisation, grid reshape, hooks, plots.

Scores are checked against ``(x W^T) @ (W phi)`` computed independently in float64 (the
product as docs/design.md writes it, not the re-association the package uses).
"""

from __future__ import annotations

import struct
import subprocess
import sys

import pytest
import torch
from torch import nn

from gift_kernels import GiftLinear, GiftTheta
from gift_kernels.adapters import GiftConfig, apply_gift, merge_gift, unmerge_gift
from gift_kernels.nn import GiftThetaWithBias
from gift_kernels.interpret import (
    assign_clusters,
    cluster_scores,
    normalize_maps,
    record_cluster_scores,
    scores_to_grid,
)
from gift_testing import TOL, assert_close_to_ref, make_inputs


def gift_layer(n, k, r, *, dtype=torch.float32, bias=True, seed=0, theta=None):
    """A GiftLinear with random W, b, and a non-zero psi (a trained-looking Theta)."""
    inp = make_inputs(1, n, k, r, dtype=dtype, bias=bias, seed=seed)
    theta = theta or GiftTheta(k, r, dtype=dtype)
    if theta.phi.shape == inp["phi"].shape and theta.phi.dtype == dtype:
        with torch.no_grad():
            theta.phi.copy_(inp["phi"])
            theta.psi.copy_(inp["psi"])
    lin = nn.Linear(k, n, bias=bias, dtype=dtype)
    with torch.no_grad():
        lin.weight.copy_(inp["weight"])
        if bias:
            lin.bias.copy_(inp["bias"])
    return GiftLinear.from_linear(lin, theta)


def scores_ref(layer, x, include_bias=False):
    """(x W^T [+ b]) @ (W phi) in float64, as docs/design.md writes it."""
    w = (layer._original_weight if layer.merged else layer.weight).double()
    y0 = x.double() @ w.T
    if include_bias and layer.bias is not None:
        y0 = y0 + layer.bias.double()
    return y0 @ (w @ layer.theta.phi.double())


class TwoLayer(nn.Module):
    """query/value-like GIFT layers sharing one Theta, plus a plain Linear."""

    def __init__(self, d=24, r=4, seed=0):
        super().__init__()
        theta = GiftTheta(d, r)
        self.query = gift_layer(d, d, r, seed=seed, theta=theta)
        self.value = gift_layer(d, d, r, seed=seed + 1, theta=theta)
        self.out = nn.Linear(d, 3)

    def forward(self, x):
        return self.out(torch.tanh(self.query(x)) * self.value(x))


def hook_count(model):
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())


# ---------------------------------------------------------------- scores


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["fp32", "fp64"])
@pytest.mark.parametrize("lead", [(), (3,)], ids=["2d", "3d"])
@pytest.mark.parametrize("bias,include_bias", [(True, False), (True, True), (False, False)], ids=["bias", "authors-tap", "no-bias"])
def test_scores_match_float64_reference(dtype, lead, bias, include_bias):
    m, n, k, r = 13, 23, 29, 5
    layer = gift_layer(n, k, r, dtype=dtype, bias=bias)
    x = make_inputs(m, n, k, r, dtype=dtype, lead=lead, seed=3)["x"].detach()
    with record_cluster_scores(layer, include_bias=include_bias) as rec:
        layer(x)
    s = rec.scores()
    assert s.shape == (*lead, m, r)
    assert s.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    assert_close_to_ref(s, scores_ref(layer, x, include_bias), dtype, "recorded scores")
    assert_close_to_ref(cluster_scores(layer, x, include_bias=include_bias), scores_ref(layer, x, include_bias), dtype, "cluster_scores")


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_low_precision_layer_scores_keep_float32_accuracy(dtype):
    # the re-associated product runs in float32: no rounding of y0 to the layer's dtype
    layer = gift_layer(31, 37, 6, dtype=dtype)
    x = torch.randn(2, 9, 37).to(dtype)
    with record_cluster_scores(layer) as rec:
        layer(x)
    assert rec.scores().dtype == torch.float32
    assert_close_to_ref(rec.scores(), scores_ref(layer, x), torch.float32, f"scores of a {dtype} layer")


def test_scores_under_autocast_are_float32_and_exact():
    layer = gift_layer(20, 18, 3)
    x = torch.randn(4, 7, 18)
    with record_cluster_scores(layer) as rec, torch.autocast("cpu", dtype=torch.bfloat16):
        layer(x)
    assert rec.scores().dtype == torch.float32
    assert_close_to_ref(rec.scores(), scores_ref(layer, x), torch.float32, "scores under autocast")


def test_merged_layer_uses_the_original_weight():
    layer = gift_layer(16, 12, 3)
    x = torch.randn(5, 12)
    expected = scores_ref(layer, x)
    layer.merge()
    with record_cluster_scores(layer) as rec:
        layer(x)
    assert_close_to_ref(rec.scores(), expected, torch.float32, "scores of a merged layer")


def test_cached_head_follows_in_place_theta_updates():
    model = TwoLayer()
    x = torch.randn(6, 24)
    with record_cluster_scores(model, "query") as rec:
        model(x)
        with torch.no_grad():
            model.query.theta.phi.mul_(-2.0).add_(0.1)  # what an optimizer step does: in place
        model(x)
    first, second = rec.calls["query"]
    assert not torch.allclose(first, second)
    assert_close_to_ref(second, scores_ref(model.query, x), torch.float32, "scores after a Theta update")


def test_shapes_and_assignment():
    model = TwoLayer(d=24, r=4)
    x3 = torch.randn(2, 11, 24)
    x2 = torch.randn(11, 24)
    with record_cluster_scores(model) as rec:
        model(x3)
        model(x2)
    assert rec.names == ["query", "value"]
    assert [tuple(s.shape) for s in rec.calls["value"]] == [(2, 11, 4), (11, 4)]
    best = rec.assignments("value", call=0)
    assert best.shape == (2, 11) and best.dtype == torch.long
    assert torch.equal(best, scores_ref(model.value, x3).argmax(-1))
    assert torch.equal(assign_clusters(rec.scores("query")), rec.assignments("query"))


def test_stacked_layer_records_one_head_per_chunk():
    # a stacked qkv weight (the authors' ViT case): chunk i has rows W_i and its own Theta
    d, splits, r = 20, (5, 7, 6), 3
    g = torch.Generator().manual_seed(4)
    thetas = [GiftTheta(d, r), GiftThetaWithBias(d, r), GiftTheta(d, r)]
    with torch.no_grad():
        for th in thetas:
            th.psi.normal_(0, 0.2, generator=g)
    lin = nn.Linear(d, sum(splits))
    layer = GiftLinear.from_module(lin, thetas, splits)
    model = nn.Sequential(layer)
    x = torch.randn(2, 9, d, generator=g)
    with record_cluster_scores(model) as rec:
        model(x)
    assert rec.names == ["0:0", "0:1", "0:2"]
    rows = lin.weight.double().split(splits)
    for i, (w, th) in enumerate(zip(rows, thetas)):
        head = w @ th.phi.double()
        if i == 1:  # the in-projection bias is part of the authors' head
            head = head + th.in_bias.double()
        ref = (x.double() @ w.T) @ head
        assert_close_to_ref(rec.scores(f"0:{i}"), ref, torch.float32, f"chunk {i}")
        assert_close_to_ref(cluster_scores(layer, x, chunk=i), ref, torch.float32, f"cluster_scores chunk {i}")
    with pytest.raises(ValueError, match="has 3 chunks"):
        cluster_scores(layer, x)


def test_transposed_single_chunk_layer_keeps_its_name():
    # GPT-2's Conv1D stores W as (d_in, d_out)
    d_in, d_out, r = 12, 10, 2
    theta = GiftTheta(d_in, r)
    with torch.no_grad():
        theta.psi.normal_(0, 0.2)
    conv1d = pytest.importorskip("transformers.pytorch_utils").Conv1D(d_out, d_in)
    with torch.no_grad():
        conv1d.weight.normal_()
    w = conv1d.weight
    layer = GiftLinear.from_module(conv1d, [theta])
    assert isinstance(layer, GiftLinear) and layer.transposed and layer.weight is w
    x = torch.randn(7, d_in)
    with record_cluster_scores(layer) as rec:
        layer(x)
    assert rec.names == [""]
    ref = (x.double() @ w.double()) @ (w.double().T @ theta.phi.double())
    assert_close_to_ref(rec.scores(), ref, torch.float32, "transposed layer")


class QV(nn.Module):
    def __init__(self, d=16):
        super().__init__()
        self.query, self.value, self.key = nn.Linear(d, d), nn.Linear(d, d), nn.Linear(d, d)

    def forward(self, x):
        return self.query(x) * self.value(x) + self.key(x)


def test_model_adapted_with_apply_gift():
    model = apply_gift(QV(), GiftConfig(rank=3, target_modules=["query", "value"]))
    x = torch.randn(4, 16)
    with record_cluster_scores(model) as rec:
        model(x)
    assert rec.names == ["query", "value"]
    assert_close_to_ref(rec.scores("value"), scores_ref(model.value, x), torch.float32, "apply_gift value")
    merge_gift(model)
    with pytest.raises(ValueError, match="unmerge_gift first"):
        record_cluster_scores(model)
    unmerge_gift(model)
    assert len(record_cluster_scores(model).layers) == 2


# ---------------------------------------------------------------- layer selection


def test_select_by_name_suffix_and_module():
    outer = nn.Sequential(TwoLayer(), TwoLayer(seed=5))
    assert list(record_cluster_scores(outer, "value").layers) == ["0.value", "1.value"]
    assert list(record_cluster_scores(outer, ["1.query"]).layers) == ["1.query"]
    assert list(record_cluster_scores(outer, outer[1].value).layers) == ["1.value"]
    assert len(record_cluster_scores(outer).layers) == 4


def test_select_errors_name_the_problem():
    model = TwoLayer()
    with pytest.raises(ValueError, match="no module named 'key'"):
        record_cluster_scores(model, "key")
    with pytest.raises(TypeError, match="'out' is a Linear, not a GiftLinear"):
        record_cluster_scores(model, "out")
    with pytest.raises(ValueError, match="not part of the model"):
        record_cluster_scores(model, gift_layer(24, 24, 4))
    with pytest.raises(ValueError, match="holds no GiftLinear layer"):
        record_cluster_scores(nn.Linear(3, 3))


def test_keep_last_and_missing_call():
    model = TwoLayer()
    rec = record_cluster_scores(model, "query", keep="last")
    with pytest.raises(RuntimeError, match="has not run"):
        rec.scores()
    with rec:
        for _ in range(3):
            model(torch.randn(5, 24))
    assert len(rec.calls["query"]) == 1


# ---------------------------------------------------------------- hooks and invariance


def test_no_hooks_outside_the_context():
    model = TwoLayer()
    assert hook_count(model) == 0
    rec = record_cluster_scores(model)
    assert hook_count(model) == 0, "creating a recorder must not install hooks"
    with rec:
        assert hook_count(model) == 2
    assert hook_count(model) == 0 and not rec.active


def test_hooks_removed_when_the_body_raises():
    model = TwoLayer()
    with pytest.raises(ZeroDivisionError):
        with record_cluster_scores(model) as rec:
            model(torch.randn(3, 24))
            1 / 0
    assert hook_count(model) == 0
    assert len(rec.calls["query"]) == 1  # what ran before the error is kept
    # and when the model's own forward raises inside the context
    with pytest.raises(ValueError):
        with record_cluster_scores(model):
            model(torch.randn(3, 25))
    assert hook_count(model) == 0


def test_outputs_and_gradients_unchanged():
    model = TwoLayer()
    x = torch.randn(2, 9, 24)
    params = [model.query.theta.phi, model.query.theta.psi, model.out.weight]

    def run():
        xi = x.clone().requires_grad_(True)
        y = model(xi)
        grads = torch.autograd.grad(y.square().sum(), [xi] + params)
        return y.detach(), grads

    y_plain, g_plain = run()
    with record_cluster_scores(model):
        y_rec, g_rec = run()
    assert torch.equal(y_plain, y_rec)
    for a, b in zip(g_plain, g_rec):
        assert torch.equal(a, b)


def test_recorded_scores_carry_no_graph():
    model = TwoLayer()
    with record_cluster_scores(model) as rec:
        model(torch.randn(4, 24, requires_grad=True))
    assert not rec.scores("query").requires_grad


# ---------------------------------------------------------------- normalisation


def test_normalize_maps_per_column_range_and_threshold():
    s = torch.randn(2, 10, 4, dtype=torch.float64)
    n = normalize_maps(s)
    assert torch.allclose(n.amin(dim=-2), torch.zeros(2, 4, dtype=torch.float64))
    assert torch.allclose(n.amax(dim=-2), torch.ones(2, 4, dtype=torch.float64))
    expected = (s - s.amin(-2, keepdim=True)) / (s.amax(-2, keepdim=True) - s.amin(-2, keepdim=True))
    assert torch.allclose(n, expected)
    t = normalize_maps(s, threshold=0.5)
    assert torch.equal(t, torch.where(expected > 0.5, n, torch.zeros_like(n)))
    # the authors keep values strictly above the threshold
    edge = normalize_maps(torch.tensor([[0.0], [1.0], [2.0]]), threshold=0.5)
    assert torch.equal(edge, torch.tensor([[0.0], [0.0], [1.0]]))


def test_normalize_constant_map_is_zero_and_mask_excludes_padding():
    s = torch.tensor([[1.0, 2.0], [1.0, 4.0], [1.0, 100.0]])
    n = normalize_maps(s, mask=torch.tensor([True, True, False]))
    assert torch.equal(n, torch.tensor([[0.0, 0.0], [0.0, 1.0], [0.0, 0.0]]))
    with pytest.raises(ValueError, match="mask must be a bool tensor of shape"):
        normalize_maps(s, mask=torch.ones(2, dtype=torch.bool))


def test_bias_shifts_raw_scores_but_not_normalised_maps():
    layer = gift_layer(16, 12, 3)
    x = torch.randn(9, 12)
    plain = cluster_scores(layer, x)
    tapped = cluster_scores(layer, x, include_bias=True)
    assert not torch.allclose(plain, tapped)
    assert torch.allclose(normalize_maps(plain), normalize_maps(tapped), atol=1e-5)


# ---------------------------------------------------------------- grid reshape


@pytest.mark.parametrize("prefix", [0, 1], ids=["no-cls", "cls"])
def test_grid_square_inferred(prefix):
    h = w = 4
    s = torch.arange(2 * (prefix + h * w) * 3, dtype=torch.float32).reshape(2, prefix + h * w, 3)
    g = scores_to_grid(s)
    assert g.shape == (2, 3, h, w)
    # patch (i, j) is token prefix + i*w + j; cluster c is the last axis of s
    assert g[1, 2, 3, 1] == s[1, prefix + 3 * w + 1, 2]


def test_grid_explicit_and_prefix_tokens():
    s = torch.randn(1 + 3 * 5, 2)
    assert torch.equal(scores_to_grid(s, grid=(3, 5))[1], s[1:, 1].reshape(3, 5))
    regs = torch.randn(5 + 16, 2)  # class token + 4 registers
    assert torch.equal(scores_to_grid(regs, num_prefix_tokens=5)[0], regs[5:, 0].reshape(4, 4))
    with pytest.raises(ValueError, match="do not fit grid 3x5"):
        scores_to_grid(torch.randn(18, 2), grid=(3, 5))


def test_grid_error_for_token_count_that_is_not_a_grid():
    with pytest.raises(ValueError, match="51 tokens are not a square grid"):
        scores_to_grid(torch.randn(51, 4))


# ---------------------------------------------------------------- plots


def png_size(path):
    data = path.read_bytes()
    assert len(data) > 1000, f"{path} is nearly empty ({len(data)} bytes)"
    assert data[:8] == b"\x89PNG\r\n\x1a\n", f"{path} is not a PNG"
    assert data[12:16] == b"IHDR"
    return struct.unpack(">II", data[16:24])


def test_plot_token_clusters_writes_png_of_requested_size(tmp_path):
    from gift_kernels.interpret.plotting import plot_token_clusters

    s = [torch.randn(6, 5), torch.randn(4, 5)]
    toks = [["the", "cat", "sat", "on", "a", "mat"], ["a", "dog", "ran", "."]]
    out = plot_token_clusters(s, toks, tmp_path / "text.png", size=(640, 360), titles=["one", "two"], threshold=0.5)
    assert png_size(out) == (640, 360)
    out = plot_token_clusters(s, toks, tmp_path / "rows.png", size=(300, 500), ncols=1, mark="normalized")
    assert png_size(out) == (300, 500)
    with pytest.raises(ValueError, match="mark must be"):
        plot_token_clusters(s, toks, tmp_path / "bad.png", mark="max")
    with pytest.raises(ValueError, match="has 6 score rows"):
        plot_token_clusters(s[0], toks[1], tmp_path / "bad.png")


@pytest.mark.parametrize("with_image", [False, True], ids=["grid", "underlay"])
def test_plot_image_clusters_writes_png_of_requested_size(tmp_path, with_image):
    from gift_kernels.interpret.plotting import plot_image_clusters

    s = torch.randn(1 + 7 * 7, 6)
    image = torch.rand(3, 56, 56) if with_image else None
    out = plot_image_clusters(s, tmp_path / "img.png", image=image, size=(501, 377), clusters=[0, 2, 5])
    assert png_size(out) == (501, 377)


def test_plot_image_clusters_rejects_a_token_count_that_is_not_a_grid(tmp_path):
    from gift_kernels.interpret.plotting import plot_image_clusters

    with pytest.raises(ValueError, match="not a square grid"):
        plot_image_clusters(torch.randn(51, 4), tmp_path / "no.png")
    assert not (tmp_path / "no.png").exists()


def test_matplotlib_is_lazy_and_pyplot_never_imported(tmp_path):
    code = (
        "import sys, torch, gift_kernels, gift_kernels.interpret, gift_kernels.interpret.plotting as p\n"
        "assert 'matplotlib' not in sys.modules, 'matplotlib imported at package import'\n"
        f"p.plot_token_clusters(torch.randn(3, 2), ['a', 'b', 'c'], r'{tmp_path / 'x.png'}')\n"
        "assert 'matplotlib.pyplot' not in sys.modules, 'pyplot imported (global backend state)'\n"
    )
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr


def test_normalize_maps_propagates_nan_and_inf_instead_of_drawing_them():
    s = torch.randn(2, 6, 3, generator=torch.Generator().manual_seed(0))
    s[0, 2, 1] = float("nan")
    s[1, 4, 2] = float("inf")
    out = normalize_maps(s)
    assert out[0, :, 1].isnan().all() and out[1, :, 2].isnan().all()  # the whole map: it has no [0, 1] scale
    clean = [(0, 0), (0, 2), (1, 0), (1, 1)]
    assert all(torch.isfinite(out[b, :, c]).all() for b, c in clean)
    mask = torch.ones(2, 6, dtype=torch.bool)
    mask[0, 2] = False  # the NaN token is padding: the map is drawn from the others
    assert torch.isfinite(normalize_maps(s, mask=mask)[0, :, 1]).all()


def test_normalize_maps_names_the_expected_layout():
    with pytest.raises(ValueError, match=r"normalize_maps: scores must have at least 2 dimensions .* got shape \(5,\)"):
        normalize_maps(torch.randn(5))
    with pytest.raises(ValueError, match="at least 3 dimensions"):
        normalize_maps(torch.randn(4, 5), dim=(-3, -2))
    with pytest.raises(TypeError, match="must be a torch.Tensor"):
        normalize_maps([[1.0, 2.0]])
