"""`vitlens heads`, `layers`, `compare` and `swin`: the seed report's figures for one image."""

from __future__ import annotations

from functools import partial
from typing import Any

import click

from vitlens.cli.common import echo_notes, load, model_options, one_image, out_png
from vitlens.cli.methods import build_method, build_methods, every_option, method_options, pop_options
from vitlens.cli.outputs import write_all
from vitlens.methods import METHODS
from vitlens.models.labels import resolve_target
from vitlens.viz import plots
from vitlens.viz.figures import save_figure


@click.command()
@click.argument("image", type=click.Path())
@model_options
@click.option("--query", default="cls", show_default=True, help="cls, mean, or ROW,COL of a patch (0-based).")
@click.option("--out", required=True, metavar="FILE.png")
def heads(image: str, model_spec: str, weights: str | None, timm_kwargs: str | None, image_size: int | None,
          device: str, query: str, out: str) -> None:
    """The raw attention of a query token, per block (rows) and head (columns)."""
    dest = out_png(out)
    model = load(model_spec, weights, timm_kwargs, image_size, device)
    build_method(model, "attention", {"query": query})  # validate before reading the image
    path, view = one_image(image, model)
    fig = plots.heads_plot(model, view, query)
    click.echo(f"wrote {write_all([(dest, partial(save_figure, fig))], [path])[0]}")


@click.command()
@click.argument("image", type=click.Path())
@model_options
@method_options(["rollout"])
@click.option("--out", required=True, metavar="FILE.png")
def layers(image: str, model_spec: str, weights: str | None, timm_kwargs: str | None, image_size: int | None,
           device: str, out: str, **options: Any) -> None:
    """Attention rollout after every block, the image first."""
    dest = out_png(out)
    given = pop_options(options, ["rollout"])
    model = load(model_spec, weights, timm_kwargs, image_size, device)
    build_method(model, "rollout", given)  # validate before reading the image
    path, view = one_image(image, model)
    fig = plots.layers_plot(model, view, **given)
    click.echo(f"wrote {write_all([(dest, partial(save_figure, fig))], [path])[0]}")


@click.command()
@click.argument("image", type=click.Path())
@model_options
@click.option("--methods", default=None, metavar="A,B,...",
              help="Methods side by side (any of `vitlens explain --method`'s) [default: rollout with mean, max and "
                   "min fusion and grad rollout, discard ratio 0.9].")
@method_options()
@click.option("--target", default=None, metavar="CLASS", help="Class for class-specific methods [default: top-1].")
@click.option("--out", required=True, metavar="FILE.png")
def compare(image: str, model_spec: str, weights: str | None, timm_kwargs: str | None, image_size: int | None,
            device: str, methods: str | None, target: str | None, out: str, **options: Any) -> None:
    """The image beside several maps: rollout variants and grad rollout, or the --methods given, in a row."""
    dest = out_png(out)
    given = pop_options(options)
    model = load(model_spec, weights, timm_kwargs, image_size, device)
    t = resolve_target(model, target)
    if methods is None:
        rollout_only = {k: v for k, v in given.items() if k in {o.name for o in METHODS["grad_rollout"].options}}
        notes = [f"note: {every_option(k).flag} does not apply to compare's rollout panels; ignored"
                 for k in given if k not in rollout_only]
        rollout_only.setdefault("discard_ratio", 0.9)
        build_method(model, "rollout", rollout_only)  # validate before reading the image
        path, view = one_image(image, model)
        fig, more = plots.compare_plot(model, view, target=t, **rollout_only)
    else:
        names = [n.strip() for n in methods.split(",") if n.strip()]
        built, notes = build_methods(model, names, given)
        path, view = one_image(image, model)
        fig, more = plots.methods_plot(model, view, built, target=t)
    echo_notes(notes + more)
    click.echo(f"wrote {write_all([(dest, partial(save_figure, fig))], [path])[0]}")


@click.command()
@click.argument("image", type=click.Path())
@model_options
@click.option("--stage", type=int, default=0, show_default=True, help="Swin stage (0-based).")
@click.option("--block", type=int, default=0, show_default=True, help="Block within the stage (0-based).")
@click.option("--patch", default="per-window", show_default=True,
              help="ROW,COL in the stage's token grid, or per-window (each window's centre patch).")
@click.option("--out", required=True, metavar="FILE.png")
def swin(image: str, model_spec: str, weights: str | None, timm_kwargs: str | None, image_size: int | None,
         device: str, stage: int, block: int, patch: str, out: str) -> None:
    """Swin: a patch's attention over the image per head and their mean, window borders drawn (shift undone)."""
    dest = out_png(out)
    model = load(model_spec, weights, timm_kwargs, image_size, device)
    path, view = one_image(image, model)
    fig = plots.swin_plot(model, view, stage, block, patch)
    click.echo(f"wrote {write_all([(dest, partial(save_figure, fig))], [path])[0]}")


COMMANDS = (heads, layers, compare, swin)
