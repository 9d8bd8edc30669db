"""Metrics of explanations, each a small class that declares its direction and scores a whole batch at once.

A metric is called with a `Batch` (the rows' images, target classes, maps, the model's clean logits and, where
known, ground-truth masks) and returns one value per row for each of its `Column`s. Summary columns go into the
tables; curve columns (one per step) into the CSV and the plots.

- `Perturbation` (Chefer et al., CVPR 2021): remove the most ("positive") or least ("negative") relevant 10%..90% of
  the patches; top-1 accuracy and probability of the target at each step; AUC = 100 * trapezoid over the fractions
  with the unperturbed value at 0 (their issue #31). Positive: lower is better; negative: higher is better.
- `Deletion` / `Insertion` (Petsiuk et al., RISE, BMVC 2018): the target's probability as the most relevant patches
  are removed from the image / added to the removed image, AUC by trapezoid over the fraction in [0, 1].
- `PointingGame`, `Energy`, `Segmentation` (Chefer et al.'s protocol): localisation against masks.
- `Sanity` (Adebayo et al., NeurIPS 2018): Spearman correlation between the maps of the model and of the model with
  its top k blocks re-initialised; lower is better (a map that does not change does not depend on the weights).

Accuracy on a single-label head: the target is still the arg max; on a multi-label head (sigmoid): the target's
probability is still above 0.5.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
import torch.nn.functional as F

from vitlens.errors import VitlensError
from vitlens.eval.curves import average_precision, counts, keep_mask, relevance_order, spearman, trapezoid
from vitlens.eval.localisation import DEFAULT_MIN_COVER, pointing_hits
from vitlens.eval.removal import FORWARD_BATCH, Remover

CHEFER_FRACTIONS = tuple(round(0.1 * k, 1) for k in range(10))  # 0 (unperturbed), 0.1, ..., 0.9
RISE_STEPS = 10  # steps of 10%: deletion shares positive perturbation's forwards, insertion negative's

# (model, x [R', 3, H, W], target [R'], rows [R'] (which rows of the batch these are)) -> maps [R', gh, gw]
Explain = Callable[[Any, torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


@dataclass(frozen=True)
class Column:
    """One output column: its name, whether higher is better, and whether it is a summary score (tables)."""

    name: str
    higher_is_better: bool
    summary: bool = True


@dataclass
class Batch:
    """What a metric sees: R rows (an image with one target class each).

    ``maps`` [R, gh, gw]; ``clean_logits`` [R, C] of the unperturbed images; ``masks`` bool [R, H, W] with
    ``has_mask`` [R] (rows without ground truth get NaN from localisation metrics); ``explain`` recomputes maps on
    another model (sanity)."""

    model: Any
    x: torch.Tensor
    target: torch.Tensor
    maps: torch.Tensor
    clean_logits: torch.Tensor
    masks: torch.Tensor | None = None
    has_mask: torch.Tensor | None = None
    explain: Explain | None = None
    multi_label: bool = False
    groups: torch.Tensor | None = None
    extra: dict = field(default_factory=dict)

    def removal_logits(self, specs: Sequence[tuple[str, int]], baseline: str,
                       forward_batch: int = FORWARD_BATCH) -> torch.Tensor:
        """Logits [S, R, C] with, per step, the ``k`` most ('top') or least ('bottom') relevant patches removed.

        Rows of one ``groups`` id share image and map, so each group is perturbed once; a step already scored for
        this batch and baseline (positive perturbation and deletion share steps, negative perturbation and insertion
        too) is not run again; removing nothing reuses the clean logits."""
        maps = self.maps.float()
        grid = _grid(maps)
        n = grid[0] * grid[1]
        r = maps.shape[0]
        groups = self.groups if self.groups is not None else torch.arange(r)
        groups = groups.to(maps.device)
        first = torch.full((int(groups.max()) + 1,), r, dtype=torch.long, device=maps.device)
        first = first.scatter_reduce(0, groups, torch.arange(r, device=maps.device), "amin")
        if "order" not in self.extra:
            self.extra["order"] = relevance_order(maps[first])
        order = self.extra["order"]
        cache = self.extra.setdefault(("logits", baseline), {})

        def key(side: str, k: int) -> tuple[str, int]:
            return ("all", n) if k >= n else (side, k)

        todo = sorted({key(sd, k) for sd, k in specs if k > 0 and key(sd, k) not in cache})
        if todo:
            keeps = [keep_mask(order, k, grid, first=sd != "bottom", keep_them=False) for sd, k in todo]
            out = Remover(self.model, baseline, forward_batch).logits(self.x[first], keeps)
            cache.update({t: out[i] for i, t in enumerate(todo)})
        clean = self.clean_logits.float()
        steps = [clean if k <= 0 else cache[key(sd, k)][groups] for sd, k in specs]
        return torch.stack(steps)


class Metric:
    """Base class: ``name``, ``higher_is_better`` of the main score, ``columns`` and ``needs_masks``."""

    name: ClassVar[str] = "metric"
    higher_is_better: ClassVar[bool] = True
    needs_masks: ClassVar[bool] = False
    needs_explain: ClassVar[bool] = False

    @property
    def columns(self) -> tuple[Column, ...]:
        """Every column this metric writes."""
        return (Column(self.name, self.higher_is_better),)

    def curves(self) -> list[tuple[str, list[float], list[str]]]:
        """(title, x values, column per x) of the curves to plot; none by default."""
        return []

    def __call__(self, batch: Batch) -> dict[str, torch.Tensor]:
        """One value per row for each column."""
        raise NotImplementedError


def target_scores(logits: torch.Tensor, target: torch.Tensor, multi_label: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """(top-1 accuracy, probability) of ``target`` [R] under ``logits`` [..., R, C], each [..., R]."""
    t = target.expand(*logits.shape[:-1])[..., None]
    logit = logits.gather(-1, t)[..., 0]
    if multi_label:
        return (logit > 0).float(), logit.sigmoid()
    return (logits.argmax(-1) == t[..., 0]).float(), logits.softmax(-1).gather(-1, t)[..., 0]


def _grid(maps: torch.Tensor) -> tuple[int, int]:
    return int(maps.shape[1]), int(maps.shape[2])


class _Curve(Metric):
    """Shared machinery: the target's scores at each step's removal (see `Batch.removal_logits`)."""

    fractions: tuple[float, ...] = ()

    def __init__(self, baseline: str = "zero", forward_batch: int = FORWARD_BATCH) -> None:
        self.baseline = baseline
        self.forward_batch = forward_batch

    def specs(self, n: int) -> list[tuple[str, int]]:
        """(side, patches removed) per step for an n-patch grid."""
        raise NotImplementedError

    def step_scores(self, batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
        """(accuracy, probability) [R, S] at every step."""
        n = batch.maps.shape[1] * batch.maps.shape[2]
        logits = batch.removal_logits(self.specs(n), self.baseline, self.forward_batch)
        acc, prob = target_scores(logits, batch.target, batch.multi_label)
        return acc.T, prob.T


class Perturbation(_Curve):
    """Chefer et al.'s positive (remove the most relevant first) or negative (least relevant first) perturbation."""

    fractions = CHEFER_FRACTIONS

    def __init__(self, order: str = "positive", baseline: str = "zero", forward_batch: int = FORWARD_BATCH) -> None:
        if order not in ("positive", "negative"):
            raise VitlensError(f"perturbation order must be positive or negative, got {order!r}")
        super().__init__(baseline, forward_batch)
        self.order = order

    @property
    def name(self) -> str:  # type: ignore[override]
        return self.order

    @property
    def higher_is_better(self) -> bool:  # type: ignore[override]
        return self.order == "negative"

    @property
    def columns(self) -> tuple[Column, ...]:
        hib = self.higher_is_better
        p = self.order[:3]
        steps = [Column(f"{p}_{what}@{round(100 * f)}", hib, False) for what in ("acc", "prob") for f in self.fractions]
        return (Column(f"{p}_acc_auc", hib), Column(f"{p}_prob_auc", hib), *steps)

    def curves(self) -> list[tuple[str, list[float], list[str]]]:
        p = self.order[:3]
        xs = [100 * f for f in self.fractions]
        return [(f"{self.order} perturbation: top-1 accuracy", xs, [f"{p}_acc@{round(x)}" for x in xs]),
                (f"{self.order} perturbation: probability", xs, [f"{p}_prob@{round(x)}" for x in xs])]

    def specs(self, n: int) -> list[tuple[str, int]]:
        side = "top" if self.order == "positive" else "bottom"
        return [(side, k) for k in counts(self.fractions, n)]

    def __call__(self, batch: Batch) -> dict[str, torch.Tensor]:
        acc, prob = self.step_scores(batch)
        p = self.order[:3]
        out = {f"{p}_acc_auc": 100 * trapezoid(acc, self.fractions),
               f"{p}_prob_auc": 100 * trapezoid(prob, self.fractions)}
        for j, f in enumerate(self.fractions):
            out[f"{p}_acc@{round(100 * f)}"] = acc[:, j]
            out[f"{p}_prob@{round(100 * f)}"] = prob[:, j]
        return out


class _Rise(_Curve):
    short: ClassVar[str] = ""
    insert: ClassVar[bool] = False

    def __init__(self, steps: int = RISE_STEPS, baseline: str = "zero", forward_batch: int = FORWARD_BATCH) -> None:
        if not isinstance(steps, int) or steps < 1:
            raise VitlensError(f"deletion/insertion steps must be a positive whole number, got {steps!r}")
        super().__init__(baseline, forward_batch)
        self.fractions = tuple(k / steps for k in range(steps + 1))

    @property
    def columns(self) -> tuple[Column, ...]:
        s = self.short
        return (Column(f"{s}_auc", self.higher_is_better),
                *(Column(f"{s}_prob@{j}", self.higher_is_better, False) for j in range(len(self.fractions))))

    def curves(self) -> list[tuple[str, list[float], list[str]]]:
        xs = [100 * f for f in self.fractions]
        return [(f"{self.name}: probability", xs, [f"{self.short}_prob@{j}" for j in range(len(xs))])]

    def specs(self, n: int) -> list[tuple[str, int]]:
        if self.insert:  # keeping the k most relevant = removing the n - k least relevant
            return [("bottom", n - k) for k in counts(self.fractions, n)]
        return [("top", k) for k in counts(self.fractions, n)]

    def __call__(self, batch: Batch) -> dict[str, torch.Tensor]:
        _, prob = self.step_scores(batch)
        out = {f"{self.short}_auc": trapezoid(prob, self.fractions)}
        out.update({f"{self.short}_prob@{j}": prob[:, j] for j in range(len(self.fractions))})
        return out


class Deletion(_Rise):
    """RISE deletion: remove the most relevant patches first; AUC of the probability over [0, 1] (lower is better)."""

    name = "deletion"
    short = "del"
    higher_is_better = False
    insert = False


class Insertion(_Rise):
    """RISE insertion: start from the fully removed image (the baseline) and put back the most relevant patches
    first; AUC of the probability over [0, 1] (higher is better)."""

    name = "insertion"
    short = "ins"
    higher_is_better = True
    insert = True


def _upsample(maps: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    return F.interpolate(maps[:, None].float(), size=size, mode="bilinear", align_corners=False)[:, 0]


def _masked(values: torch.Tensor, batch: Batch) -> torch.Tensor:
    assert batch.has_mask is not None
    return torch.where(batch.has_mask.to(values.device), values.float(), torch.full_like(values.float(), float("nan")))


class PointingGame(Metric):
    """Hit (1) when the cell holding the map's maximum is covered at least ``min_cover`` by the mask; on ties, the
    share of the tied maxima that are (`pointing_hits`: the expected hit with ties broken at random)."""

    name = "pointing"
    higher_is_better = True
    needs_masks = True

    def __init__(self, min_cover: float = DEFAULT_MIN_COVER) -> None:
        self.min_cover = min_cover

    def __call__(self, batch: Batch) -> dict[str, torch.Tensor]:
        assert batch.masks is not None
        hit = pointing_hits(batch.maps, batch.masks, self.min_cover)
        return {self.name: _masked(hit, batch)}


class Energy(Metric):
    """Share of the map's positive mass (bilinearly upsampled to the image) that lies inside the mask."""

    name = "energy"
    higher_is_better = True
    needs_masks = True

    def __call__(self, batch: Batch) -> dict[str, torch.Tensor]:
        assert batch.masks is not None
        up = _upsample(batch.maps, (batch.masks.shape[-2], batch.masks.shape[-1])).clamp_min(0)
        total = up.flatten(1).sum(1)
        inside = (up * batch.masks.to(up.device)).flatten(1).sum(1)
        e = torch.where(total > 0, inside / total.clamp_min(1e-30), torch.zeros_like(total))
        return {self.name: _masked(e, batch)}


class Segmentation(Metric):
    """Chefer et al.'s segmentation test: the map upsampled to the image (bilinear) and min-max scaled; foreground
    where it exceeds its mean. Pixel accuracy, mIoU (mean of the foreground and background IoU of the image) and AP
    (average precision of the scaled map for the foreground and of 1 - map for the background, pooled, as their
    ``get_ap_scores``). Per image, then averaged over images."""

    name = "segmentation"
    higher_is_better = True
    needs_masks = True

    @property
    def columns(self) -> tuple[Column, ...]:
        return (Column("pix_acc", True), Column("miou", True), Column("seg_ap", True))

    def __call__(self, batch: Batch) -> dict[str, torch.Tensor]:
        assert batch.masks is not None
        gt = batch.masks.to(batch.maps.device).flatten(1)
        up = _upsample(batch.maps, (batch.masks.shape[-2], batch.masks.shape[-1])).flatten(1)
        lo, hi = up.amin(1, keepdim=True), up.amax(1, keepdim=True)
        s = torch.where(hi > lo, (up - lo) / (hi - lo).clamp_min(1e-30), torch.zeros_like(up))
        pred = s > s.mean(1, keepdim=True)
        acc = (pred == gt).float().mean(1)
        ious = []
        for p, g in ((pred, gt), (~pred, ~gt)):
            inter = (p & g).float().sum(1)
            union = (p | g).float().sum(1)
            ious.append(torch.where(union > 0, inter / union.clamp_min(1), torch.ones_like(union)))
        ap = average_precision(torch.cat([s, 1 - s], 1), torch.cat([gt, ~gt], 1))
        return {"pix_acc": _masked(acc, batch), "miou": _masked((ious[0] + ious[1]) / 2, batch),
                "seg_ap": _masked(ap, batch)}


def randomised_copy(model: Any, blocks: int, seed: int = 0) -> Any:
    """A deep copy of ``model`` with its last ``blocks`` transformer blocks re-initialised (each submodule's own
    ``reset_parameters``, seeded), for the model-randomisation test."""
    n = model.num_blocks
    if not 1 <= blocks <= n:
        raise VitlensError(f"sanity blocks must be in [1, {n}] for this {n}-block model, got {blocks}")
    twin = copy.deepcopy(model)
    gen_state = torch.random.get_rng_state()
    try:
        torch.manual_seed(seed)
        for block in twin.block_modules()[n - blocks :]:
            for m in block.modules():
                reset = getattr(m, "reset_parameters", None)
                if callable(reset):
                    reset()
    finally:
        torch.random.set_rng_state(gen_state)
    return twin


class Sanity(Metric):
    """Adebayo et al.'s model-randomisation test: Spearman correlation between the maps of the model and of its copy
    with the top ``blocks`` blocks re-initialised (all blocks by default), for the same target classes."""

    name = "sanity"
    higher_is_better = False
    needs_explain = True

    def __init__(self, blocks: int | None = None, seed: int = 0) -> None:
        self.blocks = blocks
        self.seed = seed
        self._twins: dict[int, Any] = {}

    @property
    def columns(self) -> tuple[Column, ...]:
        return (Column("sanity_rho", False),)

    def twin(self, model: Any) -> Any:
        """The randomised copy of ``model`` (made once per model)."""
        key = id(model)
        if key not in self._twins:
            self._twins[key] = (model, randomised_copy(model, self.blocks or model.num_blocks, self.seed))
        return self._twins[key][1]

    def __call__(self, batch: Batch) -> dict[str, torch.Tensor]:
        if batch.explain is None:
            raise VitlensError("the sanity metric needs the method to explain again on the randomised model")
        r = batch.maps.shape[0]
        groups = (batch.groups if batch.groups is not None else torch.arange(r)).to(batch.maps.device)
        first = torch.full((int(groups.max()) + 1,), r, dtype=torch.long, device=groups.device)
        first = first.scatter_reduce(0, groups, torch.arange(r, device=groups.device), "amin")
        other = batch.explain(self.twin(batch.model), batch.x[first], batch.target[first], first).float()[groups]
        if other.shape != batch.maps.shape:
            other = F.adaptive_avg_pool2d(other[:, None], _grid(batch.maps))[:, 0]
        return {"sanity_rho": spearman(batch.maps.flatten(1), other.flatten(1)).to(batch.maps.device)}


METRICS: dict[str, Callable[..., Metric]] = {
    "positive": lambda **kw: Perturbation("positive", kw.get("baseline", "zero"),
                                          kw.get("forward_batch", FORWARD_BATCH)),
    "negative": lambda **kw: Perturbation("negative", kw.get("baseline", "zero"),
                                          kw.get("forward_batch", FORWARD_BATCH)),
    "deletion": lambda **kw: Deletion(kw.get("steps", RISE_STEPS), kw.get("baseline", "zero"),
                                      kw.get("forward_batch", FORWARD_BATCH)),
    "insertion": lambda **kw: Insertion(kw.get("steps", RISE_STEPS), kw.get("baseline", "zero"),
                                        kw.get("forward_batch", FORWARD_BATCH)),
    "pointing": lambda **kw: PointingGame(),
    "energy": lambda **kw: Energy(),
    "segmentation": lambda **kw: Segmentation(),
    "sanity": lambda **kw: Sanity(kw.get("sanity_blocks"), kw.get("seed", 0)),
}


def make_metrics(names: Sequence[str], **options: Any) -> list[Metric]:
    """The metrics ``names`` (see `METRICS`) built with the shared options (baseline, forward_batch, steps,
    sanity_blocks, seed); one-line error for an unknown name."""
    out = []
    for n in names:
        if n not in METRICS:
            raise VitlensError(f"unknown metric {n!r}; use one of {', '.join(METRICS)}")
        out.append(METRICS[n](**options))
    return out
