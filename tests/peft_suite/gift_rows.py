"""GIFT rows for PEFT's tests/test_custom_models.py (the tuple shapes of the suite's own lists).

Every config option GIFT has is covered: targets by name, list and regex; modules_to_save;
sharing type / all / layer; in/out projection biases; stacked row chunks (count and sizes);
exclude_modules; the input-side form; transformers Conv1D; a model whose Theta is shared by
several layers. MLPShared and EmbConv1DWide are defined in test_gift_custom_models.py. Not rows (docs/peft.md):
``bias`` ("all" / "gift_only": the suite's own bias tests exercise it, and PEFT refuses a second
adapter when one has a bias, which most checks add) and ``theta_dtype`` (the suite's dtype
contract, adapter parameters float32 under autocast_adapter_dtype else the base dtype, is exactly
what an explicit theta_dtype overrides).
"""

from gift_kernels.adapters.peft import GiftPeftConfig

C = GiftPeftConfig
R = {"r": 4}

# (test_name, model_id, config_cls, config_kwargs) -- as the suite's TEST_CASES
TEST_CASES = [
    ("Vanilla MLP 1 GIFT", "MLP", C, {**R, "target_modules": "lin0"}),
    ("Vanilla MLP 2 GIFT", "MLP", C, {**R, "target_modules": ["lin0"]}),
    ("Vanilla MLP 3 GIFT", "MLP", C, {**R, "target_modules": ["lin1"]}),
    ("Vanilla MLP 4 GIFT", "MLP", C, {**R, "target_modules": ["lin0", "lin1"]}),
    ("Vanilla MLP 5 GIFT regex", "MLP", C, {**R, "target_modules": r"lin\d"}),
    ("Vanilla MLP 6 GIFT modules_to_save", "MLP", C, {**R, "target_modules": ["lin0"], "modules_to_save": ["lin1"]}),
    ("Vanilla MLP 7 GIFT sharing layer", "MLP", C, {**R, "target_modules": ["lin0", "lin1"], "sharing": "layer"}),
    ("Vanilla MLP 8 GIFT sharing all stacked", "MLP", C,
     {**R, "target_modules": ["lin0"], "sharing": "all", "stacked": {"lin0": 2}}),
    ("Vanilla MLP 9 GIFT stacked", "MLP", C, {**R, "target_modules": ["lin0", "lin1"], "stacked": {"lin0": 2}}),
    ("Vanilla MLP 10 GIFT stacked list", "MLP", C, {**R, "target_modules": ["lin0"], "stacked": {"lin0": [5, 15]}}),
    ("Vanilla MLP 11 GIFT in_bias", "MLP", C, {**R, "target_modules": ["lin0"], "in_bias": True}),
    # out_bias only on lin0: on lin1 (which feeds LogSoftmax) it adds one scalar to every logit, so
    # its gradient is exactly zero (docs/adapter.md); apply_gift and the tuner warn about that case
    ("Vanilla MLP 12 GIFT out_bias", "MLP", C, {**R, "target_modules": ["lin0"], "out_bias": True}),
    ("Vanilla MLP 13 GIFT in_out_bias", "MLP", C, {**R, "target_modules": ["lin0"], "in_bias": True, "out_bias": True}),
    ("Vanilla MLP 14 GIFT exclude", "MLP", C, {**R, "target_modules": r"lin\d", "exclude_modules": ["lin1"]}),
    ("Vanilla MLP 15 GIFT input form", "MLP", C, {**R, "target_modules": ["lin0", "lin1"], "form": "input"}),
    ("MLP_LayerNorm 1 GIFT", "MLP_LayerNorm", C, {**R, "target_modules": ["lin0", "lin1"]}),
    # transformers Conv1D rows use EmbConv1DWide (suite_main.py), the suite's EmbConv1D with 20 outputs
    # and a Conv1D at nn.Linear's init scale: see docs/peft.md for why not EmbConv1D itself
    ("Embedding + transformers Conv1D 1 GIFT", "EmbConv1DWide", C, {**R, "target_modules": ["conv1d"]}),
    ("Embedding + transformers Conv1D 2 GIFT", "EmbConv1DWide", C, {**R, "target_modules": ["conv1d", "lin0"]}),
    ("Embedding + transformers Conv1D 3 GIFT mts", "EmbConv1DWide", C,
     {**R, "target_modules": ["conv1d"], "modules_to_save": ["lin0"]}),
    ("Embedding + transformers Conv1D 4 GIFT stacked", "EmbConv1DWide", C,
     {**R, "target_modules": ["conv1d"], "stacked": {"conv1d": [8, 12]}}),
    # one Theta shared by lin1 and lin2 (20 x 20 each)
    ("MLPShared 1 GIFT shared all", "MLPShared", C, {**R, "target_modules": ["lin1", "lin2"], "sharing": "all"}),
    ("MLPShared 2 GIFT shared all bias", "MLPShared", C,
     {**R, "target_modules": r"lin[12]", "sharing": "all", "in_bias": True, "out_bias": True}),
    ("MLPShared 3 GIFT shared all stacked", "MLPShared", C,
     {**R, "target_modules": ["lin1", "lin2"], "sharing": "all", "stacked": {"lin1": 2, "lin2": 2}}),
]

_INIT = {"init_weights": False}  # what the suite's set_init_weights_false gives the TEST_CASES rows

# (test_name, tuner_method, config_cls, kwargs_1, kwargs_2) -- as MULTIPLE_ACTIVE_ADAPTERS_TEST_CASES (model: MLP)
MULTIPLE_ACTIVE_ADAPTERS_TEST_CASES = [
    ("GIFT Same", "gift", C, {**R, "target_modules": ["lin0"], **_INIT}, {**R, "target_modules": ["lin0"], **_INIT}),
    ("GIFT Different", "gift", C, {**R, "target_modules": ["lin0"], **_INIT}, {**R, "target_modules": ["lin1"], **_INIT}),
]

# (test_name, config0, config1) -- as MIXED_ADAPTER_TEST_CASES
MIXED_ADAPTER_TEST_CASES = [
    ("GIFT mixed adapter", C(target_modules=["lin0"], r=4, **_INIT), C(target_modules=["lin0"], r=8, **_INIT)),
    ("GIFT mixed adapter stacked", C(target_modules=["lin0"], r=4, stacked={"lin0": 2}, **_INIT),
     C(target_modules=["lin0", "lin1"], r=2, **_INIT)),
]
