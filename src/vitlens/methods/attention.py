"""Raw attention maps per block and head, for the CLS token, a chosen patch, or the mean over tokens."""

from __future__ import annotations

import torch

from vitlens.errors import VitlensError
from vitlens.explanation import Explanation, max_normalize
from vitlens.layout import TokenLayout
from vitlens.methods.artifacts import EXCLUDE, ArtifactTracker, zero_patches
from vitlens.methods.base import Images, Method, Option, Target, register
from vitlens.models.base import VitModel

Query = str | tuple[int, int]


def parse_query(text: str) -> Query:
    """'cls', 'mean' or 'R,C' (a patch row and column) -> query."""
    t = text.strip().lower()
    if t in ("cls", "mean"):
        return t
    try:
        r, c = (int(v) for v in t.split(","))
    except ValueError:
        raise VitlensError(f"query must be 'cls', 'mean' or 'ROW,COL' of a patch; got {text!r}") from None
    return (r, c)


def query_rows(attn: torch.Tensor, layout: TokenLayout, query: Query) -> torch.Tensor:
    """[B, H, N, N] -> [B, H, gh, gw]: the query's attention over the patch tokens."""
    if query == "cls":
        if not layout.has_cls:
            raise VitlensError("this model has no CLS token; use --query mean or a patch ROW,COL")
        row = attn[:, :, 0]
    elif query == "mean":
        row = attn.mean(2)
    else:
        row = attn[:, :, layout.patch_index(*query)]
    return row[..., layout.num_prefix :].reshape(*row.shape[:2], *layout.grid)


def query_text(query: Query) -> str:
    """Words for a query: 'CLS token', 'mean of all tokens' or 'patch (r, c)'."""
    if query == "cls":
        return "CLS token"
    if query == "mean":
        return "mean of all tokens"
    return f"patch ({query[0]}, {query[1]})"


@register
class AttentionMaps(Method):
    """Per block and head, the attention of a query token over the patch tokens: extras['per_head'] [B, L, H, gh, gw]
    (raw probabilities). ``maps`` is the head mean of the last block, divided by its maximum."""

    name = "attention"
    description = "raw attention of a query token (CLS, mean, or a patch) per block and head"
    options = (Option("query", object, "cls", "cls, mean, or ROW,COL of a patch (0-based).", parse=parse_query),
               EXCLUDE)
    exclude_artifacts: int

    def __init__(self, model: VitModel, query: Query = "cls", exclude_artifacts: int = 0) -> None:
        super().__init__(model)
        self.query: Query = parse_query(query) if isinstance(query, str) else (int(query[0]), int(query[1]))
        self.set_options(exclude_artifacts=exclude_artifacts)

    @classmethod
    def title(cls, params: dict, target_text: str | None = None) -> str:
        """'attention of the CLS token, last block, mean of heads'."""
        return f"attention of the {query_text(params.get('query', 'cls'))}, last block, mean of heads"

    def explain(self, x: Images, target: Target = None) -> Explanation:
        """Attention maps for a batch (``target`` is ignored). On a hierarchical model (Swin) every block's map is
        drawn on the first stage's grid: each first-stage patch shows the value of the token it was merged into, and
        a patch query (row, col) in first-stage coordinates selects, in later stages, the token that contains it."""
        x = self.batch(x)
        plan = self.model.stage_plan(tuple(x.shape[-2:]))
        first = plan.layouts[0]
        if isinstance(self.query, tuple):
            first.patch_index(*self.query)  # fail before the forward pass
        stages = {s: (plan.layouts[s], plan.ancestors(s)) for s in set(plan.block_stage)}
        rows: dict[int, torch.Tensor] = {}
        tracker = ArtifactTracker(self.model, self.exclude_artifacts, (x.shape[-2], x.shape[-1]))

        def keep_row(i: int, probs: torch.Tensor) -> None:
            tracker.see(i, probs)
            layout, up = stages[plan.block_stage[i]]
            query = self.query
            if up is not None and isinstance(query, tuple):
                p0 = first.patch_index(*query) - first.num_prefix
                t = int(up[p0].argmax())
                query = divmod(t, layout.grid[1])
            row = query_rows(probs, layout, query)
            if up is not None:
                row = (row.flatten(2) @ up.to(row.device, row.dtype).T).reshape(*row.shape[:2], *first.grid)
            rows[i] = row

        with torch.no_grad(), self.model.record(stream=keep_row):
            logits = self.model(x)
        per_head = _stack_heads([rows[i] for i in sorted(rows)])
        last = rows[max(rows)].float().mean(1)
        extras = {"per_head": per_head, "num_heads": torch.tensor([rows[i].shape[1] for i in sorted(rows)])}
        arts = tracker.artifacts()
        if arts is not None:  # see vitlens.methods.artifacts: those patches set to 0, nothing renormalised
            extras["per_head"] = zero_patches(per_head, arts.index)
            extras["artifacts"], extras["artifact_scores"] = arts.index, arts.score
            last = zero_patches(last, arts.index)
        params = {"query": self.query, **({"exclude_artifacts": self.exclude_artifacts} if arts is not None else {})}
        return Explanation(
            maps=max_normalize(last), method=self.name, params=params,
            logits=logits, probs=self.probs_or_none(logits), extras=extras,
        )


def _stack_heads(rows: list[torch.Tensor]) -> torch.Tensor:
    """[B, H_l, gh, gw] per block -> [B, L, max H, gh, gw]; blocks with fewer heads (Swin stages) are NaN-padded."""
    h = max(r.shape[1] for r in rows)
    padded = [torch.cat([r, r.new_full((r.shape[0], h - r.shape[1], *r.shape[2:]), float("nan"))], 1) for r in rows]
    return torch.stack(padded, 1).float()
