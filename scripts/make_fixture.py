"""Regenerate vitlens' committed data fixtures, deterministically.

Writes:
  src/vitlens/data/fixtures/fashion_mnist_test_subset.npz  the first 50 t10k items of each class
  src/vitlens/data/fixtures/background_photos.npz          square crops of scikit-image's sample photos
  src/vitlens/assets/scenes/                               the demo scenes (PNG images, masks, scenes.json)

Needs the Debian package dataset-fashion-mnist (or --root) and scikit-image; neither is a runtime dependency.
Run from the repository root:  .venv/bin/python scripts/make_fixture.py
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
FIXTURES = REPO / "src" / "vitlens" / "data" / "fixtures"
SCENES = REPO / "src" / "vitlens" / "assets" / "scenes"
PER_CLASS = 50
PHOTO_SIDE = 128
# (name in skimage.data, how to pick the square: fraction of the width/height where the crop is centred)
PHOTOS: tuple[tuple[str, tuple[float, float]], ...] = (
    ("astronaut", (0.5, 0.5)),
    ("chelsea", (0.5, 0.5)),
    ("coffee", (0.5, 0.5)),
    ("rocket", (0.5, 0.5)),
    ("hubble_deep_field", (0.5, 0.5)),
    ("immunohistochemistry", (0.5, 0.5)),
    ("grass", (0.5, 0.5)),
    ("brick", (0.5, 0.5)),
)


def make_subset(root: Path | None, per_class: int = PER_CLASS) -> dict[str, np.ndarray]:
    """The first `per_class` items of each class from the Fashion-MNIST test split, in class order."""
    from vitlens.data.fashion_mnist import load_fashion_mnist

    images, labels = load_fashion_mnist("test", root)
    indices = np.concatenate([np.flatnonzero(labels == c)[:per_class] for c in range(10)])
    return {"images": images[indices], "labels": labels[indices], "indices": indices.astype(np.int64)}


def make_photos(side: int = PHOTO_SIDE) -> dict[str, np.ndarray]:
    """Square `side` x `side` RGB crops of scikit-image's sample photos (short side scaled to `side`)."""
    import skimage.data
    from PIL import Image

    crops, names = [], []
    for name, (cx, cy) in PHOTOS:
        photo = np.asarray(getattr(skimage.data, name)())
        if photo.ndim == 2:
            photo = np.repeat(photo[:, :, None], 3, axis=2)
        img = Image.fromarray(photo[:, :, :3])
        scale = side / min(img.size)
        w, h = max(side, round(img.width * scale)), max(side, round(img.height * scale))
        img = img.resize((w, h), Image.Resampling.LANCZOS)
        x0 = min(max(0, round(cx * w - side / 2)), w - side)
        y0 = min(max(0, round(cy * h - side / 2)), h - side)
        crops.append(np.asarray(img.crop((x0, y0, x0 + side, y0 + side)), dtype=np.uint8))
        names.append(name)
    return {"photos": np.stack(crops), "names": np.array(names)}


def main(argv: list[str] | None = None) -> None:
    """Write the fixtures and the demo scenes."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--root", type=Path, default=None, help="folder holding the Fashion-MNIST IDX files")
    args = parser.parse_args(argv)
    sys.path.insert(0, str(REPO / "src"))
    from vitlens.data.scenes import PHOTOS_FILE, write_demo_scenes

    FIXTURES.mkdir(parents=True, exist_ok=True)
    subset_path = FIXTURES / "fashion_mnist_test_subset.npz"
    np.savez_compressed(subset_path, **make_subset(args.root))
    photos_path = FIXTURES / PHOTOS_FILE
    np.savez_compressed(photos_path, **make_photos())
    written = write_demo_scenes(SCENES)
    for path in (subset_path, photos_path):
        print(f"wrote {path.relative_to(REPO)} ({path.stat().st_size / 1024:.0f} KiB)")
    print(f"wrote {len(written)} files under {SCENES.relative_to(REPO)}")


if __name__ == "__main__":
    main()
