"""Seeded scenes: determinism, masks that match what is visible, labels, overlap, splits, demo scenes."""

from __future__ import annotations

import gzip
import struct
from itertools import combinations
from pathlib import Path

import numpy as np
import pytest

from vitlens.data import (
    FASHION_MNIST_CLASSES,
    SceneConfig,
    SceneDataset,
    demo_scenes,
    load_background_photos,
    load_demo_scenes,
    load_fixture_items,
    make_background,
    make_scene,
    write_demo_scenes,
)
from vitlens.errors import VitlensError

ITEMS = load_fixture_items()


def scene_arrays(scene) -> list:
    return [scene.image, scene.labels, scene.masks, scene.classes, scene.boxes, scene.tints, scene.item_ids]


def assert_same_scene(a, b) -> None:
    for x, y in zip(scene_arrays(a), scene_arrays(b), strict=True):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
    assert a.background == b.background


def box_overlap(a, b) -> float:
    """Intersection over the smaller box's area, computed with pixel masks."""
    size = max(a[2], a[3], b[2], b[3])
    ma, mb = np.zeros((size, size), bool), np.zeros((size, size), bool)
    ma[a[1] : a[3], a[0] : a[2]] = True
    mb[b[1] : b[3], b[0] : b[2]] = True
    return (ma & mb).sum() / min(ma.sum(), mb.sum())


def blend_fraction(pixels: np.ndarray, base: np.ndarray, tint: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Project pixels onto the segment base -> tint: the fraction a and the distance off the segment's line."""
    pixels, base, tint = (np.asarray(v, dtype=np.float64) for v in (pixels, base, tint))
    direction = tint - base
    a = ((pixels - base) * direction).sum(-1) / (direction * direction).sum(-1)
    off = np.linalg.norm(pixels - (base + a[..., None] * direction), axis=-1)
    return a, off


def test_determinism_independent_of_access_order() -> None:
    first = SceneDataset(40, seed=3, items=ITEMS)
    forward = {i: first[i] for i in (0, 5, 17, 39)}
    second = SceneDataset(40, seed=3, items=ITEMS)
    for i in (39, 11, 17, 2, 5, 0):
        scene = second[i]
        if i in forward:
            assert_same_scene(scene, forward[i])
    assert_same_scene(second[-1], forward[39])
    with pytest.raises(IndexError):
        second[40]


def test_different_seeds_and_splits_differ() -> None:
    a = SceneDataset(8, seed=3, items=ITEMS)
    b = SceneDataset(8, seed=4, items=ITEMS)
    c = SceneDataset(8, seed=3, split="train", items=ITEMS)
    for i in range(8):
        assert not np.array_equal(a[i].image, b[i].image)
        assert not np.array_equal(a[i].image, c[i].image)


def test_scene_structure_labels_overlap() -> None:
    cfg = SceneConfig(max_items=4)
    ds = SceneDataset(150, seed=11, cfg=cfg, items=ITEMS)
    counts, kinds = set(), set()
    lo, hi = cfg.scale_range
    for scene in ds:
        k = len(scene.classes)
        counts.add(k)
        kinds.add(scene.background)
        assert scene.image.dtype == np.uint8 and scene.image.shape == (cfg.size, cfg.size, 3)
        assert scene.masks.dtype == np.bool_ and scene.masks.shape == (k, cfg.size, cfg.size)
        assert len(scene.boxes) == len(scene.tints) == len(scene.item_ids) == k
        assert cfg.min_items <= k <= cfg.max_items
        assert scene.labels.dtype == np.float32 and scene.labels.shape == (10,)
        assert set(np.flatnonzero(scene.labels)) == set(scene.classes)
        assert set(np.unique(scene.labels)) <= {0.0, 1.0}
        np.testing.assert_array_equal(ITEMS[1][scene.item_ids], scene.classes)
        assert (scene.masks.sum(axis=0) <= 1).all(), "masks overlap"
        for mask, (x0, y0, x1, y1) in zip(scene.masks, scene.boxes, strict=True):
            assert mask.any()
            assert 0 <= x0 < x1 <= cfg.size and 0 <= y0 < y1 <= cfg.size
            assert x1 - x0 == y1 - y0 and round(28 * lo) <= x1 - x0 <= round(28 * hi)
            inside = np.zeros_like(mask)
            inside[y0:y1, x0:x1] = True
            assert not (mask & ~inside).any(), "mask leaves its box"
        for a, b in combinations(scene.boxes, 2):
            assert box_overlap(a, b) <= cfg.max_overlap + 1e-9
    assert counts >= {1, 2, 3}
    assert kinds == {"plain", "noise", "photo"}


def test_masks_match_visible_blend_on_plain_background() -> None:
    cfg = SceneConfig(backgrounds={"plain": 1.0})
    ds = SceneDataset(60, seed=5, cfg=cfg, items=ITEMS)
    checked = overlaps = 0
    for scene in ds:
        pixels = scene.image.reshape(-1, 3)
        colours, counts = np.unique(pixels, axis=0, return_counts=True)
        background = colours[np.argmax(counts)]
        boxes = np.zeros((len(scene.boxes), cfg.size, cfg.size), bool)
        for k, (x0, y0, x1, y1) in enumerate(scene.boxes):
            boxes[k, y0:y1, x0:x1] = True
        outside = ~boxes.any(axis=0)
        assert (scene.image[outside] == background).all()
        for k, tint in enumerate(scene.tints):
            alone = boxes[k] & ~np.delete(boxes, k, axis=0).any(axis=0)  # only item k can touch these pixels
            a, off = blend_fraction(scene.image[alone], background, tint)
            tol = 1.0 / np.linalg.norm(np.subtract(tint, background, dtype=np.float64))
            assert off.max() <= 1.0, "pixel not a blend of background and tint"
            in_mask = scene.masks[k][alone]
            assert (a[in_mask] >= cfg.alpha_threshold - tol).all() and (a <= 1 + tol).all()
            assert (a[~in_mask] <= cfg.alpha_threshold + tol).all()
            checked += int(in_mask.sum())
        for k, j in combinations(range(len(scene.tints)), 2):  # j is drawn on top of k
            both = boxes[k] & boxes[j] & (boxes.sum(axis=0) == 2)
            # p - c = u (t_k - c) + v (t_j - c), with v = a_j and u = a_k (1 - a_j): linear least squares
            basis = np.stack([np.subtract(scene.tints[k], background), np.subtract(scene.tints[j], background)], 1)
            if not both.any() or np.linalg.cond(basis) > 10:
                continue
            rhs = (scene.image[both].astype(float) - background).T
            (u, v), *_ = np.linalg.lstsq(basis.astype(float), rhs, rcond=None)
            a_k = u / np.maximum(1 - v, 1e-6)
            thr, margin = cfg.alpha_threshold, 0.05
            top = v > thr + margin
            under = (v < thr - margin) & (a_k > thr + margin) & (v < 0.9)
            neither = (v < thr - margin) & (a_k < thr - margin)
            assert scene.masks[j][both][top].all() and not scene.masks[k][both][top].any()
            assert scene.masks[k][both][under].all() and not scene.masks[j][both][under].any()
            assert not (scene.masks[k] | scene.masks[j])[both][neither].any()
            overlaps += int(top.sum() + under.sum())
    assert checked > 0 and overlaps > 0


@pytest.mark.parametrize("kind", ["noise", "photo"])
def test_masks_match_visible_blend_on_textured_background(kind: str) -> None:
    cfg = SceneConfig(backgrounds={kind: 1.0})
    photos = load_background_photos()
    for seed in range(20):
        background, got_kind = make_background(np.random.default_rng(seed), cfg, photos)
        scene = make_scene(np.random.default_rng(seed), *ITEMS, cfg=cfg, photos=photos)
        assert got_kind == scene.background == kind
        boxes = np.zeros((len(scene.boxes), cfg.size, cfg.size), bool)
        for k, (x0, y0, x1, y1) in enumerate(scene.boxes):
            boxes[k, y0:y1, x0:x1] = True
        np.testing.assert_array_equal(scene.image[~boxes.any(axis=0)], background[~boxes.any(axis=0)])
        for k, tint in enumerate(scene.tints):
            alone = boxes[k] & ~np.delete(boxes, k, axis=0).any(axis=0)
            distance = np.linalg.norm(np.asarray(tint, float) - background.astype(float), axis=-1)
            usable = alone & (distance >= 48)
            a, off = blend_fraction(scene.image[usable], background[usable], tint)
            tol = 1.0 / distance[usable]
            assert (off <= 1.0).all()
            in_mask = scene.masks[k][usable]
            assert (a[in_mask] >= cfg.alpha_threshold - tol[in_mask]).all()
            assert (a[~in_mask] <= cfg.alpha_threshold + tol[~in_mask]).all()


def idx_gz(array: np.ndarray) -> bytes:
    array = np.ascontiguousarray(array, dtype=np.uint8)
    header = struct.pack(">BBBB", 0, 0, 0x08, array.ndim) + struct.pack(f">{array.ndim}I", *array.shape)
    return gzip.compress(header + array.tobytes())


def test_test_split_uses_only_test_items(tmp_path: Path) -> None:
    images, labels = ITEMS
    test_part, train_part = labels < 5, labels >= 5  # a fake Fashion-MNIST whose splits share no class
    for prefix, part in (("t10k", test_part), ("train", train_part)):
        (tmp_path / f"{prefix}-images-idx3-ubyte.gz").write_bytes(idx_gz(images[part]))
        (tmp_path / f"{prefix}-labels-idx1-ubyte.gz").write_bytes(idx_gz(labels[part]))
    for split, part in (("test", test_part), ("train", train_part)):
        ds = SceneDataset(40, seed=2, split=split, root=tmp_path)
        allowed = set(np.unique(labels[part]).tolist())
        drawn = [c for scene in ds for c in scene.classes]
        assert drawn and set(drawn) <= allowed
        assert all(set(np.flatnonzero(scene.labels).tolist()) <= allowed for scene in ds)


def test_gives_up_gracefully_when_items_do_not_fit() -> None:
    cfg = SceneConfig(size=64, scale_range=(2.0, 2.2), min_items=3, max_items=3, max_overlap=0.0, max_tries=10)
    for scene in SceneDataset(10, seed=0, cfg=cfg, items=ITEMS):
        assert 1 <= len(scene.classes) < 3
        for a, b in combinations(scene.boxes, 2):
            assert box_overlap(a, b) == 0


def test_config_and_item_validation() -> None:
    with pytest.raises(VitlensError):
        SceneConfig(size=64, scale_range=(1.5, 3.5))
    with pytest.raises(VitlensError):
        SceneConfig(backgrounds={"stripes": 1.0})
    with pytest.raises(VitlensError):
        SceneConfig(min_items=3, max_items=2)
    with pytest.raises(VitlensError):
        SceneDataset(4, items=(ITEMS[0][:, :14, :14], ITEMS[1]))
    with pytest.raises(VitlensError):
        SceneDataset(4, split="validation", items=ITEMS)


def test_background_photos() -> None:
    photos = load_background_photos()
    assert photos.dtype == np.uint8 and photos.ndim == 4 and photos.shape[-1] == 3 and len(photos) >= 4
    assert not photos.flags.writeable


def test_shipped_demo_scenes() -> None:
    scenes = load_demo_scenes()
    assert len(scenes) >= 6
    for scene in scenes:
        assert len(scene.masks) == len(scene.classes) == 2
        assert scene.image.dtype == np.uint8 and scene.image.shape[2] == 3
        assert scene.masks.shape[1:] == scene.image.shape[:2]
        assert all(mask.any() for mask in scene.masks) and not (scene.masks[0] & scene.masks[1]).any()
        assert box_overlap(*scene.boxes) == 0
        assert set(np.flatnonzero(scene.labels)) == set(scene.classes)
        for word, name in zip(scene.name.split("_"), scene.class_names, strict=True):
            assert "".join(ch for ch in name.lower() if ch.isalnum()).startswith(word)
        assert scene.class_names == [FASHION_MNIST_CLASSES[c] for c in scene.classes]


def test_demo_scenes_regenerate_and_round_trip(tmp_path: Path) -> None:
    built = demo_scenes()
    shipped = {scene.name: scene for scene in load_demo_scenes()}
    assert [s.name for s in built] == list(shipped)
    for scene in built:
        ref = shipped[scene.name]
        assert scene.classes == ref.classes
        assert np.abs(scene.image.astype(int) - ref.image.astype(int)).mean() < 1.0
        for mine, theirs in zip(scene.masks, ref.masks, strict=True):
            assert (mine & theirs).sum() / (mine | theirs).sum() > 0.98
    write_demo_scenes(tmp_path, built)
    for scene, again in zip(built, load_demo_scenes(tmp_path), strict=True):
        np.testing.assert_array_equal(scene.image, again.image)
        np.testing.assert_array_equal(scene.masks, again.masks)
        assert scene.classes == again.classes and scene.boxes == again.boxes
