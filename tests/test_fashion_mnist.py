"""Fashion-MNIST IDX loading: round trips through tiny IDX files written here, clear errors, the committed fixture."""

from __future__ import annotations

import gzip
import struct
from pathlib import Path

import numpy as np
import pytest

from vitlens.data import fashion_mnist
from vitlens.data.fashion_mnist import (
    FASHION_MNIST_CLASSES,
    load_fashion_mnist,
    load_fixture_items,
    parse_idx,
    read_idx,
)
from vitlens.errors import VitlensError

STEMS = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}


def idx_bytes(array: np.ndarray) -> bytes:
    """Encode an array as an unsigned-byte IDX file, independently of vitlens."""
    array = np.ascontiguousarray(array, dtype=np.uint8)
    header = struct.pack(">BBBB", 0, 0, 0x08, array.ndim) + struct.pack(f">{array.ndim}I", *array.shape)
    return header + array.tobytes()


def write_split(folder: Path, split: str, images: np.ndarray, labels: np.ndarray, gz: bool = True) -> None:
    """Write one split's two IDX files into folder (gzipped or plain)."""
    for stem, array in zip(STEMS[split], (images, labels), strict=True):
        data = idx_bytes(array)
        if gz:
            (folder / f"{stem}.gz").write_bytes(gzip.compress(data))
        else:
            (folder / stem).write_bytes(data)


def random_split(seed: int, n: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    return rng.integers(0, 256, (n, 28, 28), dtype=np.uint8), rng.integers(0, 10, n).astype(np.uint8)


def assert_one_clear_line(message: str, folder: Path) -> None:
    assert "\n" not in message
    assert str(folder) in message
    assert "apt-get install dataset-fashion-mnist" in message
    assert "root=" in message


def test_round_trip_gz_and_plain(tmp_path: Path) -> None:
    test_images, test_labels = random_split(0, 7)
    train_images, train_labels = random_split(1, 11)
    write_split(tmp_path, "test", test_images, test_labels, gz=True)
    write_split(tmp_path, "train", train_images, train_labels, gz=False)
    for split, images, labels in (("test", test_images, test_labels), ("train", train_images, train_labels)):
        got_images, got_labels = load_fashion_mnist(split, root=str(tmp_path))
        assert got_images.dtype == np.uint8 and got_images.shape == images.shape
        assert got_labels.dtype == np.int64 and got_labels.shape == labels.shape
        np.testing.assert_array_equal(got_images, images)
        np.testing.assert_array_equal(got_labels, labels.astype(np.int64))


def test_default_root_is_used(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    images, labels = random_split(2, 5)
    write_split(tmp_path, "test", images, labels)
    monkeypatch.setattr(fashion_mnist, "DEFAULT_ROOT", tmp_path)
    got_images, got_labels = load_fashion_mnist()
    np.testing.assert_array_equal(got_images, images)
    np.testing.assert_array_equal(got_labels, labels)


def test_read_idx_generic_shapes(tmp_path: Path) -> None:
    array = np.random.default_rng(3).integers(0, 256, (2, 3, 4, 5), dtype=np.uint8)
    (tmp_path / "x.idx").write_bytes(idx_bytes(array))
    np.testing.assert_array_equal(read_idx(tmp_path / "x.idx"), array)
    np.testing.assert_array_equal(parse_idx(idx_bytes(array)), array)
    with pytest.raises(VitlensError, match="magic"):
        parse_idx(idx_bytes(array), expected_magic=0x00000803)


def test_missing_folder(tmp_path: Path) -> None:
    folder = tmp_path / "nowhere"
    with pytest.raises(VitlensError) as info:
        load_fashion_mnist("test", root=folder)
    assert_one_clear_line(str(info.value), folder)


def test_missing_file(tmp_path: Path) -> None:
    images, labels = random_split(4, 3)
    write_split(tmp_path, "test", images, labels)
    (tmp_path / f"{STEMS['test'][1]}.gz").unlink()
    with pytest.raises(VitlensError, match=STEMS["test"][1]) as info:
        load_fashion_mnist("test", root=tmp_path)
    assert_one_clear_line(str(info.value), tmp_path)


def _not_gzip(folder: Path) -> None:
    (folder / f"{STEMS['test'][0]}.gz").write_bytes(b"this is not gzip data")


def _truncated(folder: Path) -> None:
    path = folder / f"{STEMS['test'][0]}.gz"
    data = gzip.decompress(path.read_bytes())
    path.write_bytes(gzip.compress(data[:-10]))


def _truncated_gzip_stream(folder: Path) -> None:
    path = folder / f"{STEMS['test'][0]}.gz"
    path.write_bytes(path.read_bytes()[:40])


def _swapped_magic(folder: Path) -> None:
    images = folder / f"{STEMS['test'][0]}.gz"
    labels = folder / f"{STEMS['test'][1]}.gz"
    images.write_bytes(labels.read_bytes())


def _count_mismatch(folder: Path) -> None:
    (folder / f"{STEMS['test'][1]}.gz").write_bytes(gzip.compress(idx_bytes(np.zeros(2, dtype=np.uint8))))


def _bad_label(folder: Path) -> None:
    (folder / f"{STEMS['test'][1]}.gz").write_bytes(gzip.compress(idx_bytes(np.full(6, 10, dtype=np.uint8))))


def _wrong_image_size(folder: Path) -> None:
    (folder / f"{STEMS['test'][0]}.gz").write_bytes(gzip.compress(idx_bytes(np.zeros((6, 14, 14), dtype=np.uint8))))


@pytest.mark.parametrize(
    "corrupt",
    [_not_gzip, _truncated, _truncated_gzip_stream, _swapped_magic, _count_mismatch, _bad_label, _wrong_image_size],
)
def test_corrupt_files(tmp_path: Path, corrupt) -> None:
    images, labels = random_split(5, 6)
    write_split(tmp_path, "test", images, labels)
    corrupt(tmp_path)
    with pytest.raises(VitlensError) as info:
        load_fashion_mnist("test", root=tmp_path)
    assert_one_clear_line(str(info.value), tmp_path)


def test_unknown_split() -> None:
    with pytest.raises(VitlensError, match="split"):
        load_fashion_mnist("validation")


def test_classes() -> None:
    assert len(FASHION_MNIST_CLASSES) == 10
    assert len(set(FASHION_MNIST_CLASSES)) == 10
    assert FASHION_MNIST_CLASSES[7] == "Sneaker" and FASHION_MNIST_CLASSES[8] == "Bag"


def test_fixture_items() -> None:
    images, labels = load_fixture_items()
    assert images.dtype == np.uint8 and images.ndim == 3 and images.shape[1:] == (28, 28)
    assert labels.dtype == np.int64 and labels.shape == (len(images),)
    counts = np.bincount(labels, minlength=10)
    assert len(counts) == 10 and (counts == counts[0]).all() and counts[0] > 0
    assert (images.reshape(len(images), -1).max(axis=1) > 0).all()
    assert len(np.unique(images.reshape(len(images), -1), axis=0)) == len(images)
