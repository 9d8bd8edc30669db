"""Seeded multi-object scenes: tinted Fashion-MNIST items on plain, noise or photo backgrounds.

Each item is a 28x28 Fashion-MNIST image scaled up, whose intensity becomes the alpha of a flat tint:
``pixel = bg * (1 - a) + tint * a`` with ``a = item / 255``. An item's mask is where its alpha exceeds
``SceneConfig.alpha_threshold`` and no later item (drawn on top) does, so masks are disjoint and match
what is visible. Everything is numpy + Pillow; no torch, no scikit-image at runtime.
"""

from __future__ import annotations

import functools
import json
import operator
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path

import numpy as np
from PIL import Image

from vitlens.data.fashion_mnist import FASHION_MNIST_CLASSES, load_fashion_mnist, load_fixture_items
from vitlens.errors import VitlensError

BACKGROUND_KINDS = ("plain", "noise", "photo")
PHOTOS_FILE = "background_photos.npz"
ITEM_SIDE = 28
NUM_CLASSES = len(FASHION_MNIST_CLASSES)
_SPLIT_SALT = {"train": 1, "test": 2}
_TINT_CANDIDATES = 16

Box = tuple[int, int, int, int]


def _default_backgrounds() -> dict[str, float]:
    return {"plain": 0.3, "noise": 0.3, "photo": 0.4}


@dataclass(frozen=True)
class SceneConfig:
    """How scenes are drawn. Sizes are in pixels; `scale_range` multiplies the 28-pixel item side.

    max_overlap: the most any two item boxes may overlap, as a fraction of the smaller box's area.
    alpha_threshold: an item pixel belongs to its mask where item/255 exceeds this.
    backgrounds: probability of each background kind ("plain", "noise", "photo"); normalised.
    min_contrast: a tint is at least this far (RGB Euclidean) from the mean background under its box, when possible.
    min_item_pixels: items whose 28x28 mask has fewer pixels are redrawn (faint images).
    min_visible: an item is only placed if every earlier item keeps this fraction of its mask visible.
    max_fill: the planned boxes of a multi-item scene cover at most this fraction of it (scales shrink, not below low).
    max_tries: placement attempts per item before it is given up (the scene then has fewer items).
    """

    size: int = 128
    min_items: int = 1
    max_items: int = 3
    scale_range: tuple[float, float] = (1.5, 3.5)
    max_overlap: float = 0.15
    alpha_threshold: float = 0.2
    backgrounds: dict[str, float] = field(default_factory=_default_backgrounds)
    min_contrast: float = 96.0
    min_item_pixels: int = 40
    min_visible: float = 0.5
    max_fill: float = 0.5
    max_tries: int = 50

    def __post_init__(self) -> None:
        lo, hi = self.scale_range
        if not 0 < lo <= hi:
            raise VitlensError(f"SceneConfig.scale_range must satisfy 0 < low <= high, got {self.scale_range}.")
        if round(ITEM_SIDE * hi) > self.size:
            raise VitlensError(
                f"SceneConfig: items up to {round(ITEM_SIDE * hi)} px do not fit a {self.size} px scene; "
                "lower scale_range or raise size."
            )
        if not 1 <= self.min_items <= self.max_items:
            raise VitlensError(
                f"SceneConfig needs 1 <= min_items <= max_items, got {self.min_items}, {self.max_items}."
            )
        if not 0 <= self.max_overlap <= 1 or not 0 <= self.alpha_threshold < 1 or not 0 <= self.min_visible <= 1:
            raise VitlensError(
                "SceneConfig: max_overlap and min_visible must lie in [0, 1], alpha_threshold in [0, 1)."
            )
        if not 0 < self.max_fill <= 1:
            raise VitlensError(f"SceneConfig.max_fill must lie in (0, 1], got {self.max_fill}.")
        unknown = set(self.backgrounds) - set(BACKGROUND_KINDS)
        probs = list(self.backgrounds.values())
        if unknown or any(p < 0 for p in probs) or sum(probs) <= 0:
            raise VitlensError(
                f"SceneConfig.backgrounds must map {BACKGROUND_KINDS} to non-negative weights with a positive sum, "
                f"got {self.backgrounds}."
            )
        if self.max_tries < 1:
            raise VitlensError(f"SceneConfig.max_tries must be at least 1, got {self.max_tries}.")


@dataclass(eq=False)
class Scene:
    """One generated scene. `masks[k]`, `classes[k]`, `boxes[k]` (x0, y0, x1, y1; x1/y1 exclusive) describe item k.

    Items are listed in drawing order (later ones on top). `item_ids[k]` indexes the item arrays the scene was
    drawn from, `tints[k]` is the item's RGB colour and `background` the background kind.
    """

    image: np.ndarray  # uint8 [H, W, 3]
    labels: np.ndarray  # float32 [10], multi-hot
    masks: np.ndarray  # bool [K, H, W], disjoint, visible pixels only
    classes: list[int]
    boxes: list[Box]
    tints: list[tuple[int, int, int]]
    item_ids: list[int]
    background: str


@functools.lru_cache(maxsize=1)
def load_background_photos() -> np.ndarray:
    """The committed background photos (crops of scikit-image's sample images) as uint8 [P, S, S, 3], read-only."""
    with (resources.files("vitlens.data") / "fixtures" / PHOTOS_FILE).open("rb") as fh, np.load(fh) as npz:
        photos = npz["photos"].astype(np.uint8)
    photos.flags.writeable = False
    return photos


def overlap_fraction(a: Box, b: Box) -> float:
    """Intersection area of boxes a and b divided by the area of the smaller one."""
    iw = min(a[2], b[2]) - max(a[0], b[0])
    ih = min(a[3], b[3]) - max(a[1], b[1])
    if iw <= 0 or ih <= 0:
        return 0.0
    smaller = min((a[2] - a[0]) * (a[3] - a[1]), (b[2] - b[0]) * (b[3] - b[1]))
    return iw * ih / smaller


def _resize(image: np.ndarray, width: int, height: int) -> np.ndarray:
    if image.shape[1] == width and image.shape[0] == height:
        return np.ascontiguousarray(image)
    return np.asarray(Image.fromarray(np.ascontiguousarray(image)).resize((width, height), Image.Resampling.BILINEAR))


def make_background(
    rng: np.random.Generator, cfg: SceneConfig | None = None, photos: np.ndarray | None = None
) -> tuple[np.ndarray, str]:
    """Draw a background (uint8 [size, size, 3]) and its kind; make_scene draws it first from its rng."""
    cfg = cfg or SceneConfig()
    kinds = list(cfg.backgrounds)
    weights = np.array([cfg.backgrounds[k] for k in kinds], dtype=np.float64)
    kind = kinds[int(rng.choice(len(kinds), p=weights / weights.sum()))]
    shape = (cfg.size, cfg.size, 3)
    if kind == "plain":
        return np.broadcast_to(rng.integers(0, 256, 3).astype(np.uint8), shape).copy(), kind
    if kind == "noise":
        if rng.random() < 0.5:  # Gaussian around a random colour
            mean, std = rng.integers(0, 256, 3), rng.uniform(8.0, 48.0)
            values = mean + std * rng.standard_normal(shape, dtype=np.float32)
        else:  # uniform in a box around a random colour
            centre, half = rng.integers(0, 256, 3), rng.uniform(16.0, 64.0)
            values = centre + rng.uniform(-half, half, shape).astype(np.float32)
        return np.rint(np.clip(values, 0, 255)).astype(np.uint8), kind
    photos = load_background_photos() if photos is None else np.asarray(photos)
    if photos.ndim != 4 or len(photos) == 0 or photos.shape[-1] != 3:
        raise VitlensError(f"Photo backgrounds need photos shaped [P, H, W, 3] with P >= 1, got {photos.shape}.")
    photo = photos[int(rng.integers(len(photos)))]
    side = min(photo.shape[:2])
    crop = int(rng.integers(int(np.ceil(0.6 * side)), side + 1))
    y0 = int(rng.integers(0, photo.shape[0] - crop + 1))
    x0 = int(rng.integers(0, photo.shape[1] - crop + 1))
    patch = photo[y0 : y0 + crop, x0 : x0 + crop]
    if rng.random() < 0.5:
        patch = patch[:, ::-1]
    return _resize(patch.astype(np.uint8), cfg.size, cfg.size), kind


def _scaled_item(item: np.ndarray, side: int) -> np.ndarray:
    """The 28x28 item resized to side x side (uint8, used as alpha * 255)."""
    return _resize(item, side, side)


def _composite(
    background: np.ndarray,
    alphas: Sequence[np.ndarray],
    boxes: Sequence[Box],
    tints: Sequence[Sequence[int]],
    alpha_threshold: float,
) -> tuple[np.ndarray, np.ndarray]:
    """Blend the items over the background in order; return the uint8 image and the visible masks [K, H, W]."""
    height, width = background.shape[:2]
    canvas = background.astype(np.float32)
    raw = np.zeros((len(alphas), height, width), dtype=bool)
    for k, (alpha_u8, (x0, y0, x1, y1), tint) in enumerate(zip(alphas, boxes, tints, strict=True)):
        a = (alpha_u8.astype(np.float32) / 255.0)[:, :, None]
        region = canvas[y0:y1, x0:x1]
        canvas[y0:y1, x0:x1] = region * (1.0 - a) + np.asarray(tint, dtype=np.float32) * a
        raw[k, y0:y1, x0:x1] = alpha_u8 > alpha_threshold * 255.0
    image = np.rint(np.clip(canvas, 0, 255)).astype(np.uint8)
    return image, _visible(raw)


def _visible(raw: np.ndarray) -> np.ndarray:
    """Masks minus whatever later masks cover: covered[k] = any(raw[k+1:])."""
    if len(raw) == 0:
        return raw
    above = np.logical_or.accumulate(raw[::-1], axis=0)[::-1]  # above[k] = any(raw[k:])
    covered = np.zeros_like(raw)
    covered[:-1] = above[1:]
    return raw & ~covered


def _check_items(images: np.ndarray, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    images, labels = np.asarray(images), np.asarray(labels)
    if images.ndim != 3 or images.shape[1:] != (ITEM_SIDE, ITEM_SIDE) or images.dtype != np.uint8 or len(images) == 0:
        raise VitlensError(f"Scene items must be uint8 [N, 28, 28] with N >= 1, got {images.dtype} {images.shape}.")
    if labels.shape != (len(images),) or not np.issubdtype(labels.dtype, np.integer):
        raise VitlensError(
            f"Scene item labels must be integers shaped [{len(images)}], got {labels.dtype} {labels.shape}."
        )
    if labels.min() < 0 or labels.max() >= NUM_CLASSES:
        raise VitlensError(f"Scene item labels must lie in 0..{NUM_CLASSES - 1}, got {labels.min()}..{labels.max()}.")
    return images, labels.astype(np.int64)


def _pick_tint(rng: np.random.Generator, under: np.ndarray, min_contrast: float) -> tuple[int, int, int]:
    """A random colour at least `min_contrast` from the mean colour `under`, or the farthest of the candidates."""
    candidates = rng.integers(0, 256, (_TINT_CANDIDATES, 3))
    distance = np.linalg.norm(candidates - under, axis=1)
    ok = np.flatnonzero(distance >= min_contrast)
    chosen = candidates[ok[0]] if len(ok) else candidates[int(np.argmax(distance))]
    return int(chosen[0]), int(chosen[1]), int(chosen[2])


def make_scene(
    rng: np.random.Generator,
    items: np.ndarray,
    labels: np.ndarray,
    cfg: SceneConfig | None = None,
    photos: np.ndarray | None = None,
) -> Scene:
    """Draw one scene from `rng`, using items (uint8 [N,28,28]) and their labels (int [N]).

    The background comes first (see make_background), then the number of items (min_items..max_items) and their
    scales, shrunk together when their boxes would cover more than max_fill of the scene. Each item gets up to
    max_tries random positions (the second half with a smaller random scale); one that does not fit is dropped.
    `photos` (uint8 [P,H,W,3]) defaults to the committed background photos.
    """
    cfg = cfg or SceneConfig()
    items, labels = _check_items(items, labels)
    background, kind = make_background(rng, cfg, photos)
    threshold = cfg.alpha_threshold * 255.0
    n_wanted = int(rng.integers(cfg.min_items, cfg.max_items + 1))
    alphas: list[np.ndarray] = []
    raws: list[np.ndarray] = []
    boxes: list[Box] = []
    tints: list[tuple[int, int, int]] = []
    ids: list[int] = []
    lo, hi = cfg.scale_range
    scales = rng.uniform(lo, hi, n_wanted)
    total = float(np.sum((ITEM_SIDE * scales) ** 2))
    budget = cfg.max_fill * cfg.size**2
    if n_wanted > 1 and total > budget:  # shrink the planned scales together so that the items can fit
        scales = np.maximum(lo, scales * np.sqrt(budget / total))
    for planned in scales:
        idx = int(rng.integers(len(items)))
        for _ in range(cfg.max_tries - 1):  # redraw faint items
            if np.count_nonzero(items[idx] > threshold) >= cfg.min_item_pixels:
                break
            idx = int(rng.integers(len(items)))
        for attempt in range(cfg.max_tries):  # the planned scale first, then smaller ones
            scale = planned if attempt < cfg.max_tries // 2 else float(rng.uniform(lo, planned))
            side = max(1, round(ITEM_SIDE * scale))
            x0 = int(rng.integers(0, cfg.size - side + 1))
            y0 = int(rng.integers(0, cfg.size - side + 1))
            box = (x0, y0, x0 + side, y0 + side)
            if any(overlap_fraction(box, other) > cfg.max_overlap for other in boxes):
                continue
            alpha = _scaled_item(items[idx], side)
            raw = np.zeros((cfg.size, cfg.size), dtype=bool)
            raw[y0 : y0 + side, x0 : x0 + side] = alpha > threshold
            if not raw.any() or not _keeps_visible(raws, raw, cfg.min_visible):
                continue
            under = background[y0 : y0 + side, x0 : x0 + side].reshape(-1, 3).mean(axis=0)
            tints.append(_pick_tint(rng, under, cfg.min_contrast))
            alphas.append(alpha)
            raws.append(raw)
            boxes.append(box)
            ids.append(idx)
            break
    image, masks = _composite(background, alphas, boxes, tints, cfg.alpha_threshold)
    classes = [int(labels[i]) for i in ids]
    multi_hot = np.zeros(NUM_CLASSES, dtype=np.float32)
    multi_hot[classes] = 1.0
    return Scene(image, multi_hot, masks, classes, boxes, tints, ids, kind)


def _keeps_visible(raws: list[np.ndarray], new: np.ndarray, min_visible: float) -> bool:
    """Whether every earlier mask keeps at least `min_visible` of its pixels once `new` is drawn on top."""
    cover = new.copy()
    for raw in reversed(raws):
        total = np.count_nonzero(raw)
        if np.count_nonzero(raw & ~cover) < min_visible * total:
            return False
        cover |= raw
    return True


class SceneDataset:
    """`n` scenes; `ds[i]` depends only on (seed, split, i), whatever the access order.

    Items come from the Fashion-MNIST `split` ("test" scenes use only test items), read by load_fashion_mnist
    from `root`; pass `items=(images, labels)` instead (e.g. load_fixture_items()) to skip the files.
    """

    def __init__(
        self,
        n: int,
        seed: int = 0,
        split: str = "test",
        cfg: SceneConfig | None = None,
        items: tuple[np.ndarray, np.ndarray] | None = None,
        root: str | Path | None = None,
        photos: np.ndarray | None = None,
    ) -> None:
        if split not in _SPLIT_SALT:
            raise VitlensError(f"Unknown scene split {split!r}: use 'train' or 'test'.")
        if int(n) < 0 or int(seed) < 0:
            raise VitlensError(f"SceneDataset needs n >= 0 and seed >= 0, got n={n}, seed={seed}.")
        self.n, self.seed, self.split = int(n), int(seed), split
        self.cfg = cfg or SceneConfig()
        images, labels = items if items is not None else load_fashion_mnist(split, root)
        self.images, self.item_labels = _check_items(images, labels)
        self.photos = load_background_photos() if photos is None else np.asarray(photos)
        self.class_names = FASHION_MNIST_CLASSES

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, index: int) -> Scene:
        i = operator.index(index)
        if i < 0:
            i += self.n
        if not 0 <= i < self.n:
            raise IndexError(f"scene index {index} out of range for {self.n} scenes")
        rng = np.random.default_rng([self.seed, _SPLIT_SALT[self.split], i])
        return make_scene(rng, self.images, self.item_labels, self.cfg, self.photos)

    def __iter__(self) -> Iterator[Scene]:
        return (self[i] for i in range(self.n))


# ---------------------------------------------------------------- demo scenes

DEMO_SIZE = 128


@dataclass(eq=False)
class DemoScene:
    """A fixed two-object scene shipped with vitlens: image uint8 [H,W,3], masks bool [K,H,W], classes per mask."""

    name: str
    image: np.ndarray
    masks: np.ndarray
    classes: list[int]
    boxes: list[Box] = field(default_factory=list)

    @property
    def labels(self) -> np.ndarray:
        """Multi-hot float32 [10] over the classes present."""
        out = np.zeros(NUM_CLASSES, dtype=np.float32)
        out[self.classes] = 1.0
        return out

    @property
    def class_names(self) -> list[str]:
        """The Fashion-MNIST class name of each mask."""
        return [FASHION_MNIST_CLASSES[c] for c in self.classes]

    def pil(self) -> Image.Image:
        """The image as a PIL RGB image."""
        return Image.fromarray(self.image)


# name, (left class, right class), background ("plain", RGB) or ("photo", index into the photos), tints
_DEMO_SPECS: tuple[tuple[str, tuple[int, int], tuple[str, object], tuple[tuple[int, int, int], ...]], ...] = (
    ("sneaker_bag", (7, 8), ("plain", (28, 36, 52)), ((250, 196, 60), (96, 200, 250))),
    ("coat_trouser", (4, 1), ("plain", (236, 232, 220)), ((40, 70, 160), (170, 40, 50))),
    ("ankleboot_dress", (9, 3), ("photo", 1), ((20, 230, 120), (250, 40, 200))),
    ("tshirt_sandal", (0, 5), ("plain", (60, 110, 70)), ((250, 250, 250), (250, 150, 40))),
    ("pullover_sneaker", (2, 7), ("photo", 3), ((255, 120, 60), (120, 255, 255))),
    ("shirt_bag", (6, 8), ("plain", (120, 80, 150)), ((250, 240, 120), (40, 230, 200))),
)


def _typical_items(images: np.ndarray, labels: np.ndarray, cls: int, threshold: float) -> np.ndarray:
    """Indices of class `cls`, most typical first: by IoU of each mask with the class's majority mask."""
    idx = np.flatnonzero(labels == cls)
    if len(idx) == 0:
        raise VitlensError(f"The demo scenes need items of class {cls} ({FASHION_MNIST_CLASSES[cls]}); none given.")
    masks = images[idx] > threshold
    majority = masks.mean(axis=0) > 0.5
    inter = (masks & majority).sum(axis=(1, 2))
    union = (masks | majority).sum(axis=(1, 2))
    iou = inter / np.maximum(union, 1)
    return idx[np.argsort(-iou, kind="stable")]


def demo_scenes(
    items: tuple[np.ndarray, np.ndarray] | None = None, photos: np.ndarray | None = None, size: int = DEMO_SIZE
) -> list[DemoScene]:
    """Build the fixed two-object demo scenes (no randomness) from the committed fixture items and photos."""
    images, labels = _check_items(*(items if items is not None else load_fixture_items()))
    photos = load_background_photos() if photos is None else np.asarray(photos)
    alpha_threshold = SceneConfig().alpha_threshold
    side = round(0.45 * size)
    y0 = (size - side) // 2
    lefts = (size // 4 - side // 2, 3 * size // 4 - side // 2)
    used: dict[int, int] = {}
    scenes = []
    for name, pair, (kind, spec), tints in _DEMO_SPECS:
        if kind == "plain":
            background = np.broadcast_to(np.asarray(spec, dtype=np.uint8), (size, size, 3)).copy()
        else:
            assert isinstance(spec, int), spec  # a photo background is named by its index
            background = _resize(np.asarray(photos[spec], dtype=np.uint8), size, size)
        alphas, boxes = [], []
        for cls, x0 in zip(pair, lefts, strict=True):
            rank = used.get(cls, 0)
            used[cls] = rank + 1
            idx = _typical_items(images, labels, cls, alpha_threshold * 255.0)[rank]
            alphas.append(_scaled_item(images[idx], side))
            boxes.append((x0, y0, x0 + side, y0 + side))
        image, masks = _composite(background, alphas, boxes, tints, alpha_threshold)
        scenes.append(DemoScene(name, image, masks, list(pair), boxes))
    return scenes


def write_demo_scenes(folder: str | Path, scenes: list[DemoScene] | None = None) -> list[Path]:
    """Write the demo scenes as <name>.png, <name>_mask<k>.png (0/255) and scenes.json; return the paths written."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    scenes = demo_scenes() if scenes is None else scenes
    written, entries = [], []
    for scene in scenes:
        image_name = f"{scene.name}.png"
        scene.pil().save(folder / image_name, optimize=True)
        written.append(folder / image_name)
        mask_names = []
        for k, mask in enumerate(scene.masks):
            mask_name = f"{scene.name}_mask{k}.png"
            Image.fromarray(mask.astype(np.uint8) * 255).save(folder / mask_name, optimize=True)
            mask_names.append(mask_name)
            written.append(folder / mask_name)
        entries.append(
            {
                "name": scene.name,
                "image": image_name,
                "masks": mask_names,
                "classes": list(scene.classes),
                "class_names": scene.class_names,
                "boxes": [list(b) for b in scene.boxes],
            }
        )
    index = folder / "scenes.json"
    index.write_text(json.dumps({"scenes": entries}, indent=2) + "\n")
    written.append(index)
    return written


def load_demo_scenes(folder: str | Path | None = None) -> list[DemoScene]:
    """Read the demo scenes shipped under vitlens/assets/scenes (or from `folder`, as written by write_demo_scenes)."""
    base = Path(folder) if folder is not None else resources.files("vitlens") / "assets" / "scenes"
    try:
        index = json.loads(base.joinpath("scenes.json").read_text())
    except (OSError, ValueError) as exc:
        detail = " ".join(str(exc).split())
        raise VitlensError(
            f"Demo scenes index {base}/scenes.json is missing or invalid ({detail}); reinstall vitlens."
        ) from None
    scenes = []
    for entry in index["scenes"]:
        with base.joinpath(entry["image"]).open("rb") as fh:
            image = np.asarray(Image.open(fh).convert("RGB"), dtype=np.uint8)
        masks = []
        for mask_name in entry["masks"]:
            with base.joinpath(mask_name).open("rb") as fh:
                masks.append(np.asarray(Image.open(fh).convert("L")) > 127)
        boxes: list[Box] = [(int(x0), int(y0), int(x1), int(y1)) for x0, y0, x1, y1 in entry.get("boxes", [])]
        scenes.append(DemoScene(entry["name"], image, np.stack(masks), [int(c) for c in entry["classes"]], boxes))
    return scenes
