"""Artifact tokens: a few patches that draw attention for no reason visible in the image.

Darcet et al. (ICLR 2024, "Vision Transformers Need Registers") found that ViTs trained long (DINOv2, CLIP, DeiT-III)
repurpose a few background patch tokens as global scratch space: high-norm tokens that draw much of the attention,
so attention and rollout maps show bright isolated patches that say nothing about the object. What shows them best
depends on the model, so this module gives both views:

- `token_norms`: the L2 norm of every patch token after every block (Darcet et al.'s high-norm tokens; on large
  DINOv2 models they stand out in the later blocks);
- `attention_received`: how much attention each patch receives in each block, as a multiple of uniform (mean over
  heads of the column sum over all query tokens; 1 when every token attends uniformly). On DINOv2 ViT-S the norms
  show no outliers (top / median <= 1.5 at every block on chelsea, coffee, astronaut) but block 0 has attention
  sinks: one patch receives about 43x uniform (17% of all attention), and rollout, a product starting with block
  0, paints exactly those patches as its brightest spots.

`find_artifacts` lists the top patches by either score. The ``exclude_artifacts=K`` option of Rollout and
AttentionMaps leaves out, per image, the K patches with the largest attention received in any block (the maximum
over blocks of `attention_received`, measured in the same forward pass): the method's raw map (and every per-layer
or per-head map) is set to 0 at those patches, and only then is the map divided by its maximum as usual. Nothing
else changes: no attention row is renormalised, so every other patch keeps its raw value and the normalised map
differs from the plain one only at the K patches and by one factor (plain maximum / maximum without them). The
patches are reported in ``extras['artifacts']`` (flat patch indices [B, K], row-major, largest score first) and
their scores in ``extras['artifact_scores']``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from vitlens.errors import VitlensError
from vitlens.methods.base import Images, Option
from vitlens.models.base import VitModel, flat_tokens

EXCLUDE = Option("exclude_artifacts", int, 0,
                 "Leave out the K patches that receive the most attention in any block (artifact tokens, Darcet et "
                 "al. 2024): set to 0 before the max normalisation; listed in extras['artifacts'].", lo=0)
SCORES = ("attention", "norm")


@dataclass
class Artifacts:
    """Top patches per image: ``index`` [B, K] flat patch indices (row-major, largest score first), ``score`` [B, K]
    their scores, ``grid`` (gh, gw), ``median`` [B] the median patch score (for scale) and ``by`` the score used."""

    index: torch.Tensor
    score: torch.Tensor
    grid: tuple[int, int]
    median: torch.Tensor
    by: str = "attention"

    def cells(self, b: int = 0) -> list[tuple[int, int]]:
        """(row, column) of image ``b``'s patches, largest score first."""
        return [divmod(int(i), self.grid[1]) for i in self.index[b]]


def _flat_layout(model: VitModel, image_size: tuple[int, int]):
    plan = model.stage_plan(image_size)
    if len(plan.layouts) > 1:
        raise VitlensError("artifact tokens are measured on single-stage ViTs; a hierarchical model (Swin) merges "
                           "its tokens between stages: leave exclude_artifacts at 0")
    return plan.layouts[0]


def patch_norms(tokens: torch.Tensor, layout) -> torch.Tensor:
    """[B, N, C] block tokens -> [B, gh, gw] L2 norms of the patch tokens (prefix tokens dropped)."""
    t = flat_tokens(tokens)
    return t[:, layout.num_prefix:].float().norm(dim=-1).reshape(-1, *layout.grid)


def received(probs: torch.Tensor, layout) -> torch.Tensor:
    """[B, H, N, N] attention -> [B, gh, gw]: attention each patch receives, as a multiple of uniform (mean over
    heads of its column's sum over all N query tokens)."""
    col = probs.float().sum(2).mean(1)  # [B, N]
    return col[:, layout.num_prefix:].reshape(-1, *layout.grid)


def token_norms(model: VitModel, x: torch.Tensor) -> torch.Tensor:
    """L2 norm of every patch token after every block: [B, L, gh, gw] for a batch [B, 3, H, W]."""
    from vitlens.taps import tap_tokens

    layout = _flat_layout(model, (x.shape[-2], x.shape[-1]))
    with torch.no_grad(), tap_tokens(model, list(range(model.num_blocks)), where="output") as taps:
        model(x)
    return torch.stack([patch_norms(taps[i], layout) for i in range(model.num_blocks)], 1)


def attention_received(model: VitModel, x: torch.Tensor) -> torch.Tensor:
    """Attention each patch receives in every block, as a multiple of uniform: [B, L, gh, gw]."""
    layout = _flat_layout(model, (x.shape[-2], x.shape[-1]))
    out: dict[int, torch.Tensor] = {}
    with torch.no_grad(), model.record(stream=lambda i, p: out.__setitem__(i, received(p, layout))):
        model(x)
    return torch.stack([out[i] for i in sorted(out)], 1)


def top_patches(scores: torch.Tensor, k: int, by: str = "attention") -> Artifacts:
    """The ``k`` largest entries of per-image patch scores [B, gh, gw]."""
    grid = (int(scores.shape[-2]), int(scores.shape[-1]))
    if not 0 < k <= grid[0] * grid[1]:
        raise VitlensError(f"exclude_artifacts must be between 1 and the {grid[0] * grid[1]} patches; got {k}")
    flat = scores.flatten(1)
    top = flat.topk(k, dim=1)
    return Artifacts(top.indices, top.values, grid, flat.median(dim=1).values, by)


def find_artifacts(model: VitModel, x: Images, k: int = 5, by: str = "attention", block: int | None = None
                   ) -> Artifacts:
    """The ``k`` top patches per image: by the attention they receive (the maximum over blocks, or at ``block``),
    or by their token norm (after ``block``, default the last)."""
    from vitlens.methods.base import Method

    if by not in SCORES:
        raise VitlensError(f"by must be one of {', '.join(SCORES)}; got {by!r}")
    batch = Method(model).batch(x)
    n = model.num_blocks
    if block is not None and not -n <= block < n:
        raise VitlensError(f"block {block} is out of range for a model with {n} blocks; use -{n}..{n - 1}")
    per_block = attention_received(model, batch) if by == "attention" else token_norms(model, batch)
    if block is None:
        scores = per_block.amax(1) if by == "attention" else per_block[:, -1]
    else:
        scores = per_block[:, block % n]
    return top_patches(scores, k, by)


class ArtifactTracker:
    """Fed each block's attention during a method's own forward pass (`see`); `artifacts` then gives the top-k
    patches by the maximum over blocks of the attention they receive. With k = 0 it does nothing."""

    def __init__(self, model: VitModel, k: int, image_size: tuple[int, int]) -> None:
        self.k = k
        self.layout = _flat_layout(model, image_size) if k > 0 else None
        self.best: torch.Tensor | None = None

    def see(self, block: int, probs: torch.Tensor) -> None:
        """Fold one block's attention [B, H, N, N] into the running maximum."""
        if self.layout is None:
            return
        r = received(probs.detach(), self.layout)
        self.best = r if self.best is None else torch.maximum(self.best, r)

    def artifacts(self) -> Artifacts | None:
        """The top-k patches seen (None when k = 0)."""
        if self.layout is None or self.best is None:
            return None
        return top_patches(self.best, self.k)


def zero_patches(maps: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """Maps [B, ..., gh, gw] with each image's patches ``index`` [B, K] (flat, row-major) set to 0."""
    b = maps.shape[0]
    shape = maps.shape
    flat = maps.reshape(b, -1, shape[-2] * shape[-1]).clone()
    flat.scatter_(2, index[:, None, :].expand(b, flat.shape[1], index.shape[1]).to(flat.device), 0.0)
    return flat.reshape(shape)
