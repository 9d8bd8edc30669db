"""How far the page's rollout is from the library's: both run the library's rollout (`RolloutAccumulator`) after every
block, one on the captured attention, one on the values the page reads back from its codes."""

from __future__ import annotations

import numpy as np
import torch

from vitlens.layout import StagePlan
from vitlens.methods.rollout import RolloutAccumulator, fuse_heads, max_normalize
from vitlens.viz.report.attention import BlockAttention

# (head fusion, discard ratio) at which the page's rollout is checked against the library's
CHECKS: tuple[tuple[str, float], ...] = (("mean", 0.0), ("max", 0.0), ("min", 0.0), ("mean", 0.5), ("max", 0.9))


def rollout_maps(plan: StagePlan, blocks: list[BlockAttention], values: list[np.ndarray], fusion: str,
                 discard: float) -> np.ndarray:
    """The library's rollout after every block on ``values`` (per block [H, E], as `BlockAttention.values`),
    max-normalised, residual 0.5, rows normalised (the page's rollout): [L, gh, gw]."""
    acc = RolloutAccumulator(plan, 0, discard, 0.5, True, True)
    for i, (b, v) in enumerate(zip(blocks, values)):
        acc.add(i, fuse_heads(torch.from_numpy(b.dense(np.asarray(v, np.float64)))[None], fusion))
    return max_normalize(torch.stack(acc.depth_maps, 1)[0]).numpy()


class RolloutCheck:
    """The library's rollout maps on the captured attention at each of `CHECKS`, computed once; `error` measures
    another set of values against them."""

    def __init__(self, plan: StagePlan, blocks: list[BlockAttention]) -> None:
        self.plan, self.blocks = plan, blocks
        self.reference = {c: rollout_maps(plan, blocks, [b.values for b in blocks], *c) for c in CHECKS}

    def error(self, values: list[np.ndarray]) -> dict[str, float]:
        """{'fusion/discard': largest difference of the max-normalised maps after any block}."""
        return {f"{f}/{d:g}": float(np.abs(rollout_maps(self.plan, self.blocks, values, f, d) - ref).max())
                for (f, d), ref in self.reference.items()}
