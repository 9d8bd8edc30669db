"""Superpixels for perturbation methods: a patch-aligned grid (no dependency), SLIC and quickshift (scikit-image).

Every function returns an int64 array [H, W] of segment ids numbered 0..S-1 without gaps.
"""

from __future__ import annotations

import math

import numpy as np

from vitlens.errors import VitlensError

SEGMENTATIONS = ("slic", "quickshift", "grid")


def relabel(segments: np.ndarray) -> np.ndarray:
    """Renumber segment ids to 0..S-1 (in order of first appearance of the sorted ids)."""
    _, inverse = np.unique(np.asarray(segments), return_inverse=True)
    return inverse.reshape(np.asarray(segments).shape).astype(np.int64)


def grid_shape(height: int, width: int, n_segments: int) -> tuple[int, int]:
    """(rows, cols) of a grid with about ``n_segments`` cells of roughly square shape."""
    rows = max(1, min(height, round(math.sqrt(n_segments * height / width))))
    cols = max(1, min(width, round(n_segments / rows)))
    return rows, cols


def grid_segments(height: int, width: int, n_segments: int, align: tuple[int, int] | None = None) -> np.ndarray:
    """A rows x cols grid of about ``n_segments`` cells. With ``align`` = (patch_h, patch_w) every patch lies wholly
    in one cell (cells are unions of whole patches), which ``hide="drop"`` needs."""
    if n_segments < 1:
        raise VitlensError(f"n_segments must be at least 1, got {n_segments}")
    if align is not None:
        ph, pw = align
        if height % ph or width % pw:
            raise VitlensError(f"image size {(height, width)} is not a multiple of the patch size {align}")
        gh, gw = height // ph, width // pw
        rows, cols = grid_shape(gh, gw, n_segments)
        r = np.repeat(np.arange(gh) * rows // gh, ph)
        c = np.repeat(np.arange(gw) * cols // gw, pw)
    else:
        rows, cols = grid_shape(height, width, n_segments)
        r = np.arange(height) * rows // height
        c = np.arange(width) * cols // width
    return relabel(r[:, None] * cols + c[None, :])


def image_segments(image: np.ndarray, method: str = "slic", n_segments: int = 50, seed: int = 0,
                   align: tuple[int, int] | None = None, **options) -> np.ndarray:
    """Segments of an RGB image [H, W, 3] with values in [0, 1]: ``slic`` (n_segments, compactness=10, sigma=1),
    ``quickshift`` (lime's defaults: kernel_size=4, max_dist=200, ratio=0.2; n_segments ignored) or ``grid``.
    SLIC and quickshift need scikit-image (``pip install vitlens[lime]``)."""
    if method not in SEGMENTATIONS:
        raise VitlensError(f"segmentation must be one of {', '.join(SEGMENTATIONS)}; got {method!r}")
    image = np.asarray(image, dtype=np.float64)
    if image.ndim != 3 or image.shape[-1] != 3:
        raise VitlensError(f"expected an RGB image [H, W, 3], got shape {image.shape}")
    h, w = image.shape[:2]
    if method == "grid":
        return grid_segments(h, w, n_segments, align)
    try:
        from skimage import segmentation as sk
    except ImportError as e:
        raise VitlensError(f"segmentation={method!r} needs scikit-image (pip install 'vitlens[lime]'), or use "
                           f"segmentation='grid' ({e})") from None
    if n_segments < 1:
        raise VitlensError(f"n_segments must be at least 1, got {n_segments}")
    if method == "slic":
        kw = dict(compactness=10.0, sigma=1.0)
        kw.update(options)
        seg = sk.slic(image, n_segments=n_segments, start_label=0, channel_axis=-1, **kw)
    else:
        kw = dict(kernel_size=4, max_dist=200, ratio=0.2)
        kw.update(options)
        seg = sk.quickshift(image, rng=seed, channel_axis=-1, **kw)
    return relabel(seg)


def boundaries(segments: np.ndarray) -> np.ndarray:
    """Boolean [H, W]: pixels whose right or lower neighbour lies in another segment."""
    s = np.asarray(segments)
    edge = np.zeros(s.shape, dtype=bool)
    edge[:, :-1] |= s[:, :-1] != s[:, 1:]
    edge[:-1, :] |= s[:-1, :] != s[1:, :]
    return edge
