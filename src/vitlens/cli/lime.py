"""`vitlens lime`: the superpixels supporting the top classes and those against the top-1 class."""

from __future__ import annotations

from functools import partial
from typing import Any

import click

from vitlens.cli.common import load, model_options, one_image, out_png
from vitlens.cli.methods import build_method, method_options, pop_options
from vitlens.cli.outputs import write_all
from vitlens.models.base import label_of
from vitlens.viz.figures import percent, save_figure
from vitlens.viz.plots import check_finite, top_predictions


@click.command("lime")
@click.argument("image", type=click.Path())
@model_options
@method_options(["lime"])
@click.option("--top", type=click.IntRange(min=1, max=10), default=2, show_default=True,
              help="Show the supporting superpixels of this many top classes.")
@click.option("--num-features", type=click.IntRange(min=1), default=5, show_default=True,
              help="Superpixels shown per panel.")
@click.option("--out", required=True, metavar="FILE.png")
def lime(image: str, model_spec: str, weights: str | None, timm_kwargs: str | None, image_size: int | None,
         device: str, top: int, num_features: int, out: str, **options: Any) -> None:
    """LIME: the superpixels supporting the top classes and those against the top-1 class."""
    from vitlens.methods.lime import Lime
    from vitlens.viz.lime_figures import lime_figure

    dest = out_png(out)
    model = load(model_spec, weights, timm_kwargs, image_size, device)
    method, _ = build_method(model, "lime", pop_options(options, ["lime"]), progress=True)
    assert isinstance(method, Lime)
    path, view = one_image(image, model)
    exp = method.explain(model.preprocess.tensor(view)[None])
    assert exp.probs is not None  # LIME always fills the probabilities
    check_finite(exp.extras["class_weights"], "the LIME weights")
    fig = lime_figure(view, exp, partial(label_of, model), top=top, num_features=num_features)
    for rank, (lbl, p) in enumerate(top_predictions(model, exp.probs[0], k=top), 1):
        click.echo(f"top-{rank}: {lbl} ({percent(p)})")
    click.echo(f"surrogate R^2 (top-1): {float(exp.extras['score'][0]):.3f}")
    click.echo(f"wrote {write_all([(dest, partial(save_figure, fig))], [path])[0]}")
