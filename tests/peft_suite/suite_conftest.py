"""conftest.py of the generated PEFT suite directory (PEFT's sdist ships none).

1. No network: HF_HUB_OFFLINE=1 before anything imports huggingface_hub (the custom-model tests
   never need the hub: MockTransformerWrapper builds the models in memory).
2. Import-only dependencies: testing_common.py imports ``diffusers.StableDiffusionPipeline``
   (used only in isinstance checks) and testing_utils.py imports ``datasets.load_dataset`` (used
   only by two hub helpers that test_custom_models.py never calls). Where the real packages are
   not installed, minimal stand-ins are put in sys.modules; a stand-in that is called raises.
3. ``--gift-only``: keep the items parametrised with a GIFT row or GiftPeftConfig (selection by
   parameter value: ``-k GIFT`` would also match this module's name).
4. As upstream's tests/conftest.py (git repo only): transformers deprecation logs fail a test.
"""

import importlib.util
import logging
import os
import sys
import types

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def _stand_in(name, **attrs):
    mod = types.ModuleType(name)
    mod.__dict__.update(attrs)
    sys.modules[name] = mod


if importlib.util.find_spec("diffusers") is None:
    _stand_in("diffusers", StableDiffusionPipeline=type("StableDiffusionPipeline", (), {}))
if importlib.util.find_spec("datasets") is None:
    def load_dataset(*args, **kwargs):
        raise RuntimeError("datasets is a stand-in in this suite (no hub access); this test needs a hub data set")

    _stand_in("datasets", load_dataset=load_dataset)


def pytest_addoption(parser):
    parser.addoption("--gift-only", action="store_true", help="keep only items parametrised with a GIFT row/config")


def pytest_configure(config):
    if config.getoption("--gift-only"):
        # read by test_gift_custom_models.py at import: the other methods' rows are dropped before the
        # parametrised tests are expanded (the same GIFT items, without generating ~20k others)
        os.environ["GIFT_SUITE_ONLY_ROWS"] = "1"

    class _ErrorOnDeprecation(logging.Handler):
        def emit(self, record):
            msg = record.getMessage().lower()
            if ("deprecat" in msg or "future" in msg) and "torch_dtype" not in msg and "bpe.__init__" not in msg:
                raise AssertionError(f"**Transformers Deprecation**: {msg}")

    logger = logging.getLogger("transformers")
    logger.addHandler(_ErrorOnDeprecation())
    logger.setLevel(logging.WARNING)


def pytest_collection_modifyitems(config, items):
    if not config.getoption("--gift-only"):
        return
    from gift_kernels.adapters.peft import GiftPeftConfig

    def is_gift(item):
        params = getattr(getattr(item, "callspec", None), "params", {})
        return any(v is GiftPeftConfig or isinstance(v, GiftPeftConfig) for v in params.values())

    keep = [i for i in items if is_gift(i)]
    config.hook.pytest_deselected(items=[i for i in items if not is_gift(i)])
    items[:] = keep
