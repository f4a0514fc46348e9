"""Runs PEFT's test_custom_models.py (verbatim) with the GIFT rows added.

``@pytest.mark.parametrize(..., TEST_CASES)`` keeps a reference to the list object, and pytest
reads it only when it collects each test class, after this module is imported: extending the
suite's lists *in place* here, then re-exporting its test classes, adds the rows without editing
the suite. Run this file only (collecting test_custom_models.py as well would run its classes
twice), with ``--gift-only`` to keep the GIFT items.
"""

import os

import torch
from torch import nn

from gift_kernels.adapters.peft import GiftPeftConfig

from . import gift_rows
from . import test_custom_models as suite

if os.environ.get("GIFT_SUITE_ONLY_ROWS") == "1":  # set by conftest.py for --gift-only
    for _lst in ("TEST_CASES", "MULTIPLE_ACTIVE_ADAPTERS_TEST_CASES", "MIXED_ADAPTER_TEST_CASES", "ALL_PEFT_CONFIG_CLASSES"):
        getattr(suite, _lst).clear()  # in place: the marks hold these very list objects
suite.TEST_CASES.extend(gift_rows.TEST_CASES)
suite.MULTIPLE_ACTIVE_ADAPTERS_TEST_CASES.extend(gift_rows.MULTIPLE_ACTIVE_ADAPTERS_TEST_CASES)
suite.MIXED_ADAPTER_TEST_CASES.extend(gift_rows.MIXED_ADAPTER_TEST_CASES)
if GiftPeftConfig not in suite.ALL_PEFT_CONFIG_CLASSES:
    suite.ALL_PEFT_CONFIG_CLASSES.append(GiftPeftConfig)


class MLPShared(nn.Module):
    """The suite's MLP with two 20 x 20 layers in a row, so that one Theta can serve both."""

    def __init__(self, bias=True):
        super().__init__()
        self.lin0 = nn.Linear(10, 20, bias=bias)
        self.relu = nn.ReLU()
        self.lin1 = nn.Linear(20, 20, bias=bias)
        self.lin2 = nn.Linear(20, 20, bias=bias)
        self.lin3 = nn.Linear(20, 2, bias=bias)
        self.sm = nn.LogSoftmax(dim=-1)
        self.dtype = torch.float

    def forward(self, X):
        X = self.relu(self.lin0(X.to(self.dtype)))
        X = self.relu(self.lin1(X))
        X = self.relu(self.lin2(X))
        return self.sm(self.lin3(X))


class EmbConv1DWide(nn.Module):
    """The suite's EmbConv1D with a 20-output transformers Conv1D (its own has a single output),
    initialised at nn.Linear's scale, U(+-1/sqrt(d_in)), instead of transformers' pretraining start
    N(0, 0.02^2): GIFT's phi gradient carries a factor W, so at that start phi moves ~1e-5 in the
    suite's 3 training steps, below its 1e-4 tolerance (docs/peft.md)."""

    def __init__(self, emb_size=100):
        super().__init__()
        self.emb = nn.Embedding(emb_size, 5)
        self.conv1d = suite.Conv1D(20, 5)
        nn.init.uniform_(self.conv1d.weight, -(5**-0.5), 5**-0.5)
        self.relu = nn.ReLU()
        self.flat = nn.Flatten()
        self.lin0 = nn.Linear(200, 2)
        self.sm = nn.LogSoftmax(dim=-1)

    def forward(self, X):
        return self.sm(self.lin0(self.flat(self.relu(self.conv1d(self.emb(X))))))


_OURS = {"MLPShared": MLPShared, "EmbConv1DWide": EmbConv1DWide}
_from_pretrained = suite.MockTransformerWrapper.from_pretrained.__func__


def _with_ours(cls, model_id, dtype=None):
    if model_id in _OURS:
        torch.manual_seed(0)
        return _OURS[model_id]().to(dtype or torch.float32)
    return _from_pretrained(cls, model_id, dtype=dtype)


suite.MockTransformerWrapper.from_pretrained = classmethod(_with_ours)

for _name in dir(suite):  # pytest collects the suite's test classes from this module
    if _name.startswith("Test") and isinstance(getattr(suite, _name), type):
        globals()[_name] = getattr(suite, _name)
