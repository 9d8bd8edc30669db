"""Heat-map overlays: a [gh, gw] map in [0, 1] upsampled bilinearly and blended over an RGB image."""

from __future__ import annotations

import matplotlib
import numpy as np
from PIL import Image

from vitlens.errors import VitlensError


def colormap(name: str):
    """The matplotlib colormap called ``name``, with a clear error for unknown names."""
    try:
        return matplotlib.colormaps[name]
    except KeyError:
        raise VitlensError(f"unknown colormap {name!r}; use a matplotlib name such as 'jet' or 'viridis'") from None


def upsample(heat: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Bilinearly resize a 2-D map to (width, height) ``size`` (pixel-centre aligned, like align_corners=False)."""
    heat = np.asarray(heat, dtype=np.float32)
    if heat.ndim != 2:
        raise VitlensError(f"a heat map must be 2-D [gh, gw], got shape {heat.shape}")
    heat = np.nan_to_num(heat, nan=0.0, posinf=1.0, neginf=0.0)
    return np.asarray(Image.fromarray(heat, mode="F").resize(size, Image.Resampling.BILINEAR), dtype=np.float32)


def overlay(image: Image.Image, heat: np.ndarray, alpha: float = 0.5, cmap: str = "jet") -> Image.Image:
    """Blend ``heat`` ([gh, gw], values in [0, 1]) coloured by ``cmap`` over ``image``; returns an RGB image of the
    image's size. ``alpha`` is the weight of the colour (0: image only, 1: heat map only)."""
    if not 0.0 <= alpha <= 1.0:
        raise VitlensError(f"alpha must be in [0, 1], got {alpha}")
    rgb = np.asarray(image.convert("RGB"), dtype=np.float32) / 255.0
    up = np.clip(upsample(heat, image.size), 0.0, 1.0)
    colour = colormap(cmap)(up)[..., :3].astype(np.float32)
    out = (1.0 - alpha) * rgb + alpha * colour
    return Image.fromarray(np.clip(np.round(out * 255.0), 0, 255).astype(np.uint8), "RGB")
