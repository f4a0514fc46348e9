"""Model-level guarantees (docs/guarantees.md): tied and shared weights are refused at merge by
name, bypassed targets are refused at planning, merged state dicts load exactly, checkpoints are
atomic and verified, odd paths and inference-mode tensors get clear errors, task heads are not
frozen silently. Every refusal leaves the model as it was."""

from __future__ import annotations

import copy
import json
import os
import warnings

import pytest
import torch
from torch import nn

from gift_kernels.adapters import GiftConfig, apply_gift, load_gift, merge_gift, save_gift, unmerge_gift
from gift_kernels.adapters.checkpoint import ADAPTER_FILE, CONFIG_FILE
from gift_testing import Wrapped, randomize_thetas

transformers = pytest.importorskip("transformers")

from tiny_hf_models import bert, llama  # noqa: E402

IDS = torch.randint(0, 60, (2, 9), generator=torch.Generator().manual_seed(0))


def out(model, x=IDS):
    with torch.no_grad():
        y = model(x)
    return y if isinstance(y, torch.Tensor) else y.logits


def snapshot(model):
    return {"types": [(n, type(m)) for n, m in model.named_modules()],
            "params": {n: p.detach().clone() for n, p in model.named_parameters(remove_duplicate=False)},
            "grad": {n: p.requires_grad for n, p in model.named_parameters(remove_duplicate=False)}}


def assert_unchanged(model, snap):
    now = snapshot(model)
    assert now["types"] == snap["types"] and now["grad"] == snap["grad"]
    for k, v in snap["params"].items():
        assert torch.equal(now["params"][k], v), k


def assert_load_refused(directory, exc, match, model=None):
    """load_gift(model, directory) raises ``exc`` matching ``match`` and leaves the model as it was."""
    model = bert() if model is None else model
    snap = snapshot(model)
    with pytest.raises(exc, match=match):
        load_gift(model, directory)
    assert_unchanged(model, snap)


def tied_llama():
    return llama(tied=True)


# --------------------------------------------------------------------------- shared weights


def test_tied_lm_head_adapts_but_merge_is_refused_by_name():
    model = apply_gift(tied_llama(), GiftConfig(rank=2, target_modules=["lm_head"], init_weights=False))
    y = out(model)
    snap = snapshot(model)
    with pytest.raises(RuntimeError, match=r"'lm_head'.*same Parameter as that of \['model.embed_tokens'\]"):
        merge_gift(model)
    assert_unchanged(model, snap)
    assert torch.equal(out(model), y)


def test_two_targets_sharing_one_weight_cannot_be_merged():
    first, second = nn.Linear(8, 8), nn.Linear(8, 8)
    second.weight = first.weight  # two modules, one Parameter
    model = Wrapped(nn.Sequential(first, nn.Tanh(), nn.Sequential(second)))
    model = apply_gift(model, GiftConfig(rank=2, target_modules=r"body\.(0|2\.0)", sharing="layer", init_weights=False))
    snap = snapshot(model)
    with pytest.raises(RuntimeError, match=r"'body.0'.*same Parameter as that of \['body.2.0'\]|'body.2.0'.*\['body.0'\]"):
        merge_gift(model)
    assert_unchanged(model, snap)


def test_a_target_whose_parent_bypasses_its_forward_is_refused():
    model = nn.TransformerEncoderLayer(d_model=16, nhead=2, dim_feedforward=24, batch_first=True)
    snap = snapshot(model)
    with pytest.raises(TypeError, match=r"'self_attn.out_proj' cannot be adapted: .*nn.MultiheadAttention.*never calls"):
        apply_gift(model, GiftConfig(rank=2, target_modules=["out_proj", "linear1"]))
    assert_unchanged(model, snap)
    apply_gift(model, GiftConfig(rank=2, target_modules=["linear1"]))  # layers it does call are fine


# --------------------------------------------------------------------------- merged state dicts


def test_merged_model_state_dict_is_the_unmerged_checkpoint():
    base = bert()
    cfg = GiftConfig(rank=3, target_modules=["query", "value"], task_type="SEQ_CLS", init_weights=False)
    model = apply_gift(copy.deepcopy(base), cfg)
    y = out(model)
    merge_gift(model)
    sd = model.state_dict()
    fresh = apply_gift(copy.deepcopy(base), cfg)
    fresh.load_state_dict(sd)
    assert torch.equal(out(fresh), y)  # no Theta applied twice
    snap = snapshot(model)
    with pytest.raises(RuntimeError, match=r"load_state_dict: .* is merged \(merge_gift\); call unmerge_gift"):
        model.load_state_dict(sd)
    assert_unchanged(model, snap)
    unmerge_gift(model)
    model.load_state_dict(sd)
    assert torch.equal(out(model), y)


# --------------------------------------------------------------------------- checkpoints


def _saved(tmp_path, seed=1):
    model = apply_gift(bert(), GiftConfig(rank=2, target_modules=["query"], task_type="SEQ_CLS"))
    randomize_thetas(model.gift_thetas["default"], seed=seed)
    save_gift(model, tmp_path)
    return model


def test_flipped_byte_in_the_payload_is_caught_by_its_checksum(tmp_path):
    _saved(tmp_path)
    path = tmp_path / ADAPTER_FILE
    data = bytearray(path.read_bytes())
    data[-3] ^= 0x01  # inside the last tensor's bytes
    path.write_bytes(bytes(data))
    assert_load_refused(tmp_path, ValueError, r"tensor '.*' in .*gift_adapter.safetensors does not match its SHA-256")


@pytest.mark.parametrize("damage", ["truncate", "garbage", "empty"])
def test_corrupt_files_name_the_file(tmp_path, damage):
    _saved(tmp_path)
    path = tmp_path / ADAPTER_FILE
    data = path.read_bytes()
    path.write_bytes({"truncate": data[: len(data) // 2], "garbage": b"\x00\x01not safetensors" * 9, "empty": b""}[damage])
    assert_load_refused(tmp_path, ValueError, rf"load_gift\({tmp_path}\): {path} is not a readable safetensors file")


def test_tensor_of_the_wrong_dtype_is_refused_not_cast(tmp_path):
    from safetensors.torch import load_file, save_file

    _saved(tmp_path)
    tensors = load_file(str(tmp_path / ADAPTER_FILE))
    tensors["gift_thetas.query.psi"] = tensors["gift_thetas.query.psi"].double()
    save_file(tensors, str(tmp_path / ADAPTER_FILE))  # an edited file: no gift_kernels metadata
    assert_load_refused(tmp_path, TypeError, r"'gift_thetas.query.psi' is torch.float64 in .* builds torch.float32")


def test_a_failed_save_leaves_the_old_checkpoint(tmp_path, monkeypatch):
    old = _saved(tmp_path, seed=1)
    new = apply_gift(bert(), GiftConfig(rank=2, target_modules=["query"], task_type="SEQ_CLS"))
    randomize_thetas(new.gift_thetas["default"], seed=2)
    import safetensors.torch

    def disk_full(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(safetensors.torch, "save_file", disk_full)
    with pytest.raises(OSError, match="No space left"):
        save_gift(new, tmp_path)
    monkeypatch.undo()
    assert sorted(os.listdir(tmp_path)) == [ADAPTER_FILE, CONFIG_FILE]  # no half-written files left behind
    assert torch.equal(out(load_gift(bert(), tmp_path)), out(old))


def test_a_save_interrupted_after_its_commit_point_loads_as_the_new_checkpoint(tmp_path, monkeypatch):
    _saved(tmp_path, seed=1)
    new = apply_gift(bert(), GiftConfig(rank=4, target_modules=["query", "value"], task_type="SEQ_CLS"))
    randomize_thetas(new.gift_thetas["default"], seed=2)
    real_replace, calls = os.replace, []

    def crash_on_second(src, dst):
        calls.append(dst)
        if len(calls) == 2:  # the config's rename, after the tensor file was committed
            raise KeyboardInterrupt
        real_replace(src, dst)

    monkeypatch.setattr(os, "replace", crash_on_second)
    with pytest.raises(KeyboardInterrupt):
        save_gift(new, tmp_path)
    monkeypatch.undo()
    assert json.loads((tmp_path / CONFIG_FILE).read_text())["rank"] == 2  # the old config is still in place
    assert torch.equal(out(load_gift(bert(), tmp_path)), out(new))  # but the directory loads as the new one
    assert len([f for f in os.listdir(tmp_path) if f.endswith(".pending")]) == 1
    save_gift(new, tmp_path)  # a later save supersedes the interrupted one's leftovers
    assert sorted(os.listdir(tmp_path)) == [ADAPTER_FILE, CONFIG_FILE]


def test_paths_that_are_not_regular_files_are_refused(tmp_path):
    model = _saved(tmp_path / "ok")
    fifo_dir = tmp_path / "fifo"
    fifo_dir.mkdir()
    os.mkfifo(fifo_dir / ADAPTER_FILE)
    with pytest.raises(ValueError, match=r"gift_adapter.safetensors exists and is a FIFO"):
        save_gift(model, fifo_dir)  # refused before anything is opened: no hang
    with pytest.raises(ValueError, match="is a FIFO"):
        load_gift(bert(), fifo_dir)
    as_dir = tmp_path / "asdir"
    (as_dir / ADAPTER_FILE).mkdir(parents=True)
    with pytest.raises(ValueError, match=r"gift_adapter.safetensors exists and is a directory"):
        save_gift(model, as_dir)
    a_file = tmp_path / "file"
    a_file.write_text("x")
    with pytest.raises(NotADirectoryError, match=r"save_gift\(.*\): .*file exists and is not a directory"):
        save_gift(model, a_file)


def _rewrite_metadata(path, edit):
    """Rewrite a tensor file with ``edit(metadata)`` applied (the tensors, and so their checksums, unchanged)."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    with safe_open(str(path), framework="pt") as f:
        metadata = dict(f.metadata())
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    edit(metadata)
    save_file(tensors, str(path), metadata=metadata)


def test_an_edited_config_with_the_same_tensor_shapes_is_refused(tmp_path):
    _saved(tmp_path)
    cfg = json.loads((tmp_path / CONFIG_FILE).read_text())
    assert cfg["layers"] is None
    cfg["layers"] = [0]  # same Theta keys and shapes, but only layer 0 would be adapted
    (tmp_path / CONFIG_FILE).write_text(json.dumps(cfg))
    assert_load_refused(tmp_path, ValueError,
                        rf"load_gift\({tmp_path}\): {tmp_path / CONFIG_FILE} does not match the config .* was saved with")


@pytest.mark.parametrize("fmt, message", [
    ("gift_kernels.adapter.v99", "newer than this gift_kernels reads .* upgrade gift_kernels"),
    ("gift_kernels.adapter.v2", "older than this gift_kernels reads .* save the adapter again"),
    ("gift_kernels.adapter.vX", "not a gift_kernels adapter format"),
    (None, "has gift_kernels checksums but no gift_kernels format"),
])
def test_another_format_version_is_refused_never_loaded_unchecked(tmp_path, fmt, message):
    _saved(tmp_path)
    path = tmp_path / ADAPTER_FILE

    def edit(metadata):
        metadata.pop("format")
        if fmt is not None:
            metadata["format"] = fmt

    _rewrite_metadata(path, edit)
    assert_load_refused(tmp_path, ValueError, rf"load_gift\({tmp_path}\): {path} .*{message}")


def test_a_tensor_file_without_its_base_record_is_refused(tmp_path):
    _saved(tmp_path)
    _rewrite_metadata(tmp_path / ADAPTER_FILE, lambda m: m.pop("base"))
    with pytest.raises(ValueError, match=r"lacks its 'base' record"):
        load_gift(bert(), tmp_path)


def test_two_saves_into_one_directory_at_once_never_mix(tmp_path, monkeypatch):
    """Save A stalls while writing; save B into the same directory meanwhile is refused, naming
    save_gift, before writing anything; A then completes and the directory loads as A."""
    import threading

    import safetensors.torch

    a = apply_gift(bert(), GiftConfig(rank=2, target_modules=["query"], task_type="SEQ_CLS"))
    randomize_thetas(a.gift_thetas["default"], seed=1)
    b = apply_gift(bert(), GiftConfig(rank=4, target_modules=["query", "value"], task_type="SEQ_CLS"))
    randomize_thetas(b.gift_thetas["default"], seed=2)
    real_save, writing, release = safetensors.torch.save_file, threading.Event(), threading.Event()

    def stalled_save(*args, **kwargs):
        real_save(*args, **kwargs)
        if threading.current_thread() is not threading.main_thread():
            writing.set()  # A's tensor file is written to its pending name: A stalls here
            assert release.wait(60)

    errors = []

    def save_a():
        try:
            save_gift(a, tmp_path)
        except BaseException as exc:  # reported by the main thread
            errors.append(exc)

    monkeypatch.setattr(safetensors.torch, "save_file", stalled_save)
    thread = threading.Thread(target=save_a)
    thread.start()
    try:
        assert writing.wait(60)
        pending = sorted(os.listdir(tmp_path))
        assert len(pending) == 1 and pending[0].startswith(f".{ADAPTER_FILE}.{os.getpid()}-")  # a name of its own
        with pytest.raises(RuntimeError, match=rf"save_gift\({tmp_path}\): another save into {tmp_path} is in "
                                               rf"progress .* nothing was written"):
            save_gift(b, tmp_path)
        assert sorted(os.listdir(tmp_path)) == pending
    finally:
        release.set()
        thread.join(60)
    monkeypatch.undo()
    assert not errors and sorted(os.listdir(tmp_path)) == [ADAPTER_FILE, CONFIG_FILE]
    assert torch.equal(out(load_gift(bert(), tmp_path)), out(a))
    save_gift(b, tmp_path)  # once A has finished, B saves normally
    assert torch.equal(out(load_gift(bert(), tmp_path)), out(b))


def test_a_mix_of_two_saves_is_caught_at_load(tmp_path):
    """Were two saves to interleave anyway (no flock on the filesystem), one's tensors with the
    other's config are refused."""
    _saved(tmp_path / "a", seed=1)
    other = apply_gift(bert(), GiftConfig(rank=2, target_modules=["query"], task_type="SEQ_CLS", form="input"))
    save_gift(other, tmp_path / "b")
    (tmp_path / "a" / CONFIG_FILE).write_bytes((tmp_path / "b" / CONFIG_FILE).read_bytes())
    with pytest.raises(ValueError, match=r"gift_config.json does not match the config"):
        load_gift(bert(), tmp_path / "a")


def bert_layers(n):
    torch.manual_seed(0)
    cfg = transformers.BertConfig(vocab_size=60, hidden_size=32, num_hidden_layers=n, num_attention_heads=4,
                                  intermediate_size=40, max_position_embeddings=32, num_labels=2)
    return transformers.BertForSequenceClassification(cfg).eval()


def test_an_adapter_from_another_base_is_refused(tmp_path):
    two = apply_gift(bert_layers(2), GiftConfig(rank=2, target_modules=["query"], task_type="SEQ_CLS"))
    save_gift(two, tmp_path)
    three = bert_layers(3)  # same Theta keys and shapes: only the recorded base tells them apart
    snap = snapshot(three)
    with pytest.raises(ValueError, match=r"saved from a base with 2 adapted layer\(s\), but on "
                                         r"BertForSequenceClassification the config adapts 3: 1 layer\(s\) adapted "
                                         r"here but not saved: \['bert.encoder.layer.2.attention.self.query'\]"):
        load_gift(three, tmp_path)
    assert_unchanged(three, snap)
    # the same check when adding a named adapter to an adapted model (adapters without a head)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the frozen classifier's warning
        save_gift(apply_gift(bert_layers(2), GiftConfig(rank=2, target_modules=["query"])), tmp_path / "nohead")
        adapted = apply_gift(bert_layers(3), GiftConfig(rank=2, target_modules=["query"]))
    with pytest.raises(ValueError, match=r"adapter_name='second'\): .* saved from a base with 2 adapted layer"):
        load_gift(adapted, tmp_path / "nohead", adapter_name="second")
    assert torch.equal(out(load_gift(bert_layers(2), tmp_path)), out(two))


def test_load_gift_on_a_peft_directory_says_to_use_peft(tmp_path):
    peft = pytest.importorskip("peft")
    from gift_kernels.adapters.peft import GiftPeftConfig

    peft.get_peft_model(bert(), GiftPeftConfig(r=2, target_modules=["query"])).save_pretrained(tmp_path)
    assert_load_refused(tmp_path, FileNotFoundError,
                        r"holds a PEFT adapter \(adapter_config.json.* peft.PeftModel.from_pretrained\(model, ")


# --------------------------------------------------------------------------- PEFT loading


def _peft_saved(tmp_path, fmt):
    peft = pytest.importorskip("peft")
    from gift_kernels.adapters.peft import GiftPeftConfig

    model = peft.get_peft_model(bert(), GiftPeftConfig(r=2, target_modules=["query", "value"], init_weights=False))
    model.save_pretrained(tmp_path, safe_serialization=fmt == "safetensors")
    path = tmp_path / f"adapter_model.{fmt}"
    assert path.exists()
    return model, path


def _rewrite_peft_tensors(path, edit):
    from safetensors.torch import load_file, save_file

    tensors = load_file(str(path)) if path.suffix == ".safetensors" else torch.load(path, weights_only=True)
    edit(tensors)
    if path.suffix == ".safetensors":
        save_file(tensors, str(path), metadata={"format": "pt"})
    else:
        torch.save(tensors, path)


@pytest.mark.parametrize("fmt", ["safetensors", "bin"])
def test_peft_loads_both_formats(tmp_path, fmt):
    from peft import PeftModel

    model, _ = _peft_saved(tmp_path, fmt)
    assert torch.equal(out(PeftModel.from_pretrained(bert(), tmp_path)), out(model))


@pytest.mark.parametrize("fmt", ["safetensors", "bin"])
@pytest.mark.parametrize("damage", ["truncated", "config_rank", "tensor_rank", "tensor_ndim", "missing", "extra"])
def test_peft_loading_checks_the_file_and_every_shape_before_wrapping(tmp_path, fmt, damage):
    from peft import PeftModel

    _, path = _peft_saved(tmp_path, fmt)
    if damage == "truncated":
        path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
        message = rf"{path} is not a readable"
    elif damage == "config_rank":  # the config says r=3, the tensors are r=2
        cfg = json.loads((tmp_path / "adapter_config.json").read_text())
        cfg["r"] = 3
        (tmp_path / "adapter_config.json").write_text(json.dumps(cfg))
        message = r"has shape \(32, 2\) in .* but the config \(r=3\) builds \(32, 3\)"
    else:
        def edit(tensors):
            key = next(k for k in tensors if k.endswith("query.phi"))
            if damage == "tensor_rank":
                tensors[key] = torch.zeros(32, 3)
            elif damage == "tensor_ndim":
                tensors[key] = tensors[key].flatten()
            elif damage == "missing":
                del tensors[key]
            else:
                tensors[key.replace("query", "key")] = tensors[key].clone()

        _rewrite_peft_tensors(path, edit)
        message = {"tensor_rank": r"'query.phi' has shape \(32, 3\) in", "tensor_ndim": r"'query.phi' has shape \(64,\) in",
                   "missing": r"lacks \['query.phi'\]", "extra": r"holds Theta\(s\) \['key.phi'\] the config builds "
                                                          r"nowhere"}[damage]
    base = bert()
    snap = snapshot(base)
    with pytest.raises(ValueError, match=rf"PeftModel.from_pretrained: .*{message}"):
        PeftModel.from_pretrained(base, tmp_path)
    assert_unchanged(base, snap)
    assert not hasattr(base, "peft_config")


# --------------------------------------------------------------------------- planning checks


def test_inference_mode_tensors_are_refused_before_any_change(tmp_path):
    _saved(tmp_path)
    with torch.inference_mode():
        model = bert()
    snap = snapshot(model)
    with pytest.raises(RuntimeError, match=r"holds tensors created under torch.inference_mode\(\)"):
        apply_gift(model, GiftConfig(rank=2, target_modules=["query"]))
    assert_unchanged(model, snap)
    with pytest.raises(RuntimeError, match="inference_mode"):
        load_gift(model, tmp_path)
    assert_unchanged(model, snap)


def test_a_task_head_left_frozen_is_named_in_a_warning():
    with pytest.warns(UserWarning, match=r"task head\(s\) \['classifier'\] that will stay frozen.*task_type='SEQ_CLS'"):
        apply_gift(bert(), GiftConfig(rank=2, target_modules=["query"]))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        model = apply_gift(bert(), GiftConfig(rank=2, target_modules=["query"], task_type="SEQ_CLS"))
    assert all(p.requires_grad for p in model.classifier.parameters())
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        model = apply_gift(bert(), GiftConfig(rank=2, target_modules=["query"], trainable_modules="classifier"))
    assert model.gift_thetas["default"] and all(p.requires_grad for p in model.classifier.parameters())
    with pytest.raises(ValueError, match=r"task_type='SEQ_CLS' but LlamaForCausalLM has none of its heads"):
        apply_gift(llama(), GiftConfig(rank=2, target_modules=["q_proj"], task_type="SEQ_CLS"))


def test_init_weights_false_gives_an_adapter_that_changes_outputs():
    base = bert()
    assert torch.equal(out(apply_gift(copy.deepcopy(base), GiftConfig(rank=2, target_modules=["query"]))), out(base))
    changed = apply_gift(copy.deepcopy(base), GiftConfig(rank=2, target_modules=["query"], init_weights=False))
    assert not torch.allclose(out(changed), out(base))


def test_projection_biases_before_a_softmax_are_named_in_a_warning():
    model = Wrapped(nn.Sequential(nn.Linear(6, 6), nn.ReLU(), nn.Linear(6, 3), nn.Dropout(0.1), nn.LogSoftmax(dim=-1)))
    with pytest.warns(UserWarning, match=r"'body.2' feeds body.4 \(LogSoftmax\).*zero gradient"):
        apply_gift(model, GiftConfig(rank=2, target_modules=["body.0", "body.2"], sharing="layer", out_bias=True))
    with warnings.catch_warnings():  # no bias, no warning; and a layer followed by an activation is fine
        warnings.simplefilter("error")
        apply_gift(Wrapped(nn.Sequential(nn.Linear(6, 6), nn.ReLU())), GiftConfig(rank=2, target_modules=["body.0"],
                                                                                   out_bias=True))


def test_a_rank_larger_than_d_in_is_refused_unchanged():
    model = bert()
    snap = snapshot(model)
    with pytest.raises(ValueError, match=r"apply_gift: rank 33 is larger than target "
                                         r"'bert.encoder.layer.0.attention.self.query''s in_features 32 \(Linear\)"):
        apply_gift(model, GiftConfig(rank=33, target_modules=["query"]))
    assert_unchanged(model, snap)
    peft = pytest.importorskip("peft")
    from gift_kernels.adapters.peft import GiftPeftConfig

    with pytest.raises(ValueError, match=r"GIFT: rank 33 is larger than target .*in_features 32"):
        peft.get_peft_model(model, GiftPeftConfig(r=33, target_modules=["query"]))
    assert_unchanged(model, snap)
    adapted = apply_gift(model, GiftConfig(rank=32, target_modules=["query"]))
    assert adapted.gift_thetas["default"]["query"].phi.shape == (32, 32)
