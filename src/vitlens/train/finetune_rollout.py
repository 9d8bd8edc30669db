"""Does fine-tuning move the rollout? Attention rollout of the same classifier before its first step and after
training, on the same held-out images: maps, their per-image correlation, and a side-by-side figure."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch import nn


@torch.no_grad()
def rollout_maps(module: nn.Module, x: torch.Tensor, batch: int = 32) -> np.ndarray:
    """Attention rollout maps [B, gh, gw] (vitlens defaults, max-normalised) of a classifier on inputs ``x``."""
    from vitlens.methods.rollout import Rollout
    from vitlens.models.loading import wrap

    was_training = module.training
    model = wrap(module)
    try:
        maps = [Rollout(model).explain(x[k: k + batch]).maps.float().cpu().numpy() for k in range(0, len(x), batch)]
    finally:
        module.train(was_training)
    return np.concatenate(maps)


def map_correlation(before: np.ndarray, after: np.ndarray) -> list[float]:
    """Pearson correlation of each image's before and after map (NaN where a map is constant)."""
    out = []
    for a, b in zip(before, after, strict=True):
        a, b = a.ravel() - a.mean(), b.ravel() - b.mean()
        den = float(np.sqrt((a * a).sum() * (b * b).sum()))
        out.append(float((a * b).sum() / den) if den > 0 else float("nan"))
    return out


def rollout_figure(images: Sequence[np.ndarray], before: np.ndarray, after: np.ndarray, title: str,
                   captions: Sequence[str] = ()) -> Any:
    """Rows of (image, rollout before, rollout after) overlays."""
    from vitlens.viz.figures import new_figure
    from vitlens.viz.overlay import overlay

    n = len(images)
    fig = new_figure(6.6, 2.1 * n + 0.5)
    corr = map_correlation(before, after)
    for i, img in enumerate(images):
        view = Image.fromarray(img).resize((168, 168), Image.Resampling.NEAREST)
        panels = [(view, captions[i] if i < len(captions) else "held-out image"),
                  (overlay(view, before[i]), "rollout before"),
                  (overlay(view, after[i]), f"after (r = {corr[i]:.2f})")]
        for j, (pic, text) in enumerate(panels):
            ax = fig.add_subplot(n, 3, 3 * i + j + 1)
            ax.imshow(pic)
            ax.set_title(text, fontsize=9)
            ax.set_axis_off()
    fig.suptitle(title, fontsize=10)
    return fig
