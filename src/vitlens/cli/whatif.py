"""`vitlens whatif`: move, resize or split regions and compare the top-k classes of the original and edited images."""

from __future__ import annotations

from functools import partial
from pathlib import Path

import click

from vitlens.cli.common import collect_images, load, model_options, out_png
from vitlens.cli.outputs import write_all
from vitlens.errors import VitlensError
from vitlens.methods.whatif import FILLS
from vitlens.viz.figures import save_figure


def _write_text(text: str, path: Path) -> None:
    path.write_text(text, encoding="utf-8")


@click.command("whatif")
@click.argument("image", type=click.Path())
@model_options
@click.option("--edit", "edit_texts", multiple=True, metavar="EDIT",
              help="move:X0,Y0,X1,Y1:TO_X,TO_Y | scale:X0,Y0,X1,Y1:FACTOR | split:X0,Y0,X1,Y1[:GAP] (pixels of "
                   "the original image; X1, Y1 exclusive). Repeatable.")
@click.option("--edits", "edits_file", type=click.Path(), default=None, metavar="FILE.json",
              help="A JSON list of edits (strings as --edit, or objects with kind, box, to, factor, gap).")
@click.option("--fill", type=click.Choice(FILLS), default="blur", show_default=True,
              help="How the hole left by the cut region is filled.")
@click.option("--top-k", type=click.IntRange(min=1, max=100), default=3, show_default=True)
@click.option("--out", required=True, metavar="FILE.png",
              help="The figure; the table goes beside it as FILE.csv and FILE.md.")
def whatif(image: str, model_spec: str, weights: str | None, timm_kwargs: str | None, image_size: int | None,
           device: str, edit_texts: tuple[str, ...], edits_file: str | None, fill: str, top_k: int, out: str) -> None:
    """What-if: move, resize or split regions and compare the top-k classes of the original and edited images."""
    from vitlens.images import load_image
    from vitlens.methods.whatif import check_edit, load_edits, parse_edit
    from vitlens.methods.whatif import whatif as run_whatif
    from vitlens.viz.lime_figures import whatif_figure

    edits = [parse_edit(t) for t in edit_texts] + (load_edits(edits_file) if edits_file else [])
    if not edits:
        raise VitlensError("no edit given; pass --edit EDIT (repeatable) or --edits FILE.json")
    dest = out_png(out)
    tables = [dest.with_suffix(".csv"), dest.with_suffix(".md")]
    model = load(model_spec, weights, timm_kwargs, image_size, device)
    paths = collect_images([image])
    if len(paths) != 1:
        raise VitlensError(f"{image} holds {len(paths)} images; this command takes one image file")
    picture = load_image(paths[0])
    for e in edits:
        check_edit(e, picture.size)
    result = run_whatif(model, picture, edits, top_k=top_k, fill=fill)
    fig = whatif_figure(result, f"What-if edits on {paths[0].name} (hole filled by {fill})")
    table = result.markdown()
    inputs: list[str | Path] = [paths[0], *([edits_file] if edits_file else [])]
    write_all([(dest, partial(save_figure, fig)), (tables[0], partial(_write_text, result.csv())),
               (tables[1], partial(_write_text, table))], inputs)
    click.echo(table, nl=False)
    click.echo(f"wrote {dest}, {tables[0]} and {tables[1]}")
