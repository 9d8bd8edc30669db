"""`load_image` pixel correctness for awkward modes, EXIF rotation and unreadable files."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from vitlens.errors import VitlensError
from vitlens.images import find_images, load_image


def _load(img: Image.Image, path, **save) -> np.ndarray:
    img.save(path, **save)
    out = load_image(path)
    assert out.mode == "RGB"
    return np.asarray(out)


def test_i16_is_scaled_to_8_bits(tmp_path):
    arr = np.array([[0, 257, 65535]], dtype=np.uint16)
    img = Image.fromarray(arr)
    assert img.mode == "I;16"
    px = _load(img, tmp_path / "deep.png")
    assert px[0, :, 0].tolist() == [0, 1, 255]
    assert np.all(px[..., 0] == px[..., 1]) and np.all(px[..., 1] == px[..., 2])


def test_rgba_transparent_becomes_white(tmp_path):
    img = Image.new("RGBA", (2, 1))
    img.putpixel((0, 0), (255, 0, 0, 0))  # fully transparent red
    img.putpixel((1, 0), (255, 0, 0, 255))  # opaque red
    px = _load(img, tmp_path / "rgba.png")
    assert px[0, 0].tolist() == [255, 255, 255]
    assert px[0, 1].tolist() == [255, 0, 0]


def test_la_and_l(tmp_path):
    la = Image.new("LA", (2, 1))
    la.putpixel((0, 0), (0, 0))
    la.putpixel((1, 0), (40, 255))
    px = _load(la, tmp_path / "la.png")
    assert px[0].tolist() == [[255, 255, 255], [40, 40, 40]]
    gray = Image.new("L", (1, 1), 77)
    assert _load(gray, tmp_path / "l.png")[0, 0].tolist() == [77, 77, 77]


def test_palette_with_transparency(tmp_path):
    img = Image.new("P", (2, 1))
    img.putpalette([0, 0, 0, 0, 0, 255] + [0] * (254 * 3))  # index 0 black, index 1 blue
    img.putpixel((0, 0), 0)
    img.putpixel((1, 0), 1)
    px = _load(img, tmp_path / "p.png", transparency=0)
    assert px[0, 0].tolist() == [255, 255, 255]  # the transparent index -> white background
    assert px[0, 1].tolist() == [0, 0, 255]


def test_cmyk_converts(tmp_path):
    img = Image.new("CMYK", (2, 1))
    img.putpixel((0, 0), (0, 0, 0, 0))  # no ink: white
    img.putpixel((1, 0), (0, 255, 255, 0))  # magenta + yellow: red
    px = _load(img, tmp_path / "cmyk.tif")
    assert px[0, 0].tolist() == [255, 255, 255]
    assert px[0, 1].tolist() == [255, 0, 0]


def test_exif_orientation_6_is_applied(tmp_path):
    w, h = 40, 20
    arr = np.zeros((h, w, 3), dtype=np.uint8)
    arr[:8, :8] = (255, 0, 0)  # red block in the stored top-left corner
    exif = Image.Exif()
    exif[0x0112] = 6  # display = stored image rotated 90 degrees clockwise
    path = tmp_path / "rot.jpg"
    Image.fromarray(arr).save(path, exif=exif.tobytes(), quality=95)
    img = load_image(path)
    assert img.size == (h, w)
    px = np.asarray(img, dtype=int)
    assert px[3, -4, 0] > 200 and px[3, -4, 1] < 60  # the block is now top-right
    assert px[3, 3].sum() < 60


def test_unreadable_inputs_raise_clear_errors(tmp_path):
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n" + b"garbage" * 10)
    with pytest.raises(VitlensError, match="cannot read image"):
        load_image(bad)
    with pytest.raises(VitlensError, match="not found"):
        load_image(tmp_path / "missing.png")
    with pytest.raises(VitlensError, match="is a folder"):
        load_image(tmp_path)
    (tmp_path / "empty").mkdir()
    with pytest.raises(VitlensError, match="holds no images"):
        find_images([tmp_path / "empty"])
