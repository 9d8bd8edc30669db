"""Real photos that ship with scikit-image and matplotlib, and the figures the demo draws on them with
`vitlens:dinov2-small`: heads grid, last-block attention and rollout with the artifact patches marked, and
rollout / attention before and after ``exclude_artifacts``."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
from matplotlib.figure import Figure
from matplotlib.patches import Rectangle
from PIL import Image

from vitlens.methods import AttentionMaps, Rollout
from vitlens.methods.artifacts import Artifacts
from vitlens.models.base import VitModel
from vitlens.viz.figures import _colorbar, _show_image, _show_overlay, _wrap, new_figure
from vitlens.viz.plots import heads_plot

SKIMAGE_PHOTOS = ("chelsea", "coffee", "astronaut")
MATPLOTLIB_PHOTOS = {"grace_hopper": "grace_hopper.jpg"}
ARTIFACTS_SHOWN = 4


def real_photos() -> dict[str, Image.Image]:
    """The cat ``chelsea``, ``coffee``, ``astronaut`` (scikit-image) and ``grace_hopper`` (matplotlib), those that
    are installed."""
    photos: dict[str, Image.Image] = {}
    try:
        from skimage import data

        for name in SKIMAGE_PHOTOS:
            photos[name] = Image.fromarray(getattr(data, name)()).convert("RGB")
    except ImportError:
        pass
    from matplotlib import cbook

    for name, file in MATPLOTLIB_PHOTOS.items():
        try:
            with Image.open(cbook.get_sample_data(file, asfileobj=False)) as im:
                photos[name] = im.convert("RGB")
        except (OSError, ValueError):
            pass
    return photos


def _mark(ax, arts: Artifacts, view: Image.Image, colour: str = "white") -> None:
    gh, gw = arts.grid
    ph, pw = view.height / gh, view.width / gw
    for r, c in arts.cells(0):
        ax.add_patch(Rectangle((c * pw, r * ph), pw, ph, fill=False, edgecolor=colour, lw=1.4))


def _maps(model: VitModel, view: Image.Image, k: int):
    x = model.preprocess.tensor(view)[None]
    plain_r, excl_r = Rollout(model).explain(x), Rollout(model, exclude_artifacts=k).explain(x)
    plain_a, excl_a = AttentionMaps(model).explain(x), AttentionMaps(model, exclude_artifacts=k).explain(x)
    ex = excl_r.extras
    arts = Artifacts(ex["artifacts"], ex["artifact_scores"], (plain_r.maps.shape[-2], plain_r.maps.shape[-1]),
                     ex["artifact_scores"][:, -1], "attention")
    return plain_r, excl_r, plain_a, excl_a, arts


def artifacts_figure(model: VitModel, view: Image.Image, k: int = ARTIFACTS_SHOWN, name: str = "") -> Figure:
    """Input with the k artifact patches boxed | last-block CLS attention and rollout, plain (boxes drawn) and
    with ``exclude_artifacts=k``."""
    plain_r, excl_r, plain_a, excl_a, arts = _maps(model, view, k)
    fig = new_figure(3.0 * 5 + 0.8, 3.6)
    axes = fig.subplots(1, 5)
    scores = ", ".join(f"{float(s):.0f}x" for s in arts.score[0])
    _show_image(axes[0], view, _wrap(f"input; boxes: the {k} patches receiving most attention ({scores} uniform)", 36))
    _mark(axes[0], arts, view)
    panels = [(plain_a, "last-block CLS attention"), (excl_a, f"same, exclude_artifacts={k}"),
              (plain_r, "rollout"), (excl_r, f"rollout, exclude_artifacts={k}")]
    for ax, (exp, title) in zip(axes[1:], panels):
        _show_overlay(ax, view, exp.numpy()[0], _wrap(title, 34))
        if "artifacts" not in exp.extras:
            _mark(ax, arts, view)
    _colorbar(fig, list(axes), "map / its max")
    fig.suptitle(f"{name + ': ' if name else ''}artifact patches (Darcet et al. 2024) before and after "
                 "exclude_artifacts", fontsize=11)
    return fig


def photo_jobs(model: VitModel) -> list[tuple[str, str, Callable[[Image.Image], Figure]]]:
    """(file suffix, caption, figure builder) for each real photo: heads grid, artifacts before/after."""
    return [
        ("heads", "raw attention of the CLS token, per block and head (vitlens:dinov2-small)",
         lambda view: heads_plot(model, view)),
        ("artifacts", "last-block attention and rollout, artifact patches boxed, and with exclude_artifacts",
         lambda view: artifacts_figure(model, view)),
    ]


def map_mass_in_box(heat: np.ndarray, box: tuple[int, int, int, int]) -> float:
    """Share of a [gh, gw] map's mass inside the patch box (row0, col0, row1, col1), ends excluded."""
    r0, c0, r1, c1 = box
    total = float(heat.sum())
    return float(heat[r0:r1, c0:c1].sum()) / total if total > 0 else 0.0
