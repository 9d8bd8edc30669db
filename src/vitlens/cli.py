"""The `vitlens` command line: parses options, calls `vitlens.runner`, prints where things went.

Every user-facing failure is one line ``error: <message>`` on stderr with exit status 2, and nothing half-written.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Sequence
from functools import partial

import click

from vitlens import runner
from vitlens.cli_common import _load, _model_options, _one_image, _out_png
from vitlens.cli_model_agnostic import register as _register_model_agnostic
from vitlens.errors import VitlensError
from vitlens.viz.figures import percent, save_figure

METHOD_NAMES = ("attention", "rollout", "grad_rollout")
FUSIONS = ("mean", "max", "min")
# click >= 8.2 raises this for a bare `vitlens`; older versions print the help themselves
_NO_ARGS_IS_HELP = getattr(click.exceptions, "NoArgsIsHelpError", ())


def _rollout_options(f: Callable) -> Callable:
    """--head-fusion, --discard-ratio, --start-layer, --residual-weight, --no-normalize (None = library default)."""
    options = [
        click.option("--head-fusion", "--head_fusion", "head_fusion", type=click.Choice(FUSIONS), default=None,
                     help="How rollout fuses heads [default: mean]."),
        click.option("--discard-ratio", "--discard_ratio", "discard_ratio", type=float, default=None,
                     help="Fraction of the lowest attention weights zeroed per block, in [0, 1) [default: 0]."),
        click.option("--start-layer", type=int, default=None, help="First block (0-based) rolled out [default: 0]."),
        click.option("--residual-weight", type=float, default=None,
                     help="Weight w of the identity in (1-w)A + wI, in [0, 1] [default: 0.5]."),
        click.option("--no-normalize", is_flag=True, default=False, help="Do not divide rows by their sums."),
    ]
    for option in reversed(options):
        f = option(f)
    return f


def _rollout_kwargs(head_fusion, discard_ratio, start_layer, residual_weight, no_normalize) -> dict:
    return dict(head_fusion=head_fusion, discard_ratio=discard_ratio, start_layer=start_layer,
                residual_weight=residual_weight, normalize=False if no_normalize else None)


def _notes(notes: Sequence[str]) -> None:
    for n in notes:
        click.echo(n, err=True)


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 110})
@click.version_option(package_name="vitlens")
def cli() -> None:
    """See what a Vision Transformer looks at: attention maps, rollout, gradient rollout."""


@cli.command()
@click.argument("images", nargs=-1, type=click.Path())
@click.option("--image_path", "image_paths", multiple=True, type=click.Path(),
              help="An image (vit-explain's flag; same as the positional IMAGE).")
@_model_options
@click.option("--method", type=click.Choice(METHOD_NAMES), default=None,
              help="[default: rollout; grad_rollout when --category_index is given]")
@_rollout_options
@click.option("--query", default=None, help="attention only: cls, mean or ROW,COL of a patch [default: cls].")
@click.option("--target", default=None, metavar="CLASS", help="grad_rollout: class index or name [default: top-1].")
@click.option("--category_index", default=None, metavar="CLASS", help="vit-explain's flag: --target, and grad_rollout.")
@click.option("--use_cuda", is_flag=True, default=False, help="vit-explain's flag: same as --device cuda.")
@click.option("--batch-size", type=click.IntRange(min=1), default=8, show_default=True)
@click.option("--out", required=True, metavar="FILE.png|DIR",
              help="The figure (one image) or a folder of <stem>_<method>.png (several images or a folder).")
@click.option("--save-mask", default=None, metavar="FILE.npy|DIR",
              help="Also save the map as float32 [gh, gw] .npy (max 1); a folder of <stem>.npy for several images.")
def explain(images, image_paths, model_spec, weights, timm_kwargs, image_size, device, method, head_fusion,
            discard_ratio, start_layer, residual_weight, no_normalize, query, target, category_index, use_cuda,
            batch_size, out, save_mask) -> None:
    """Explain IMAGE(s) (files or folders): image, overlay and the top-5 predictions per image."""
    inputs = [*images, *image_paths]
    if category_index is not None:
        if target is not None and str(target) != str(category_index):
            raise VitlensError(f"--target {target} and --category_index {category_index} disagree; give one")
        target = category_index
        method = method or "grad_rollout"
    method = method or "rollout"
    if use_cuda:
        device = "cuda"
    paths = runner.collect_images(inputs)
    plan = runner.plan_outputs(inputs, paths, out, method, save_mask)
    model = _load(model_spec, weights, timm_kwargs, image_size, device)
    options = _rollout_kwargs(head_fusion, discard_ratio, start_layer, residual_weight, no_normalize)
    m, t, notes = runner.prepare_explain(model, method, target, query=query, **options)
    _notes(notes)
    progress = len(paths) > 1
    views = runner.read_views(model, paths, progress=progress)
    items = runner.explain_views(m, paths, views, target=t, batch_size=batch_size, progress=progress)
    runner.write_outputs(model, items, plan, progress=progress)
    if plan.folder:
        where = plan.figures[0].parent
        click.echo(f"wrote {len(items)} figures to {where}"
                   + (f" and {len(items)} masks to {plan.masks[0].parent}" if plan.masks else ""))
        return
    item = items[0]
    top = runner.top_predictions(model, item.probs, k=1)
    if item.target is not None:
        click.echo(f"explained class '{runner.label_of(model, item.target)}' (index {item.target})")
    if top:
        click.echo(f"top prediction: {top[0][0]} ({percent(top[0][1])})")
    click.echo(f"wrote {plan.figures[0]}")
    if plan.masks:
        click.echo(f"wrote {plan.masks[0]}")


@cli.command()
@click.argument("image", type=click.Path())
@_model_options
@click.option("--query", default="cls", show_default=True, help="cls, mean, or ROW,COL of a patch (0-based).")
@click.option("--out", required=True, metavar="FILE.png")
def heads(image, model_spec, weights, timm_kwargs, image_size, device, query, out) -> None:
    """The raw attention of a query token, per block (rows) and head (columns)."""
    target = _out_png(out)
    model = _load(model_spec, weights, timm_kwargs, image_size, device)
    _, view = _one_image(image, model)
    fig = runner.heads_plot(model, view, query)
    click.echo(f"wrote {runner.write_output(partial(save_figure, fig), target)}")


@cli.command()
@click.argument("image", type=click.Path())
@_model_options
@_rollout_options
@click.option("--out", required=True, metavar="FILE.png")
def layers(image, model_spec, weights, timm_kwargs, image_size, device, head_fusion, discard_ratio, start_layer,
           residual_weight, no_normalize, out) -> None:
    """Attention rollout after every block, the image first."""
    target = _out_png(out)
    model = _load(model_spec, weights, timm_kwargs, image_size, device)
    options = _rollout_kwargs(head_fusion, discard_ratio, start_layer, residual_weight, no_normalize)
    runner.make_method(model, "rollout", **options)  # validate before reading the image
    _, view = _one_image(image, model)
    fig = runner.layers_plot(model, view, **options)
    click.echo(f"wrote {runner.write_output(partial(save_figure, fig), target)}")


@cli.command()
@click.argument("image", type=click.Path())
@_model_options
@click.option("--discard-ratio", "--discard_ratio", "discard_ratio", type=float, default=0.9, show_default=True)
@click.option("--start-layer", type=int, default=None, help="First block (0-based) rolled out [default: 0].")
@click.option("--target", default=None, metavar="CLASS", help="Class for the grad rollout panel [default: top-1].")
@click.option("--out", required=True, metavar="FILE.png")
def compare(image, model_spec, weights, timm_kwargs, image_size, device, discard_ratio, start_layer, target,
            out) -> None:
    """The image beside rollout with mean, max and min head fusion and gradient rollout."""
    dest = _out_png(out)
    model = _load(model_spec, weights, timm_kwargs, image_size, device)
    runner.make_method(model, "rollout", discard_ratio=discard_ratio, start_layer=start_layer)  # validate
    t = runner.resolve_target(model, target)
    _, view = _one_image(image, model)
    fig, notes = runner.compare_plot(model, view, discard_ratio=discard_ratio, target=t, start_layer=start_layer)
    _notes(notes)
    click.echo(f"wrote {runner.write_output(partial(save_figure, fig), dest)}")


@cli.command()
@click.argument("image", type=click.Path())
@_model_options
@click.option("--stage", type=int, default=0, show_default=True, help="Swin stage (0-based).")
@click.option("--block", type=int, default=0, show_default=True, help="Block within the stage (0-based).")
@click.option("--patch", default="per-window", show_default=True,
              help="ROW,COL in the stage's token grid, or per-window (each window's centre patch).")
@click.option("--out", required=True, metavar="FILE.png")
def swin(image, model_spec, weights, timm_kwargs, image_size, device, stage, block, patch, out) -> None:
    """Swin: a patch's attention over the image per head and their mean, window borders drawn (shift undone)."""
    target = _out_png(out)
    model = _load(model_spec, weights, timm_kwargs, image_size, device)
    _, view = _one_image(image, model)
    fig = runner.swin_plot(model, view, stage, block, patch)
    click.echo(f"wrote {runner.write_output(partial(save_figure, fig), target)}")


@cli.command()
def models() -> None:
    """List the embedded models and the supported model families."""
    from vitlens.models import zoo
    from vitlens.models.loading import FAMILIES, SPEC_HELP

    found = zoo.zoo_models()
    click.echo("embedded models (--model vitlens:NAME):")
    if not found:
        click.echo("  none installed yet")
    for name in found:
        click.echo(f"  vitlens:{name}  ({zoo.model_summary(name)})")
    click.echo("supported families:")
    for key, text in FAMILIES.items():
        click.echo(f"  {key}: {text}")
    click.echo(f"--model takes {SPEC_HELP}")


@cli.command()
@click.option("--out", default="vitlens-demo", show_default=True, metavar="DIR", help="Folder for the figures.")
@click.option("--device", default="cpu", show_default=True)
def demo(out, device) -> None:
    """Write example figures (heads, rollout variants, rollout per block, grad rollout) and an index.html."""
    model, images, note = runner.demo_inputs()
    if note:
        click.echo(note)
    result = runner.run_demo(out, device=device, progress=True, model=model or runner.random_vit(), images=images,
                             note=note)
    click.echo(f"model: {f'vitlens:{runner.DEMO_MODEL} ' if model is not None else ''}({result.model})")
    for _, path in result.figures:
        click.echo(f"wrote {path}")
    click.echo(f"open {result.index} to see them all")


_register_model_agnostic(cli)


def _one_line(text: str) -> str:
    return "; ".join(part.strip() for part in str(text).strip().splitlines() if part.strip())


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; returns the exit status (0, or 2 with one `error:` line on stderr)."""
    try:
        result = cli.main(args=list(argv) if argv is not None else None, prog_name="vitlens", standalone_mode=False)
    except _NO_ARGS_IS_HELP as e:
        click.echo(e.ctx.get_help() if e.ctx else e.format_message(), err=True)
        return 2
    except click.ClickException as e:
        click.echo(f"error: {_one_line(e.format_message())}", err=True)
        return 2
    except VitlensError as e:
        click.echo(f"error: {_one_line(str(e))}", err=True)
        return 2
    except ImportError as e:  # an optional dependency missing or broken
        click.echo(f"error: a required package failed to import: {_one_line(str(e))[:300]}", err=True)
        return 2
    except click.exceptions.Abort:
        click.echo("error: aborted", err=True)
        return 130
    except KeyboardInterrupt:
        click.echo("error: interrupted", err=True)
        return 130
    return result if isinstance(result, int) else 0


if __name__ == "__main__":
    sys.exit(main())
