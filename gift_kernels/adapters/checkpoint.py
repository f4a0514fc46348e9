"""Adapter-only checkpoint files: the Thetas and the trainable heads, not the base model.

    save_gift(model, "out/")        # out/gift_adapter.safetensors + out/gift_config.json
    model = load_gift(fresh_base_model, "out/")   # gift_kernels.adapters.loading

This module reads and writes the files (and checks them); :mod:`gift_kernels.adapters.loading`
applies what it reads to a model, and :mod:`gift_kernels.adapters.multi` adds it as a named
adapter.

``gift_adapter.safetensors`` holds ``gift_thetas.<key>.<phi|psi|in_bias|out_bias>`` (each
shared Theta once, not once per layer) and ``<head>.<name>`` for every trainable module; its
metadata holds the format version, a SHA-256 of every tensor and of the config, and the base
it was made for (each adapted layer's name, ``in_features`` and ``out_features``).
``gift_config.json`` is the :class:`~gift_kernels.GiftConfig`.

Guarantees:

- **Atomic save.** Both files are first written in full beside their targets under names of
  their own (``.gift_adapter.safetensors.<pid>-<random>.pending``, ...) and flushed to disk;
  then the tensor file is renamed into place (the commit point), then the config. A save
  interrupted before the commit leaves the old checkpoint; one interrupted after it leaves a
  pending config whose hash the new tensor file records, which ``load_gift`` uses: either
  way the directory loads as the old checkpoint or the new one, never a mix. Targets that
  exist but are not regular files (a directory, a FIFO) are refused before anything is
  written.
- **One save at a time per directory.** A save holds an exclusive lock on the directory
  (``flock``, released by the OS if the process dies) from its first write to its last
  rename; a second save into the same directory meanwhile raises, naming the function, before
  writing anything. Were the lock unavailable (a filesystem without ``flock``), a mix would
  still be caught at load: the config must match the hash the tensor file records.
- **Checked load.** ``load_gift`` checks the files (readable safetensors, this format version,
  every tensor's SHA-256, the config file against its recorded hash), plans the config on the
  model, checks the model's adapted layers against the recorded base and every key, shape and
  dtype *before* the model is changed; a corrupt, truncated or edited file, one from a newer
  gift_kernels, or an adapter made for another base raises an error naming the file (and the
  tensor or layer) and leaves the model as it was. A tensor file without gift_kernels metadata
  (written by another tool) loads without checksums. Given the same base weights, a loaded
  model reproduces the saved model's outputs exactly.
"""

from __future__ import annotations

import contextlib
import ctypes
import hashlib
import json
import os
import stat
import uuid
from pathlib import Path
from typing import Callable, Dict, Optional, Sequence, Tuple, Union

import torch
from torch import Tensor, nn

from .config import GiftConfig
from .model import adapter_state, layer_thetas
from .planning import THETAS_ATTR

__all__ = ["ADAPTER_FILE", "CONFIG_FILE", "adapter_tensors", "check_base", "check_saved_tensors", "read_checkpoint",
           "save_gift", "write_files_atomically"]

ADAPTER_FILE = "gift_adapter.safetensors"
CONFIG_FILE = "gift_config.json"
_FORMAT_PREFIX = "gift_kernels.adapter.v"
_VERSION = 3  # v2: checksums in the metadata (v1 had none); v3: the base it was made for
_FORMAT = f"{_FORMAT_PREFIX}{_VERSION}"
PEFT_CONFIG_FILE = "adapter_config.json"  # what a directory saved by PEFT's save_pretrained holds

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


def _pending(path: Path, tag: str) -> Path:
    """Where one save (``tag``: its pid and a random part) stages ``path``; unique, so two saves
    never write into one pending file."""
    return path.parent / f".{path.name}.{tag}.pending"


def _pendings(path: Path):
    """Every pending file of ``path`` (of this save, of interrupted ones)."""
    return sorted(path.parent.glob(f".{path.name}.*.pending"))


@contextlib.contextmanager
def _directory_lock(out: Path, what: str):
    """An exclusive ``flock`` on the directory for one save (the OS drops it if the process
    dies); another save holding it: an error before anything is written. Yields whether the
    lock is held (not where the OS or filesystem has no ``flock``)."""
    try:
        import fcntl
    except ImportError:  # pragma: no cover - not POSIX: the load-time config hash check remains
        yield False
        return
    fd = os.open(out, os.O_RDONLY)
    try:
        locked = True
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise RuntimeError(f"{what}: another save into {out} is in progress (it holds the directory's lock); "
                               f"refusing to interleave with it, nothing was written. Save again once it has "
                               f"finished, or into another directory") from None
        except OSError:  # pragma: no cover - a filesystem without flock: the load-time hash check remains
            locked = False
        yield locked
    finally:
        os.close(fd)  # releases the lock


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
    metadata = {"format": _FORMAT, "config_sha256": hashlib.sha256(config_text.encode()).hexdigest(),
                "base": json.dumps({e.name: [e.adapted.in_features, e.adapted.out_features] for e in state.entries},
                                   sort_keys=True)}
    metadata.update({f"sha256:{k}": tensor_sha256(t) for k, t in tensors.items()})
    write_files_atomically(out, [(out / ADAPTER_FILE, lambda p: save_file(tensors, p, metadata=metadata)),
                                 (out / CONFIG_FILE, lambda p: Path(p).write_text(config_text))], what)
    return out


def write_files_atomically(out: Path, files: Sequence[Tuple[Path, Callable[[str], None]]], what: str) -> None:
    """Write each ``(target, write)`` of directory ``out`` in full beside its target (a pending
    name of this save's own, flushed to disk), then rename them into place in the order given:
    the first rename is the commit point (see the module docstring). The whole save holds the
    directory's lock: a concurrent save raises. Targets that exist but are not regular files
    are refused before anything is written; on an error while writing, this save's pending
    files are removed and the targets are untouched. After the renames, pending files left by
    interrupted earlier saves of these targets are removed (this save supersedes them; only
    under the lock, when no other save can be under way)."""
    for path, _ in files:
        check_writable_file(path, what)
    tag = f"{os.getpid()}-{uuid.uuid4().hex[:12]}"
    with _directory_lock(out, what) as locked:
        try:
            for path, write in files:
                _write_durably(_pending(path, tag), write)
        except BaseException:
            for path, _ in files:
                if _pending(path, tag).exists():
                    _pending(path, tag).unlink()
            raise
        for path, _ in files:
            os.replace(_pending(path, tag), path)
        for path, _ in files:
            for stale in _pendings(path) if locked else ():  # unlocked, one could be a concurrent save's
                with contextlib.suppress(OSError):
                    stale.unlink()
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
    """The config of the checkpoint: gift_config.json, or the pending config of a save
    interrupted after its commit point; whichever has the hash the tensor file records (a
    config without a recorded hash: a file of another tool, gift_config.json as it is)."""
    want = metadata.get("config_sha256")
    check_writable_file(cfg_path, what)
    text = cfg_path.read_text() if cfg_path.is_file() else None
    if want is None or (text is not None and hashlib.sha256(text.encode()).hexdigest() == want):
        if text is None:
            raise FileNotFoundError(f"{what}: {cfg_path} does not exist; expected {ADAPTER_FILE} and {CONFIG_FILE} in "
                                    f"{cfg_path.parent}")
        return text
    for pending in _pendings(cfg_path):
        if pending.is_file() and hashlib.sha256(pending.read_bytes()).hexdigest() == want:
            return pending.read_text()
    if text is None:
        raise FileNotFoundError(f"{what}: {cfg_path} does not exist; expected {ADAPTER_FILE} and {CONFIG_FILE} in "
                                f"{cfg_path.parent}")
    raise ValueError(f"{what}: {cfg_path} does not match the config {cfg_path.parent / ADAPTER_FILE} was saved with "
                     f"(its recorded SHA-256): the config was edited, or is another save's; refusing to load an "
                     f"adapter under a config it was not trained with. Save the adapter again")


def _check_format(metadata: Dict[str, str], path: Path, what: str) -> bool:
    """Whether the tensor file carries gift_kernels metadata (then checked: this version only);
    False for a file of another tool (no checksums to check)."""
    fmt = metadata.get("format", "")
    ours = fmt.startswith(_FORMAT_PREFIX)
    if not ours:
        if "config_sha256" in metadata or any(k.startswith("sha256:") for k in metadata):
            raise ValueError(f"{what}: {path} has gift_kernels checksums but no gift_kernels format ({fmt!r}); the "
                             f"file was edited")
        return False
    version = fmt[len(_FORMAT_PREFIX):]
    if not version.isdigit():
        raise ValueError(f"{what}: {path} claims format {fmt!r}, which is not a gift_kernels adapter format")
    if int(version) > _VERSION:
        raise ValueError(f"{what}: {path} is in format {fmt!r}, newer than this gift_kernels reads ({_FORMAT}); "
                         f"upgrade gift_kernels to load it")
    if int(version) < _VERSION:
        raise ValueError(f"{what}: {path} is in format {fmt!r}, older than this gift_kernels reads ({_FORMAT}); "
                         f"save the adapter again")
    missing = [k for k in ("config_sha256", "base") if k not in metadata]
    if missing:
        raise ValueError(f"{what}: {path} lacks its {missing[0]!r} record ({_FORMAT}); the file was edited")
    return True


def check_base(recorded: Optional[Dict[str, Tuple[int, int]]], here: Dict[str, Tuple[int, int]], path: Path,
               model: nn.Module, what: str) -> None:
    """The layers the config adapts on ``model`` (``{name: (in_features, out_features)}``) must
    be the ones the adapter was saved from (``recorded``; None: a file of another tool)."""
    if recorded is None or recorded == here:
        return
    missing = sorted(set(recorded) - set(here))
    extra = sorted(set(here) - set(recorded))
    shapes = sorted(n for n in set(recorded) & set(here) if recorded[n] != here[n])
    diff = [f"{len(missing)} saved layer(s) not adapted here: {missing[:4]}" if missing else "",
            f"{len(extra)} layer(s) adapted here but not saved: {extra[:4]}" if extra else "",
            f"different (in_features, out_features): " + ", ".join(
                f"{n!r} saved {tuple(recorded[n])} here {tuple(here[n])}" for n in shapes[:4]) if shapes else ""]
    raise ValueError(f"{what}: {path} was saved from a base with {len(recorded)} adapted layer(s), but on "
                     f"{type(model).__name__} the config adapts {len(here)}: " + "; ".join(d for d in diff if d) +
                     ". Load the adapter into the model it was trained for")


def read_checkpoint(src: Path, what: str
                    ) -> Tuple[GiftConfig, Dict[str, Tensor], Path, Optional[Dict[str, Tuple[int, int]]]]:
    """``(config, tensors, tensor file, base)`` of the checkpoint in ``src``, every checksum
    and the config's hash verified; ``base``: ``{layer name: (in_features, out_features)}`` it
    was saved from (None for a file of another tool). A missing, corrupt or edited file, or one
    of another format version, raises an error naming it."""
    cfg_path, ten_path = src / CONFIG_FILE, src / ADAPTER_FILE
    if not ten_path.exists():
        if (src / PEFT_CONFIG_FILE).is_file():
            raise FileNotFoundError(f"{what}: {src} holds a PEFT adapter ({PEFT_CONFIG_FILE}, saved by "
                                    f"save_pretrained), not a save_gift checkpoint; load it with "
                                    f"peft.PeftModel.from_pretrained(model, {str(src)!r}) after importing "
                                    f"gift_kernels.adapters.peft")
        raise FileNotFoundError(f"{what}: {ten_path} does not exist; expected {ADAPTER_FILE} and {CONFIG_FILE} in {src}")
    saved, metadata = read_safetensors(ten_path, what)
    base = None
    if _check_format(metadata, ten_path, what):
        verify_hashes(saved, metadata, ten_path, what)
        try:
            base = {str(k): (int(v[0]), int(v[1])) for k, v in json.loads(metadata["base"]).items()}
        except (ValueError, TypeError, KeyError, IndexError, AttributeError) as exc:
            raise ValueError(f"{what}: {ten_path} has an unreadable base record ({exc}); the file was edited") from exc
    config_text = _config_text(cfg_path, metadata, what)
    try:
        config = GiftConfig.from_dict(json.loads(config_text))
    except (ValueError, TypeError) as exc:
        raise ValueError(f"{what}: {cfg_path} is not a valid GiftConfig: {exc}") from exc
    return config, saved, ten_path, base


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
