"""Attention rollout (Abnar & Zuidema 2020) with head fusion, discarding, residual weight and normalisation."""

from __future__ import annotations

import math
from typing import ClassVar

import torch

from vitlens.errors import VitlensError
from vitlens.explanation import Explanation, max_normalize
from vitlens.layout import StagePlan, TokenLayout
from vitlens.methods.artifacts import EXCLUDE, Artifacts, ArtifactTracker, zero_patches
from vitlens.methods.base import Images, Method, Option, Target, register
from vitlens.models.base import VitModel

HEAD_FUSIONS = ("mean", "max", "min")

FUSION = Option("head_fusion", str, "mean", "How heads are fused.", choices=HEAD_FUSIONS)
DISCARD = Option("discard_ratio", float, 0.0, "Fraction of the lowest attention weights zeroed per block.",
                 lo=0.0, hi=1.0, hi_open=True)
START = Option("start_layer", int, 0, "First block (0-based) rolled out; earlier blocks count as identity.", lo=0)
RESIDUAL = Option("residual_weight", float, 0.5, "Weight w of the identity in (1-w)A + wI.", lo=0.0, hi=1.0)
NORMALIZE = Option("normalize", bool, True, "Divide each row of (1-w)A + wI by its sum.")
ROW_ONLY_ELEMENTS = 1 << 24  # block matrices kept for a row-only rollout (64 MiB in float32)
PER_LAYER = Option("per_layer", bool, False, "Also return the rollout after every block.", cli=False)


def fuse_heads(attn: torch.Tensor, head_fusion: str) -> torch.Tensor:
    """[B, H, N, N] -> [B, N, N] by mean, max or min over heads."""
    if head_fusion == "mean":
        return attn.mean(1)
    if head_fusion == "max":
        return attn.amax(1)
    return attn.amin(1)


def discard_lowest(a: torch.Tensor, ratio: float) -> torch.Tensor:
    """Zero the floor(ratio * N^2) lowest entries of each [N, N] matrix, except entry [0, 0] (as vit-explain); equal
    values at the cut-off are cut in row-major order, so the result does not depend on a selection kernel's order,
    and the explorer page cuts them the same way."""
    b, n, _ = a.shape
    k = math.floor(ratio * n * n)
    if k == 0:
        return a
    flat = a.reshape(b, n * n)
    cut = flat.kthvalue(k, dim=-1, keepdim=True).values  # the k-th lowest value
    drop = flat <= cut
    if bool((drop.sum(-1) > k).any()):  # values equal to the cut-off on both sides of it: the first ones go
        tied = flat == cut
        drop &= ~tied | (tied.cumsum(-1) <= k - (flat < cut).sum(-1, keepdim=True))
    out = flat.masked_fill(drop, 0.0)
    out[:, 0] = flat[:, 0]  # entry [0, 0] is never discarded
    return out.view(b, n, n)


def add_residual(a: torch.Tensor, residual_weight: float, normalize: bool) -> torch.Tensor:
    """(1 - w) * A + w * I, then optionally each row divided by its sum (a new tensor; ``a`` is left as it is)."""
    a = a * (1.0 - residual_weight)  # then w added on the diagonal in place: no identity matrix is allocated
    a.diagonal(dim1=-2, dim2=-1).add_(residual_weight)
    if normalize:
        a.div_(a.sum(-1, keepdim=True).clamp_min_(torch.finfo(a.dtype).tiny))
    return a


def readout(rollout: torch.Tensor, pooled: TokenLayout, first: TokenLayout) -> torch.Tensor:
    """[B, N_s, N_0] rollout -> [B, gh, gw]: the model's pooled row (weights from the last stage's layout ``pooled``)
    over the first stage's patch tokens (``first``; prefix tokens removed)."""
    w = pooled.readout_weights(rollout.device, rollout.dtype)
    row = torch.einsum("n,bnm->bm", w, rollout)[:, first.num_prefix :]
    return row.reshape(-1, *first.grid)


class RolloutAccumulator:
    """Consumes fused per-block matrices in forward order, keeping R = A_l ... A_start (and per-depth maps).

    Between stages (Swin), R is carried to the next token grid by the stage's transition matrix, so R is always
    [B, N_current, N_0] and maps are drawn on the first stage's grid. Blocks before ``start_layer`` count as
    identity.

    With ``row_only`` (only the final map is wanted), the per-block matrices are kept and the map is computed at the
    end as the readout row times them, last block first: L vector-matrix products instead of L matrix products,
    for O(L N^2) memory instead of O(N^2).
    """

    def __init__(self, plan: StagePlan, start_layer: int, discard_ratio: float, residual_weight: float,
                 normalize: bool, per_layer: bool, row_only: bool = False) -> None:
        self.plan, self.start_layer = plan, start_layer
        self.discard_ratio, self.residual_weight, self.normalize = discard_ratio, residual_weight, normalize
        self.per_layer = per_layer
        self.row_only = row_only and not per_layer
        self.stage = 0
        self.result: torch.Tensor | None = None
        self.chain: torch.Tensor | None = None  # transitions crossed before the first rolled-out block
        self.depth_maps: list[torch.Tensor] = []
        self.ops: list[torch.Tensor] = []  # row_only: transitions and block matrices in forward order

    def _advance(self, stage: int, like: torch.Tensor) -> None:
        while self.stage < stage:
            t = self.plan.transitions[self.stage].to(like.device, like.dtype)
            if self.row_only:
                self.ops.append(t)
            elif self.result is None:
                self.chain = t if self.chain is None else t @ self.chain
            else:
                self.result = t @ self.result
            self.stage += 1

    def add(self, block: int, fused: torch.Tensor) -> None:
        """Fold block ``block``'s fused attention [B, N, N] into the rollout (blocks before start_layer are skipped)."""
        self._advance(self.plan.block_stage[block], fused)
        if block < self.start_layer:
            return
        a = add_residual(discard_lowest(fused, self.discard_ratio), self.residual_weight, self.normalize)
        if self.row_only:
            self.ops.append(a)
            return
        base = self.result if self.result is not None else self.chain
        self.result = a if base is None else a @ base
        if self.per_layer:
            self.depth_maps.append(self.map())

    def map(self) -> torch.Tensor:
        """[B, gh, gw] readout of the rollout so far."""
        if self.row_only and self.ops:
            first = self.plan.layouts[0]
            row = self.plan.layouts[self.stage].readout_weights(self.ops[-1].device, self.ops[-1].dtype)[None, None]
            for op in reversed(self.ops):
                row = row @ op  # [B or 1, 1, N_before]
            return row[:, 0, first.num_prefix:].reshape(-1, *first.grid)
        if self.result is None:
            raise VitlensError("rollout has no block to read out yet")
        return readout(self.result, self.plan.layouts[self.stage], self.plan.layouts[0])


@register
class Rollout(Method):
    """Attention rollout.

    Per sample and block: fuse heads (mean/max/min); zero the lowest floor(discard_ratio * N^2) entries except [0, 0];
    A = (1 - w) A + w I with w = residual_weight; if normalize, divide each row by its sum; R = A_L ... A_start.
    The map is the model's pooled row of R (CLS, CLS+distillation mean, or the mean of patch rows) over the patch
    tokens, divided by its maximum. Streams block by block: extra memory is O(N^2) per sample, or, when the
    block matrices fit in ROW_ONLY_ELEMENTS and per_layer is off, they are kept and only the readout row is computed.
    The seed report's variant (no normalisation, A + I, first block skipped) is
    ``Rollout(model, normalize=False, residual_weight=0.5, start_layer=1)``: A + I = 2 * (0.5 A + 0.5 I) and the
    constant factor vanishes in the max normalisation.
    """

    name = "rollout"
    description = "products of the per-block attention (heads fused, residual added) read out from the pooled token"
    head_fusion: str
    discard_ratio: float
    start_layer: int
    residual_weight: float
    normalize: bool
    per_layer: bool
    exclude_artifacts: int
    options: ClassVar[tuple[Option, ...]] = (
        FUSION,
        DISCARD, START, RESIDUAL, NORMALIZE, PER_LAYER, EXCLUDE,
    )

    def __init__(self, model: VitModel, head_fusion: str = "mean", discard_ratio: float = 0.0, start_layer: int = 0,
                 residual_weight: float = 0.5, normalize: bool = True, per_layer: bool = False,
                 exclude_artifacts: int = 0) -> None:
        super().__init__(model)
        self.set_options(head_fusion=head_fusion, discard_ratio=discard_ratio, start_layer=start_layer,
                         residual_weight=residual_weight, normalize=normalize, per_layer=per_layer,
                         exclude_artifacts=exclude_artifacts)
        self.check_start_layer()

    @property
    def params(self) -> dict:
        """The options, for the Explanation (``per_layer`` shapes the output, it is not a parameter of the map)."""
        p = super().params
        p.pop("per_layer", None)
        return p

    @classmethod
    def title(cls, params: dict, target_text: str | None = None) -> str:
        """'rollout; max fusion, discard 0.9, ...' (or 'grad rollout for ...')."""
        opts = []
        if "head_fusion" in params:
            opts.append(f"{params['head_fusion']} fusion")
        opts.append(f"discard {params.get('discard_ratio', 0.0):g}")
        if params.get("start_layer"):
            opts.append(f"from block {params['start_layer']}")
        if params.get("residual_weight", 0.5) != 0.5:
            opts.append(f"residual {params['residual_weight']:g}")
        if params.get("normalize") is False:
            opts.append("rows not normalised")
        what = cls.name.replace("_", " ") + (f" for {target_text}" if target_text else "")
        return f"{what}; {', '.join(opts)}"

    def accumulator(self, plan: StagePlan, batch: int = 1 << 30) -> RolloutAccumulator:
        """A fresh accumulator with this method's options; it keeps the block matrices and computes only the readout
        row at the end when they fit in ``ROW_ONLY_ELEMENTS`` (fewer matrix products: rollout's cost at batch 1)."""
        kept = batch * self.model.num_blocks * plan.layouts[0].num_tokens ** 2
        return RolloutAccumulator(plan, self.start_layer, self.discard_ratio, self.residual_weight,
                                  self.normalize, self.per_layer, row_only=kept <= ROW_ONLY_ELEMENTS)

    def finish(self, acc: RolloutAccumulator, logits: torch.Tensor, target: torch.Tensor | None,
               arts: Artifacts | None = None) -> Explanation:
        """Explanation from a filled accumulator; ``arts`` (see `vitlens.methods.artifacts`): patches set to 0 in
        every map before its max normalisation."""
        extras = {}
        if arts is not None:
            extras["artifacts"], extras["artifact_scores"] = arts.index, arts.score
        if self.per_layer:
            depth = torch.stack(acc.depth_maps, 1).float()  # [B, L', gh, gw], each depth divided by its own max
            depth = zero_patches(depth, arts.index) if arts is not None else depth
            extras["per_layer"] = max_normalize(depth.flatten(0, 1)).view_as(depth)
            extras["per_layer_blocks"] = torch.arange(self.start_layer, self.model.num_blocks)
        raw = acc.map().float()
        return Explanation(
            maps=max_normalize(zero_patches(raw, arts.index) if arts is not None else raw),
            method=self.name, params=self.params, target=target, logits=logits.detach(),
            probs=self.probs_or_none(logits.detach()), extras=extras,
        )

    def explain(self, x: Images, target: Target = None) -> Explanation:
        """Rollout maps for a batch (``target`` is ignored: rollout is class-agnostic)."""
        x = self.batch(x)
        acc = self.accumulator(self.model.stage_plan(tuple(x.shape[-2:])), x.shape[0])
        tracker = ArtifactTracker(self.model, self.exclude_artifacts, (x.shape[-2], x.shape[-1]))

        def fold(i: int, p: torch.Tensor) -> None:
            tracker.see(i, p)
            acc.add(i, fuse_heads(p, self.head_fusion))

        with torch.no_grad(), self.model.record(stream=fold):
            logits = self.model(x)
        return self.finish(acc, logits, None, tracker.artifacts())
