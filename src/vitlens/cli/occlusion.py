"""`vitlens occlusion`: the drop of the class probability when each window is covered."""

from __future__ import annotations

from functools import partial

import click

from vitlens.cli.common import load, model_options, one_image, out_png, pair
from vitlens.cli.outputs import write_all
from vitlens.models.base import label_of
from vitlens.models.labels import resolve_target
from vitlens.viz.figures import explain_figure, save_figure
from vitlens.viz.plots import check_finite, top_predictions


@click.command("occlusion")
@click.argument("image", type=click.Path())
@model_options
@click.option("--window", default="16", show_default=True, metavar="N|H,W", help="Occluding window in pixels.")
@click.option("--stride", default=None, metavar="N|H,W", help="Step between windows [default: the window].")
@click.option("--baseline", default="0", show_default=True,
              help="What covers a window: a number in the model's input space (0 = dataset mean), mean or blur.")
@click.option("--target", default=None, metavar="CLASS", help="Class index or name [default: top-1].")
@click.option("--batch-size", type=click.IntRange(min=1, max=4096), default=64, show_default=True)
@click.option("--out", required=True, metavar="FILE.png")
def occlusion(image: str, model_spec: str, weights: str | None, timm_kwargs: str | None, image_size: int | None,
              device: str, window: str, stride: str | None, baseline: str, target: str | None, batch_size: int,
              out: str) -> None:
    """Occlusion: the drop of the class probability when each window is covered."""
    from vitlens.methods.occlusion import Occlusion

    dest = out_png(out)
    win, step = pair(window, "--window"), pair(stride, "--stride")
    model = load(model_spec, weights, timm_kwargs, image_size, device)
    method = Occlusion(model, window=win, stride=step, baseline=baseline, batch_size=batch_size, progress=True)
    t = resolve_target(model, target)
    path, view = one_image(image, model)
    exp = method.explain(model.preprocess.tensor(view)[None], target=t)
    cls = int(exp.target[0])
    check_finite(exp.maps[0], "the occlusion map")
    title = (f"occlusion for '{label_of(model, cls)}': probability drop, window {method.window}, "
             f"stride {method.stride}, baseline {method.baseline}")
    top = top_predictions(model, exp.probs[0])
    fig = explain_figure(view, exp.maps[0].numpy(), title, top or None, label_of(model, cls))
    click.echo(f"explained class '{label_of(model, cls)}' (index {cls})")
    click.echo(f"wrote {write_all([(dest, partial(save_figure, fig))], [path])[0]}")
