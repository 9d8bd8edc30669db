"""Reading images of any mode and turning them into model input."""

from __future__ import annotations

import math
import numbers
import os
import stat
import struct
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import cast

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError

from vitlens.errors import VitlensError

DEFAULT_MAX_PIXELS = 64_000_000
MAX_PIXELS_ENV = "VITLENS_MAX_PIXELS"
MAX_SIDE = 4096  # the longest model input side --image-size / a preprocessor config may ask for
MAX_TOKENS = 1600  # patch tokens of one image (a 40 x 40 grid); attention memory grows with its square
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm"}
_RESAMPLE = {
    "bilinear": Image.Resampling.BILINEAR,
    "bicubic": Image.Resampling.BICUBIC,
    "nearest": Image.Resampling.NEAREST,
    "lanczos": Image.Resampling.LANCZOS,
}


def to_rgb(img: Image.Image, background: tuple[int, int, int] = (255, 255, 255)) -> Image.Image:
    """Convert any PIL mode to 8-bit RGB: transparency composited over ``background``, 16/32-bit scaled to 8 bits."""
    if img.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        arr = np.asarray(img, dtype=np.float64)
        if img.mode.startswith("I;16"):
            arr = arr / 257.0
        elif img.mode == "I" and arr.max(initial=0) > 255:
            arr = arr * (255.0 / max(float(arr.max()), 1.0))
        elif img.mode == "F" and arr.max(initial=0) <= 1.0:
            arr = arr * 255.0
        img = Image.fromarray(np.clip(np.round(arr), 0, 255).astype(np.uint8), "L")
    if img.mode == "P":
        img = img.convert("RGBA") if "transparency" in img.info else img.convert("RGB")
    if img.mode in ("LA", "La", "PA", "RGBa"):
        img = img.convert("RGBA")
    if img.mode == "RGBA":
        canvas = Image.new("RGB", img.size, background)
        canvas.paste(img, mask=img.getchannel("A"))
        return canvas
    return img.convert("RGB")


def max_pixels() -> int:
    """The largest image (width x height) vitlens decodes: $VITLENS_MAX_PIXELS, default 64 million."""
    text = os.environ.get(MAX_PIXELS_ENV, "").strip()
    if not text:
        return DEFAULT_MAX_PIXELS
    try:
        value = int(float(text))
    except (ValueError, OverflowError):
        value = 0
    if value < 1:
        raise VitlensError(f"{MAX_PIXELS_ENV}={text!r} is not a positive number of pixels; unset it or give e.g. "
                           f"{DEFAULT_MAX_PIXELS}")
    return value


def check_regular_file(path: str | Path, what: str = "image") -> Path:
    """``path`` if it is an existing regular file (never a folder, pipe, socket or device, which could hang a
    read); else one clear error."""
    p = Path(path)
    try:
        mode = os.stat(p).st_mode
    except FileNotFoundError:
        raise VitlensError(f"{what} not found: {p}; check the path") from None
    except OSError as e:
        raise VitlensError(f"cannot read {what} {p}: {e.strerror or e}") from None
    if stat.S_ISDIR(mode):
        raise VitlensError(f"{p} is a folder, not an {what}; pass {what} files (commands also take a folder)")
    if not stat.S_ISREG(mode):
        raise VitlensError(f"{p} is not a regular file (a pipe, socket or device); save the {what} to a file first")
    return p


def load_image(path: str | Path) -> Image.Image:
    """Open an image file as RGB, honouring EXIF rotation; one clear error for missing, unreadable, non-regular or
    too large files (more than `max_pixels`, checked on the header before any pixel is decoded)."""
    p = check_regular_file(path)
    limit = max_pixels()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(p) as img:
                _check_pixels(p, img.size, limit)
                img.load()
                img = ImageOps.exif_transpose(img)
                return to_rgb(img)
    except VitlensError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        raise VitlensError(_too_large(p, None, limit)) from None
    except MemoryError:
        raise VitlensError(f"not enough memory to decode image {p}; shrink it or lower {MAX_PIXELS_ENV}") from None
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError, EOFError, struct.error) as e:
        raise VitlensError(
            f"cannot read image {p}: not a valid image file ({type(e).__name__}); re-save it as PNG or JPEG"
        ) from None


def _check_pixels(path: Path, size: tuple[int, int], limit: int) -> None:
    if size[0] * size[1] > limit:
        raise VitlensError(_too_large(path, size, limit))


def _too_large(path: Path, size: tuple[int, int] | None, limit: int) -> str:
    what = f"{size[0]}x{size[1]} pixels" if size else "its header claims a huge size"
    return (f"image {path} is too large ({what}; the limit is {limit} pixels): downscale it, or raise the limit "
            f"with {MAX_PIXELS_ENV}=N")


def find_images(paths: Sequence[str | Path]) -> list[Path]:
    """Expand folders into their image files (sorted); files are kept as given."""
    out: list[Path] = []
    for item in paths:
        p = Path(item)
        if p.is_dir():
            found = sorted(q for q in p.iterdir() if q.suffix.lower() in IMAGE_SUFFIXES and q.is_file())
            if not found:
                raise VitlensError(f"folder {p} holds no images ({', '.join(sorted(IMAGE_SUFFIXES))})")
            out.extend(found)
        else:
            out.append(p)
    return out


def _check_size(size) -> tuple[int, int]:
    """(height, width) of positive ints no larger than MAX_SIDE, or one clear error (strings, floats, bools refused)."""
    try:
        hw = tuple(size)
    except TypeError:
        hw = ()
    if len(hw) != 2 or not all(isinstance(v, numbers.Integral) and not isinstance(v, bool) for v in hw):
        raise VitlensError(f"image size must be two whole numbers of pixels (height, width), got {size!r}")
    if min(hw) < 1 or max(hw) > MAX_SIDE:
        raise VitlensError(f"image size must be between 1 and {MAX_SIDE} pixels a side, got {hw[0]}x{hw[1]}; "
                           "ViTs cost memory quadratic in the number of patches")
    return int(hw[0]), int(hw[1])


def check_tokens(size: tuple[int, int], patch: tuple[int, int]) -> None:
    """Refuse an input size whose patch grid exceeds MAX_TOKENS tokens: attention matrices are tokens^2 per head
    and block, so 1000 px at patch 8 (15625 tokens) would need gigabytes per block."""
    gh, gw = size[0] // patch[0], size[1] // patch[1]
    if gh * gw > MAX_TOKENS:
        side = math.isqrt(MAX_TOKENS)
        raise VitlensError(
            f"image size {size[0]}x{size[1]} makes {gh}x{gw} = {gh * gw} patch tokens of {patch[0]}x{patch[1]} px; "
            f"at most {MAX_TOKENS} (e.g. {side * patch[0]} px a side) keep attention memory bounded: lower --image-size"
        )


def _three(name: str, values) -> tuple[float, float, float]:
    """Three finite floats (one per RGB channel), or one clear error."""
    try:
        vals = tuple(float(v) for v in values if not isinstance(v, (str, bool)))
        n = len(tuple(values))
    except (TypeError, ValueError, OverflowError):
        vals, n = (), -1
    if n != 3 or len(vals) != 3 or not all(math.isfinite(v) for v in vals):
        raise VitlensError(f"{name} must be three finite numbers (one per RGB channel), got {values!r}")
    return vals  # the length check above narrows it to three floats


@dataclass(frozen=True)
class Preprocess:
    """Resize (optionally shorter side then centre crop), scale to [0, 1], normalise by mean/std."""

    size: tuple[int, int] = (224, 224)
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD
    crop_pct: float = 1.0
    interpolation: str = "bicubic"

    def __post_init__(self) -> None:
        size = _check_size(self.size)
        mean = _three("mean", self.mean)
        std = _three("std", self.std)
        if min(std) <= 0:
            raise VitlensError(f"std must be positive in every channel (it divides the pixels), got {list(std)}")
        if isinstance(self.crop_pct, bool) or not isinstance(self.crop_pct, (int, float)) \
                or not math.isfinite(self.crop_pct) or not 0 < self.crop_pct <= 1:
            raise VitlensError(f"crop_pct must be a number in (0, 1], got {self.crop_pct!r}")
        if self.interpolation not in _RESAMPLE:
            raise VitlensError(f"unknown interpolation {self.interpolation!r}; use one of {sorted(_RESAMPLE)}")
        object.__setattr__(self, "size", size)
        object.__setattr__(self, "mean", mean)
        object.__setattr__(self, "std", std)
        object.__setattr__(self, "crop_pct", float(self.crop_pct))

    def with_size(self, size: int | tuple[int, int]) -> Preprocess:
        """The same preprocessing at another square (int) or (height, width) size."""
        hw = (size, size) if isinstance(size, numbers.Integral) and not isinstance(size, bool) else size
        return Preprocess(cast("tuple[int, int]", hw), self.mean, self.std, self.crop_pct, self.interpolation)

    def view(self, img: Image.Image) -> Image.Image:
        """The RGB picture the model sees (after resize and crop), for overlays."""
        img = to_rgb(img)
        h, w = self.size
        resample = _RESAMPLE[self.interpolation]
        if self.crop_pct >= 1.0:
            return img.resize((w, h), resample)
        sh, sw = int(h / self.crop_pct), int(w / self.crop_pct)
        scale = max(sh / img.height, sw / img.width)
        img = img.resize((max(w, round(img.width * scale)), max(h, round(img.height * scale))), resample)
        left, top = (img.width - w) // 2, (img.height - h) // 2
        return img.crop((left, top, left + w, top + h))

    def tensor(self, view: Image.Image) -> torch.Tensor:
        """Normalised tensor [3, H, W] of an already resized view."""
        arr = torch.from_numpy(np.asarray(view, dtype=np.float32).copy()).permute(2, 0, 1) / 255.0
        mean = torch.tensor(self.mean).view(3, 1, 1)
        std = torch.tensor(self.std).view(3, 1, 1)
        return (arr - mean) / std

    def __call__(self, images: Image.Image | Sequence[Image.Image]) -> tuple[torch.Tensor, list[Image.Image]]:
        """Batch [B, 3, H, W] and the resized RGB views."""
        imgs = [images] if isinstance(images, Image.Image) else list(images)
        views = [self.view(i) for i in imgs]
        return torch.stack([self.tensor(v) for v in views]), views
