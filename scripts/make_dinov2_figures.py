"""Redraw docs/images/dinov2_*.png: heads grid and artifact patches before/after exclude_artifacts for the real
photos of `vitlens.viz.photos`, with vitlens:dinov2-small (needs the dinov2 extra).

    python scripts/make_dinov2_figures.py
"""

from pathlib import Path

from PIL import Image

import vitlens
from vitlens.viz.figures import save_figure
from vitlens.viz.photos import artifacts_figure, real_photos
from vitlens.viz.plots import heads_plot

OUT = Path(__file__).resolve().parents[1] / "docs" / "images"


def small_png(path: Path) -> None:
    """Re-save a figure with a 256-colour palette (about a third of the size)."""
    with Image.open(path) as im:
        pal = im.convert("RGB").quantize(256, method=Image.Quantize.MEDIANCUT)
    pal.save(path, optimize=True)


def main() -> None:
    """Write the eight figures."""
    model = vitlens.load_model("vitlens:dinov2-small")
    for name, photo in real_photos().items():
        view = model.preprocess.view(photo)
        for path, fig, dpi in ((OUT / f"dinov2_artifacts_{name}.png", artifacts_figure(model, view, name=name), 80),
                               (OUT / f"dinov2_heads_{name}.png", heads_plot(model, view), 60)):
            save_figure(fig, path, dpi=dpi)
            small_png(path)
            print(f"wrote {path}")


if __name__ == "__main__":
    main()
