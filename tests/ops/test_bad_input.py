"""Bad input: a clear error naming the tensor and the shapes; nothing broadcast; nothing
the caller passed is modified."""

from __future__ import annotations

import pytest
import torch

from gift_kernels import gift_linear
from gift_testing import make_inputs

ARGS = ("x", "weight", "bias", "phi", "psi")


def _base():
    return make_inputs(6, 5, 4, 2)


def _replace(**changes):
    inputs = _base()
    inputs.update(changes)
    return inputs


CASES = {
    # name: (inputs, exception, pattern that must appear in the message)
    "x_last_dim": (lambda: _replace(x=torch.randn(6, 3)), ValueError, r"x's last dimension \(3\).*\(6, 3\).*\(5, 4\)"),
    "phi_rows": (lambda: _replace(phi=torch.randn(3, 2)), ValueError, r"phi must have shape \(d_in, r\).*\(3, 2\)"),
    "psi_cols": (lambda: _replace(psi=torch.randn(2, 7)), ValueError, r"psi must have shape \(r, d_in\).*\(2, 7\)"),
    "rank_mismatch": (lambda: _replace(psi=torch.randn(3, 4)), ValueError, r"phi's rank \(2\).*psi's rank \(3\)"),
    "phi_rank_3": (lambda: _replace(phi=torch.randn(4, 2, 1)), ValueError, r"phi must be 2-D.*\(4, 2, 1\)"),
    "psi_rank_1": (lambda: _replace(psi=torch.randn(4)), ValueError, r"psi must be 2-D.*\(4,\)"),
    "weight_rank_1": (lambda: _replace(weight=torch.randn(4)), ValueError, r"weight must be 2-D.*\(4,\)"),
    "bias_shape": (lambda: _replace(bias=torch.randn(4)), ValueError, r"bias must have shape \(5,\).*\(4,\)"),
    "bias_2d": (lambda: _replace(bias=torch.randn(1, 5)), ValueError, r"bias must have shape \(5,\).*\(1, 5\)"),
    "x_rank_0": (lambda: _replace(x=torch.tensor(1.0)), ValueError, r"x must have at least one dimension"),
    "x_int": (lambda: _replace(x=torch.ones(6, 4, dtype=torch.int64)), TypeError, r"x must be a floating-point.*int64.*\(6, 4\)"),
    "weight_bool": (lambda: _replace(weight=torch.ones(5, 4, dtype=torch.bool)), TypeError, r"weight must be a floating-point.*bool"),
    "phi_int": (lambda: _replace(phi=torch.ones(4, 2, dtype=torch.int32)), TypeError, r"phi must be a floating-point"),
    "x_weight_dtype": (lambda: _replace(x=torch.randn(6, 4, dtype=torch.float64)), TypeError, r"x dtype torch.float64.*weight dtype torch.float32"),
    "theta_dtypes": (lambda: _replace(psi=torch.randn(2, 4, dtype=torch.float64)), TypeError, r"phi dtype.*psi dtype"),
    "device": (lambda: _replace(weight=torch.empty(5, 4, device="meta")), ValueError, r"weight is on meta.*\(5, 4\).*x is on cpu"),
    "not_a_tensor": (lambda: _replace(phi=[[1.0, 2.0]] * 4), TypeError, r"phi must be a torch.Tensor"),
    "x_sparse": (lambda: _replace(x=torch.randn(6, 4).to_sparse()), TypeError, r"x must be a dense \(strided\) tensor"),
    "x_sparse_csr": (lambda: _replace(x=torch.randn(6, 4).to_sparse_csr()), TypeError, r"x must be a dense \(strided\)"),
    "weight_rank_0": (lambda: _replace(weight=torch.tensor(1.0)), ValueError, r"weight must be 2-D.*\(\)"),
    "bias_int": (lambda: _replace(bias=torch.ones(5, dtype=torch.int64)), TypeError, r"bias must be a floating-point"),
}


@pytest.mark.parametrize("warm", [False, True], ids=["cold", "after-a-good-call"])
@pytest.mark.parametrize("case", sorted(CASES), ids=sorted(CASES))
def test_bad_input_is_a_clear_error_and_modifies_nothing(case, warm):
    """``warm``: a good call of the same shapes ran first, so its plan (and validated signature,
    which lets later calls skip the checks) is cached: the bad call must still be refused."""
    make, exc, pattern = CASES[case]
    if warm:
        good = _base()
        for requires_grad in (False, True):
            gift_linear(*(good[a].requires_grad_(requires_grad) if a == "x" else good[a] for a in ARGS))
    inputs = make()
    def dense(v):
        return v.to_dense() if v.layout != torch.strided else v

    before = {k: dense(v.detach()).clone() for k, v in inputs.items()
              if isinstance(v, torch.Tensor) and v.device.type != "meta"}
    with pytest.raises(exc, match=pattern):
        gift_linear(*(inputs[a] for a in ARGS))
    for name, old in before.items():
        assert torch.equal(dense(inputs[name]), old), f"{name} was modified"
        assert inputs[name].grad is None


def test_registered_op_checks_its_inputs_too():
    """Other libraries call the op directly: it validates (it takes 2-D x only)."""
    inputs = _base()
    x3 = inputs["x"].detach().unsqueeze(0)
    with pytest.raises(ValueError, match=r"x must be 2-D \(M, d_in\).*\(1, 6, 4\)"):
        torch.ops.gift_kernels.gift_linear_fwd(x3, inputs["weight"], inputs["bias"], inputs["phi"], inputs["psi"])
    with pytest.raises(ValueError, match=r"x's last dimension"):
        torch.ops.gift_kernels.gift_linear_fwd(torch.randn(6, 3), inputs["weight"], None, inputs["phi"], inputs["psi"])


def test_a_known_kind_of_call_is_checked_once(monkeypatch):
    """The checks run on the first call of a signature only (the plan cache holds it); a call
    differing in any checked property (here W's dtype, then x's layout) is checked again."""
    from gift_kernels.ops import functional, plan

    seen = []
    real = functional.check_gift_args
    monkeypatch.setattr(functional, "check_gift_args", lambda *a, **k: seen.append(1) or real(*a, **k))
    plan.clear()
    good = _base()
    args = [good[a] for a in ARGS]
    for _ in range(3):
        gift_linear(*args)
    assert len(seen) == 1
    gift_linear(args[0].double(), args[1].double(), args[2].double(), *args[3:])
    assert len(seen) == 2
    with pytest.raises(TypeError, match="dense"):
        gift_linear(args[0].to_sparse(), *args[1:])
    assert len(seen) == 3
    plan.clear()
    gift_linear(*args)
    assert len(seen) == 4, "clear() forgets the validated signatures with the plans"


GIFT_INPUT_CASES = {
    "phi_rows": (dict(phi=torch.randn(3, 2)), ValueError, r"phi must have shape \(d_in, r\).*\(3, 2\)"),
    "psi_dtype": (dict(psi=torch.randn(2, 4, dtype=torch.float64)), TypeError, r"phi dtype.*psi dtype"),
    "x_sparse": (dict(x=torch.randn(6, 4).to_sparse()), TypeError, r"x must be a dense \(strided\) tensor"),
    "x_rank_0": (dict(x=torch.tensor(1.0)), ValueError, r"x must be"),
    "x_list": (dict(x=[[1.0] * 4] * 6), TypeError, r"x must be a torch.Tensor"),
    "x_sparse_csr": (dict(x=torch.randn(6, 4).to_sparse_csr()), TypeError, r"x must be a dense \(strided\)"),
    "x_nested": (dict(x=torch.nested.nested_tensor([torch.randn(2, 4), torch.randn(3, 4)], layout=torch.jagged)),
                 TypeError, r"x must be a dense \(strided\)"),
}


@pytest.mark.parametrize("case", sorted(GIFT_INPUT_CASES), ids=sorted(GIFT_INPUT_CASES))
def test_gift_input_refuses_bad_input_after_a_good_call(case):
    from gift_kernels import gift_input

    good = dict(x=torch.randn(6, 4), phi=torch.randn(4, 2), psi=torch.randn(2, 4))
    gift_input(**good)
    gift_input(good["x"].requires_grad_(True), good["phi"], good["psi"])
    changes, exc, pattern = GIFT_INPUT_CASES[case]
    with pytest.raises(exc, match=pattern):
        gift_input(**{**good, **changes})


def test_gift_linear_refuses_a_nested_x_by_name():
    good = _base()
    gift_linear(*(good[a] for a in ARGS))
    x = torch.nested.nested_tensor([torch.randn(2, 4), torch.randn(3, 4)], layout=torch.jagged)
    with pytest.raises(TypeError, match=r"x must be a dense \(strided\)"):
        gift_linear(x, *(good[a] for a in ARGS[1:]))


def test_a_cleared_plan_is_not_outlived_by_its_validated_signature(monkeypatch):
    """``choose`` records a validated signature only while its plan is still cached: a
    ``clear()`` on another thread right after the plan was stored leaves nothing for ``known``."""
    from gift_kernels.ops import plan
    from gift_kernels.ops.checks import gift_signature

    class ClearedAtOnce(dict):
        def __setitem__(self, key, value):  # stored, then cleared before choose records the signature
            pass

    good = _base()
    args = [good[a] for a in ARGS]
    sig = gift_signature(*args)
    plan.clear()
    monkeypatch.setattr(plan, "_plans", ClearedAtOnce())
    gift_linear(*args)
    assert plan.known("gift_linear", sig, args[0], 5, training=True) is None
    monkeypatch.undo()
    gift_linear(*args)
    assert plan.known("gift_linear", sig, args[0], 5, training=True) is not None
