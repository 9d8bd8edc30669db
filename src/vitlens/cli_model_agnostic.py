"""Command-line commands of the model-agnostic methods: ``lime``, ``occlusion`` and ``whatif``.

`register(cli)` adds them to the `vitlens` group. Every check on user input runs before anything is written.
"""

from __future__ import annotations

from functools import partial
from pathlib import Path

import click

from vitlens import runner
from vitlens.cli_common import _load, _model_options, _one_image, _out_png
from vitlens.errors import VitlensError
from vitlens.io import atomic_write
from vitlens.segmentation import SEGMENTATIONS
from vitlens.viz.figures import percent, save_figure
from vitlens.whatif import FILLS


def _pair_option(text: str | None, flag: str) -> tuple[int, int] | None:
    """'N' or 'H,W' -> (h, w) of positive ints."""
    if text is None:
        return None
    parts = [p.strip() for p in str(text).split(",")]
    try:
        vals = [int(p) for p in parts]
    except ValueError:
        raise VitlensError(f"{flag} must be N or H,W in pixels, got {text!r}") from None
    if len(vals) == 1:
        vals = vals * 2
    if len(vals) != 2 or min(vals) < 1:
        raise VitlensError(f"{flag} must be N or H,W of positive integers, got {text!r}")
    return vals[0], vals[1]


@click.command("lime")
@click.argument("image", type=click.Path())
@_model_options
@click.option("--segmentation", type=click.Choice(SEGMENTATIONS), default="slic", show_default=True,
              help="Superpixels: slic, quickshift (scikit-image) or a grid aligned to the patches.")
@click.option("--n-segments", type=click.IntRange(min=1), default=50, show_default=True,
              help="About how many superpixels (slic, grid).")
@click.option("--num-samples", type=click.IntRange(min=2), default=1000, show_default=True)
@click.option("--batch-size", type=click.IntRange(min=1), default=64, show_default=True)
@click.option("--kernel-width", type=float, default=0.25, show_default=True)
@click.option("--hide", default="mean", show_default=True,
              help="mean (each superpixel's mean colour), blur, drop (ViT token removal, grid only), or a grey "
                   "level / R,G,B in [0, 1].")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--top", type=click.IntRange(min=1, max=10), default=2, show_default=True,
              help="Show the supporting superpixels of this many top classes.")
@click.option("--num-features", type=click.IntRange(min=1), default=5, show_default=True,
              help="Superpixels shown per panel.")
@click.option("--out", required=True, metavar="FILE.png")
def lime(image, model_spec, weights, timm_kwargs, image_size, device, segmentation, n_segments, num_samples,
         batch_size, kernel_width, hide, seed, top, num_features, out) -> None:
    """LIME: the superpixels supporting the top classes and those against the top-1 class."""
    from vitlens.methods.lime import Lime
    from vitlens.viz.lime_figures import lime_figure

    dest = _out_png(out)
    model = _load(model_spec, weights, timm_kwargs, image_size, device)
    method = Lime(model, segmentation=segmentation, n_segments=n_segments, num_samples=num_samples,
                  batch_size=batch_size, kernel_width=kernel_width, hide=hide, seed=seed, progress=True)
    _, view = _one_image(image, model)
    exp = method.explain(model.preprocess.tensor(view)[None])
    fig = lime_figure(view, exp, partial(runner.label_of, model), top=top, num_features=num_features)
    for rank, (lbl, p) in enumerate(runner.top_predictions(model, exp.probs[0], k=top), 1):
        click.echo(f"top-{rank}: {lbl} ({percent(p)})")
    click.echo(f"surrogate R^2 (top-1): {float(exp.extras['score'][0]):.3f}")
    click.echo(f"wrote {runner.write_output(partial(save_figure, fig), dest)}")


@click.command("occlusion")
@click.argument("image", type=click.Path())
@_model_options
@click.option("--window", default="16", show_default=True, metavar="N|H,W", help="Occluding window in pixels.")
@click.option("--stride", default=None, metavar="N|H,W", help="Step between windows [default: the window].")
@click.option("--baseline", default="0", show_default=True,
              help="What covers a window: a number in the model's input space (0 = dataset mean), mean or blur.")
@click.option("--target", default=None, metavar="CLASS", help="Class index or name [default: top-1].")
@click.option("--batch-size", type=click.IntRange(min=1), default=64, show_default=True)
@click.option("--out", required=True, metavar="FILE.png")
def occlusion(image, model_spec, weights, timm_kwargs, image_size, device, window, stride, baseline, target,
              batch_size, out) -> None:
    """Occlusion: the drop of the class probability when each window is covered."""
    from vitlens.methods.occlusion import Occlusion
    from vitlens.viz.figures import explain_figure

    dest = _out_png(out)
    win, step = _pair_option(window, "--window"), _pair_option(stride, "--stride")
    model = _load(model_spec, weights, timm_kwargs, image_size, device)
    method = Occlusion(model, window=win, stride=step, baseline=baseline, batch_size=batch_size, progress=True)
    t = runner.resolve_target(model, target)
    _, view = _one_image(image, model)
    exp = method.explain(model.preprocess.tensor(view)[None], target=t)
    cls = int(exp.target[0])
    title = (f"occlusion for '{runner.label_of(model, cls)}': probability drop, window {method.window}, "
             f"stride {method.stride}, baseline {method.baseline}")
    top = runner.top_predictions(model, exp.probs[0])
    fig = explain_figure(view, exp.maps[0], title, top or None, runner.label_of(model, cls))
    click.echo(f"explained class '{runner.label_of(model, cls)}' (index {cls})")
    click.echo(f"wrote {runner.write_output(partial(save_figure, fig), dest)}")


def _write_text(text: str, path: Path) -> Path:
    with atomic_write(path) as tmp:
        tmp.write_text(text, encoding="utf-8")
    return path


@click.command("whatif")
@click.argument("image", type=click.Path())
@_model_options
@click.option("--edit", "edit_texts", multiple=True, metavar="EDIT",
              help="move:X0,Y0,X1,Y1:TO_X,TO_Y | scale:X0,Y0,X1,Y1:FACTOR | split:X0,Y0,X1,Y1[:GAP] (pixels of "
                   "the original image; X1, Y1 exclusive). Repeatable.")
@click.option("--edits", "edits_file", type=click.Path(), default=None, metavar="FILE.json",
              help="A JSON list of edits (strings as --edit, or objects with kind, box, to, factor, gap).")
@click.option("--fill", type=click.Choice(FILLS), default="blur", show_default=True,
              help="How the hole left by the cut region is filled.")
@click.option("--top-k", type=click.IntRange(min=1), default=3, show_default=True)
@click.option("--out", required=True, metavar="FILE.png",
              help="The figure; the table goes beside it as FILE.csv and FILE.md.")
def whatif(image, model_spec, weights, timm_kwargs, image_size, device, edit_texts, edits_file, fill, top_k,
           out) -> None:
    """What-if: move, resize or split regions and compare the top-k classes of the original and edited images."""
    from vitlens.images import load_image
    from vitlens.viz.lime_figures import whatif_figure
    from vitlens.whatif import check_edit, load_edits, parse_edit
    from vitlens.whatif import whatif as run_whatif

    edits = [parse_edit(t) for t in edit_texts] + (load_edits(edits_file) if edits_file else [])
    if not edits:
        raise VitlensError("no edit given; pass --edit EDIT (repeatable) or --edits FILE.json")
    dest = _out_png(out)
    tables = [dest.with_suffix(".csv"), dest.with_suffix(".md")]
    for p in tables:
        if p.is_dir():
            raise VitlensError(f"{p} is a folder; the table is written there")
    model = _load(model_spec, weights, timm_kwargs, image_size, device)
    paths = runner.collect_images([image])
    if len(paths) != 1:
        raise VitlensError(f"{image} holds {len(paths)} images; this command takes one image file")
    picture = load_image(paths[0])
    for e in edits:
        check_edit(e, picture.size)
    result = run_whatif(model, picture, edits, top_k=top_k, fill=fill)
    fig = whatif_figure(result, f"What-if edits on {paths[0].name} (hole filled by {fill})")
    table = result.markdown()
    click.echo(table, nl=False)
    runner.write_output(partial(save_figure, fig), dest)
    runner.write_output(partial(_write_text, result.csv()), tables[0])
    runner.write_output(partial(_write_text, table), tables[1])
    click.echo(f"wrote {dest}, {tables[0]} and {tables[1]}")


COMMANDS = (lime, occlusion, whatif)


def register(group: click.Group) -> click.Group:
    """Add the lime, occlusion and whatif commands to ``group`` (a no-op for those already there)."""
    for cmd in COMMANDS:
        if cmd.name not in group.commands:
            group.add_command(cmd)
    return group
