"""Transformer attribution (Chefer, Gur, Wolf, CVPR 2021): LRP relevance of each block's attention times its gradient,
rolled out."""

from __future__ import annotations

from typing import ClassVar

import torch

from vitlens.explanation import Explanation
from vitlens.methods.base import GradientMethod, Images, Option, Target, register
from vitlens.methods.lrp_rules import CHEFER, lrp_mode
from vitlens.methods.rollout import PER_LAYER, START, Rollout


@register
class TransformerAttribution(GradientMethod, Rollout):
    """Per block i >= start_layer: cam_i = mean over heads of clamp(dS/dA_i * R(A_i), min=0), where S is the target
    score, A_i the attention probabilities and R(A_i) their LRP relevance under Chefer et al.'s rules (`CHEFER` in
    `vitlens.methods.lrp_rules`: alpha=1/beta=0 on linear layers, identity on LayerNorm, GELU and softmax, half of the
    z-rule to each side of q @ k^T and A @ V, their normalised residual-add rule), starting from relevance 1 on the
    score; then R = I, R <- R + cam_i @ R, and the map is the model's pooled row of R over the patch tokens (raw values,
    not max-normalised: the size of R is the method's output, as in the authors' code).

    One forward pass builds a graph whose backward is switched between the ordinary gradient and the LRP rules, so
    the whole batch costs one forward and two backward passes. Relevance starts as the score's gradient divided by
    the score (one-hot / logit for a class index: relevance 1 on the target logit, as Chefer's one-hot start).
    Swin: blocks are rolled out across stages through the stage plan, like `GradRollout`.
    """

    name = "transformer_attribution"
    description = "rollout of I + mean over heads of clamp(attention gradient * attention LRP relevance), Chefer 2021"
    options: ClassVar[tuple[Option, ...]] = (START, PER_LAYER)
    start_layer: int
    per_layer: bool

    def __init__(self, model, start_layer: int = 0, per_layer: bool = False) -> None:
        GradientMethod.__init__(self, model)
        self.head_fusion = "mean"
        # R <- (I + cam) R is (0.5 cam + 0.5 I) R times 2: the rollout accumulator with residual 0.5, no row
        # normalisation, and the factor 2 per block restored at the end (powers of two: exact in floating point)
        self.discard_ratio, self.residual_weight, self.normalize = 0.0, 0.5, False
        self.set_options(start_layer=start_layer, per_layer=per_layer)
        self._abs_weights: dict = {}  # |W| per linear layer, kept between calls (see lrp_mode)
        self.check_start_layer()

    @classmethod
    def title(cls, params: dict, target_text: str | None = None) -> str:
        """'transformer attribution for ...' (and the first block when not 0)."""
        what = "transformer attribution" + (f" for {target_text}" if target_text else "")
        start = params.get("start_layer", 0)
        return what + (f"; from block {start}" if start else "")

    def cams(self, x: torch.Tensor,
             target: Target) -> tuple[dict[int, torch.Tensor], torch.Tensor, torch.Tensor | None]:
        """({block: cam [B, N, N] in global token coordinates}, logits, resolved target) for a batch."""
        blocks = range(self.start_layer, self.model.num_blocks)
        with self.model.record(grads=True, blocks=blocks) as rec:
            with lrp_mode(CHEFER, type(self.model.module).__name__, self._abs_weights) as mode:
                logits = self.model(x)
            score, t = self.score(logits, target)
            grads = rec.grads(score, retain_graph=True)
            start = torch.autograd.grad(score.sum(), logits, retain_graph=True)[0]  # d score / d output
            denom = score.detach()
            denom = torch.where(denom >= 0, denom + 1e-9, denom - 1e-9)  # relevance 1 on the score
            with mode.relevance():
                rel_grads = rec.grads((logits * (start / denom[:, None])).sum(-1))
        cams = {}
        with torch.no_grad():
            for i in rec.captured():
                a = rec.probs[i]
                cams[i] = torch.mul(a, rel_grads[i]).mul_(grads[i]).clamp_min_(0).mean(1)
        return cams, logits.detach(), t

    def explain(self, x: Images, target: Target = None) -> Explanation:
        """Transformer-attribution maps for a batch; ``target`` defaults to each sample's top-1 class."""
        x = self.batch(x)
        plan = self.model.stage_plan(tuple(x.shape[-2:]))
        cams, logits, t = self.cams(x, target)
        acc = self.accumulator(plan)
        for i in sorted(cams):
            acc.add(i, cams[i])
        scale = 2.0 ** len(cams)
        exp = Explanation(maps=(acc.map() * scale).float(), method=self.name, params=self.params, target=t,
                          logits=logits, probs=self.probs_or_none(logits))
        if self.per_layer:
            depth = torch.stack(acc.depth_maps, 1).float()
            exp.extras["per_layer"] = depth * 2.0 ** torch.arange(1, depth.shape[1] + 1, device=depth.device).view(
                1, -1, 1, 1).to(depth.dtype)
            exp.extras["per_layer_blocks"] = torch.arange(self.start_layer, self.model.num_blocks)
        return exp
