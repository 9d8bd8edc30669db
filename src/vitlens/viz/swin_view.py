"""Swin per-patch view (the seed report's figure 4): one patch's attention over the image, per head and mean."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from vitlens.errors import VitlensError
from vitlens.models.base import VitModel

PatchChoice = tuple[int, int] | str  # (row, col) in the stage's token grid, or "per-window"


@dataclass
class SwinPatchView:
    """Attention rows of chosen patches in one Swin block, on that stage's token grid.

    ``maps`` [B, heads + 1, gh, gw]: per head, then the head mean. With ``per-window``, each window's centre patch
    is chosen and, since attention never leaves a window, every window shows its own patch's row.
    ``window_id`` [gh, gw] numbers the window of every token (with the cyclic shift undone).
    """

    maps: torch.Tensor
    window_id: torch.Tensor
    patches: list[tuple[int, int]]
    stage: int
    block: int
    shift: tuple[int, int]


def swin_block_index(model: VitModel, image_size: tuple[int, int], stage: int, block: int) -> int:
    """Global block index of block ``block`` of stage ``stage``, with clear errors."""
    plan = model.stage_plan(image_size)
    stages = plan.block_stage
    if len(plan.layouts) < 2:
        raise VitlensError(f"{type(model.module).__name__} is not a Swin model (one stage, no windows); "
                           "use `vitlens heads` for a ViT")
    if not 0 <= stage < len(plan.layouts):
        raise VitlensError(f"--stage must be in 0..{len(plan.layouts) - 1}; got {stage}")
    blocks = [i for i, s in enumerate(stages) if s == stage]
    if not 0 <= block < len(blocks):
        raise VitlensError(f"stage {stage} has {len(blocks)} blocks: --block must be in 0..{len(blocks) - 1}; "
                           f"got {block}")
    return blocks[block]


def swin_patch_view(model: VitModel, x: torch.Tensor, stage: int, block: int,
                    patch: PatchChoice = "per-window") -> SwinPatchView:
    """Capture one Swin block and return the chosen patches' attention rows (see `SwinPatchView`)."""
    size = (int(x.shape[-2]), int(x.shape[-1]))
    index = swin_block_index(model, size, stage, block)
    grid = model.stage_plan(size).layouts[stage].grid
    if isinstance(patch, tuple) and not (0 <= patch[0] < grid[0] and 0 <= patch[1] < grid[1]):
        raise VitlensError(f"patch {patch} is outside stage {stage}'s {grid[0]}x{grid[1]} token grid")
    with torch.no_grad(), model.record(blocks=[index]) as rec:
        model(x.to(model.device))
    probs, meta = rec.probs[index], rec.meta[index]
    assert probs is not None, "record(blocks=[index]) stores that block"
    window_id = meta["window_id"]
    patches = [patch] if isinstance(patch, tuple) else _window_centres(window_id)
    rows = torch.tensor([r * grid[1] + c for r, c in patches], device=probs.device)
    per_head = probs[:, :, rows].sum(2).reshape(probs.shape[0], probs.shape[1], *grid)
    maps = torch.cat([per_head, per_head.mean(1, keepdim=True)], 1).float()
    return SwinPatchView(maps, window_id, patches, stage, index, meta["shift"])


def _window_centres(window_id: torch.Tensor) -> list[tuple[int, int]]:
    """The token nearest each window's centroid (windows may be split by the cyclic shift; any member will do)."""
    out = []
    for w in torch.unique(window_id).tolist():
        rr, cc = torch.nonzero(window_id == w, as_tuple=True)
        cr, ccol = rr.float().mean(), cc.float().mean()
        k = int(((rr - cr) ** 2 + (cc - ccol) ** 2).argmin())
        out.append((int(rr[k]), int(cc[k])))
    return out
