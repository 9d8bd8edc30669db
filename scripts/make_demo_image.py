"""Regenerate src/vitlens/assets/demo_cat.png, the demo's bundled photo, from scikit-image's `chelsea` sample.

scikit-image is needed here only; it is not a runtime dependency. Run from the repository root:
    .venv/bin/python scripts/make_demo_image.py
"""

from __future__ import annotations

from pathlib import Path

from PIL import Image

OUT = Path(__file__).resolve().parents[1] / "src" / "vitlens" / "assets" / "demo_cat.png"
SIDE = 224


def main() -> None:
    """Crop the cat to a centred square, resize it to SIDE x SIDE and save it as an optimised RGB PNG."""
    from skimage import data

    img = Image.fromarray(data.chelsea()).convert("RGB")  # 451 x 300
    side = min(img.size)
    left = (img.width - side) // 2
    img = img.crop((left, 0, left + side, side)).resize((SIDE, SIDE), Image.Resampling.LANCZOS)
    OUT.parent.mkdir(parents=True, exist_ok=True)
    img.save(OUT, format="PNG", optimize=True)
    print(f"wrote {OUT} ({OUT.stat().st_size // 1024} KB, {img.size[0]}x{img.size[1]})")


if __name__ == "__main__":
    main()
