"""`Explanation`: what every method returns."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F


def max_normalize(maps: torch.Tensor) -> torch.Tensor:
    """Divide each sample's map by its maximum (over all but the first dim); all-zero maps stay zero."""
    peak = maps.flatten(1).amax(1).clamp_min(torch.finfo(maps.dtype).tiny)
    return maps / peak.view(-1, *([1] * (maps.ndim - 1)))


@dataclass
class Explanation:
    """Relevance maps [B, gh, gw] (float32, each divided by its maximum) with how they were made.

    ``extras`` holds per-layer / per-head tensors when a method provides them, e.g. ``per_layer`` [B, L, gh, gw] or
    ``per_head`` [B, L, H, gh, gw]. ``logits``/``probs`` are the model's outputs on the same forward pass.
    """

    maps: torch.Tensor
    method: str
    params: dict[str, Any] = field(default_factory=dict)
    target: torch.Tensor | None = None
    logits: torch.Tensor | None = None
    probs: torch.Tensor | None = None
    extras: dict[str, torch.Tensor] = field(default_factory=dict)

    def __len__(self) -> int:
        return self.maps.shape[0]

    def upsample(self, size: tuple[int, int], mode: str = "bilinear") -> torch.Tensor:
        """Maps resized to image size (height, width): [B, H, W]."""
        kw = {"align_corners": False} if mode in ("bilinear", "bicubic") else {}
        return F.interpolate(self.maps[:, None].float(), size=size, mode=mode, **kw)[:, 0]

    def numpy(self) -> np.ndarray:
        """Maps as a float32 numpy array [B, gh, gw] (copied to the CPU)."""
        return self.maps.detach().float().cpu().numpy()

    def save(self, path: str | Path, index: int = 0) -> Path:
        """Save one sample's map as float32 .npy [gh, gw] (maximum 1), written atomically."""
        from vitlens.io import atomic_write

        path = Path(path)
        with atomic_write(path) as tmp, open(tmp, "wb") as f:
            np.save(f, self.numpy()[index].astype(np.float32))
        return path

    def overlay(self, images: list, alpha: float = 0.5, cmap: str = "jet") -> list:
        """PIL overlays of each map on its image (the preprocessed views)."""
        from vitlens.viz.overlay import overlay

        return [overlay(img, m, alpha=alpha, cmap=cmap) for img, m in zip(images, self.numpy())]
