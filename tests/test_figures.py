"""Overlays and figures: pixel behaviour of `overlay`, panel titles and labels, atomic PNG writing, no leaks."""

from __future__ import annotations

import threading
from pathlib import Path

import matplotlib
import numpy as np
import pytest
from matplotlib._pylab_helpers import Gcf
from matplotlib.patches import Rectangle
from PIL import Image

from vitlens.errors import VitlensError
from vitlens.viz import compare_figure, explain_figure, heads_figure, layers_figure, overlay, save_figure, write_index

RNG = np.random.default_rng(0)


@pytest.fixture
def view() -> Image.Image:
    return Image.fromarray((RNG.random((32, 48, 3)) * 255).astype(np.uint8))


def _titles(fig) -> list[str]:
    return [ax.get_title() for ax in fig.axes]


# ---- overlay --------------------------------------------------------------------------------------------------------
def test_overlay_size_mode_and_alpha_extremes(view):
    heat = RNG.random((4, 6))
    out = overlay(view, heat)
    assert out.size == view.size and out.mode == "RGB"
    assert np.array_equal(np.asarray(overlay(view, heat, alpha=0.0)), np.asarray(view))
    full = np.asarray(overlay(view, np.ones((4, 6)), alpha=1.0, cmap="jet"))
    top = (np.array(matplotlib.colormaps["jet"](1.0)[:3]) * 255).round()
    assert np.all(full == top.astype(np.uint8))


def test_overlay_upsamples_bilinearly():
    img = Image.new("RGB", (8, 4), (0, 0, 0))
    out = np.asarray(overlay(img, np.array([[0.0, 1.0]]), alpha=1.0, cmap="gray"), dtype=float)[..., 0]
    row = out[0]
    assert np.all(np.diff(row) >= 0)  # a smooth ramp from left to right, not two blocks
    assert row[0] == 0 and row[-1] == 255
    assert 0 < row[3] < 255 and 0 < row[4] < 255
    assert np.all(out == out[0])  # constant down the columns


def test_overlay_rejects_bad_input(view):
    with pytest.raises(VitlensError, match="2-D"):
        overlay(view, np.ones(5))
    with pytest.raises(VitlensError, match="alpha"):
        overlay(view, np.ones((2, 2)), alpha=1.5)
    with pytest.raises(VitlensError, match="colormap"):
        overlay(view, np.ones((2, 2)), cmap="no-such-map")


# ---- figures --------------------------------------------------------------------------------------------------------
def test_explain_figure_with_and_without_predictions(view):
    top = [("Sneaker", 0.6), ("Bag", 0.3), ("Coat", 0.05), ("Dress", 0.04), ("Shirt", 0.01)]
    fig = explain_figure(view, RNG.random((4, 6)), "rollout; mean fusion", top, highlight="Bag")
    titles = _titles(fig)
    assert "rollout; mean fusion" in titles and "top-5 predictions" in titles
    assert any(t.startswith("input") for t in titles)
    bars = next(ax for ax in fig.axes if ax.get_title() == "top-5 predictions")
    assert [t.get_text() for t in bars.get_yticklabels()] == [lbl for lbl, _ in top][::-1]
    texts = [t.get_text() for t in bars.texts]
    assert "60.0%" in texts and "1.0%" in texts
    assert any("relevance" in ax.get_ylabel() for ax in fig.axes)  # the colour bar is labelled
    bare = explain_figure(view, RNG.random((4, 6)), "attention", None)
    assert "top-5 predictions" not in _titles(bare)


def test_heads_figure_grid_labels_and_query_marker(view):
    per_head = RNG.random((2, 3, 4, 6))
    fig = heads_figure(view, per_head, "patch (1, 2)", (1, 2))
    titles, ylabels = _titles(fig), [ax.get_ylabel() for ax in fig.axes]
    assert [t for t in titles if t.startswith("head")] == ["head 0", "head 1", "head 2"]
    assert [y for y in ylabels if y.startswith("block")] == ["block 0", "block 1"]
    panels = [ax for ax in fig.axes if ax.images and ax.images[0].get_array().shape == (4, 6)]
    assert len(panels) == 6
    for ax, m in zip(panels, per_head.reshape(6, 4, 6)):
        np.testing.assert_allclose(ax.images[0].get_array(), m / m.max(), rtol=1e-6)  # each panel / its own max
        assert any(isinstance(p, Rectangle) for p in ax.patches)
    cls = heads_figure(view, per_head, "CLS token")
    assert not any(isinstance(p, Rectangle) for ax in cls.axes for p in ax.patches)
    with pytest.raises(VitlensError, match="blocks, heads"):
        heads_figure(view, per_head[0], "CLS token")


def test_layers_and_compare_figures(view):
    fig = layers_figure(view, RNG.random((3, 4, 6)), [1, 2, 3])
    titles = _titles(fig)
    assert titles[0] == "input"
    assert "rollout of block 1" in titles and "rollout of blocks 1..3" in titles
    with pytest.raises(VitlensError, match="per_layer"):
        layers_figure(view, RNG.random((3, 4, 6)), [0, 1])
    panels = [(f"rollout, {f} fusion", RNG.random((4, 6))) for f in ("mean", "max", "min")]
    fig = compare_figure(view, panels, "Rollout variants")
    assert _titles(fig)[:4] == ["input", "rollout, mean fusion", "rollout, max fusion", "rollout, min fusion"]
    assert fig.get_suptitle() == "Rollout variants"
    with pytest.raises(VitlensError):
        compare_figure(view, [])


def test_save_figure_is_png_atomic_and_leaks_nothing(view, tmp_path):
    before = Gcf.get_num_fig_managers()
    fig = compare_figure(view, [("map", RNG.random((4, 6)))])
    path = save_figure(fig, tmp_path / "sub" / "figure.out")  # PNG whatever the suffix
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with Image.open(path) as im:
        assert im.width > 300 and im.height > 150
    assert [p.name for p in (tmp_path / "sub").iterdir()] == ["figure.out"]  # no temporary file left
    assert Gcf.get_num_fig_managers() == before  # not registered with pyplot


def test_failed_save_leaves_no_file(view, tmp_path, monkeypatch):
    fig = explain_figure(view, RNG.random((4, 6)), "t", None)

    def fail_halfway(path, **kwargs) -> None:
        assert kwargs["format"] == "png"  # explicit: the temporary name need not end in .png
        Path(path).write_bytes(b"\x89PNG partial")
        raise OSError("disk full")

    monkeypatch.setattr(fig, "savefig", fail_halfway)
    with pytest.raises(OSError, match="disk full"):
        save_figure(fig, tmp_path / "x.png")
    assert list(tmp_path.iterdir()) == []


def test_figures_from_threads(view, tmp_path):
    errors: list[BaseException] = []

    def work(i: int) -> None:
        try:
            save_figure(explain_figure(view, RNG.random((4, 6)), f"map {i}", [("a", 0.5)]), tmp_path / f"{i}.png")
        except BaseException as e:  # collected and re-checked in the main thread
            errors.append(e)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    assert sorted(p.name for p in tmp_path.iterdir()) == ["0.png", "1.png", "2.png"]


def test_write_index_escapes_and_links(tmp_path):
    page = write_index(tmp_path / "index.html", "demo <1>", [("cat & dog", "a b.png")], note="random <weights>")
    text = page.read_text()
    assert "demo &lt;1&gt;" in text and "cat &amp; dog" in text and 'src="a%20b.png"' in text
    assert "random &lt;weights&gt;" in text
