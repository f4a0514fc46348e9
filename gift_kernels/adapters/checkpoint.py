"""Adapter-only checkpoint files: the Thetas and the trainable heads, not the base model.

    save_gift(model, "out/")        # out/gift_adapter.safetensors + out/gift_config.json
    model = load_gift(fresh_base_model, "out/")   # gift_kernels.adapters.loading

This module reads and writes the files (and checks them); :mod:`gift_kernels.adapters.loading`
applies what it reads to a model, and :mod:`gift_kernels.adapters.multi` adds it as a named
adapter.

``gift_adapter.safetensors`` holds ``gift_thetas.<key>.<phi|psi|in_bias|out_bias>`` (each
shared Theta once, not once per layer) and ``<head>.<name>`` for every trainable module; its
metadata holds a SHA-256 of every tensor and of the config. ``gift_config.json`` is the
:class:`~gift_kernels.GiftConfig`.

Guarantees:

- **Atomic save.** Both files are first written in full beside their targets
  (``.gift_adapter.safetensors.pending``, ``.gift_config.json.pending``) and flushed to disk;
  then the tensor file is renamed into place (the commit point), then the config. A save
  interrupted before the commit leaves the old checkpoint; one interrupted after it leaves a
  pending config whose hash the new tensor file records, which ``load_gift`` uses: either
  way the directory loads as the old checkpoint or the new one, never a mix. Targets that
  exist but are not regular files (a directory, a FIFO) are refused before anything is
  written.
- **Checked load.** ``load_gift`` checks the files (readable safetensors, every tensor's
  SHA-256), plans the config on the model and checks every key, shape and dtype *before*
  the model is changed; a corrupt, truncated or edited file raises an error naming the file
  (and the tensor) and leaves the model as it was. A tensor file without gift_kernels
  metadata (written by another tool) loads without checksums. Given the same base weights, a
  loaded model reproduces the saved model's outputs exactly.
"""

from __future__ import annotations

import ctypes
import hashlib
import json
import os
import stat
from pathlib import Path
from typing import Callable, Dict, Sequence, Tuple, Union

import torch
from torch import Tensor, nn

from .config import GiftConfig
from .model import adapter_state, layer_thetas
from .planning import THETAS_ATTR

__all__ = ["ADAPTER_FILE", "CONFIG_FILE", "adapter_tensors", "check_saved_tensors", "read_checkpoint", "save_gift",
           "write_files_atomically"]

ADAPTER_FILE = "gift_adapter.safetensors"
CONFIG_FILE = "gift_config.json"
_FORMAT = "gift_kernels.adapter.v2"  # checksums in the metadata

PathLike = Union[str, os.PathLike]


def tensor_sha256(t: Tensor) -> str:
    """SHA-256 of a tensor's bytes, with its dtype and shape (a flipped bit changes it)."""
    t = t.detach().to("cpu").contiguous()
    h = hashlib.sha256(f"{t.dtype}:{tuple(t.shape)}:".encode())
    if t.numel():  # the raw bytes, read without numpy (not a dependency of the package)
        h.update(ctypes.string_at(t.data_ptr(), t.numel() * t.element_size()))
    return h.hexdigest()


def adapter_tensors(model: nn.Module, heads, what: str) -> Dict[str, Tensor]:
    """The checkpoint's tensors, by key: the Thetas of the adapter the layers hold
    (``gift_thetas.<key>.<param>``, without the adapter's name) and the heads' state."""
    tensors: Dict[str, Tensor] = {}
    for key, theta in layer_thetas(model, what).items():
        for pname, p in theta.named_parameters():
            tensors[f"{THETAS_ATTR}.{key}.{pname}"] = p
    for head in heads:
        for pname, t in model.get_submodule(head).state_dict().items():
            tensors[f"{head}.{pname}"] = t
    return tensors


def _full(t: Tensor) -> Tensor:
    """A plain CPU copy; a sharded DTensor (FSDP2) is all-gathered first (a collective)."""
    t = t.detach()
    if hasattr(t, "full_tensor"):
        t = t.full_tensor()
    return t.to("cpu").contiguous().clone()


def check_writable_file(path: Path, what: str) -> None:
    """Refuse a target path that exists but is not a regular file (a directory, a FIFO, ...)."""
    try:
        mode = os.lstat(path).st_mode
    except FileNotFoundError:
        return
    if not stat.S_ISREG(mode):
        kind = "a directory" if stat.S_ISDIR(mode) else "a FIFO" if stat.S_ISFIFO(mode) else "not a regular file"
        raise ValueError(f"{what}: {path} exists and is {kind}; expected a regular file (or nothing) there")


def prepare_directory(directory: PathLike, what: str) -> Path:
    out = Path(directory)
    if out.exists() and not out.is_dir():
        raise NotADirectoryError(f"{what}: {out} exists and is not a directory; pass a directory to write into")
    out.mkdir(parents=True, exist_ok=True)
    return out


def _pending(path: Path) -> Path:
    return path.parent / f".{path.name}.pending"


def _write_durably(path: Path, write) -> None:
    """``write(path)`` then fsync it."""
    write(str(path))
    with open(path, "rb+") as f:
        os.fsync(f.fileno())


def _fsync_dir(path: Path) -> None:
    try:
        dfd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)
    except OSError:  # pragma: no cover - some filesystems do not fsync directories
        pass


def save_gift(model: nn.Module, directory: PathLike) -> Path:
    """Write the adapter of ``model`` (adapted by :func:`~gift_kernels.apply_gift`) to ``directory``.

    Works merged or not (the Thetas do not change on merge). Under torch.distributed, call it
    on every rank: sharded Thetas (FSDP2) are gathered, and only rank 0 writes. Returns the
    directory. Atomic: see the module docstring.
    """
    from safetensors.torch import save_file

    what = f"save_gift({directory})"
    state = adapter_state(model, "save_gift")
    tensors = {k: _full(v) for k, v in adapter_tensors(model, state.heads, "save_gift").items()}
    out = Path(directory)
    dist = torch.distributed
    if dist.is_available() and dist.is_initialized() and dist.get_rank() != 0:
        return out
    out = prepare_directory(out, what)
    config_text = state.config.to_json() + "\n"
    metadata = {"format": _FORMAT, "config_sha256": hashlib.sha256(config_text.encode()).hexdigest()}
    metadata.update({f"sha256:{k}": tensor_sha256(t) for k, t in tensors.items()})
    write_files_atomically(out, [(out / ADAPTER_FILE, lambda p: save_file(tensors, p, metadata=metadata)),
                                 (out / CONFIG_FILE, lambda p: Path(p).write_text(config_text))], what)
    return out


def write_files_atomically(out: Path, files: Sequence[Tuple[Path, Callable[[str], None]]], what: str) -> None:
    """Write each ``(target, write)`` of directory ``out`` in full beside its target
    (``.<name>.pending``, flushed to disk), then rename them into place in the order given: the
    first rename is the commit point (see the module docstring). Targets that exist but are not
    regular files are refused before anything is written; on an error while writing, the
    pending files are removed and the targets are untouched."""
    for path, _ in files:
        check_writable_file(path, what)
        check_writable_file(_pending(path), what)
    try:
        for path, write in files:
            _write_durably(_pending(path), write)
    except BaseException:
        for path, _ in files:
            if _pending(path).exists():
                _pending(path).unlink()
        raise
    for path, _ in files:
        os.replace(_pending(path), path)
    _fsync_dir(out)


def read_safetensors(path: Path, what: str):
    """``(tensors, metadata)`` of a safetensors file, with an error naming the file if it is not one."""
    from safetensors import safe_open

    check_writable_file(path, what)  # a FIFO or directory would hang or fail obscurely
    try:
        with safe_open(str(path), framework="pt") as f:
            metadata = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as exc:  # safetensors raises its own error types, without the path
        raise ValueError(f"{what}: {path} is not a readable safetensors file (corrupt or truncated?): "
                         f"{type(exc).__name__}: {exc}") from exc
    return tensors, metadata


def verify_hashes(tensors: Dict[str, Tensor], metadata: Dict[str, str], path: Path, what: str) -> None:
    for k, t in tensors.items():
        want = metadata.get(f"sha256:{k}")
        if want is None:
            raise ValueError(f"{what}: {path} has no checksum for tensor {k!r}; the file was edited or truncated")
        if tensor_sha256(t) != want:
            raise ValueError(f"{what}: tensor {k!r} in {path} does not match its SHA-256 checksum: the file is "
                             f"corrupt (a changed byte) or was edited")


def _config_text(cfg_path: Path, metadata: Dict[str, str], what: str) -> str:
    """The config of the checkpoint: the pending config of a save interrupted after its commit
    point (its hash is the one the tensor file records), else gift_config.json."""
    pending = _pending(cfg_path)
    want = metadata.get("config_sha256")
    if want is not None and pending.is_file():
        text = pending.read_text()
        if hashlib.sha256(text.encode()).hexdigest() == want:
            return text
    check_writable_file(cfg_path, what)
    if not cfg_path.is_file():
        raise FileNotFoundError(f"{what}: {cfg_path} does not exist; expected {ADAPTER_FILE} and {CONFIG_FILE} in "
                                f"{cfg_path.parent}")
    return cfg_path.read_text()


def read_checkpoint(src: Path, what: str) -> Tuple[GiftConfig, Dict[str, Tensor], Path]:
    """``(config, tensors, tensor file)`` of the checkpoint in ``src``, every checksum verified;
    a missing, corrupt or edited file raises an error naming it."""
    cfg_path, ten_path = src / CONFIG_FILE, src / ADAPTER_FILE
    if not ten_path.exists():
        raise FileNotFoundError(f"{what}: {ten_path} does not exist; expected {ADAPTER_FILE} and {CONFIG_FILE} in {src}")
    saved, metadata = read_safetensors(ten_path, what)
    if metadata.get("format") == _FORMAT:
        verify_hashes(saved, metadata, ten_path, what)
    config_text = _config_text(cfg_path, metadata, what)
    try:
        config = GiftConfig.from_dict(json.loads(config_text))
    except (ValueError, TypeError) as exc:
        raise ValueError(f"{what}: {cfg_path} is not a valid GiftConfig: {exc}") from exc
    return config, saved, ten_path


def check_saved_tensors(saved: Dict[str, Tensor], expected: Dict[str, Tuple[torch.Size, torch.dtype]], ten_path: Path,
                        model: nn.Module, config: GiftConfig, strict: bool, what: str) -> None:
    """Every saved key expected, every expected Theta key saved (heads too if ``strict``), and
    each tensor of the expected shape and dtype; else an error naming the key and the file."""
    unexpected = sorted(set(saved) - set(expected))
    if unexpected:
        raise ValueError(
            f"{what}: {ten_path} holds key {unexpected[0]!r} that the config builds nowhere on "
            f"{type(model).__name__} ({len(unexpected)} unexpected key(s): {unexpected[:5]})"
        )
    missing = sorted(k for k in set(expected) - set(saved) if strict or k.startswith(THETAS_ATTR + "."))
    if missing:
        raise ValueError(f"{what}: {ten_path} lacks key {missing[0]!r} ({len(missing)} missing key(s): {missing[:5]})")
    for k, t in saved.items():
        shape, dtype = expected[k]
        if t.shape != shape:
            raise ValueError(
                f"{what}: {k!r} has shape {tuple(t.shape)} in {ten_path} but {tuple(shape)} on "
                f"{type(model).__name__}; the checkpoint was saved from a different model or config"
            )
        if t.dtype != dtype:
            raise TypeError(
                f"{what}: {k!r} is {t.dtype} in {ten_path} but the config builds {dtype} on {type(model).__name__} "
                f"(theta_dtype={config.theta_dtype!r}); refusing to cast it silently"
            )
