"""Small numeric pieces of the metrics: patch orders, keep masks, trapezoid AUC, average precision, rank correlation."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch


def relevance_order(maps: torch.Tensor) -> torch.Tensor:
    """Patch indices [R, N] from the most to the least relevant (ties: lower index first)."""
    return torch.argsort(maps.flatten(1), dim=1, descending=True, stable=True)


def keep_mask(order: torch.Tensor, count: int, grid: tuple[int, int], first: bool, keep_them: bool) -> torch.Tensor:
    """bool [R, gh, gw]: the ``count`` patches at the head (``first``) or tail of ``order`` are kept (``keep_them``)
    and every other patch removed, or removed and every other patch kept."""
    r, n = order.shape
    chosen = order[:, :count] if first else order[:, n - count :]
    mask = torch.full((r, n), not keep_them, dtype=torch.bool, device=order.device)
    mask.scatter_(1, chosen, keep_them)
    return mask.view(r, *grid)


def counts(fractions: Sequence[float], n: int) -> list[int]:
    """Patches per step: round(fraction * n)."""
    return [int(round(f * n)) for f in fractions]


def trapezoid(y: torch.Tensor, x: Sequence[float]) -> torch.Tensor:
    """Trapezoid-rule area under y [..., S] over the S points x."""
    xs = torch.as_tensor(list(x), dtype=y.dtype, device=y.device)
    return ((y[..., 1:] + y[..., :-1]) * (xs[1:] - xs[:-1]) / 2).sum(-1)


def average_precision(scores: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Average precision per row (as scikit-learn's ``average_precision_score``: the sum over distinct thresholds of
    (recall step) x precision), scores [R, P] float, labels [R, P] bool; NaN for a row without positives."""
    s, idx = torch.sort(scores.double(), dim=1, descending=True, stable=True)
    y = labels.gather(1, idx).double()
    tp = y.cumsum(1)
    seen = torch.arange(1, y.shape[1] + 1, device=y.device, dtype=y.dtype).expand_as(y)
    last = torch.ones_like(y, dtype=torch.bool)
    last[:, :-1] = s[:, 1:] != s[:, :-1]  # the last position of each run of equal scores is a threshold
    tp_at = torch.where(last, tp, torch.zeros_like(tp))
    before = torch.cummax(tp_at, 1).values
    before = torch.cat([torch.zeros_like(before[:, :1]), before[:, :-1]], 1)  # tp at the previous threshold
    positives = tp[:, -1:]
    gain = torch.where(last, (tp - before) / positives * (tp / seen), torch.zeros_like(tp))
    ap = gain.sum(1)
    return torch.where(positives[:, 0] > 0, ap, torch.full_like(ap, float("nan"))).float()


def spearman(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Spearman rank correlation per row of a, b [R, P] (average ranks for ties). A row constant in both is 1 when
    the rows are equal (the map ignores the model), 0 when only one of them is constant."""
    from scipy.stats import rankdata

    an = a.detach().double().cpu().numpy()
    bn = b.detach().double().cpu().numpy()
    ra = rankdata(an, axis=1)
    rb = rankdata(bn, axis=1)
    ra -= ra.mean(1, keepdims=True)
    rb -= rb.mean(1, keepdims=True)
    den = np.sqrt((ra**2).sum(1) * (rb**2).sum(1))
    with np.errstate(invalid="ignore", divide="ignore"):
        rho = (ra * rb).sum(1) / den
    const = den == 0
    rho[const] = np.where(np.all(an == bn, axis=1), 1.0, 0.0)[const]
    return torch.from_numpy(rho).float()
