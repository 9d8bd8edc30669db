"""Figures built from explanations: each function runs a method on one view and draws the seed report's figures."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from matplotlib.figure import Figure
from PIL import Image

from vitlens.errors import VitlensError
from vitlens.explanation import Explanation
from vitlens.methods import METHODS, AttentionMaps, GradRollout, Rollout
from vitlens.methods.attention import Query, parse_query, query_text
from vitlens.models.base import VitModel, label_of, top_labels
from vitlens.viz.figures import compare_figure, explain_figure, heads_figure, layers_figure, percent


def describe(exp: Explanation, model: Any, index: int = 0) -> str:
    """A one-line title saying what a map shows: method, class (for class-specific maps) and options."""
    target_text = None
    if exp.target is not None:
        t = int(exp.target[index])
        prob = f", {percent(float(exp.probs[index, t]))}" if exp.probs is not None else ""
        target_text = f"'{label_of(model, t)}' (class {t}{prob})"
    method = METHODS.get(exp.method)
    return method.title(exp.params, target_text) if method is not None else exp.method


def top_predictions(model: Any, probs: torch.Tensor | np.ndarray | None, k: int = 5) -> list[tuple[str, float]]:
    """The ``k`` most probable (label, probability) pairs of one sample, or [] without a head."""
    if probs is None or not model.has_head:
        return []
    return top_labels(model, torch.as_tensor(probs), k)


def check_finite(values: np.ndarray | torch.Tensor, what: str) -> None:
    """Refuse to draw or save a map holding NaN or inf (one line naming what produced it)."""
    if not bool(np.isfinite(np.asarray(values, dtype=np.float64)).all()):
        raise VitlensError(f"{what} contains NaN or inf values (check the model's preprocessing and the options); "
                           "nothing was written")


def explain_plot(model: Any, view: Image.Image, exp: Explanation, index: int = 0) -> Figure:
    """Image | overlay | top-5 predictions (when the model has a head) for row ``index`` of ``exp``."""
    probs = None if exp.probs is None else exp.probs[index]
    top = top_predictions(model, probs)
    target = None if exp.target is None else int(exp.target[index])
    highlight = label_of(model, target) if target is not None else None
    m = exp.numpy()[index]
    check_finite(m, f"the {exp.method} map")
    return explain_figure(view, m, describe(exp, model, index), top or None, highlight)


def heads_plot(model: VitModel, view: Image.Image, query: str | Query = "cls") -> Figure:
    """The blocks x heads grid of raw attention maps for ``query`` ('cls', 'mean' or 'R,C')."""
    q = parse_query(query) if isinstance(query, str) else query
    exp = AttentionMaps(model, query=q).explain(model.preprocess.tensor(view)[None])
    return heads_figure(view, exp.extras["per_head"][0], query_text(q), q if isinstance(q, tuple) else None)


def swin_plot(model: VitModel, view: Image.Image, stage: int, block: int, patch: str = "per-window") -> Figure:
    """Swin per-patch view: ``patch`` is 'R,C' in the stage's token grid or 'per-window' (each window's centre)."""
    from vitlens.viz.figures import swin_figure
    from vitlens.viz.swin_view import swin_patch_view

    choice: Any = "per-window"
    if patch.strip().lower() != "per-window":
        q = parse_query(patch)
        if not isinstance(q, tuple):
            raise VitlensError(f"--patch must be ROW,COL or per-window; got {patch!r}")
        choice = q
    v = swin_patch_view(model, model.preprocess.tensor(view)[None], stage, block, choice)
    gh, gw = v.window_id.shape
    which = f"patch {choice}" if isinstance(choice, tuple) else "each window's centre patch"
    title = (f"Swin stage {stage}, block {block} (model block {v.block}; {gh}x{gw} tokens, shift {v.shift[0]}): "
             f"attention of {which}")
    return swin_figure(view, v.maps[0], v.window_id, v.patches, title)


def layers_plot(model: VitModel, view: Image.Image, **options: Any) -> Figure:
    """The input, then the rollout after every block (``options`` as `Rollout` takes them)."""
    exp = Rollout(model, per_layer=True, **options).explain(model.preprocess.tensor(view)[None])
    title = "Attention rollout after every block: " + describe(exp, model).split("; ", 1)[1]
    return layers_figure(view, exp.extras["per_layer"][0], exp.extras["per_layer_blocks"].tolist(), title)


def compare_plot(model: VitModel, view: Image.Image, target: int | None = None, discard_ratio: float = 0.9,
                 **options: Any) -> tuple[Figure, list[str]]:
    """The input beside rollout with mean, max and min head fusion and (with a head) grad rollout, all with
    ``discard_ratio`` and the other rollout ``options``; returns the figure and notes (e.g. grad rollout left out
    for a backbone)."""
    x = model.preprocess.tensor(view)[None]
    panels, notes = [], []
    for fusion in ("mean", "max", "min"):
        exp = Rollout(model, head_fusion=fusion, discard_ratio=discard_ratio, **options).explain(x)
        panels.append((describe(exp, model), exp.numpy()[0]))
    if model.has_head:
        exp = GradRollout(model, discard_ratio=discard_ratio, **options).explain(x, target)
        panels.append((describe(exp, model), exp.numpy()[0]))
    else:
        notes.append("note: the model has no classification head, so the grad rollout panel is left out")
    for caption, m in panels:
        check_finite(m, caption)
    top = top_predictions(model, exp.probs[0] if exp.probs is not None else None, k=1)
    title = "Rollout variants" + (f" (top prediction: {top[0][0]}, {percent(top[0][1])})" if top else "")
    return compare_figure(view, panels, title), notes


def methods_plot(model: VitModel, view: Image.Image, methods: Sequence[Any], target: int | None = None
                 ) -> tuple[Figure, list[str]]:
    """The input beside the map of each method (built methods, in order); class-specific ones explain ``target``
    (default: the top-1 class). Returns the figure and notes."""
    x = model.preprocess.tensor(view)[None]
    panels = []
    exp = None
    for method in methods:
        exp = method.explain(x, target=target if method.class_specific else None)
        m = exp.numpy()[0]
        check_finite(m, f"the {exp.method} map")
        panels.append((describe(exp, model), m))
    top = top_predictions(model, exp.probs[0] if exp is not None and exp.probs is not None else None, k=1)
    title = "Methods side by side" + (f" (top prediction: {top[0][0]}, {percent(top[0][1])})" if top else "")
    return compare_figure(view, panels, title), []


def grad_top_plot(model: VitModel, view: Image.Image, k: int = 3, discard_ratio: float = 0.0,
                  classes: Sequence[int] | None = None) -> Figure:
    """The input beside grad rollout for each of ``classes`` (default: the model's ``k`` most probable classes)."""
    x = model.preprocess.tensor(view)[None]
    if classes is None:
        with torch.no_grad():
            probs = model.probabilities(model(x))[0]
        classes = probs.topk(min(k, probs.numel())).indices.tolist()
        title = f"Gradient rollout for the top {len(classes)} classes"
    else:
        title = "Gradient rollout for each object's class"
    targets = torch.as_tensor(list(classes))
    exp = GradRollout(model, discard_ratio=discard_ratio).explain(x.expand(len(targets), *x.shape[1:]), target=targets)
    panels = [(describe(exp, model, i), exp.numpy()[i]) for i in range(len(targets))]
    return compare_figure(view, panels, title)
