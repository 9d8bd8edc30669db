"""Figures that read without a caption: titled panels, colour bars, class names and probabilities in percent.

Everything builds `matplotlib.figure.Figure` objects on an Agg canvas directly (no pyplot state), so figures are
thread-safe and none is left open. Save them with `save_figure`.
"""

from __future__ import annotations

import html
import math
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.cm import ScalarMappable
from matplotlib.colors import Normalize
from matplotlib.figure import Figure
from matplotlib.patches import Rectangle
from matplotlib.text import Text
from PIL import Image

from vitlens.errors import VitlensError
from vitlens.io import atomic_write
from vitlens.viz.overlay import colormap, overlay

DPI = 110
PANEL = 2.6  # inches per image panel
MAX_COLUMNS = 6

Top = Sequence[tuple[str, float]]


def new_figure(width: float, height: float) -> Figure:
    """A constrained-layout figure of (width, height) inches on its own Agg canvas."""
    fig = Figure(figsize=(width, height), layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def _as_map(heat, name: str = "map") -> np.ndarray:
    arr = np.asarray(heat.detach().cpu() if hasattr(heat, "detach") else heat, dtype=np.float32)
    if arr.ndim != 2:
        raise VitlensError(f"{name} must be a 2-D [gh, gw] array, got shape {arr.shape}")
    return arr


def _show_image(ax, view: Image.Image, title: str) -> None:
    ax.imshow(view)
    ax.set_title(title, fontsize=10)
    ax.set_axis_off()


def _show_overlay(ax, view: Image.Image, heat: np.ndarray, title: str, cmap: str = "jet") -> None:
    ax.imshow(overlay(view, heat, alpha=0.5, cmap=cmap))
    ax.set_title(title, fontsize=10)
    ax.set_axis_off()


def _colorbar(fig: Figure, axes, label: str, cmap: str = "jet") -> None:
    sm = ScalarMappable(norm=Normalize(0.0, 1.0), cmap=colormap(cmap))
    cb = fig.colorbar(sm, ax=axes, fraction=0.046, pad=0.02, shrink=0.9)
    cb.set_label(label, fontsize=8)
    cb.ax.tick_params(labelsize=7)


def _wrap(title: str, width: int = 38) -> str:
    """Break a long panel title into lines of about ``width`` characters."""
    words, lines, line = title.split(), [], ""
    for w in words:
        if line and len(line) + 1 + len(w) > width:
            lines.append(line)
            line = w
        else:
            line = f"{line} {w}".strip()
    lines.append(line)
    return "\n".join(lines)


def percent(p: float) -> str:
    """A probability as a percentage with sensible precision."""
    v = 100.0 * float(p)
    return f"{v:.1f}%" if v >= 0.1 or v == 0 else f"{v:.2g}%"


def explain_figure(view: Image.Image, exp_map, title: str, top: Top | None = None,
                   highlight: str | None = None) -> Figure:
    """Image | overlay of ``exp_map`` titled ``title`` | (when ``top`` is given) a bar chart of the top predictions
    as (label, probability) pairs; the bar whose label is ``highlight`` (the explained class) is drawn darker."""
    heat = _as_map(exp_map)
    ncols = 3 if top else 2
    fig = new_figure(PANEL * 2 + (3.4 if top else 0) + 0.6, PANEL + 0.7)
    widths = [1, 1.12] + ([1.35] if top else [])
    axes = fig.subplots(1, ncols, gridspec_kw={"width_ratios": widths})
    _show_image(axes[0], view, f"input ({view.width}x{view.height})")
    _show_overlay(axes[1], view, heat, _wrap(title))
    _colorbar(fig, axes[1], "relevance (map / its max)")
    if top:
        ax = axes[2]
        labels = [str(lbl) for lbl, _ in top][::-1]
        probs = [100.0 * float(p) for _, p in top][::-1]
        colours = ["#1f4e99" if lbl == highlight else "#8fb3e0" for lbl in labels]
        bars = ax.barh(range(len(labels)), probs, color=colours)
        ax.set_yticks(range(len(labels)), [_short(lbl) for lbl in labels], fontsize=8)
        ax.set_xlim(0, max(100.0, max(probs) * 1.05))
        ax.set_xlabel("probability (%)", fontsize=8)
        ax.tick_params(axis="x", labelsize=7)
        ax.set_title(f"top-{len(top)} predictions", fontsize=10)
        for bar, p in zip(bars, probs):
            ax.text(bar.get_width() + 1.5, bar.get_y() + bar.get_height() / 2, percent(p / 100.0),
                    va="center", fontsize=7)
        ax.spines[["top", "right"]].set_visible(False)
    return fig


def _short(label: str, width: int = 24) -> str:
    return label if len(label) <= width else label[: width - 1] + "…"


def heads_figure(view: Image.Image, per_head, query_desc: str, query: tuple[int, int] | None = None) -> Figure:
    """The blocks x heads grid of attention maps ``per_head`` [L, H, gh, gw] (rows "block i", columns "head j"),
    each panel divided by its own maximum, beside the input. ``query`` (row, col) marks the query patch."""
    arr = np.asarray(per_head.detach().cpu() if hasattr(per_head, "detach") else per_head, dtype=np.float32)
    if arr.ndim != 4:
        raise VitlensError(f"per_head must be [blocks, heads, gh, gw], got shape {arr.shape}")
    nb, nh, gh, gw = arr.shape
    cell = 1.25
    fig = new_figure(PANEL + 0.9 + cell * nh, max(PANEL + 0.6, cell * nb + 0.8))
    grid = fig.add_gridspec(nb, nh + 1, width_ratios=[max(2.0, nh / 2)] + [1] * nh)
    ax_img = fig.add_subplot(grid[:, 0])
    _show_image(ax_img, view, _wrap(f"input; query: {query_desc}", 28))
    if query is not None:
        ph, pw = view.height / gh, view.width / gw
        ax_img.add_patch(Rectangle((query[1] * pw, query[0] * ph), pw, ph, fill=False, edgecolor="white", lw=1.5))
    axes = []
    for b in range(nb):
        for h in range(nh):
            ax = fig.add_subplot(grid[b, h + 1])
            m = arr[b, h]
            if np.isnan(m).all():  # a stage with fewer heads (Swin)
                ax.set_axis_off()
                continue
            peak = float(m.max())
            ax.imshow(m / peak if peak > 0 else m, cmap=colormap("viridis"), vmin=0.0, vmax=1.0,
                      interpolation="nearest")
            ax.set_xticks([])
            ax.set_yticks([])
            if b == 0:
                ax.set_title(f"head {h}", fontsize=9)
            if h == 0:
                ax.set_ylabel(f"block {b}", fontsize=9)
            if query is not None:
                ax.add_patch(Rectangle((query[1] - 0.5, query[0] - 0.5), 1, 1, fill=False, edgecolor="red", lw=1))
            axes.append(ax)
    _colorbar(fig, axes, "attention / panel max", cmap="viridis")
    fig.suptitle(f"Attention of the {query_desc} over the {gh}x{gw} patches, per block and head", fontsize=11)
    return fig


def _panels_grid(fig_title: str, view: Image.Image, panels: Sequence[tuple[str, np.ndarray]],
                 first_title: str) -> Figure:
    n = len(panels) + 1
    nrows = math.ceil(n / MAX_COLUMNS)
    ncols = math.ceil(n / nrows)
    fig = new_figure(PANEL * ncols + 0.8, (PANEL + 0.55) * nrows + 0.4)
    axes = np.atleast_1d(fig.subplots(nrows, ncols)).ravel()
    _show_image(axes[0], view, first_title)
    for ax, (title, heat) in zip(axes[1:], panels):
        _show_overlay(ax, view, _as_map(heat, title), _wrap(title, 34))
    for ax in axes[n:]:
        ax.set_axis_off()
    _colorbar(fig, list(axes), "relevance (map / its max)")
    if fig_title:
        fig.suptitle(fig_title, fontsize=11)
    return fig


def layers_figure(view: Image.Image, per_layer, blocks: Sequence[int], title: str = "") -> Figure:
    """The input, then the rollout after every block: ``per_layer`` [L', gh, gw] with ``blocks`` their block
    indices (0-based, as --start-layer counts)."""
    arr = np.asarray(per_layer.detach().cpu() if hasattr(per_layer, "detach") else per_layer, dtype=np.float32)
    blocks = [int(b) for b in blocks]
    if arr.ndim != 3 or arr.shape[0] != len(blocks):
        raise VitlensError(f"per_layer must be [{len(blocks)}, gh, gw] for blocks {blocks}, got shape {arr.shape}")
    start = blocks[0] if blocks else 0
    panels = [(f"rollout of blocks {start}..{b}" if b != start else f"rollout of block {b}", m)
              for b, m in zip(blocks, arr)]
    return _panels_grid(title or "Attention rollout after every block", view, panels, "input")


def compare_figure(view: Image.Image, panels: Sequence[tuple[str, np.ndarray]], title: str = "") -> Figure:
    """The input beside several maps, each a (title, [gh, gw] map) pair."""
    if not panels:
        raise VitlensError("compare_figure needs at least one (title, map) panel")
    return _panels_grid(title, view, list(panels), "input")


def save_figure(fig: Figure, path: str | Path, dpi: int = DPI) -> Path:
    """Write ``fig`` as PNG to ``path`` atomically (a failure leaves no partial file)."""
    path = Path(path)
    for text in fig.findobj(Text):  # labels and file names are data: '$' must not start math mode
        text.set_parse_math(False)
    with atomic_write(path) as tmp:
        fig.savefig(tmp, format="png", dpi=dpi)
    return path


def _href(src: str | Path) -> str:
    """A relative path as an attribute value: URL-encoded per segment (``#``, ``%``, ``?``, spaces...), then escaped."""
    from urllib.parse import quote

    return html.escape(quote(Path(src).as_posix(), safe="/"))


def write_index(path: str | Path, title: str, entries: Sequence[tuple[str, str | Path]], note: str = "",
                links: Sequence[tuple[str, str | Path]] = ()) -> Path:
    """A small HTML page showing images: ``entries`` are (caption, image path relative to the page's folder), and
    ``links`` (caption, page path) a list of links after the heading (e.g. the demo's interactive reports).
    Captions, title and note are HTML-escaped; paths are URL-encoded per segment, then escaped, so any file name
    links to itself."""
    path = Path(path)
    items = "\n".join(
        f'<figure><figcaption>{html.escape(cap)}</figcaption>'
        f'<img src="{_href(src)}" alt="{html.escape(cap)}"></figure>'
        for cap, src in entries
    )
    note_html = f'<p class="note">{html.escape(note)}</p>' if note else ""
    if links:
        anchors = "".join(f'<li><a href="{_href(src)}">{html.escape(cap)}</a></li>' for cap, src in links)
        note_html = f'\n<section class="reports"><h2>Interactive reports</h2><ul>{anchors}</ul></section>' + note_html
    page = (
        "<!doctype html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
        f"<title>{html.escape(title)}</title><style>body{{font-family:sans-serif;margin:2em;}}"
        "figure{margin:0 0 2em 0;}img{max-width:100%;border:1px solid #ccc;}"
        "figcaption{font-weight:bold;margin-bottom:.4em;}.note{background:#fff4d6;padding:.6em;}</style></head>\n"
        f"<body><h1>{html.escape(title)}</h1>\n{note_html}\n{items}\n</body></html>\n"
    )
    with atomic_write(path) as tmp:
        tmp.write_text(page, encoding="utf-8")
    return path


def swin_figure(view: Image.Image, maps, window_id, patches: Sequence[tuple[int, int]], title: str) -> Figure:
    """One Swin block: chosen patches' attention per head and head mean over the image, window borders in red."""
    arr = np.asarray(maps.detach().cpu() if hasattr(maps, "detach") else maps, dtype=np.float32)
    wid = np.asarray(window_id.cpu() if hasattr(window_id, "cpu") else window_id)
    n = arr.shape[0]
    gh, gw = wid.shape
    ncols = min(n, MAX_COLUMNS)
    nrows = math.ceil(n / ncols)
    fig = new_figure(PANEL * ncols + 0.8, (PANEL + 0.55) * nrows + 0.5)
    axes = np.atleast_1d(fig.subplots(nrows, ncols)).ravel()
    sy, sx = view.height / gh, view.width / gw
    for k, ax in enumerate(axes):
        if k >= n:
            ax.set_axis_off()
            continue
        panel = f"head {k}" if k < n - 1 else "mean of heads"
        _show_overlay(ax, view, _as_map(arr[k] / max(float(arr[k].max()), 1e-12), panel), panel)
        for r in range(gh):  # window borders: between neighbouring tokens of different windows
            for c in range(gw):
                if c + 1 < gw and wid[r, c] != wid[r, c + 1]:
                    ax.plot([(c + 1) * sx] * 2, [r * sy, (r + 1) * sy], color="red", lw=1.2)
                if r + 1 < gh and wid[r, c] != wid[r + 1, c]:
                    ax.plot([c * sx, (c + 1) * sx], [(r + 1) * sy] * 2, color="red", lw=1.2)
        for r, c in patches:
            ax.add_patch(Rectangle((c * sx, r * sy), sx, sy, fill=False, edgecolor="red", lw=1.5))
        ax.set_xlim(0, view.width)
        ax.set_ylim(view.height, 0)
    _colorbar(fig, list(axes), "attention (panel / its max)")
    fig.suptitle(title, fontsize=11)
    return fig
