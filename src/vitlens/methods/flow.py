"""Attention flow (Abnar and Zuidema, 2020): max flows through the layered attention graph, exact and batched."""

from __future__ import annotations

import numpy as np
import torch

from vitlens.explanation import Explanation, max_normalize
from vitlens.layered_flow import layered_max_flow
from vitlens.layout import StagePlan
from vitlens.methods.base import Images, Method, Target, register
from vitlens.methods.rollout import FUSION, RESIDUAL, add_residual, fuse_heads
from vitlens.models.base import VitModel


def flow_levels(plan: StagePlan, fused: list[torch.Tensor]) -> list[torch.Tensor]:
    """The capacity matrices of the layered graph in forward order, each [B, N_out, N_in] (row i: from output token
    i down to the input tokens): every block's matrix, with a stage's transition matrix (Swin's patch merging: a
    merged token takes a quarter of each parent, rows sum to 1) inserted where the token grid changes."""
    levels, stage = [], 0
    for block, a in enumerate(fused):
        while stage < plan.block_stage[block]:
            t = plan.transitions[stage].to(a.device, a.dtype)
            levels.append(t.expand(a.shape[0], *t.shape))
            stage += 1
        levels.append(a)
    return levels


@register
class AttentionFlow(Method):
    """Attention flow: for each patch token, the maximum flow from the model's readout at the output down to that
    token at the input, through the layered graph of the blocks' attention.

    Graph (as Abnar and Zuidema build it): one level of N nodes per block boundary (L + 1 levels); an edge from token
    i after block l to token j before it, with capacity A_l[i, j], where A_l = (1 - w) * fused heads + w * I with each
    row divided by its sum (the authors' A + I, normalised, is w = 0.5). The source is a super-node above the last
    level with an edge of capacity r_i to each token i, r the model's readout weights: for a CLS readout (r = e_0)
    this is exactly the authors' max flow from the output CLS node, whose out-capacity is 1; for a mean readout
    (Swin, BEiT, GAP models) or CLS+distillation it is the honest generalisation (the pooled vector draws r_i from
    token i). Swin's patch merging is a level of its own, with the merge matrix as capacities. The max flows are
    exact (see `vitlens.layered_flow`: feasible flows, each with a certified gap to the exact maximum).

    Maps are max-normalised; ``extras['flow']`` holds the raw flow values [B, gh, gw] (float64) and
    ``extras['gap']`` the largest certified distance of any of them to the exact maximum (a 0-d tensor).
    """

    name = "flow"
    head_fusion: str
    residual_weight: float
    description = "max flow from the readout to each patch through the layered attention graph (residual added)"
    options = (FUSION, RESIDUAL)

    def __init__(self, model: VitModel, head_fusion: str = "mean", residual_weight: float = 0.5) -> None:
        super().__init__(model)
        self.set_options(head_fusion=head_fusion, residual_weight=residual_weight)

    def explain(self, x: Images, target: Target = None) -> Explanation:
        """Attention-flow maps for a batch (``target`` is ignored: attention flow is class-agnostic)."""
        x = self.batch(x)
        plan = self.model.stage_plan(tuple(x.shape[-2:]))
        fused: list[torch.Tensor] = []

        def keep(i: int, p: torch.Tensor) -> None:
            fused.append(add_residual(fuse_heads(p.double(), self.head_fusion), self.residual_weight, True))

        with torch.no_grad(), self.model.record(stream=keep):
            logits = self.model(x)
        first, last = plan.layouts[0], plan.layouts[len(plan.transitions)]
        source = last.readout_weights(dtype=torch.float64).expand(x.shape[0], -1)
        levels = [m.cpu().numpy() for m in flow_levels(plan, fused)]
        sinks = range(first.num_prefix, first.num_tokens)
        flows, gaps = layered_max_flow(source.numpy(), levels, sinks)
        raw = torch.from_numpy(flows).view(x.shape[0], *first.grid)
        return Explanation(
            maps=max_normalize(raw.float()).to(x.device), method=self.name, params=self.params, target=None,
            logits=logits.detach(), probs=self.probs_or_none(logits.detach()),
            extras={"flow": raw, "gap": torch.tensor(float(np.max(gaps, initial=0.0)), dtype=torch.float64)},
        )
