"""`vitlens lime`: the superpixels supporting the top classes and those against the top-1 class."""

from __future__ import annotations

from functools import partial

import click

from vitlens.cli.common import load, model_options, one_image, out_png
from vitlens.cli.outputs import write_all
from vitlens.methods.segmentation import SEGMENTATIONS
from vitlens.models.base import label_of
from vitlens.viz.figures import percent, save_figure
from vitlens.viz.plots import check_finite, top_predictions


@click.command("lime")
@click.argument("image", type=click.Path())
@model_options
@click.option("--segmentation", type=click.Choice(SEGMENTATIONS), default="slic", show_default=True,
              help="Superpixels: slic, quickshift (scikit-image) or a grid aligned to the patches.")
@click.option("--n-segments", type=click.IntRange(min=1, max=10_000), default=50, show_default=True,
              help="About how many superpixels (slic, grid).")
@click.option("--num-samples", type=click.IntRange(min=2, max=1_000_000), default=1000, show_default=True)
@click.option("--batch-size", type=click.IntRange(min=1, max=4096), default=64, show_default=True)
@click.option("--kernel-width", type=float, default=0.25, show_default=True)
@click.option("--hide", default="mean", show_default=True,
              help="mean (each superpixel's mean colour), blur, drop (ViT token removal, grid only), or a grey "
                   "level / R,G,B in [0, 1].")
@click.option("--seed", type=click.IntRange(min=0, max=2**63 - 1), default=0, show_default=True)
@click.option("--top", type=click.IntRange(min=1, max=10), default=2, show_default=True,
              help="Show the supporting superpixels of this many top classes.")
@click.option("--num-features", type=click.IntRange(min=1), default=5, show_default=True,
              help="Superpixels shown per panel.")
@click.option("--out", required=True, metavar="FILE.png")
def lime(image: str, model_spec: str, weights: str | None, timm_kwargs: str | None, image_size: int | None,
         device: str, segmentation: str, n_segments: int, num_samples: int, batch_size: int, kernel_width: float,
         hide: str, seed: int, top: int, num_features: int, out: str) -> None:
    """LIME: the superpixels supporting the top classes and those against the top-1 class."""
    from vitlens.methods.lime import Lime
    from vitlens.viz.lime_figures import lime_figure

    dest = out_png(out)
    model = load(model_spec, weights, timm_kwargs, image_size, device)
    method = Lime(model, segmentation=segmentation, n_segments=n_segments, num_samples=num_samples,
                  batch_size=batch_size, kernel_width=kernel_width, hide=hide, seed=seed, progress=True)
    path, view = one_image(image, model)
    exp = method.explain(model.preprocess.tensor(view)[None])
    check_finite(exp.extras["class_weights"], "the LIME weights")
    fig = lime_figure(view, exp, partial(label_of, model), top=top, num_features=num_features)
    for rank, (lbl, p) in enumerate(top_predictions(model, exp.probs[0], k=top), 1):
        click.echo(f"top-{rank}: {lbl} ({percent(p)})")
    click.echo(f"surrogate R^2 (top-1): {float(exp.extras['score'][0]):.3f}")
    click.echo(f"wrote {write_all([(dest, partial(save_figure, fig))], [path])[0]}")
