"""Generic Attention-model Explainability (GAE; Chefer, Gur and Wolf, ICCV 2021)."""

from __future__ import annotations

import torch

from vitlens.explanation import Explanation, max_normalize
from vitlens.layout import StagePlan
from vitlens.methods.base import GradientMethod, Images, Target, register
from vitlens.methods.rollout import START, RolloutAccumulator


def gae_fuse(probs: torch.Tensor, grads: torch.Tensor) -> torch.Tensor:
    """[B, H, N, N] attention and its gradient -> [B, N, N]: each head's (gradient * attention) clamped at 0, then
    the mean over heads (clamp first, then the mean: a head's negative entries never cancel another's)."""
    return (grads * probs).clamp_min(0).mean(1)


class GaeAccumulator(RolloutAccumulator):
    """R = I, then per block in forward order R = R + fused @ R (blocks before ``start_layer`` count as nothing).

    Between stages (Swin) R is carried to the next token grid by the stage plan's transitions, as rollout does, so
    R is always [B, N_current, N_0]; its readout row is drawn on the first stage's grid."""

    def __init__(self, plan: StagePlan, start_layer: int) -> None:
        super().__init__(plan, start_layer, discard_ratio=0.0, residual_weight=0.5, normalize=False, per_layer=False)

    def add(self, block: int, fused: torch.Tensor) -> None:
        """Fold block ``block``'s fused relevance [B, N, N] into R."""
        self._advance(self.plan.block_stage[block], fused)
        if block < self.start_layer:
            return
        base = self.result if self.result is not None else self.chain
        if base is None:  # R = I: I + fused @ I
            eye = torch.eye(fused.shape[-1], device=fused.device, dtype=fused.dtype)
            self.result = fused + eye
        else:
            self.result = base + fused @ base


@register
class GenericAttention(GradientMethod):
    """GAE (Chefer, Gur, Wolf, ICCV 2021, "Generic Attention-model Explainability"): R = I; for every block from
    ``start_layer`` in forward order, R = R + mean_h(clamp(dy/dA_h * A_h, min=0)) @ R, with A_h the block's attention
    probabilities of head h and y the target score. The map is the model's readout row of R (the CLS row, the mean
    of CLS and distillation rows, the mean of patch rows, ...; see `TokenLayout.readout_weights`) over the patch
    tokens, divided by its maximum; the raw row is ``extras['raw']``. Swin: R crosses stages by the patch-merging
    maps, as in `Rollout`."""

    name = "gae"
    description = "R = R + mean over heads of clamp(grad * attention, 0) @ R per block (Chefer et al. 2021), read out"
    options = (START,)
    start_layer: int

    def __init__(self, model, start_layer: int = 0) -> None:
        super().__init__(model)
        self.set_options(start_layer=start_layer)
        self.check_start_layer()

    def explain(self, x: Images, target: Target = None) -> Explanation:
        """GAE maps for a batch; ``target`` as in `GradientMethod.score` (top-1 by default)."""
        g = self.attention_gradients(self.batch(x), target, self.start_layer)
        acc = GaeAccumulator(g.plan, self.start_layer)
        with torch.no_grad():
            for i, attention, grad in g.blocks():
                acc.add(i, gae_fuse(attention, grad))
            raw = acc.map().float()
        return Explanation(maps=max_normalize(raw), method=self.name, params=self.params, target=g.target,
                           logits=g.logits, probs=self.probs_or_none(g.logits), extras={"raw": raw})
