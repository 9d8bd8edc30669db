"""Fashion-MNIST: read the four IDX files, and a small committed test subset for tests and demos."""

from __future__ import annotations

import gzip
import zlib
from importlib import resources
from pathlib import Path

import numpy as np

from vitlens.errors import VitlensError

DEFAULT_ROOT = Path("/usr/share/datasets/fashion-mnist")

FASHION_MNIST_CLASSES: tuple[str, ...] = (
    "T-shirt/top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle boot",
)

_FILES: dict[str, tuple[str, str]] = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}
_FIX = (
    "install the Debian package dataset-fashion-mnist: apt-get install dataset-fashion-mnist, "
    "or pass root= a folder holding the four IDX files"
)
_IMAGE_MAGIC = 0x00000803  # unsigned bytes, 3 dimensions
_LABEL_MAGIC = 0x00000801  # unsigned bytes, 1 dimension
FIXTURE_FILE = "fashion_mnist_test_subset.npz"


class _IdxError(Exception):
    """Internal: what is wrong with one IDX file (turned into a VitlensError naming the folder)."""


def _one_line(text: object) -> str:
    return " ".join(str(text).split())


def _read_bytes(path: Path) -> bytes:
    try:
        raw = path.read_bytes()
        return gzip.decompress(raw) if path.name.endswith(".gz") else raw
    except (OSError, EOFError, zlib.error) as exc:
        raise _IdxError(f"{path.name} cannot be read ({_one_line(exc)})") from exc


def parse_idx(data: bytes, expected_magic: int | None = None, name: str = "IDX data") -> np.ndarray:
    """Parse the bytes of an unsigned-byte IDX file into a uint8 array shaped by its header.

    Raises VitlensError when the header is malformed, the magic differs from `expected_magic`,
    or the payload size does not match the dimensions.
    """
    try:
        return _parse_idx(data, expected_magic, name)
    except _IdxError as exc:
        raise VitlensError(f"{exc}.") from None


def _parse_idx(data: bytes, expected_magic: int | None, name: str) -> np.ndarray:
    if len(data) < 4:
        raise _IdxError(f"{name} is too short to hold an IDX header ({len(data)} bytes)")
    magic = int.from_bytes(data[:4], "big")
    zero, dtype_code, ndim = magic >> 16, (magic >> 8) & 0xFF, magic & 0xFF
    if zero != 0 or dtype_code != 0x08 or ndim == 0:
        raise _IdxError(f"{name} has an invalid IDX magic number 0x{magic:08x} (expected unsigned bytes)")
    if expected_magic is not None and magic != expected_magic:
        raise _IdxError(f"{name} has IDX magic number 0x{magic:08x}, expected 0x{expected_magic:08x}")
    header = 4 + 4 * ndim
    if len(data) < header:
        raise _IdxError(f"{name} is truncated inside its IDX header")
    dims = tuple(int(d) for d in np.frombuffer(data, dtype=">u4", count=ndim, offset=4))
    expected = int(np.prod(dims, dtype=np.int64))
    if len(data) - header != expected:
        raise _IdxError(f"{name} holds {len(data) - header} data bytes but its header {dims} says {expected}")
    return np.frombuffer(data, dtype=np.uint8, offset=header).reshape(dims).copy()


def read_idx(path: str | Path, expected_magic: int | None = None) -> np.ndarray:
    """Read one unsigned-byte IDX file (plain or .gz) into a uint8 array; VitlensError if it is unreadable."""
    path = Path(path)
    try:
        return _parse_idx(_read_bytes(path), expected_magic, path.name)
    except _IdxError as exc:
        raise VitlensError(f"{exc}.") from None


def _find(folder: Path, stem: str) -> Path:
    for candidate in (folder / stem, folder / f"{stem}.gz"):
        if candidate.is_file():
            return candidate
    raise _IdxError(f"{stem}(.gz) is missing")


def load_fashion_mnist(split: str = "test", root: str | Path | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Load a Fashion-MNIST split as (images uint8 [N,28,28], labels int64 [N]).

    `root` is a folder holding the IDX files (plain or gzipped); it defaults to
    /usr/share/datasets/fashion-mnist, where the Debian package dataset-fashion-mnist puts them.
    Missing or corrupt files raise VitlensError with one line naming the folder and the fix.
    """
    if split not in _FILES:
        raise VitlensError(f"Unknown Fashion-MNIST split {split!r}: use 'train' or 'test'.")
    folder = Path(root) if root is not None else DEFAULT_ROOT
    try:
        if not folder.is_dir():
            raise _IdxError("the folder does not exist")
        image_stem, label_stem = _FILES[split]
        image_path, label_path = _find(folder, image_stem), _find(folder, label_stem)
        images = _parse_idx(_read_bytes(image_path), _IMAGE_MAGIC, image_path.name)
        labels = _parse_idx(_read_bytes(label_path), _LABEL_MAGIC, label_path.name)
        if images.shape[1:] != (28, 28):
            raise _IdxError(f"{image_path.name} holds {images.shape[1]}x{images.shape[2]} images, expected 28x28")
        if len(images) != len(labels):
            raise _IdxError(f"{image_path.name} holds {len(images)} images but {label_path.name} {len(labels)} labels")
        if labels.size and int(labels.max()) >= len(FASHION_MNIST_CLASSES):
            raise _IdxError(f"{label_path.name} holds label {int(labels.max())}, expected 0..9")
    except _IdxError as exc:
        raise VitlensError(f"Fashion-MNIST {split} split not readable in {folder}: {exc}; {_FIX}.") from None
    return images, labels.astype(np.int64)


def load_fixture_items() -> tuple[np.ndarray, np.ndarray]:
    """Load the committed Fashion-MNIST test subset (50 items per class) as (images uint8 [500,28,28], labels int64)."""
    with (resources.files("vitlens.data") / "fixtures" / FIXTURE_FILE).open("rb") as fh, np.load(fh) as npz:
        return npz["images"].astype(np.uint8), npz["labels"].astype(np.int64)
