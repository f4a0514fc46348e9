"""apply_gift on plain modules and tiny Hugging Face models (BERT, Llama, GPT-2): matching,
sharing, stacked chunks, Conv1D, projection biases, report, merge/unmerge, adapter checkpoints,
and bad input that must leave the model exactly as it was."""

from __future__ import annotations

import copy
import json
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from gift_kernels.adapters import (
    GiftConfig,
    apply_gift,
    gift_report,
    is_adapted,
    merge_gift,
    print_trainable_parameters,
    unmerge_gift,
)
from gift_kernels.adapters.checkpoint import ADAPTER_FILE, CONFIG_FILE, save_gift
from gift_kernels.adapters.loading import load_gift
from gift_kernels.nn import (
    GiftLinear,
    GiftTheta,
    GiftThetaWithBias,
    gift_linear_stacked,
)
from gift_testing import TOL, Wrapped, rel_err

transformers = pytest.importorskip("transformers")

from tiny_hf_models import bert, gpt2, llama, randomize_thetas  # noqa: E402


# --------------------------------------------------------------------------- models


class Block(nn.Module):
    def __init__(self, d=16, dv=8):
        super().__init__()
        self.q = nn.Linear(d, d)
        self.v = nn.Linear(d, dv)
        self.o = nn.Linear(dv, d, bias=False)
        self.norm = nn.LayerNorm(d)

    def forward(self, x):
        return self.norm(x + self.o(torch.tanh(self.v(x))) + self.q(x))


class Toy(nn.Module):
    def __init__(self, n=3):
        super().__init__()
        self.layers = nn.ModuleList([Block() for _ in range(n)])
        self.head = nn.Linear(16, 3)

    def forward(self, x):
        for layer in self.layers:
            x = layer(x)
        return self.head(x)


def toy():
    torch.manual_seed(0)
    return Toy()


def ids(seed=0, shape=(2, 9)):
    return torch.randint(0, 60, shape, generator=torch.Generator().manual_seed(seed))


def out(model, x):
    with torch.no_grad():
        y = model(x)
    return y if isinstance(y, torch.Tensor) else y.logits


def snapshot(model):
    return {
        "state": {k: v.detach().clone() for k, v in model.state_dict().items()},
        "types": [(n, type(m)) for n, m in model.named_modules()],
        "grad": [(n, p.requires_grad) for n, p in model.named_parameters()],
        "attrs": sorted(model.__dict__),
    }


def assert_unchanged(model, snap):
    now = snapshot(model)
    assert now["types"] == snap["types"]
    assert now["grad"] == snap["grad"]
    assert now["attrs"] == snap["attrs"]
    assert now["state"].keys() == snap["state"].keys()
    for k, v in snap["state"].items():
        assert torch.equal(now["state"][k], v), k
    assert not is_adapted(model)


# --------------------------------------------------------------------------- projection biases


def biased_ref(x, weight, bias, phi, psi, b1, b2):
    """float64 spec of GIFT with projection biases: rows w_i + ((w_i phi + b1) psi + b2)."""
    w = weight.double()
    gen = w @ phi.double()
    if b1 is not None:
        gen = gen + b1.double()
    w_hat = w + gen @ psi.double()
    if b2 is not None:
        w_hat = w_hat + b2.double()
    return F.linear(x.double(), w_hat, None if bias is None else bias.double())


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
@pytest.mark.parametrize("in_bias,out_bias", [(True, True), (True, False), (False, True)], ids=["b1b2", "b1", "b2"])
def test_projection_biases_match_the_float64_formula(dtype, in_bias, out_bias):
    torch.manual_seed(0)
    k, n, r = 37, 23, 5
    lin = nn.Linear(k, n).to(dtype)
    theta = GiftThetaWithBias(k, r, in_bias=in_bias, out_bias=out_bias, dtype=dtype)
    with torch.no_grad():
        for p in theta.parameters():
            p.copy_(torch.randn(p.shape, dtype=torch.float64) / math.sqrt(k))
    layer = GiftLinear.from_module(lin, [theta])
    x = torch.randn(3, 7, k, dtype=dtype, requires_grad=True)
    y = layer(x)
    g = torch.randn(y.shape, dtype=dtype)
    leaves = [x] + list(theta.parameters())
    grads = torch.autograd.grad(y, leaves, g)

    ref_leaves = [t.detach().double().requires_grad_() for t in leaves]
    xr, phi, psi = ref_leaves[:3]
    rest = dict(zip([n for n, _ in theta.named_parameters()][2:], ref_leaves[3:]))
    y_ref = biased_ref(xr, lin.weight, lin.bias, phi, psi, rest.get("in_bias"), rest.get("out_bias"))
    grads_ref = torch.autograd.grad(y_ref, ref_leaves, g.double())
    assert rel_err(y, y_ref) <= TOL[dtype]
    for (name, _), gr, gref in zip([("x", x)] + list(theta.named_parameters()), grads, grads_ref):
        assert gr.dtype == dtype
        assert rel_err(gr, gref) <= TOL[dtype], name
    # and merging folds exactly that W_hat
    w_hat = layer.merged_weight()
    assert rel_err(F.linear(x.detach(), w_hat, lin.bias), y_ref) <= TOL[dtype]


def test_biased_theta_init_starts_at_the_pretrained_layer():
    torch.manual_seed(0)
    theta = GiftThetaWithBias(40, 6)
    assert torch.count_nonzero(theta.out_bias) == 0 and torch.count_nonzero(theta.psi) == 0
    assert 0 < theta.in_bias.abs().max() <= 1 / math.sqrt(40)
    lin = nn.Linear(40, 12)
    x = torch.randn(5, 40)
    assert torch.equal(GiftLinear.from_module(lin, [theta])(x), lin(x))


def test_gift_linear_refuses_a_biased_theta():
    with pytest.raises(TypeError, match=r"GiftLinear.from_linear: a GiftThetaWithBias .* GiftLinear.from_module"):
        GiftLinear.from_linear(nn.Linear(8, 4), GiftThetaWithBias(8, 2))


@pytest.mark.parametrize("splits", [(6,), (2, 4)], ids=["one-chunk", "two-chunks"])
def test_stacked_refuses_a_bias_of_another_length(splits):
    """One chunk or several: a bias longer than d_out is refused, never cut by a row slice."""
    k = 5
    w, b = torch.randn(sum(splits), k), torch.randn(sum(splits) + 2)
    thetas = [[GiftTheta(k, 2)] for _ in splits]
    with pytest.raises(ValueError, match=r"bias must have shape \(6,\)"):
        gift_linear_stacked(torch.randn(3, k), w, b, thetas, splits)


def test_stacked_chunks_match_per_chunk_reference_with_grads():
    torch.manual_seed(0)
    k, splits, r = 19, (7, 5, 9), 3
    w = torch.randn(sum(splits), k, dtype=torch.float64)
    b = torch.randn(sum(splits), dtype=torch.float64)
    thetas = [GiftTheta(k, r, dtype=torch.float64) for _ in splits]
    for t in thetas:
        nn.init.normal_(t.psi)
    x = torch.randn(4, k, dtype=torch.float64, requires_grad=True)
    y = gift_linear_stacked(x, w, b, [[t] for t in thetas], splits)
    parts, start = [], 0
    for s, t in zip(splits, thetas):
        wc = w[start : start + s]
        parts.append(F.linear(x, wc @ (torch.eye(k, dtype=torch.float64) + t.phi @ t.psi), b[start : start + s]))
        start += s
    ref = torch.cat(parts, -1)
    assert rel_err(y, ref) <= TOL[torch.float64]
    g = torch.randn_like(y)
    leaves = [x] + [p for t in thetas for p in (t.phi, t.psi)]
    for a, c in zip(torch.autograd.grad(y, leaves, g), torch.autograd.grad(ref, leaves, g)):
        assert rel_err(a, c) <= TOL[torch.float64]


# --------------------------------------------------------------------------- plain modules


def test_plain_module_starts_at_base_and_trains_only_theta_and_head():
    base = toy()
    model = copy.deepcopy(base)
    x = torch.randn(4, 5, 16)
    apply_gift(model, GiftConfig(rank=4, target_modules=["q", "v"], trainable_modules=["head"]))
    assert torch.equal(out(model, x), out(base, x))
    assert all(isinstance(model.layers[i].q, GiftLinear) for i in range(3))
    assert isinstance(model.layers[0].o, nn.Linear) and not isinstance(model.layers[0].o, GiftLinear)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    thetas = {id(p) for p in model.gift_thetas["default"].parameters()}
    head = {id(p) for p in model.head.parameters()}
    assert {id(p) for p in model.parameters() if p.requires_grad} == thetas | head
    assert trainable  # names resolved through the first alias of each Theta
    # the wrapped layers hold the original Parameters (no copy)
    assert model.layers[0].q.weight is not None
    rep = gift_report(model)
    assert rep.trainable == 2 * (2 * 16 * 4) + (16 * 3 + 3)
    assert rep.total == sum(p.numel() for p in base.parameters()) + 2 * (2 * 16 * 4)
    assert rep.adapted == [f"layers.{i}.{t}" for i in range(3) for t in ("q", "v")]
    assert rep.thetas == {"q": (16, 4), "v": (16, 4)}
    assert rep.line().startswith("trainable params: 307 || all params: ")
    assert "layers.2.v" in str(rep)


def test_one_training_step_moves_only_theta_and_head():
    model = apply_gift(toy(), GiftConfig(rank=4, target_modules=["q", "v"], trainable_modules=["head"]))
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    x, target = torch.randn(8, 16), torch.randint(0, 3, (8,))
    for _ in range(2):  # psi starts at zero: phi gets no gradient on the first step
        opt.zero_grad()
        F.cross_entropy(model(x), target).backward()
        opt.step()
    changed = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    assert changed == {n for n, p in model.named_parameters() if p.requires_grad}
    assert any("psi" in n for n in changed) and any("phi" in n for n in changed)


def test_sharing_modes():
    m = apply_gift(toy(), GiftConfig(rank=2, target_modules=["q", "layers.1.v"], sharing="type"))
    assert list(m.gift_thetas["default"]) == ["q", "layers__1__v"]
    assert m.layers[0].q.theta is m.layers[2].q.theta is m.gift_thetas["default"]["q"]

    # a layer matching several entries takes the most specific one's Theta
    m = apply_gift(toy(), GiftConfig(rank=2, target_modules=["layers.1.q", "q"], sharing="type"))
    assert list(m.gift_thetas["default"]) == ["q", "layers__1__q"]
    assert m.layers[1].q.theta is m.gift_thetas["default"]["layers__1__q"] and m.layers[2].q.theta is m.gift_thetas["default"]["q"]

    m = apply_gift(toy(), GiftConfig(rank=2, target_modules=["q", "v"], sharing="all"))
    assert list(m.gift_thetas["default"]) == ["all"]
    assert m.layers[0].q.theta is m.layers[1].v.theta

    m = apply_gift(toy(), GiftConfig(rank=2, target_modules=["q", "v"], sharing="layer"))
    assert len(m.gift_thetas["default"]) == 6 and "layers__0__q" in m.gift_thetas["default"]
    assert m.layers[0].q.theta is not m.layers[1].q.theta


def test_regex_targets_and_layer_selection():
    m = apply_gift(toy(), GiftConfig(rank=2, target_modules=r"layers\.\d+\.(q|v)", layers=[0, 2]))
    assert gift_report(m).adapted == ["layers.0.q", "layers.0.v", "layers.2.q", "layers.2.v"]
    assert list(m.gift_thetas["default"]) == ["q", "v"]
    m = apply_gift(toy(), GiftConfig(rank=2, target_modules=["v"], layers=[1], layers_pattern="layers"))
    assert gift_report(m).adapted == ["layers.1.v"]


def test_theta_dtype_is_honoured():
    m = apply_gift(toy().to(torch.bfloat16), GiftConfig(rank=2, target_modules=["q"], theta_dtype="float32"))
    assert m.gift_thetas["default"]["q"].phi.dtype == torch.float32
    y = m(torch.randn(2, 16, dtype=torch.bfloat16))
    assert y.dtype == torch.bfloat16


def test_stacked_linear_gets_one_theta_per_chunk():
    class Fused(nn.Module):
        def __init__(self):
            super().__init__()
            self.blocks = nn.ModuleList([nn.ModuleDict({"qkv": nn.Linear(12, 12 + 6 + 6)}) for _ in range(2)])

        def forward(self, x):
            return sum(b["qkv"](x) for b in self.blocks)

    torch.manual_seed(0)
    base = Fused()
    m = apply_gift(copy.deepcopy(base), GiftConfig(rank=3, target_modules=["qkv"], stacked={"qkv": [12, 6, 6]}))
    assert list(m.gift_thetas["default"]) == ["qkv__chunk0", "qkv__chunk1", "qkv__chunk2"]
    layer = m.blocks[0]["qkv"]
    assert isinstance(layer, GiftLinear) and layer.splits == (12, 6, 6)
    assert layer.weight is base.blocks[0]["qkv"].weight or torch.equal(layer.weight, base.blocks[0]["qkv"].weight)
    randomize_thetas(m.gift_thetas["default"])
    x = torch.randn(5, 12, dtype=torch.float32)
    ref = 0
    for blk, b0 in zip(m.blocks, base.blocks):
        w = b0["qkv"].weight.double()
        rows, start = [], 0
        for size, key in zip((12, 6, 6), m.gift_thetas["default"]):
            t = m.gift_thetas["default"][key]
            wc = w[start : start + size]
            rows.append(wc + (wc @ t.phi.double()) @ t.psi.double())
            start += size
        ref = ref + F.linear(x.double(), torch.cat(rows), b0["qkv"].bias.double())
    assert rel_err(out(m, x), ref) <= TOL[torch.float32]


# --------------------------------------------------------------------------- Hugging Face models


@pytest.mark.parametrize(
    "factory,targets,extra",
    [
        (bert, ["query", "value"], {"trainable_modules": ["classifier"]}),
        (llama, ["q_proj", "v_proj"], {}),
        (gpt2, ["c_attn"], {"stacked": {"c_attn": 3}}),
    ],
    ids=["bert", "llama", "gpt2"],
)
def test_hf_models_adapt_save_load_merge(tmp_path, factory, targets, extra):
    base = factory()
    x = ids()
    y0 = out(base, x)
    model = apply_gift(copy.deepcopy(base), GiftConfig(rank=4, target_modules=targets, **extra))
    assert torch.equal(out(model, x), y0)  # psi = 0: exactly the pretrained model
    randomize_thetas(model.gift_thetas["default"])
    y1 = out(model, x)
    assert not torch.allclose(y1, y0)

    save_gift(model, tmp_path)
    assert (tmp_path / ADAPTER_FILE).is_file() and (tmp_path / CONFIG_FILE).is_file()
    loaded = load_gift(copy.deepcopy(base), tmp_path)
    assert torch.equal(out(loaded, x), y1)

    types = [(n, type(m)) for n, m in base.named_modules()]
    merge_gift(model)
    assert [(n, type(m)) for n, m in model.named_modules() if n in dict(types)] == types  # original layer types
    assert not any(isinstance(m, GiftLinear) for m in model.modules())
    assert rel_err(out(model, x), y1) <= 1e-5
    unmerge_gift(model)
    assert torch.equal(out(model, x), y1)


def test_gpt2_conv1d_is_wrapped_without_copying_the_weight():
    base = gpt2()
    original = base.transformer.h[0].attn.c_attn
    model = apply_gift(base, GiftConfig(rank=2, target_modules=["c_attn"], stacked={"c_attn": 3}))
    layer = model.transformer.h[0].attn.c_attn
    assert isinstance(layer, GiftLinear) and layer.transposed
    assert layer.weight is original.weight and layer.weight.shape == (32, 96)
    assert layer.weight_rows().data_ptr() == original.weight.data_ptr()  # a view, not a copy
    assert list(model.gift_thetas["default"]) == ["c_attn__chunk0", "c_attn__chunk1", "c_attn__chunk2"]
    # the adapted Conv1D equals an nn.Linear holding W^T adapted chunk by chunk
    randomize_thetas(model.gift_thetas["default"])
    x = torch.randn(3, 32)
    w_rows = original.weight.detach().t().double()
    ref = []
    for c, t in enumerate(model.gift_thetas["default"].values()):
        wc = w_rows[32 * c : 32 * (c + 1)]
        ref.append(F.linear(x.double(), wc + (wc @ t.phi.double()) @ t.psi.double(), original.bias[32 * c : 32 * (c + 1)].double()))
    assert rel_err(layer(x), torch.cat(ref, -1)) <= TOL[torch.float32]
    # forward + backward copy no weight-sized tensor (only activations are copied/concatenated)
    from torch.profiler import profile

    xg = torch.randn(3, 32, requires_grad=True)
    with profile(record_shapes=True) as prof:
        layer(xg).sum().backward()
    copies = [
        e.input_shapes for e in prof.key_averages(group_by_input_shape=True)
        if e.key in ("aten::copy_", "aten::clone", "aten::contiguous", "aten::_to_copy")
    ]
    assert not [s for s in copies if any(list(d) in ([32, 96], [96, 32], [32, 32]) for d in s if d)], copies
    merge_gift(model)
    assert type(model.transformer.h[0].attn.c_attn).__name__ == "Conv1D"


def test_merged_model_runs_plain_layers_and_state_dict_is_the_base_ones(tmp_path):
    base = bert()
    model = apply_gift(copy.deepcopy(base), GiftConfig(rank=4, target_modules=["query", "value"]))
    randomize_thetas(model.gift_thetas["default"])
    weights_before = {n: p.detach().clone() for n, p in model.named_parameters()}
    merge_gift(model)
    q = model.bert.encoder.layer[0].attention.self.query
    assert type(q) is nn.Linear
    assert not [k for k in model.state_dict() if "original_weight" in k or "unmerged" in k]
    assert set(base.state_dict()) <= set(model.state_dict())
    with pytest.raises(RuntimeError, match="already merged"):
        merge_gift(model)
    unmerge_gift(model)
    for n, p in model.named_parameters():
        assert torch.equal(p, weights_before[n]), n
    with pytest.raises(RuntimeError, match="not merged"):
        unmerge_gift(model)


def test_deepcopy_and_print(capsys):
    model = apply_gift(bert(), GiftConfig(rank=2, target_modules=["query"]))
    twin = copy.deepcopy(model)
    randomize_thetas(twin.gift_thetas["default"])
    assert not torch.equal(twin.gift_thetas["default"]["query"].psi, model.gift_thetas["default"]["query"].psi)
    assert twin.bert.encoder.layer[1].attention.self.query.theta is twin.gift_thetas["default"]["query"]
    merge_gift(twin)
    unmerge_gift(twin)
    print_trainable_parameters(model)
    assert capsys.readouterr().out.startswith("trainable params: 128 || all params: ")  # 2 x 32 x 2


# --------------------------------------------------------------------------- config


def test_config_json_round_trip_and_validation():
    cfg = GiftConfig(rank=8, target_modules=["q_proj"], layers=[1], stacked={"qkv": 3}, theta_dtype="float32")
    assert GiftConfig.from_json(cfg.to_json()) == cfg
    json.loads(cfg.to_json())
    with pytest.raises(ValueError, match="unknown key"):
        GiftConfig.from_dict({"rank": 2, "target_modules": ["q"], "alpha": 3})
    with pytest.raises(ValueError, match=r"unknown key\(s\) \['fused'\]"):  # stacked has one spelling
        GiftConfig.from_dict({"rank": 8, "target_modules": ["q_proj"], "fused": {"qkv": 3}})
    for bad in (
        {"rank": 0, "target_modules": ["q"]},
        {"target_modules": []},
        {"target_modules": ["q"], "sharing": "block"},
        {"target_modules": ["q"], "theta_dtype": "int8"},
        {"target_modules": "("},
        {"target_modules": ["q"], "stacked": {"q": [3, 0]}},
    ):
        with pytest.raises(ValueError):
            GiftConfig(**bad)


def test_config_accepts_peft_r():
    assert GiftConfig(r=8, target_modules=["q"]).rank == 8
    assert GiftConfig(r=8, rank=8, target_modules=["q"]) == GiftConfig(rank=8, target_modules=["q"])
    assert GiftConfig(target_modules=["q"]).rank == 16
    assert "r" not in GiftConfig(r=8, target_modules=["q"]).to_dict()
    assert GiftConfig.from_dict({"r": 4, "target_modules": ["q"]}).rank == 4
    with pytest.raises(ValueError, match=r"rank=4 and its PEFT spelling r=8 disagree"):
        GiftConfig(rank=4, r=8, target_modules=["q"])
    with pytest.raises(ValueError, match="rank must be an int"):
        GiftConfig(r=0, target_modules=["q"])


# --------------------------------------------------------------------------- bad input: model untouched


def test_target_matching_nothing_names_it():
    model = bert()
    snap = snapshot(model)
    with pytest.raises(ValueError, match=r"target 'vlaue' matches no module.*'query'"):
        apply_gift(model, GiftConfig(target_modules=["query", "vlaue"]))
    assert_unchanged(model, snap)
    with pytest.raises(ValueError, match="regex"):
        apply_gift(model, GiftConfig(target_modules=r".*\.nothing"))
    with pytest.raises(ValueError, match=r"layers \[7\]"):
        apply_gift(model, GiftConfig(target_modules=["query"], layers=[0, 7]))
    with pytest.raises(ValueError, match="trainable module 'clasifier'"):
        apply_gift(model, GiftConfig(target_modules=["query"], trainable_modules=["clasifier"]))
    assert_unchanged(model, snap)


def test_target_that_is_not_linear_names_the_module_and_type():
    model = bert()
    snap = snapshot(model)
    with pytest.raises(TypeError, match=r"'bert\.embeddings\.LayerNorm' is a LayerNorm, not a linear layer"):
        apply_gift(model, GiftConfig(target_modules=["query", "LayerNorm"]))
    assert_unchanged(model, snap)


def test_shared_theta_with_two_input_sizes_names_both_layers():
    model = bert()  # attention.output.dense has d_in 32, output.dense has d_in 40
    snap = snapshot(model)
    with pytest.raises(ValueError, match=r"in_features=40.*in_features=32|in_features=32.*in_features=40") as err:
        apply_gift(model, GiftConfig(target_modules=["dense"], sharing="type", layers=[0]))
    assert "output.dense" in str(err.value)
    with pytest.raises(ValueError, match="one d_in"):
        apply_gift(model, GiftConfig(target_modules=["query", "output.dense"], sharing="all"))
    assert_unchanged(model, snap)
    apply_gift(model, GiftConfig(target_modules=["dense"], sharing="layer", layers=[0]))  # allowed per layer
    assert is_adapted(model)


def test_bad_stacked_split_and_shared_module_objects():
    model = gpt2()
    snap = snapshot(model)
    with pytest.raises(ValueError, match=r"c_attn.*sum to 90.*96"):
        apply_gift(model, GiftConfig(target_modules=["c_attn"], stacked={"c_attn": [32, 32, 26]}))
    with pytest.raises(ValueError, match="not divisible"):
        apply_gift(model, GiftConfig(target_modules=["c_attn"], stacked={"c_attn": 5}))
    with pytest.raises(ValueError, match=r"stacked\['c_proj'\]"):
        apply_gift(model, GiftConfig(target_modules=["c_attn"], stacked={"c_proj": 2}))
    assert_unchanged(model, snap)

    shared = nn.Linear(4, 4)
    tied = nn.ModuleDict({"a": shared, "b": nn.Sequential(shared)})
    snap = snapshot(tied)
    with pytest.raises(ValueError, match="several names"):
        apply_gift(tied, GiftConfig(target_modules=["a"]))
    assert_unchanged(tied, snap)


def test_applying_twice_is_refused():
    model = apply_gift(toy(), GiftConfig(rank=2, target_modules=["q"]))
    snap = snapshot(model)
    with pytest.raises(ValueError, match="already adapted"):
        apply_gift(model, GiftConfig(rank=2, target_modules=["v"]))
    now = snapshot(model)
    assert now["types"] == snap["types"] and now["state"].keys() == snap["state"].keys()


def test_sequential_root_is_refused_unchanged(tmp_path):
    # nn.Sequential's forward calls every child: a Theta store added to it would run as a layer
    seq = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 4))
    snap = snapshot(seq)
    with pytest.raises(TypeError, match="apply_gift: .*nn.Sequential.*wrap it"):
        apply_gift(seq, GiftConfig(rank=2, target_modules=["0"]))
    assert_unchanged(seq, snap)

    model = apply_gift(Wrapped(copy.deepcopy(seq)), GiftConfig(rank=2, target_modules=["body.0"]))
    x = torch.randn(3, 8)
    assert model(x).shape == (3, 4)
    save_gift(model, tmp_path)
    with pytest.raises(TypeError, match=r"load_gift\(.*nn.Sequential"):
        load_gift(copy.deepcopy(seq), tmp_path)


def test_checkpoint_for_another_model_names_the_target(tmp_path):
    save_gift(apply_gift(llama(), GiftConfig(rank=2, target_modules=["q_proj"])), tmp_path)
    model = bert()
    snap = snapshot(model)
    with pytest.raises(ValueError, match="target 'q_proj' matches no module"):
        load_gift(model, tmp_path)
    assert_unchanged(model, snap)


def test_checkpoint_with_other_shapes_names_the_key(tmp_path):
    save_gift(apply_gift(bert(), GiftConfig(rank=2, target_modules=["query"])), tmp_path)
    cfg = transformers.BertConfig(vocab_size=60, hidden_size=48, num_hidden_layers=2, num_attention_heads=4, intermediate_size=40)
    torch.manual_seed(0)
    model = transformers.BertForSequenceClassification(cfg)
    snap = snapshot(model)
    with pytest.raises(ValueError, match=r"'gift_thetas\.query\.phi' has shape \(32, 2\).*\(48, 2\)"):
        load_gift(model, tmp_path)
    assert_unchanged(model, snap)


def test_checkpoint_with_edited_keys_or_config(tmp_path):
    from safetensors.torch import load_file, save_file

    save_gift(apply_gift(bert(), GiftConfig(rank=2, target_modules=["query"], trainable_modules=["classifier"])), tmp_path)
    tensors = load_file(str(tmp_path / ADAPTER_FILE))
    model = bert()
    snap = snapshot(model)

    save_file({**tensors, "gift_thetas.key.phi": tensors["gift_thetas.query.phi"].clone()}, str(tmp_path / ADAPTER_FILE))
    with pytest.raises(ValueError, match="'gift_thetas.key.phi'"):
        load_gift(model, tmp_path)
    save_file({k: v for k, v in tensors.items() if k != "gift_thetas.query.psi"}, str(tmp_path / ADAPTER_FILE))
    with pytest.raises(ValueError, match="lacks key 'gift_thetas.query.psi'"):
        load_gift(model, tmp_path)
    save_file(tensors, str(tmp_path / ADAPTER_FILE))
    cfg = json.loads((tmp_path / CONFIG_FILE).read_text())
    (tmp_path / CONFIG_FILE).write_text(json.dumps({**cfg, "rank": 3}))
    with pytest.raises(ValueError, match=r"'gift_thetas\.query\.phi' has shape \(32, 2\).*\(32, 3\)"):
        load_gift(model, tmp_path)
    (tmp_path / CONFIG_FILE).write_text(json.dumps({**cfg, "scale": 3}))
    with pytest.raises(ValueError, match="unknown key"):
        load_gift(model, tmp_path)
    with pytest.raises(FileNotFoundError, match=CONFIG_FILE):
        load_gift(model, tmp_path / "nowhere")
    assert_unchanged(model, snap)

    (tmp_path / CONFIG_FILE).write_text(json.dumps(cfg))
    loaded = load_gift(model, tmp_path)
    assert torch.equal(loaded.classifier.weight, tensors["classifier.weight"])


def test_loading_into_an_adapted_model_is_refused(tmp_path):
    save_gift(apply_gift(bert(), GiftConfig(rank=2, target_modules=["query"])), tmp_path)
    model = apply_gift(bert(), GiftConfig(rank=2, target_modules=["value"]))
    snap = snapshot(model)
    with pytest.raises(ValueError, match="already adapted"):
        load_gift(model, tmp_path)
    now = snapshot(model)
    assert now["types"] == snap["types"] and now["grad"] == snap["grad"]
    for k, v in snap["state"].items():
        assert torch.equal(now["state"][k], v), k
