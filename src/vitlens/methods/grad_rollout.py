"""Gradient-weighted attention rollout (as jacobgil/vit-explain, with its bugs fixed)."""

from __future__ import annotations

from typing import ClassVar

import torch

from vitlens.explanation import Explanation
from vitlens.methods.base import GradientMethod, Images, Option, Target, register
from vitlens.methods.rollout import DISCARD, NORMALIZE, PER_LAYER, RESIDUAL, START, Rollout


@register
class GradRollout(GradientMethod, Rollout):
    """Per block, fused = mean over heads of (attention * d score / d attention), clamped at 0; then discard, residual,
    normalisation and products as in `Rollout`. The score is the target class logit (top-1 by default).

    Differences from vit-explain: gradients are taken with respect to the attention probabilities (the softmax
    output) and matched to their own blocks (vit-explain pairs them in reverse order, its issue #6); rows are
    normalised by their own sums (vit-explain's broadcast divides columns); the whole batch is explained at once.
    """

    name = "grad_rollout"
    description = "rollout of the per-block attention weighted by its gradient (clamped at 0, mean over heads)"
    options: ClassVar[tuple[Option, ...]] = (DISCARD, START, RESIDUAL, NORMALIZE, PER_LAYER)
    start_layer: int

    def __init__(self, model, discard_ratio: float = 0.0, start_layer: int = 0, residual_weight: float = 0.5,
                 normalize: bool = True, per_layer: bool = False) -> None:
        GradientMethod.__init__(self, model)
        self.head_fusion = "mean"  # the gradient-weighted heads are averaged
        self.set_options(discard_ratio=discard_ratio, start_layer=start_layer, residual_weight=residual_weight,
                         normalize=normalize, per_layer=per_layer)
        self.check_start_layer()

    def explain(self, x: Images, target: Target = None) -> Explanation:
        """Class-specific rollout maps for a batch; ``target`` defaults to each sample's top-1 class."""
        g = self.attention_gradients(self.batch(x), target, self.start_layer)
        acc = self.accumulator(g.plan)
        with torch.no_grad():
            for i, attention, grad in g.blocks():
                acc.add(i, (attention * grad).mean(1).clamp_min(0))
        return self.finish(acc, g.logits, g.target)
