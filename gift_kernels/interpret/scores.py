"""GIFT's token-clustering head, as numbers.

``B = W phi`` (``d_out x r``) is the factor GIFT generates for every adapted layer. The
authors read it as a token-clustering head: each of its ``r`` columns scores every token of
the layer's output before the GIFT residual,

    y0     = x W^T                  (tokens x d_out)
    scores = y0 @ B = y0 (W phi)    (tokens x r)

one map per column, normalised to [0, 1] per map, values at or below 0.5 dropped
(``normalize_maps``), reshaped to the patch grid for ViTs (``scores_to_grid``).

Bias: docs/design.md defines ``y0 = x W^T`` (the paper's head); the authors' code
(savadikarc/gift, ``GIFTLinear.pre_delta_identity``) taps ``F.linear(x, W, b)``, which
includes the bias. The default here follows the definition; ``include_bias=True`` reproduces the
authors' tap. The bias only adds the constant ``b @ B`` to each column, so every normalised
map is the same either way; the raw scores, and therefore the hard assignment
(``assign_clusters``), differ.

How the scores are computed: ``scores = x (W^T (W phi))``, the same product re-associated.
``G = W^T (W phi)`` (``d_in x r``) costs ``4 d_out d_in r`` FLOPs and is cached while W and
phi are unchanged (checked by their version counters), so a forward adds one ``2 M d_in r``
product and no ``M x d_out`` intermediate. The alternatives cost more and lose precision:
recomputing ``x W^T`` repeats the layer's whole GEMM (``2 M d_out d_in``), and recovering
``y0 = y - b - t B^T`` from the hook's output subtracts two numbers rounded to the
activation dtype (bf16 loses ~3 digits that way). Everything runs in float32 (float64 for
float64 layers) with autocast off.

Stacked layers (a :class:`~gift_kernels.nn.GiftLinear` with row chunks: a qkv weight, GPT-2's
``Conv1D``, Thetas with projection biases) have one head per row chunk ``W_i`` of the weight
and its Theta: ``B_i = W_i phi_i (+ b1_i)``, the in-projection bias the authors' head
includes. A layer with several chunks is recorded under ``"<name>:<i>"``, one name per chunk.

Quantized bases (:mod:`gift_kernels.nn.bases`): ``W`` is the base's dequantized weight. A
recorder dequantizes each such layer once and keeps that dense weight while it records
(reused while the quantized weight is unchanged; released on exit); :func:`cluster_head`
dequantizes on every call.

Recording: ``with record_cluster_scores(model, ["query", "value"]) as rec: model(x)``
installs one forward hook per chosen GIFT layer on entry and removes every hook on exit,
also when the body raises; outside the context nothing is installed. The hooks read the
layer's input, return nothing, and compute under ``no_grad`` on detached tensors, so the
model's outputs and gradients are unchanged.
"""

from __future__ import annotations

import math
from typing import Dict, List, Optional, Sequence, Tuple, Union

import torch
from torch import Tensor, nn

from ..nn.linear import GiftLinear

__all__ = [
    "ClusterRecorder",
    "assign_clusters",
    "cluster_head",
    "cluster_scores",
    "normalize_maps",
    "record_cluster_scores",
    "scores_to_grid",
]

GiftLayer = GiftLinear
LayerSpec = Union[str, GiftLayer]
_LAYER_TYPES = (GiftLinear,)

#: the authors' threshold on normalised maps (savadikarc/gift ``vis_utils.normalize``)
AUTHORS_THRESHOLD = 0.5


def _acc_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _chunks(layer: GiftLayer):
    """``[(W_i, b_i, theta_i)]``: the weight rows, bias and Theta of each chunk of ``layer``
    (a merged layer's head is built from its original weight)."""
    if not isinstance(layer, GiftLinear):
        raise TypeError(f"cluster_head: expected a GiftLinear, got {type(layer).__name__}")
    return layer.chunks()


def _n_chunks(layer: GiftLayer) -> int:
    return len(layer.splits)


def _pick_chunk(layer: GiftLayer, chunk: Optional[int], where: str):
    chunks = _chunks(layer)
    if chunk is None:
        if len(chunks) != 1:
            raise ValueError(
                f"{where}: {type(layer).__name__} has {len(chunks)} chunks (splits {list(layer.splits)}), "
                f"one head each; pass chunk=0..{len(chunks) - 1}"
            )
        return chunks[0]
    if not 0 <= chunk < len(chunks):
        raise ValueError(f"{where}: chunk={chunk} out of range for {type(layer).__name__} with {len(chunks)} chunk(s)")
    return chunks[chunk]


def _head(w: Tensor, b: Optional[Tensor], theta, include_bias: bool) -> Tuple[Tensor, Optional[Tensor]]:
    acc = _acc_dtype(w.dtype)
    with torch.no_grad(), torch.autocast(w.device.type, enabled=False):
        w_acc = w.detach().to(acc)
        head = w_acc @ theta.phi.detach().to(device=w.device, dtype=acc)  # B = W phi, d_out x r
        in_bias = getattr(theta, "in_bias", None)
        if in_bias is not None:  # the authors' head is their in-projection's output, bias included
            head = head + in_bias.detach().to(acc)
        g = w_acc.t() @ head
        c = b.detach().to(acc) @ head if include_bias and b is not None else None
    return g, c


def cluster_head(layer: GiftLayer, *, include_bias: bool = False, chunk: Optional[int] = None) -> Tuple[Tensor, Optional[Tensor]]:
    """``(G, c)`` with ``G = W^T (W phi)`` (``d_in x r``) and ``c = b @ (W phi)`` (``r``) or None.

    ``scores = x @ G (+ c)``. Computed without grad in float32 (float64 for float64 weights).
    ``chunk`` picks the row chunk of a multi-chunk :class:`GiftLinear`.
    """
    w, b, theta = _pick_chunk(layer, chunk, "cluster_head")
    return _head(w, b, theta, include_bias)


def cluster_scores(layer: GiftLayer, x: Tensor, *, include_bias: bool = False, chunk: Optional[int] = None) -> Tensor:
    """Per-token cluster scores ``(x W^T) @ (W phi)`` of ``layer`` for input ``x``.

    ``x``: ``(..., d_in)``; returns ``(..., r)`` in float32 (float64 for float64 layers),
    detached. ``include_bias`` adds ``b @ (W phi)``, as the authors' tap does. ``chunk``
    picks the row chunk of a multi-chunk :class:`GiftLinear`.
    """
    g, c = cluster_head(layer, include_bias=include_bias, chunk=chunk)
    return _scores_from_head(x, g, c, layer)


def _scores_from_head(x: Tensor, g: Tensor, c: Optional[Tensor], layer: GiftLayer) -> Tensor:
    if not isinstance(x, Tensor) or x.dim() < 1 or x.shape[-1] != g.shape[0]:
        shape = tuple(x.shape) if isinstance(x, Tensor) else type(x).__name__
        raise ValueError(
            f"cluster_scores: x must have shape (..., {g.shape[0]}) for {layer.__class__.__name__}"
            f"(in_features={layer.in_features}), got {shape}"
        )
    with torch.no_grad(), torch.autocast(x.device.type, enabled=False):
        s = x.detach().to(g.dtype) @ g
        if c is not None:
            s = s + c
    return s


def assign_clusters(scores: Tensor) -> Tensor:
    """Hard assignment: the index of each token's best column, ``scores.argmax(-1)``.

    On raw scores the columns keep their own scales; to compare columns after per-map
    normalisation, pass ``normalize_maps(scores)`` instead.
    """
    return scores.argmax(dim=-1)


def normalize_maps(
    scores: Tensor,
    *,
    threshold: Optional[float] = None,
    dim: Union[int, Tuple[int, ...]] = -2,
    mask: Optional[Tensor] = None,
) -> Tensor:
    """Min-max normalise each map to [0, 1] over the token axis ``dim``, as the authors do.

    ``scores``: ``(..., tokens, r)`` (the default ``dim=-2``), or per-cluster image maps
    ``(..., r, h, w)`` with ``dim=(-2, -1)``. ``threshold`` (the authors use
    :data:`AUTHORS_THRESHOLD` = 0.5) zeroes every value not above it and keeps the rest.
    A constant map becomes zeros. A map holding a NaN or an infinite score (among the tokens
    that take part) comes back all NaN: it has no [0, 1] scale, and must not look like one.
    ``mask``: boolean, ``scores`` shape without the last axis (``(..., tokens)``, for the
    default layout), False for tokens (padding) that take no part in the min and max; they
    come back as 0.
    """
    if not isinstance(scores, Tensor):
        raise TypeError(f"normalize_maps: scores must be a torch.Tensor, got {type(scores).__name__}")
    if not scores.is_floating_point():
        raise TypeError(f"normalize_maps: scores must be floating point, got {scores.dtype}")
    dims = (dim,) if isinstance(dim, int) else tuple(dim)
    need = max(max(-d, d + 1) for d in dims) if dims else 1
    if scores.dim() < max(need, 2):
        raise ValueError(f"normalize_maps: scores must have at least {max(need, 2)} dimensions for dim={dim} "
                         f"((..., tokens, r) by default), got shape {tuple(scores.shape)}")
    s = scores.to(_acc_dtype(scores.dtype))
    keep = None
    if mask is not None:
        if mask.dtype != torch.bool or mask.shape != scores.shape[:-1]:
            raise ValueError(
                f"normalize_maps: mask must be a bool tensor of shape {tuple(scores.shape[:-1])} "
                f"(scores {tuple(scores.shape)} without its last axis), got {mask.dtype} {tuple(mask.shape)}"
            )
        keep = mask.unsqueeze(-1).expand_as(s)
        lo = s.masked_fill(~keep, math.inf).amin(dim=dim, keepdim=True)
        hi = s.masked_fill(~keep, -math.inf).amax(dim=dim, keepdim=True)
    else:
        lo = s.amin(dim=dim, keepdim=True)
        hi = s.amax(dim=dim, keepdim=True)
    finite = s if keep is None else s.masked_fill(~keep, 0.0)
    bad = (~torch.isfinite(finite)).any(dim=dims[0] if len(dims) == 1 else dims, keepdim=True)
    span = hi - lo
    ok = torch.isfinite(span) & (span > 0)
    out = torch.where(ok, (s - lo) / torch.where(ok, span, torch.ones_like(span)), torch.zeros_like(s))
    out = out.clamp(0.0, 1.0)
    if threshold is not None:
        out = torch.where(out > threshold, out, torch.zeros_like(out))
    if keep is not None:
        out = out.masked_fill(~keep, 0.0)
    return out.masked_fill(bad, math.nan)  # a non-finite map propagates, it is never drawn as a picture


def _isqrt_exact(n: int) -> Optional[int]:
    if n < 1:
        return None
    root = math.isqrt(n)
    return root if root * root == n else None


def scores_to_grid(
    scores: Tensor,
    *,
    grid: Optional[Tuple[int, int]] = None,
    num_prefix_tokens: Optional[int] = None,
) -> Tensor:
    """Reshape ``(..., tokens, r)`` scores of an image-shaped token sequence to ``(..., r, h, w)``.

    Leading non-patch tokens (a class token, registers) are dropped. Without ``grid``, the
    patch count must be square: ``tokens`` itself, or ``tokens - 1`` (one class token) when
    ``num_prefix_tokens`` is not given. With ``grid=(h, w)``, the prefix is inferred as
    ``tokens - h*w`` when that is 0 or 1; give ``num_prefix_tokens`` for anything else.
    """
    if scores.dim() < 2:
        raise ValueError(f"scores_to_grid: scores must be (..., tokens, r), got shape {tuple(scores.shape)}")
    n_tok = scores.shape[-2]
    if num_prefix_tokens is not None and not 0 <= num_prefix_tokens < n_tok:
        raise ValueError(f"scores_to_grid: num_prefix_tokens={num_prefix_tokens} must be in [0, {n_tok}) for {n_tok} tokens")

    if grid is not None:
        if len(grid) != 2 or min(grid) < 1:
            raise ValueError(f"scores_to_grid: grid must be (h, w) with h, w >= 1, got {grid}")
        h, w = int(grid[0]), int(grid[1])
        prefix = n_tok - h * w if num_prefix_tokens is None else num_prefix_tokens
        if n_tok - prefix != h * w or (num_prefix_tokens is None and prefix not in (0, 1)):
            raise ValueError(
                f"scores_to_grid: {n_tok} tokens do not fit grid {h}x{w} = {h * w} patches"
                + ("" if num_prefix_tokens is None else f" after dropping {num_prefix_tokens} prefix tokens")
                + "; pass num_prefix_tokens for other than 0 or 1 leading (class/register) tokens"
            )
    else:
        candidates = (0, 1) if num_prefix_tokens is None else (num_prefix_tokens,)
        for prefix in candidates:
            side = _isqrt_exact(n_tok - prefix)
            if side is not None:
                h = w = side
                break
        else:
            tried = " or ".join(f"{n_tok - p} (dropping {p})" for p in candidates)
            raise ValueError(
                f"scores_to_grid: {n_tok} tokens are not a square grid of patches: {tried} is not a "
                f"perfect square; pass grid=(h, w) and/or num_prefix_tokens"
            )
    patches = scores[..., prefix:, :]
    return patches.transpose(-1, -2).reshape(*scores.shape[:-2], scores.shape[-1], h, w)


class ClusterRecorder:
    """Records cluster scores of chosen GIFT layers during ordinary forward passes.

    Use through :func:`record_cluster_scores`. Inside ``with``, each forward call of a chosen
    layer appends its scores (``(..., tokens, r)``, float32, detached, on the layer's device)
    to ``calls[name]``; they stay readable after the context exits.
    """

    def __init__(self, layers: Dict[str, GiftLayer], *, include_bias: bool = False, keep: str = "all") -> None:
        if keep not in ("all", "last"):
            raise ValueError(f"record_cluster_scores: keep must be 'all' or 'last', got {keep!r}")
        self.layers: Dict[str, GiftLayer] = dict(layers)
        self.include_bias = include_bias
        self.keep = keep
        # one recorded name per head: the layer's name, or "<name>:<i>" per chunk of a stacked layer
        self._heads_of: Dict[str, List[str]] = {
            name: [name] if _n_chunks(layer) == 1 else [f"{name}:{i}" for i in range(_n_chunks(layer))]
            for name, layer in self.layers.items()
        }
        self.calls: Dict[str, List[Tensor]] = {h: [] for hs in self._heads_of.values() for h in hs}
        self._handles: list = []
        self._heads: Dict[str, Tuple[tuple, Tensor, Optional[Tensor]]] = {}
        self._dense: Dict[str, tuple] = {}  # layer name -> (base state key, chunks): quantized bases

    @property
    def names(self) -> List[str]:
        """The recorded heads: layer names, ``"<name>:<i>"`` for the chunks of a stacked layer."""
        return list(self.calls)

    @property
    def active(self) -> bool:
        return bool(self._handles)

    def _name(self, name: Optional[str]) -> str:
        if name is None:
            if len(self.layers) != 1:
                raise ValueError(f"ClusterRecorder: {len(self.layers)} layers recorded, name one of {self.names}")
            return self.names[0]
        if name not in self.calls:
            raise KeyError(f"ClusterRecorder: no recorded layer {name!r}; recorded: {self.names}")
        return name

    def scores(self, name: Optional[str] = None, call: int = -1) -> Tensor:
        """Scores of layer ``name`` (optional with one layer) from forward call ``call`` (last by default)."""
        name = self._name(name)
        if not self.calls[name]:
            raise RuntimeError(f"ClusterRecorder: layer {name!r} has not run inside the context")
        return self.calls[name][call]

    def assignments(self, name: Optional[str] = None, call: int = -1) -> Tensor:
        """Hard assignment of each token to its best column (argmax of the raw scores)."""
        return assign_clusters(self.scores(name, call))

    def normalized(self, name: Optional[str] = None, call: int = -1, *, threshold: Optional[float] = None, mask=None) -> Tensor:
        """Each map min-max normalised to [0, 1] over the tokens; see :func:`normalize_maps`."""
        return normalize_maps(self.scores(name, call), threshold=threshold, mask=mask)

    def clear(self) -> None:
        for v in self.calls.values():
            v.clear()

    def _head(self, head: str, w: Tensor, b: Optional[Tensor], theta) -> Tuple[Tensor, Optional[Tensor]]:
        # G = W^T W phi is reused while W, Theta (and the bias) are the same tensors, unmodified
        # (an optimizer step or merge() changes them in place and bumps their version)
        tensors = [w, theta.phi, getattr(theta, "in_bias", None), b if self.include_bias else None]
        try:
            key = tuple((t.data_ptr(), t._version) if t is not None else None for t in tensors)
        except RuntimeError:  # inference tensors carry no version counter: do not cache
            key = None
        cached = self._heads.get(head)
        if key is not None and cached is not None and cached[0] == key:
            return cached[1], cached[2]
        g, c = _head(w, b, theta, self.include_bias)
        if key is not None:
            self._heads[head] = (key, g, c)
        return g, c

    def _layer_chunks(self, name: str, layer: GiftLayer):
        # a quantized base's dequantized weight is kept while recording, reused while its
        # quantized state is unchanged: one dequantization per recording, not one per forward
        key = layer.base_state_key()
        if key is None:
            return _chunks(layer)
        cached = self._dense.get(name)
        if cached is None or cached[0] != key:
            cached = self._dense[name] = (key, _chunks(layer))
        return cached[1]

    def _hook(self, name: str):
        heads = self._heads_of[name]

        def hook(module, args, kwargs, output):
            x = args[0] if args else kwargs.get("x", kwargs.get("input"))
            for head, (w, b, theta) in zip(heads, self._layer_chunks(name, module)):
                g, c = self._head(head, w, b, theta)
                s = _scores_from_head(x, g, c, module)
                if self.keep == "last":
                    self.calls[head][:] = [s]
                else:
                    self.calls[head].append(s)
            return None

        return hook

    def __enter__(self) -> "ClusterRecorder":
        if self._handles:
            raise RuntimeError("ClusterRecorder: already recording; a recorder is entered once at a time")
        try:
            for name, layer in self.layers.items():
                self._handles.append(layer.register_forward_hook(self._hook(name), with_kwargs=True))
        except BaseException:
            self._remove()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self._remove()
        self._heads.clear()
        self._dense.clear()

    def _remove(self) -> None:
        while self._handles:
            self._handles.pop().remove()


def _select_layers(model: nn.Module, layers) -> Dict[str, GiftLayer]:
    named = {}
    for name, mod in model.named_modules():
        named.setdefault(id(mod), name)
    all_gift = {name: mod for name, mod in model.named_modules() if isinstance(mod, _LAYER_TYPES)}

    if layers is None:
        if not all_gift:
            raise ValueError(
                f"record_cluster_scores: {type(model).__name__} holds no GiftLinear layer "
                "(a model merged with merge_gift holds plain layers again: unmerge_gift first)"
            )
        return all_gift
    if isinstance(layers, (str, nn.Module)):
        layers = [layers]

    chosen: Dict[str, GiftLayer] = {}
    modules = dict(model.named_modules())
    for spec in layers:
        if isinstance(spec, nn.Module):
            if id(spec) not in named:
                raise ValueError(f"record_cluster_scores: module {spec.__class__.__name__} is not part of the model {type(model).__name__}")
            found = {named[id(spec)]: spec}
        elif isinstance(spec, str):
            if spec in modules:
                found = {spec: modules[spec]}
            else:  # a suffix such as "query" or "attention.self.value" selects every match
                found = {n: m for n, m in modules.items() if n.endswith("." + spec)}
            if not found:
                raise ValueError(
                    f"record_cluster_scores: no module named {spec!r} (or ending in '.{spec}') in "
                    f"{type(model).__name__}; GIFT layers: {list(all_gift)[:8]}{' ...' if len(all_gift) > 8 else ''}"
                )
        else:
            raise TypeError(f"record_cluster_scores: layers must be names or GIFT layer modules, got {type(spec).__name__}")
        for name, mod in found.items():
            if not isinstance(mod, _LAYER_TYPES):
                raise TypeError(
                    f"record_cluster_scores: {name!r} is a {type(mod).__name__}, not a GiftLinear; "
                    "only GIFT-adapted layers have a clustering head"
                )
            chosen[name] = mod
    return chosen


def record_cluster_scores(
    model: nn.Module,
    layers: Union[None, LayerSpec, Sequence[LayerSpec]] = None,
    *,
    include_bias: bool = False,
    keep: str = "all",
) -> ClusterRecorder:
    """A context manager recording cluster scores of ``model``'s GIFT layers as it runs.

    Args:
        model: the model (or a single GIFT layer, whose name is then ``""``).
        layers: None for every ``GiftLinear`` in ``model``; else names
            (exact qualified names, or suffixes such as ``"query"`` that select every layer
            ending in ``.query``) and/or GIFT layer modules of ``model``, alone or in a list.
            A stacked layer with several chunks is recorded as ``"<name>:0"``, ``"<name>:1"``, ...
        include_bias: add ``b @ (W phi)`` to the scores (the authors' tap includes the bias;
            the definition ``y0 = x W^T`` does not). Normalised maps are the same either way.
        keep: ``"all"`` keeps every forward call's scores, ``"last"`` only the latest (for
            loops that run many batches inside the context).

    Example::

        with record_cluster_scores(model, ["query", "value"]) as rec:
            out = model(**batch)
        s = rec.scores("encoder.layer.5.attention.self.value")   # (batch, tokens, r)
        best = rec.assignments("encoder.layer.5.attention.self.value")
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"record_cluster_scores: model must be an nn.Module, got {type(model).__name__}")
    return ClusterRecorder(_select_layers(model, layers), include_bias=include_bias, keep=keep)
