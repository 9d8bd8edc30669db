"""Images with ground truth for the evaluation: the held-out scenes, or a folder of images with masks or boxes.

A folder holds ``NAME.png`` (or any image vitlens reads) with, beside it, ``NAME.mask.png`` (non-zero = object)
and/or ``NAME.json``: ``{"boxes": [[x0, y0, x1, y1], ...], "class": INDEX or "label"}`` (boxes in pixels of the
original image, x1/y1 exclusive; both keys optional). Masks and boxes go through the model's own resize and crop.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from vitlens.errors import VitlensError

MASK_SUFFIX = ".mask"
MAX_BOXES = 1000


@dataclass
class Sample:
    """One image as the model sees it (``view``) with its objects: (class index or None, bool mask [H, W]).
    ``key`` is its id in a `vitlens run` store (the path relative to the folder; the name when empty)."""

    name: str
    view: Image.Image
    objects: list[tuple[int | None, np.ndarray]]
    key: str = ""


def _mask_view(model: Any, mask: np.ndarray) -> np.ndarray:
    """A bool mask [h, w] of the original image through the model's resize and crop."""
    img = Image.fromarray(np.where(mask, 255, 0).astype(np.uint8)).convert("RGB")
    return np.asarray(model.preprocess.view(img))[..., 0] > 127


def scene_key(i: int) -> str:
    """The name (and `vitlens run` id) of held-out scene ``i``."""
    return f"scene{i:04d}"


def scene_samples(model: Any, n: int) -> list[Sample]:
    """The first ``n`` held-out two-object scenes (`vitlens.train.embedded.localisation_scenes`: seeded test scenes of
    the committed Fashion-MNIST test items, never seen in training), each item a class with its mask."""
    from vitlens.train.embedded import localisation_scenes

    images, masks, classes, _ = localisation_scenes(n)
    return [Sample(scene_key(i), model.preprocess.view(Image.fromarray(im)),
                   [(int(c), _mask_view(model, m)) for c, m in zip(cs, ms)])
            for i, (im, ms, cs) in enumerate(zip(images, masks, classes))]


def _class(model: Any, value: Any, where: Path) -> int | None:
    if value is None:
        return None
    from vitlens.models.labels import resolve_target

    try:
        index = resolve_target(model, value)
        if index is None:
            return None
        return int(index)
    except VitlensError as e:
        raise VitlensError(f"{where}: {e}") from None


def _boxes(value: Any, size: tuple[int, int], where: Path) -> np.ndarray:
    w, h = size
    if not isinstance(value, list) or len(value) > MAX_BOXES:
        raise VitlensError(f"{where}: 'boxes' must be a list of at most {MAX_BOXES} [x0, y0, x1, y1] boxes")
    mask = np.zeros((h, w), dtype=bool)
    for b in value:
        if not (isinstance(b, list) and len(b) == 4 and all(isinstance(v, (int, float)) and not isinstance(v, bool)
                                                             and np.isfinite(v) for v in b)):
            raise VitlensError(f"{where}: each box must be [x0, y0, x1, y1] in pixels, got {str(b)[:60]}")
        x0, y0, x1, y1 = (int(round(v)) for v in b)
        if not (0 <= x0 < x1 <= w and 0 <= y0 < y1 <= h):
            raise VitlensError(f"{where}: box {b} lies outside the {w}x{h} image or is empty")
        mask[y0:y1, x0:x1] = True
    return mask


def folder_samples(model: Any, folder: str | Path, n: int | None = None) -> list[Sample]:
    """Images of ``folder`` (sorted by name) that have a mask or a JSON with boxes; at most ``n``."""
    from vitlens.images import find_images, load_image

    root = Path(folder)
    if not root.is_dir():
        raise VitlensError(f"--data {folder}: not a folder; give 'scenes' or a folder of images with masks")
    out: list[Sample] = []
    for p in find_images([root]):
        if p.stem.endswith(MASK_SUFFIX):
            continue
        mask_path = p.with_name(p.stem + MASK_SUFFIX + ".png")
        meta_path = p.with_suffix(".json")
        if not mask_path.is_file() and not meta_path.is_file():
            continue
        image = load_image(p)
        mask = None
        if mask_path.is_file():
            m = load_image(mask_path)
            if m.size != image.size:
                raise VitlensError(f"{mask_path}: mask is {m.size[0]}x{m.size[1]} but its image is "
                                   f"{image.size[0]}x{image.size[1]}; give a mask of the image's size")
            mask = np.asarray(m.convert("L")) > 0
        cls = None
        if meta_path.is_file():
            try:
                meta = json.loads(meta_path.read_text())
            except (ValueError, RecursionError, UnicodeDecodeError):
                raise VitlensError(f"{meta_path}: not valid JSON; give {{\"boxes\": [[x0, y0, x1, y1]], "
                                   "\"class\": INDEX}}") from None
            if not isinstance(meta, dict):
                raise VitlensError(f"{meta_path}: expected a JSON object with 'boxes' and/or 'class'")
            cls = _class(model, meta.get("class"), meta_path)
            if "boxes" in meta:
                boxes = _boxes(meta["boxes"], image.size, meta_path)
                mask = boxes if mask is None else mask | boxes
        if mask is None:
            raise VitlensError(f"{meta_path}: no mask image and no 'boxes'; give {p.stem}{MASK_SUFFIX}.png or boxes")
        out.append(Sample(p.stem, model.preprocess.view(image), [(cls, _mask_view(model, mask))],
                          p.relative_to(root).as_posix()))
        if n is not None and len(out) >= n:
            break
    if not out:
        raise VitlensError(f"--data {folder}: no image there has a mask (NAME{MASK_SUFFIX}.png) or boxes (NAME.json)")
    return out


def load_samples(model: Any, data: str, n: int) -> list[Sample]:
    """``data`` = 'scenes' (held-out scenes) or a folder; ``n`` images at most."""
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise VitlensError(f"--n must be a positive whole number, got {n!r}")
    if data == "scenes":
        return scene_samples(model, n)
    return folder_samples(model, data, n)
