"""Reading images of any mode and turning them into model input."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError

from vitlens.errors import VitlensError

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


def load_image(path: str | Path) -> Image.Image:
    """Open an image file as RGB, honouring EXIF rotation; one clear error for missing or unreadable files."""
    p = Path(path)
    if not p.exists():
        raise VitlensError(f"image not found: {p}; check the path")
    if p.is_dir():
        raise VitlensError(f"{p} is a folder, not an image; pass image files (commands also take a folder)")
    try:
        with Image.open(p) as img:
            img.load()
            img = ImageOps.exif_transpose(img)
            return to_rgb(img)
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as e:
        raise VitlensError(
            f"cannot read image {p}: not a valid image file ({type(e).__name__}); re-save it as PNG or JPEG"
        ) from None


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


@dataclass(frozen=True)
class Preprocess:
    """Resize (optionally shorter side then centre crop), scale to [0, 1], normalise by mean/std."""

    size: tuple[int, int] = (224, 224)
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD
    crop_pct: float = 1.0
    interpolation: str = "bicubic"

    def __post_init__(self) -> None:
        if min(self.size) < 1:
            raise VitlensError(f"image size must be positive, got {self.size}")
        if not 0 < self.crop_pct <= 1:
            raise VitlensError(f"crop_pct must be in (0, 1], got {self.crop_pct}")
        if self.interpolation not in _RESAMPLE:
            raise VitlensError(f"unknown interpolation {self.interpolation!r}; use one of {sorted(_RESAMPLE)}")

    def with_size(self, size: int | tuple[int, int]) -> Preprocess:
        """The same preprocessing at another square (int) or (height, width) size."""
        hw = (size, size) if isinstance(size, int) else tuple(size)
        return Preprocess(hw, self.mean, self.std, self.crop_pct, self.interpolation)

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
