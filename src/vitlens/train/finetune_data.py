"""Fine-tuning data: an ImageFolder-layout folder, Fashion-MNIST single items, or multi-label vitlens scenes, each as
uint8 images at the training size with a fixed held-out split (the same for every seed, so seeds vary training only).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from vitlens.errors import VitlensError

DATA_SEED = 0  # which items are drawn does not depend on the training seed
BUILTIN = ("fashion-mnist", "scenes")


@dataclass
class TaskData:
    """Training and held-out images (uint8 [N, S, S, 3]) and labels (int64 [N], or float32 multi-hot [N, C])."""

    name: str
    train_images: np.ndarray
    train_labels: np.ndarray
    eval_images: np.ndarray
    eval_labels: np.ndarray
    classes: list[str]
    multi_label: bool

    def describe(self) -> dict:
        """Sizes and classes, for the metrics JSON."""
        return {"data": self.name, "train": len(self.train_images), "held_out": len(self.eval_images),
                "classes": self.classes, "multi_label": self.multi_label,
                "image_size": int(self.train_images.shape[1])}


def _resize(img: Image.Image, size: int) -> np.ndarray:
    img = img.convert("RGB")
    if img.size != (size, size):
        img = img.resize((size, size), Image.Resampling.BICUBIC)
    return np.asarray(img, dtype=np.uint8)


def _check_counts(n_train: int, n_eval: int) -> None:
    for name, n in (("--n-train", n_train), ("--n-eval", n_eval)):
        if isinstance(n, bool) or not isinstance(n, int) or n < 1:
            raise VitlensError(f"{name} must be a whole number >= 1, got {n!r}")


def fashion_mnist_task(size: int, n_train: int = 1000, n_eval: int = 500, root: str | Path | None = None) -> TaskData:
    """Single Fashion-MNIST items (grey, as RGB) resized to ``size`` px: ``n_train`` from the train split and
    ``n_eval`` from the test split, drawn with a fixed seed; 10-way single-label classification."""
    from vitlens.data.fashion_mnist import FASHION_MNIST_CLASSES, load_fashion_mnist

    _check_counts(n_train, n_eval)
    parts = []
    for split, n in (("train", n_train), ("test", n_eval)):
        images, labels = load_fashion_mnist(split, root)
        if n > len(images):
            raise VitlensError(f"asked for {n} Fashion-MNIST {split} images, the split has {len(images)}")
        idx = np.random.default_rng(DATA_SEED).permutation(len(images))[:n]
        parts.append((np.stack([_resize(Image.fromarray(images[i]), size) for i in idx]), labels[idx].astype(np.int64)))
    (tr_x, tr_y), (ev_x, ev_y) = parts
    return TaskData("fashion-mnist", tr_x, tr_y, ev_x, ev_y, list(FASHION_MNIST_CLASSES), False)


def scenes_task(size: int, n_train: int = 1000, n_eval: int = 500) -> TaskData:
    """vitlens scenes (1-3 Fashion-MNIST items on backgrounds) resized to ``size`` px; multi-label over 10 classes.
    Train scenes from the train items, held-out scenes from the test items."""
    from vitlens.data.fashion_mnist import FASHION_MNIST_CLASSES
    from vitlens.train.embedded import scene_arrays

    _check_counts(n_train, n_eval)
    tr_x, tr_y, _, _ = scene_arrays(n_train, DATA_SEED, "train", size)
    ev_x, ev_y, _, _ = scene_arrays(n_eval, DATA_SEED, "test", size)
    return TaskData("scenes", tr_x, tr_y, ev_x, ev_y, list(FASHION_MNIST_CLASSES), True)


def folder_task(folder: str | Path, size: int, eval_fraction: float = 0.2) -> TaskData:
    """An ImageFolder layout (one sub-folder of images per class, named after the class): every class is split with a
    fixed seed into training and held-out images (at least one of each, so each class needs two images)."""
    from vitlens.images import IMAGE_SUFFIXES, load_image

    root = Path(folder)
    if not root.exists():
        raise VitlensError(f"data folder {root} not found; pass a folder with one sub-folder of images per class, "
                           f"or one of {', '.join(BUILTIN)}")
    if not root.is_dir():
        raise VitlensError(f"data {root} is not a folder; pass a folder with one sub-folder of images per class")
    if not (0 < eval_fraction < 1):
        raise VitlensError(f"--eval-fraction must be between 0 and 1 (exclusive), got {eval_fraction}")
    classes = sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    if len(classes) < 2:
        raise VitlensError(f"data folder {root} has {len(classes)} class sub-folder(s); a classifier needs at least 2 "
                           "(one sub-folder of images per class)")
    rng = np.random.default_rng(DATA_SEED)
    split: dict[str, list[tuple[Path, int]]] = {"train": [], "eval": []}
    for k, c in enumerate(classes):
        files = sorted(q for q in (root / c).iterdir() if q.suffix.lower() in IMAGE_SUFFIXES and q.is_file())
        if len(files) < 2:
            raise VitlensError(f"class folder {root / c} holds {len(files)} image(s); each class needs at least 2 "
                               "(one for training, one held out)")
        order = rng.permutation(len(files))
        n_eval = min(len(files) - 1, max(1, round(eval_fraction * len(files))))
        split["eval"] += [(files[i], k) for i in order[:n_eval]]
        split["train"] += [(files[i], k) for i in order[n_eval:]]
    arrays = {s: (np.stack([_resize(load_image(p), size) for p, _ in items]),
                  np.array([k for _, k in items], dtype=np.int64)) for s, items in split.items()}
    return TaskData(str(root), *arrays["train"], *arrays["eval"], classes, False)


def load_task(data: str, size: int, n_train: int = 1000, n_eval: int = 500, eval_fraction: float = 0.2) -> TaskData:
    """``fashion-mnist``, ``scenes`` or an ImageFolder path, at ``size`` px (n_train/n_eval apply to the built-in
    tasks; a folder is split by ``eval_fraction``)."""
    if data == "fashion-mnist":
        return fashion_mnist_task(size, n_train, n_eval)
    if data == "scenes":
        return scenes_task(size, n_train, n_eval)
    return folder_task(data, size, eval_fraction)
