"""`vitlens occlusion`: the drop of the class probability when each window is covered."""

from __future__ import annotations

from functools import partial
from typing import Any

import click

from vitlens.cli.common import load, model_options, one_image, out_png
from vitlens.cli.methods import build_method, method_options, pop_options
from vitlens.cli.outputs import write_all
from vitlens.models.base import label_of
from vitlens.models.labels import resolve_target
from vitlens.viz.figures import explain_figure, save_figure
from vitlens.viz.plots import check_finite, top_predictions


@click.command("occlusion")
@click.argument("image", type=click.Path())
@model_options
@method_options(["occlusion"])
@click.option("--target", default=None, metavar="CLASS", help="Class index or name [default: top-1].")
@click.option("--out", required=True, metavar="FILE.png")
def occlusion(image: str, model_spec: str, weights: str | None, timm_kwargs: str | None, image_size: int | None,
              device: str, target: str | None, out: str, **options: Any) -> None:
    """Occlusion: the drop of the class probability when each window is covered."""
    from vitlens.methods.occlusion import Occlusion

    dest = out_png(out)
    model = load(model_spec, weights, timm_kwargs, image_size, device)
    method, _ = build_method(model, "occlusion", pop_options(options, ["occlusion"]), progress=True)
    assert isinstance(method, Occlusion)
    t = resolve_target(model, target)
    path, view = one_image(image, model)
    exp = method.explain(model.preprocess.tensor(view)[None], target=t)
    assert exp.target is not None and exp.probs is not None  # Occlusion always fills both
    cls = int(exp.target[0])
    check_finite(exp.maps[0], "the occlusion map")
    title = (f"occlusion for '{label_of(model, cls)}': probability drop, window {method.window}, "
             f"stride {method.stride}, baseline {method.baseline}")
    top = top_predictions(model, exp.probs[0])
    fig = explain_figure(view, exp.maps[0].numpy(), title, top or None, label_of(model, cls))
    click.echo(f"explained class '{label_of(model, cls)}' (index {cls})")
    click.echo(f"wrote {write_all([(dest, partial(save_figure, fig))], [path])[0]}")
