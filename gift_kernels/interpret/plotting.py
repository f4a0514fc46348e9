"""GIFT's token-clustering head, as pictures (PNG).

- :func:`plot_token_clusters`: text, a token x cluster heat map with the tokens as labels
  (one panel per sequence).
- :func:`plot_image_clusters`: image-shaped token grids, one panel per cluster over the
  patch grid, optionally upsampled and overlaid on the image.

matplotlib is imported inside the functions, so the package imports without it. The figures
are built as ``matplotlib.figure.Figure`` objects and written by the Agg canvas: pyplot is
never imported and the caller's backend (a notebook's, say) is left alone. ``size`` is the
PNG's width and height in pixels.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import List, Optional, Sequence, Tuple, Union

import torch
from torch import Tensor

from .scores import AUTHORS_THRESHOLD, assign_clusters, normalize_maps, scores_to_grid

__all__ = ["plot_image_clusters", "plot_token_clusters"]

PathLike = Union[str, Path]


def _figure(size: Tuple[int, int], dpi: int):
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise ImportError("gift_kernels.interpret.plotting needs matplotlib: pip install matplotlib") from e
    if len(size) != 2 or min(size) < 16:
        raise ValueError(f"plotting: size must be (width, height) in pixels, each >= 16, got {size}")
    if dpi < 1:
        raise ValueError(f"plotting: dpi must be >= 1, got {dpi}")
    fig = Figure(figsize=(size[0] / dpi, size[1] / dpi), dpi=dpi, layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def _save(fig, path: PathLike, dpi: int) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    # no bbox_inches="tight": it would change the pixel size the caller asked for
    fig.savefig(path, dpi=dpi, format="png")
    return path


def _as_2d_scores(s, what: str) -> Tensor:
    if not isinstance(s, Tensor):
        s = torch.as_tensor(s)
    if s.dim() != 2:
        raise ValueError(f"{what}: scores must be (tokens, r) for one sequence/image, got shape {tuple(s.shape)}")
    return s.detach().to("cpu", torch.float64)


def plot_token_clusters(
    scores: Union[Tensor, Sequence[Tensor]],
    tokens: Union[Sequence[str], Sequence[Sequence[str]]],
    path: PathLike,
    *,
    size: Tuple[int, int] = (1000, 600),
    dpi: int = 100,
    titles: Optional[Sequence[str]] = None,
    ncols: Optional[int] = None,
    threshold: Optional[float] = None,
    mark: Optional[str] = "raw",
    cmap: str = "viridis",
) -> Path:
    """Token x cluster heat map(s) of text, written as a PNG of ``size`` pixels.

    Args:
        scores: ``(tokens, r)`` scores of one sequence, or a list of them (one panel each);
            each column is min-max normalised over the sequence's tokens (pass the real
            tokens only, not padding).
        tokens: the token strings, one per row of ``scores`` (a list of lists for several
            sequences).
        ncols: panels per row (default: all in one row).
        threshold: drop normalised values not above it (the authors use 0.5).
        mark: put a dot on each token's best column: ``"raw"`` (the hard assignment,
            argmax of the raw scores), ``"normalized"`` (argmax of the drawn, per-column
            normalised values) or None.
    """
    if isinstance(scores, Tensor):
        scores, tokens = [scores], [tokens]
    scores = [_as_2d_scores(s, "plot_token_clusters") for s in scores]
    tokens = [list(t) for t in tokens]
    if len(tokens) != len(scores):
        raise ValueError(f"plot_token_clusters: {len(scores)} score tensors but {len(tokens)} token lists")
    for i, (s, t) in enumerate(zip(scores, tokens)):
        if len(t) != s.shape[0]:
            raise ValueError(
                f"plot_token_clusters: sequence {i} has {s.shape[0]} score rows (scores {tuple(s.shape)}) "
                f"but {len(t)} token labels"
            )
    if titles is not None and len(titles) != len(scores):
        raise ValueError(f"plot_token_clusters: {len(scores)} panels but {len(titles)} titles")
    if mark not in ("raw", "normalized", None):
        raise ValueError(f"plot_token_clusters: mark must be 'raw', 'normalized' or None, got {mark!r}")

    ncols = ncols or len(scores)
    fig = _figure(size, dpi)
    axes = fig.subplots(math.ceil(len(scores) / ncols), ncols, squeeze=False).ravel()
    for ax in axes[len(scores):]:
        ax.set_axis_off()
    im = None
    for i, (ax, s, t) in enumerate(zip(axes, scores, tokens)):
        maps = normalize_maps(s, threshold=threshold)
        im = ax.imshow(maps.numpy(), cmap=cmap, vmin=0.0, vmax=1.0, aspect="auto", interpolation="nearest")
        ax.set_yticks(range(len(t)), labels=t, fontsize="small")
        r = s.shape[1]
        step = max(1, math.ceil(r / 16))
        ax.set_xticks(range(0, r, step))
        ax.tick_params(axis="x", labelsize="small")
        ax.set_xlabel("cluster (column of W phi)" + (f"\n dot: best column ({mark} score)" if mark else ""))
        if mark is not None:
            best = assign_clusters(s if mark == "raw" else normalize_maps(s)).numpy()
            ax.scatter(best, range(len(t)), s=12, c="white", edgecolors="black", linewidths=0.5)
        if titles is not None:
            ax.set_title(titles[i], fontsize="medium")
    label = "normalised score" + (f" (> {threshold})" if threshold is not None else "")
    fig.colorbar(im, ax=list(axes), label=label, shrink=0.8)
    return _save(fig, path, dpi)


def _image_hwc(image) -> "numpy.ndarray":  # noqa: F821
    import numpy as np

    arr = image.detach().cpu().numpy() if isinstance(image, Tensor) else np.asarray(image)
    if arr.ndim == 3 and arr.shape[0] in (1, 3) and arr.shape[-1] not in (1, 3, 4):
        arr = np.moveaxis(arr, 0, -1)  # CHW (torch layout) -> HWC
    if arr.ndim == 3 and arr.shape[-1] == 1:
        arr = arr[..., 0]
    if arr.ndim not in (2, 3) or (arr.ndim == 3 and arr.shape[-1] not in (3, 4)):
        raise ValueError(f"plot_image_clusters: image must be (H, W), (H, W, 3|4) or (3, H, W), got shape {arr.shape}")
    if arr.dtype == np.uint8:
        arr = arr.astype(np.float64) / 255.0
    return np.clip(arr.astype(np.float64), 0.0, 1.0)


def plot_image_clusters(
    scores: Tensor,
    path: PathLike,
    *,
    grid: Optional[Tuple[int, int]] = None,
    num_prefix_tokens: Optional[int] = None,
    image=None,
    clusters: Optional[Sequence[int]] = None,
    ncols: Optional[int] = None,
    size: Tuple[int, int] = (1000, 800),
    dpi: int = 100,
    threshold: Optional[float] = AUTHORS_THRESHOLD,
    alpha: float = 0.6,
    cmap: str = "jet",
    title: Optional[str] = None,
) -> Path:
    """Per-cluster maps over an image-shaped token grid, a grid of panels in one PNG.

    Args:
        scores: ``(tokens, r)`` scores for one image; the class token (and ``num_prefix_tokens``
            leading tokens) are dropped and the rest reshaped to ``grid`` (inferred when the
            patch count is square), see :func:`gift_kernels.interpret.scores_to_grid`.
        image: optional underlay, ``(H, W)``, ``(H, W, 3)`` or ``(3, H, W)``, uint8 or float in
            [0, 1]. Each map is upsampled bilinearly to ``H x W``, normalised to [0, 1] and
            thresholded (the authors' order), and drawn over the image with ``alpha``;
            thresholded-out pixels are transparent. Without an image the maps are drawn at the
            grid's resolution.
        clusters: which columns to draw (default all ``r``).
        threshold: the authors' 0.5 by default; None keeps the whole normalised map.
    """
    import numpy as np

    s = _as_2d_scores(scores, "plot_image_clusters")
    maps = scores_to_grid(s, grid=grid, num_prefix_tokens=num_prefix_tokens)  # r, h, w
    r = maps.shape[0]
    clusters = list(range(r)) if clusters is None else [int(c) for c in clusters]
    bad = [c for c in clusters if not 0 <= c < r]
    if bad or not clusters:
        raise ValueError(f"plot_image_clusters: clusters must be a non-empty list of indices in [0, {r}), got {clusters}")
    maps = maps[clusters]

    underlay = None if image is None else _image_hwc(image)
    if underlay is not None:
        # bilinear interpolation stays inside each map's [min, max], so upsample-then-normalise
        # equals the authors' order exactly; the threshold is applied after upsampling
        maps = torch.nn.functional.interpolate(maps[None], size=underlay.shape[:2], mode="bilinear", align_corners=False)[0]
    maps = normalize_maps(maps, threshold=threshold, dim=(-2, -1)).numpy()

    n_panels = len(clusters) + (underlay is not None)
    ncols = ncols or math.ceil(math.sqrt(n_panels))
    nrows = math.ceil(n_panels / ncols)
    fig = _figure(size, dpi)
    axes = fig.subplots(nrows, ncols, squeeze=False).ravel()
    for ax in axes:
        ax.set_axis_off()
    panel = 0
    if underlay is not None:
        axes[0].imshow(underlay, cmap="gray" if underlay.ndim == 2 else None)
        axes[0].set_title("image", fontsize="small")
        panel = 1
    im = None
    for c, m in zip(clusters, maps):
        ax = axes[panel]
        panel += 1
        if underlay is not None:
            ax.imshow(underlay, cmap="gray" if underlay.ndim == 2 else None)
            shown = np.ma.masked_where(m <= 0, m) if threshold is not None else m
            im = ax.imshow(shown, cmap=cmap, vmin=0.0, vmax=1.0, alpha=alpha, interpolation="bilinear")
        else:
            im = ax.imshow(m, cmap=cmap, vmin=0.0, vmax=1.0, interpolation="nearest")
        ax.set_title(f"cluster {c}", fontsize="small")
    if title is not None:
        fig.suptitle(title)
    fig.colorbar(im, ax=list(axes), shrink=0.6, label="normalised score")
    return _save(fig, path, dpi)
