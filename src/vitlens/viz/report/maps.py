"""The precomputed maps of a report: class-specific methods for each of the top-k classes (grad rollout, any
registered method by name, LIME), class-agnostic methods once."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from vitlens.errors import VitlensError
from vitlens.explanation import max_normalize
from vitlens.models.base import VitModel

LIVE = ("rollout", "attention")  # computed in the page from the embedded attention
CLASS_MARK = "\x01"


@dataclass
class MethodMaps:
    """One method's maps: per class index (or the key None for a class-agnostic method) a float32 map."""

    name: str
    title: str
    class_specific: bool
    maps: dict[int | None, np.ndarray] = field(default_factory=dict)


def check_method_names(names: Sequence[str], model: VitModel) -> tuple[list[str], list[str]]:
    """The methods to precompute (registered names, in order, without duplicates) and notes about the ones left
    out; unknown names fail with the list of known ones."""
    from vitlens.methods import METHODS

    keep, notes = [], []
    for n in names:
        n = n.strip()
        if not n or n in keep:
            continue
        if n not in METHODS:
            raise VitlensError(f"unknown method {n!r} for the report; use one of {', '.join(sorted(METHODS))}")
        cls = METHODS[n]
        if n in LIVE:
            notes.append(f"note: {n} is computed in the page itself; no need to list it")
        elif not cls.applies_to(model):
            notes.append(f"note: {n} does not apply to {type(model.module).__name__}; left out")
        elif cls.class_specific and not model.has_head:
            notes.append(f"note: {n} needs a classification head; left out")
        else:
            keep.append(n)
    return keep, notes


def method_maps(model: VitModel, x: torch.Tensor, name: str, classes: Sequence[int],
                options: dict[str, Any] | None = None) -> MethodMaps:
    """Maps of the registered method ``name`` on ``x`` [1, 3, H, W]: one per class of ``classes`` when it is
    class-specific (one batch holding the image once per class), else one. LIME fits every class at once, so it
    runs once and each class's map is painted from its own weights as `Lime` paints the target's."""
    from vitlens.methods import METHODS

    cls = METHODS[name]
    method = cls(model, **(options or {}))
    # the page puts the class's label where CLASS_MARK stands
    title = cls.title(getattr(method, "params", {}), CLASS_MARK if cls.class_specific else None)
    out = MethodMaps(name, title, cls.class_specific)
    if not cls.class_specific:
        out.maps[None] = _as_map(method.explain(x).maps[0])
        return out
    if name == "lime":
        exp = method.explain(x, target=classes[0])
        weights, segs = exp.extras["class_weights"][0], exp.extras["segments"][0]
        for c in classes:
            painted = weights[c][segs].clamp_min(0).float()
            out.maps[c] = _as_map(max_normalize(painted[None])[0])
        return out
    # one batch: the image once per class, each with its own target (samples of a batch do not interact)
    maps = method.explain(x.expand(len(classes), *x.shape[1:]), target=list(classes)).maps
    for c, m in zip(classes, maps):
        out.maps[c] = _as_map(m)
    return out


def _as_map(m: torch.Tensor) -> np.ndarray:
    arr = m.detach().float().cpu().numpy()
    if arr.ndim != 2:
        raise VitlensError(f"a method returned a map of shape {arr.shape}; the report shows 2-D maps")
    return np.nan_to_num(arr, nan=0.0, posinf=0.0, neginf=0.0).astype(np.float32)


def quantise_map(m: np.ndarray) -> tuple[float, float, np.ndarray]:
    """(low, step, uint16 codes) with value = low + code * step (error at most step / 2)."""
    lo, hi = float(m.min()), float(m.max())
    step = (hi - lo) / 65535 if hi > lo else 1.0
    codes = np.clip(np.rint((m - lo) / step), 0, 65535).astype(np.uint16)
    return lo, step, codes
