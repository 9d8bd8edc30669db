"""Running the metrics over a data set: rows (image x target class), maps of every explainer, batched scores, and
the resumable CSV.

Rows per image: target 'pred' (the model's top-1 class; localised against the objects of that class, or against all
objects when the data has no classes) and target 'gt', one row per ground-truth class (multi-label models score each
class present), localised against that class's objects.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from vitlens.errors import VitlensError
from vitlens.eval.data import Sample
from vitlens.eval.explainers import Explainer
from vitlens.eval.metrics import Batch, Metric
from vitlens.eval.store import KEY_COLUMNS, ResumableCSV

TARGET_KINDS = ("pred", "gt")


@dataclass
class Row:
    """One (image, target class) pair of a batch."""

    local: int  # index of the image in the batch
    kind: str
    cls: int
    mask: np.ndarray | None


def rows_of(sample: Sample, predicted: int, kinds: Sequence[str]) -> list[Row]:
    """The rows of one image (see the module docstring)."""
    out: list[Row] = []
    classes = sorted({c for c, _ in sample.objects if c is not None})

    def union(cls: int | None) -> np.ndarray | None:
        ms = [m for c, m in sample.objects if cls is None or c == cls]
        return np.logical_or.reduce(ms) if ms else None

    if "pred" in kinds:
        out.append(Row(0, "pred", predicted, union(predicted) if classes else union(None)))
    if "gt" in kinds:
        out += [Row(0, "gt", c, union(c)) for c in classes]
    return out


def header(metrics: Sequence[Metric]) -> list[str]:
    """The CSV header: key columns, then every metric's columns."""
    return [*KEY_COLUMNS, *(c.name for m in metrics for c in m.columns)]


def score_batch(model: Any, samples: Sequence[Sample], ids: Sequence[int], explainers: Sequence[Explainer],
                metrics: Sequence[Metric], kinds: Sequence[str] = TARGET_KINDS) -> list[dict]:
    """CSV rows (dicts) of one batch of images: for every explainer and row, every metric's columns."""
    pre = model.preprocess
    device = model.device
    x = torch.stack([pre.tensor(s.view) for s in samples]).to(device)
    with torch.no_grad():
        clean = model(x).float()
    predicted = clean.argmax(-1).tolist()
    rows: list[Row] = []
    for i, (s, p) in enumerate(zip(samples, predicted)):
        for r in rows_of(s, p, kinds):
            r.local = i
            rows.append(r)
    if not rows:
        return []
    local = torch.tensor([r.local for r in rows], device=device)
    xr = x[local]
    target = torch.tensor([r.cls for r in rows], device=device)
    row_ids = torch.tensor([ids[r.local] for r in rows])
    has_mask = torch.tensor([r.mask is not None for r in rows], device=device)
    masks = None
    if any(m.needs_masks for m in metrics):
        h, w = x.shape[-2:]
        masks = torch.from_numpy(np.stack([r.mask if r.mask is not None else np.zeros((h, w), bool) for r in rows]))
        masks = masks.to(device)
    per_image = {i: sum(1 for r in rows if r.local == i) for i in range(len(samples))}
    out: list[dict] = []
    for ex in explainers:
        # rows with the same image (and, for a class-specific method, the same class) share map and perturbations
        keys = [(r.local, r.cls if ex.class_specific else -1) for r in rows]
        uniq = sorted(set(keys))
        groups = torch.tensor([uniq.index(k) for k in keys], device=device)
        u_local = torch.tensor([k[0] for k in uniq], device=device)
        u_target = torch.tensor([k[1] for k in uniq], device=device) if ex.class_specific else clean.argmax(-1)[u_local]
        u_ids = torch.tensor([ids[k[0]] for k in uniq])
        maps = ex(model, x[u_local], u_target, u_ids)[groups]
        batch = Batch(model, xr, target, maps, clean[local], masks, has_mask, explain=_reexplain(ex, row_ids),
                      multi_label=bool(getattr(model, "multi_label", False)), groups=groups)
        cols: dict[str, torch.Tensor] = {}
        for m in metrics:
            if m.needs_masks and masks is None:
                continue
            cols.update(m(batch))
        values = {k: v.detach().float().cpu().tolist() for k, v in cols.items()}
        for j, r in enumerate(rows):
            out.append({"image": ids[r.local], "name": samples[r.local].name,
                        "rows": per_image[r.local] * len(explainers), "method": ex.name, "target": r.kind,
                        "class": r.cls, "predicted": predicted[r.local],
                        **{k: v[j] for k, v in values.items()}})
    out.sort(key=lambda d: (d["image"], [e.name for e in explainers].index(d["method"])))
    return out


def _reexplain(ex: Explainer, row_ids: torch.Tensor) -> Callable[..., torch.Tensor]:
    return lambda m, x, t, rows: ex(m, x, t, row_ids[rows.cpu()])


def evaluate(model: Any, samples: Sequence[Sample], explainers: Sequence[Explainer], metrics: Sequence[Metric],
             store: ResumableCSV, batch_size: int = 16, kinds: Sequence[str] = TARGET_KINDS, progress: bool = True,
             after_batch: Callable[[int], None] | None = None) -> int:
    """Score every sample not yet in ``store.done``, ``batch_size`` images at a time, appending each batch's rows;
    returns the number of images scored now. ``after_batch(k)`` is called after the k-th batch is written."""
    from tqdm.auto import tqdm

    if batch_size < 1:
        raise VitlensError(f"--batch-size must be at least 1, got {batch_size}")
    todo = [i for i in range(len(samples)) if i not in store.done]
    bar = tqdm(total=len(samples), initial=len(samples) - len(todo), desc="evaluate", unit="image",
               disable=not progress, file=sys.stderr, dynamic_ncols=True)
    try:
        for k, s in enumerate(range(0, len(todo), batch_size)):
            chunk = todo[s : s + batch_size]
            rows = score_batch(model, [samples[i] for i in chunk], chunk, explainers, metrics, kinds)
            store.append(rows)
            bar.update(len(chunk))
            if after_batch is not None:
                after_batch(k + 1)
    finally:
        bar.close()
    return len(todo)
