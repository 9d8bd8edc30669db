"""Does an explanation's maximum fall on the object? Hit rates of class-specific maps against ground-truth masks."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
from PIL import Image

from vitlens.errors import VitlensError
from vitlens.methods import GradRollout
from vitlens.models.base import VitModel

DEFAULT_MIN_COVER = 0.15


def mask_cover(masks: torch.Tensor | np.ndarray, grid: tuple[int, int]) -> torch.Tensor:
    """Fraction of each cell of a `grid` over the image that each mask covers: float [B, gh, gw] from bool [B, H, W]
    (cells are the areas adaptive average pooling gives, so H and W need not be multiples of the grid)."""
    m = torch.as_tensor(np.asarray(masks) if not isinstance(masks, torch.Tensor) else masks)
    if m.ndim != 3:
        raise VitlensError(f"masks must be [B, H, W], got shape {tuple(m.shape)}")
    return torch.nn.functional.adaptive_avg_pool2d(m.float()[:, None], grid)[:, 0]


def _covered(maps: torch.Tensor, masks: torch.Tensor | np.ndarray, min_cover: float) -> torch.Tensor:
    """bool [B, gh * gw]: the cells of the maps' grid that each matching mask covers at least ``min_cover``."""
    if maps.ndim != 3 or len(maps) != len(masks):
        raise VitlensError(f"maps must be [B, gh, gw] with one mask each, got {tuple(maps.shape)} and {len(masks)}")
    return mask_cover(masks, (maps.shape[1], maps.shape[2])).to(maps.device).flatten(1) >= min_cover


def max_in_mask(maps: torch.Tensor | np.ndarray, masks: torch.Tensor | np.ndarray,
                min_cover: float = DEFAULT_MIN_COVER) -> torch.Tensor:
    """bool [B]: whether the cell holding each map's maximum (the first one on ties) is covered at least
    `min_cover` by the matching mask. maps [B, gh, gw] on the model's token grid, masks bool [B, H, W]."""
    maps = torch.as_tensor(maps)
    cover = _covered(maps, masks, min_cover)
    return cover.gather(1, maps.flatten(1).argmax(1)[:, None])[:, 0]


TIE_RTOL = 1e-6


def pointing_hits(maps: torch.Tensor, masks: torch.Tensor | np.ndarray,
                  min_cover: float = DEFAULT_MIN_COVER) -> torch.Tensor:
    """float [B]: the pointing game's expected hit with ties broken uniformly at random: the share of each map's
    maximal cells (within ``TIE_RTOL`` of the maximum) that the mask covers at least ``min_cover``. Without ties this
    is `max_in_mask`; with ties (attention flow saturates many tokens at the readout's capacity, a centred Gaussian on
    an even grid has four maxima) no cell wins by its position in the grid."""
    maps = torch.as_tensor(maps).float()
    cover = _covered(maps, masks, min_cover)
    flat = maps.flatten(1)
    top = flat.amax(1, keepdim=True)
    tied = flat >= top - TIE_RTOL * top.abs()
    return (tied & cover).sum(1) / tied.sum(1)


@dataclass
class Localisation:
    """Hits of a method's maximum inside the target object's mask: counts, rate and one flag per item."""

    hits: int
    total: int
    per_item: list[bool] = field(default_factory=list)

    @property
    def rate(self) -> float:
        """hits / total (0 when there are no items)."""
        return self.hits / self.total if self.total else 0.0

    def as_dict(self) -> dict:
        """JSON-ready summary."""
        return {"hits": self.hits, "total": self.total, "rate": self.rate}


def grad_rollout_in_mask(model: VitModel, images: Sequence[np.ndarray | Image.Image],
                         masks: Sequence[np.ndarray], classes: Sequence[Sequence[int]], batch_size: int = 16,
                         min_cover: float = DEFAULT_MIN_COVER) -> Localisation:
    """For every item of every scene, grad rollout for the item's class, and whether its maximum lies in the item's
    mask (`max_in_mask`). images: RGB scenes; masks[i]: bool [K_i, H, W]; classes[i]: the K_i item classes.
    The model's preprocessing must keep the whole image (resize, no crop), as the embedded models' does."""
    jobs = [(i, k, int(c)) for i, cs in enumerate(classes) for k, c in enumerate(cs)]
    views, _ = model.preprocess([_pil(im) for im in images])
    method = GradRollout(model)
    flags: list[bool] = []
    for s in range(0, len(jobs), batch_size):
        chunk = jobs[s : s + batch_size]
        x = torch.stack([views[i] for i, _, _ in chunk])
        maps = method.explain(x, target=torch.tensor([c for _, _, c in chunk])).maps
        item_masks = np.stack([np.asarray(masks[i][k], dtype=bool) for i, k, _ in chunk])
        flags += max_in_mask(maps.detach().cpu(), item_masks, min_cover).tolist()
    return Localisation(sum(flags), len(flags), flags)


def _pil(image: np.ndarray | Image.Image) -> Image.Image:
    return image if isinstance(image, Image.Image) else Image.fromarray(np.asarray(image, dtype=np.uint8))
