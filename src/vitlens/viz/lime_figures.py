"""Figures for the model-agnostic methods: LIME's supporting / opposing superpixels and the what-if table."""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np
from matplotlib.figure import Figure
from PIL import Image

from vitlens.explanation import Explanation
from vitlens.methods.segmentation import boundaries
from vitlens.viz.figures import MAX_COLUMNS, PANEL, _short, _wrap, new_figure, percent

DIM = 0.25  # brightness kept by superpixels that are not shown


def _rgb(view: Image.Image, shape: tuple[int, int]) -> np.ndarray:
    img = view.convert("RGB")
    if img.size != (shape[1], shape[0]):
        img = img.resize((shape[1], shape[0]), Image.Resampling.BILINEAR)
    return np.asarray(img, dtype=np.float32) / 255.0


def _chosen(weights: np.ndarray, positive: bool, num_features: int) -> np.ndarray:
    """Indices of the ``num_features`` largest positive (or most negative) weights."""
    order = np.argsort(-weights if positive else weights)
    keep = [i for i in order[:num_features] if (weights[i] > 0 if positive else weights[i] < 0)]
    return np.asarray(keep, dtype=np.int64)


def region_image(rgb: np.ndarray, segments: np.ndarray, chosen: np.ndarray, tint: tuple[float, float, float] | None,
                 edge: tuple[float, float, float]) -> np.ndarray:
    """``rgb`` with the ``chosen`` superpixels shown (optionally tinted) and the rest dimmed, their borders drawn."""
    show = np.isin(segments, chosen)
    out = np.where(show[..., None], rgb, rgb * DIM)
    if tint is not None:
        out = np.where(show[..., None], 0.55 * out + 0.45 * np.asarray(tint, dtype=np.float32), out)
    border = boundaries(np.where(show, segments, -1)) & (show | np.roll(show, 1, 0) | np.roll(show, 1, 1))
    out[border] = edge
    return np.clip(out, 0, 1)


def lime_figure(view: Image.Image, exp: Explanation, label: Callable[[int], str], top: int = 2,
                num_features: int = 5, index: int = 0) -> Figure:
    """The input with its superpixels, the superpixels supporting each of the ``top`` most probable classes (their
    ``num_features`` largest positive LIME weights), and those speaking against the top-1 class (most negative)."""
    seg = exp.extras["segments"][index].cpu().numpy()
    cw = exp.extras["class_weights"][index].cpu().numpy()  # [C, S]
    probs = exp.probs[index].cpu().numpy() if exp.probs is not None else cw.sum(1)
    classes = np.argsort(-probs)[: max(1, min(top, len(probs)))]
    rgb = _rgb(view, seg.shape)
    panels = []
    edges = rgb.copy()
    edges[boundaries(seg)] = (1.0, 1.0, 0.0)
    panels.append((f"input, {int(seg.max()) + 1} superpixels ({exp.params.get('segmentation', '')})", edges))
    for rank, c in enumerate(classes, 1):
        chosen = _chosen(cw[c, : int(seg.max()) + 1], True, num_features)
        panels.append((f"top-{rank} '{_short(label(int(c)))}' ({percent(probs[c])}): {len(chosen)} supporting "
                       f"superpixels", region_image(rgb, seg, chosen, None, (0.0, 1.0, 0.0))))
    c0 = int(classes[0])
    neg = _chosen(cw[c0, : int(seg.max()) + 1], False, num_features)
    panels.append((f"against '{_short(label(c0))}': {len(neg)} superpixels with negative weight",
                   region_image(rgb, seg, neg, (1.0, 0.0, 0.0), (1.0, 0.0, 0.0))))
    n = len(panels)
    fig = new_figure(PANEL * n + 0.4, PANEL + 0.9)
    axes = np.atleast_1d(fig.subplots(1, n)).ravel()
    for ax, (title, img) in zip(axes, panels):
        ax.imshow(img)
        ax.set_title(_wrap(title, 34), fontsize=9)
        ax.set_axis_off()
    p = exp.params
    score = float(exp.extras["score"][index]) if "score" in exp.extras else float("nan")
    fig.suptitle(f"LIME: {p.get('num_samples')} samples, hide={p.get('hide')}, seed {p.get('seed')}; "
                 f"surrogate R\u00b2 {score:.2f} for the explained class", fontsize=10)
    return fig


def whatif_figure(result, title: str = "What-if edits") -> Figure:
    """The original and each edited image, titled with its edit and its top-k classes."""
    rows = result.rows
    n = len(rows)
    ncols = min(n, MAX_COLUMNS)
    nrows = math.ceil(n / ncols)
    k = max(len(r.top) for r in rows)
    fig = new_figure(PANEL * ncols + 0.4, (PANEL + 0.35 + 0.17 * (k + 1)) * nrows + 0.4)
    axes = np.atleast_1d(fig.subplots(nrows, ncols)).ravel()
    for ax, r in zip(axes, rows):
        ax.imshow(r.image)
        lines = [r.name + (f": {r.edit}" if r.edit else "")]
        lines += [f"{i}. {_short(lbl, 22)} {percent(p)}" for i, (lbl, p) in enumerate(r.top, 1)]
        ax.set_title("\n".join(lines), fontsize=8, loc="left")
        ax.set_axis_off()
    for ax in axes[n:]:
        ax.set_axis_off()
    fig.suptitle(title, fontsize=11)
    return fig
