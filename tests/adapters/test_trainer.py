"""Every way people save and resume an adapted model, with Thetas shared across layers.

A shared Theta lives once in the model (``model.gift_thetas["default"]``); the layers that use it hold a
reference outside the module tree. So ``state_dict`` holds each Theta tensor once, safetensors
(the Hugging Face ``Trainer``'s default format) accepts it, and loading writes into the one
Parameter every layer reads: the layers stay tied. Tested with the real ``Trainer`` on a tiny
Llama built from a config: checkpoints in both formats, ``save_model`` and a resume that
continues the uninterrupted run's loss curve exactly.
"""

from __future__ import annotations

import pytest
import torch

transformers = pytest.importorskip("transformers")
pytest.importorskip("safetensors")

from safetensors.torch import load_file  # noqa: E402

from gift_kernels import GiftConfig, apply_gift  # noqa: E402
from tiny_hf_models import llama  # noqa: E402

STEPS, SAVE_AT = 6, 3


def _adapted(seed: int = 0):
    model = apply_gift(llama(), GiftConfig(rank=4, target_modules=["q_proj", "v_proj", "o_proj"]))
    torch.manual_seed(seed)
    with torch.no_grad():  # psi starts at zero: give every Theta a value so a lost tie shows
        for p in model.gift_thetas["default"].parameters():
            p.normal_(0, 0.05)
    return model


class _Data(torch.utils.data.Dataset):
    def __init__(self, n: int = 24, seq: int = 9):
        g = torch.Generator().manual_seed(1)
        self.ids = torch.randint(0, 60, (n, seq), generator=g)

    def __len__(self):
        return len(self.ids)

    def __getitem__(self, i):
        return {"input_ids": self.ids[i], "labels": self.ids[i]}


def _trainer(model, out, *, safetensors: bool = True):
    kw = {}
    if not safetensors and "save_safetensors" in transformers.TrainingArguments.__dataclass_fields__:
        kw["save_safetensors"] = False  # transformers 4; 5 always writes safetensors (see _as_torch_checkpoint)
    args = transformers.TrainingArguments(
        output_dir=str(out), max_steps=STEPS, per_device_train_batch_size=4, learning_rate=1e-2, logging_steps=1,
        save_steps=SAVE_AT, save_strategy="steps", report_to=[], use_cpu=True, seed=0, data_seed=0,
        dataloader_num_workers=0, disable_tqdm=True, **kw,
    )
    return transformers.Trainer(model=model, args=args, train_dataset=_Data())


def _as_torch_checkpoint(ckpt):
    """The checkpoint in the torch format (``pytorch_model.bin``), which the Trainer loads with
    ``torch.load`` (transformers 5 no longer writes it but still resumes from it)."""
    safe = ckpt / "model.safetensors"
    if safe.exists():
        torch.save(load_file(str(safe)), ckpt / "pytorch_model.bin")
        safe.unlink()


def _losses(trainer):
    return {h["step"]: h["loss"] for h in trainer.state.log_history if "loss" in h}


def _assert_tied(model):
    """Every adapted layer reads the Theta object of the store; each Parameter once in the model."""
    thetas = {id(t) for t in model.gift_thetas["default"].values()}
    layers = [m for m in model.modules() if type(m).__name__ == "GiftLinear"]
    assert layers and all(id(t) in thetas for m in layers for t in m.chunk_thetas)
    names = [n for n, _ in model.named_parameters(remove_duplicate=False) if "phi" in n or "psi" in n]
    assert names and all(n.startswith("gift_thetas.") for n in names), names


def _theta_state(model):
    return {k: v.detach().clone() for k, v in model.gift_thetas["default"].state_dict().items()}


@pytest.mark.parametrize("safetensors", [True, False], ids=["safetensors", "torch"])
def test_trainer_checkpoint_and_resume_continue_the_same_loss_curve(tmp_path, safetensors):
    full = _trainer(_adapted(), tmp_path / "full", safetensors=safetensors)
    full.train()
    ref = _losses(full)
    assert sorted(ref) == list(range(1, STEPS + 1))

    ckpt = tmp_path / "full" / f"checkpoint-{SAVE_AT}"
    if not safetensors:
        _as_torch_checkpoint(ckpt)
    weights = ckpt / ("model.safetensors" if safetensors else "pytorch_model.bin")
    assert weights.is_file()
    saved = load_file(str(weights)) if safetensors else torch.load(weights, weights_only=True)
    theta_keys = sorted(k for k in saved if "phi" in k or "psi" in k)
    # each shared Theta once (3 types x phi, psi), not once per layer
    assert theta_keys == sorted(f"gift_thetas.default.{t}.{p}" for t in ("q_proj", "v_proj", "o_proj") for p in ("phi", "psi"))

    resumed_model = _adapted(seed=7)  # other Theta values: the checkpoint must overwrite them all
    resumed = _trainer(resumed_model, tmp_path / "full", safetensors=safetensors)
    resumed.train(resume_from_checkpoint=str(ckpt))
    _assert_tied(resumed_model)
    got = {step: loss for step, loss in _losses(resumed).items() if step > SAVE_AT}  # (earlier: the checkpoint's log)
    assert sorted(got) == list(range(SAVE_AT + 1, STEPS + 1))
    for step, loss in got.items():
        assert loss == pytest.approx(ref[step], rel=1e-5, abs=1e-6), f"step {step}: resumed {loss} vs {ref[step]}"
    assert ref[STEPS] != ref[SAVE_AT + 1]  # training moved: the comparison is not between constants
    final = _theta_state(full.model)
    for k, v in _theta_state(resumed_model).items():
        torch.testing.assert_close(v, final[k], rtol=1e-5, atol=1e-6, msg=lambda m: f"{k}: {m}")


def test_trainer_save_model_writes_each_theta_once_and_loads_tied(tmp_path):
    model = _adapted()
    trainer = _trainer(model, tmp_path / "run")
    trainer.save_model(str(tmp_path / "final"))
    saved = load_file(str(tmp_path / "final" / "model.safetensors"))
    assert sum("phi" in k for k in saved) == 3

    fresh = _adapted(seed=3)
    result = fresh.load_state_dict(saved, strict=False)
    assert not result.unexpected_keys and not [k for k in result.missing_keys if "gift" in k]
    _assert_tied(fresh)
    ids = torch.randint(0, 60, (2, 7))
    with torch.no_grad():
        torch.testing.assert_close(fresh(ids).logits, model(ids).logits, rtol=0, atol=0)


def test_save_pretrained_and_torch_save_round_trip(tmp_path):
    model = _adapted()
    model.save_pretrained(str(tmp_path / "hf"))  # safetensors refuses shared tensors: each Theta once
    saved = load_file(str(tmp_path / "hf" / "model.safetensors"))
    assert sum(k.endswith(".psi") for k in saved) == 3

    torch.save(model.state_dict(), tmp_path / "sd.pt")
    ids = torch.randint(0, 60, (2, 7))
    with torch.no_grad():
        ref = model(ids).logits
    for state in (saved, torch.load(tmp_path / "sd.pt", weights_only=True)):
        fresh = _adapted(seed=5)
        fresh.load_state_dict(state)
        _assert_tied(fresh)
        with torch.no_grad():
            torch.testing.assert_close(fresh(ids).logits, ref, rtol=0, atol=0)
        # tied after load: an in-place step on the store reaches every layer that shares it
        with torch.no_grad():
            fresh.gift_thetas["default"]["q_proj"].psi.add_(0.5)
            assert not torch.equal(fresh(ids).logits, ref)


# --------------------------------------------------------------------------- the same through PEFT


def _peft_adapted(seed: int = 0):
    peft = pytest.importorskip("peft")
    from gift_kernels.adapters.peft import GiftPeftConfig

    model = peft.get_peft_model(llama(), GiftPeftConfig(r=4, target_modules=["q_proj", "v_proj", "o_proj"]))
    torch.manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.requires_grad:
                p.normal_(0, 0.05)
    return model


def _peft_thetas(model):
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


def test_peft_trainer_checkpoint_and_resume_continue_the_same_loss_curve(tmp_path):
    full = _trainer(_peft_adapted(), tmp_path / "full")
    full.train()
    ref = _losses(full)
    ckpt = tmp_path / "full" / f"checkpoint-{SAVE_AT}"
    saved = load_file(str(ckpt / "adapter_model.safetensors"))
    assert sorted(saved) == sorted(f"base_model.gift_thetas.{t}.{p}" for t in ("q_proj", "v_proj", "o_proj")
                                   for p in ("phi", "psi"))  # each Theta once

    resumed_model = _peft_adapted(seed=7)
    resumed = _trainer(resumed_model, tmp_path / "full")
    resumed.train(resume_from_checkpoint=str(ckpt))
    got = {step: loss for step, loss in _losses(resumed).items() if step > SAVE_AT}
    assert sorted(got) == list(range(SAVE_AT + 1, STEPS + 1))
    for step, loss in got.items():
        assert loss == pytest.approx(ref[step], rel=1e-5, abs=1e-6), f"step {step}: resumed {loss} vs {ref[step]}"
    final = _peft_thetas(full.model)
    for k, v in _peft_thetas(resumed_model).items():
        torch.testing.assert_close(v, final[k], rtol=1e-5, atol=1e-6, msg=lambda m: f"{k}: {m}")


def test_peft_state_dict_round_trips_tied(tmp_path):
    model = _peft_adapted()
    ids = torch.randint(0, 60, (2, 7))
    with torch.no_grad():
        ref = model(ids).logits
    torch.save(model.state_dict(), tmp_path / "sd.pt")
    fresh = _peft_adapted(seed=4)
    fresh.load_state_dict(torch.load(tmp_path / "sd.pt", weights_only=True))
    with torch.no_grad():
        torch.testing.assert_close(fresh(ids).logits, ref, rtol=0, atol=0)
    store = fresh.base_model.gift_thetas["default"]
    for layer in (fresh.base_model.model.model.layers[i].self_attn.q_proj for i in (0, 1)):
        assert layer.gift_theta["default"][0] is store["q_proj"]  # tied after load
    model.save_pretrained(str(tmp_path / "peft"))
    assert sum(k.endswith(".psi") for k in load_file(str(tmp_path / "peft" / "adapter_model.safetensors"))) == 3


def test_a_layer_of_the_store_refuses_a_theta_of_its_own():
    from gift_kernels.nn import GiftTheta

    model = _adapted()
    layer = model.model.layers[0].self_attn.q_proj
    with pytest.raises(AttributeError, match="adapter store"):
        layer.theta = GiftTheta(32, 4)
    assert layer.theta is model.gift_thetas["default"]["q_proj"]

