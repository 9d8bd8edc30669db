"""`vitlens explain`: maps of one method for images and folders, batched, one figure (and mask) per image."""

from __future__ import annotations

import sys
from collections.abc import Sequence
from functools import partial
from pathlib import Path
from typing import Any

import click
import torch
from PIL import Image

from vitlens.cli.common import collect_images, echo_notes, load, model_options, progress_off, read_views
from vitlens.cli.methods import build_method, map_methods, method_options, pop_options, resolve_method_target
from vitlens.cli.outputs import Outputs, plan_outputs
from vitlens.errors import VitlensError
from vitlens.explanation import Explanation
from vitlens.methods.base import Method
from vitlens.models.base import label_of
from vitlens.viz.figures import percent, save_figure
from vitlens.viz.plots import check_finite, explain_plot, top_predictions


def explain_views(method: Method, views: Sequence[Image.Image], target: int | None = None, batch_size: int = 8,
                  progress: bool = False) -> list[tuple[Explanation, int]]:
    """Explain prepared views in batches of ``batch_size``; per image its batch `Explanation` and row in it."""
    from tqdm.auto import tqdm

    if batch_size < 1:
        raise VitlensError(f"batch size must be at least 1, got {batch_size}")
    pre = method.model.preprocess
    out: list[tuple[Explanation, int]] = []
    with tqdm(total=len(views), desc=method.name, unit="image", disable=progress_off(progress, len(views)),
              file=sys.stderr) as bar:
        for s in range(0, len(views), batch_size):
            chunk = views[s : s + batch_size]
            exp = method.explain(torch.stack([pre.tensor(v) for v in chunk]), target=target)
            out.extend((exp, i) for i in range(len(chunk)))
            bar.update(len(chunk))
    return out


def _save_mask(exp: Explanation, index: int, path: Path) -> None:
    check_finite(exp.numpy()[index], f"the {exp.method} map")
    exp.save(path, index)


@click.command()
@click.argument("images", nargs=-1, type=click.Path())
@click.option("--image_path", "image_paths", multiple=True, type=click.Path(),
              help="An image (vit-explain's flag; same as the positional IMAGE).")
@model_options
@click.option("--method", type=click.Choice(list(map_methods())), default=None,
              help="[default: rollout; grad_rollout when --category_index is given]")
@method_options()
@click.option("--target", default=None, metavar="CLASS", help="Class index or name for class-specific methods "
              "[default: top-1].")
@click.option("--category_index", default=None, metavar="CLASS", help="vit-explain's flag: --target, and grad_rollout.")
@click.option("--use_cuda", is_flag=True, default=False, help="vit-explain's flag: same as --device cuda.")
@click.option("--batch-size", type=click.IntRange(min=1, max=4096), default=8, show_default=True)
@click.option("--out", required=True, metavar="FILE.png|DIR",
              help="The figure (one image) or a folder of <stem>_<method>.png (several images or a folder).")
@click.option("--save-mask", default=None, metavar="FILE.npy|DIR",
              help="Also save the map as float32 [gh, gw] .npy (max 1); a folder of <stem>.npy for several images.")
def explain(images: tuple[str, ...], image_paths: tuple[str, ...], model_spec: str, weights: str | None,
            timm_kwargs: str | None, image_size: int | None, device: str, method: str | None, target: str | None,
            category_index: str | None, use_cuda: bool, batch_size: int, out: str, save_mask: str | None,
            **options: Any) -> None:
    """Explain IMAGE(s) (files or folders): image, overlay and the top-5 predictions per image."""
    inputs = [*images, *image_paths]
    if category_index is not None:
        if target is not None and str(target) != str(category_index):
            raise VitlensError(f"--target {target} and --category_index {category_index} disagree; give one")
        target = category_index
        method = method or "grad_rollout"
    method = method or "rollout"
    given = pop_options(options)
    paths = collect_images(inputs)
    plan = plan_outputs(inputs, paths, out, method, save_mask)
    model = load(model_spec, weights, timm_kwargs, image_size, "cuda" if use_cuda else device)
    m, notes = build_method(model, method, given)
    t, more = resolve_method_target(model, m, target)
    echo_notes(notes + more)
    progress = len(paths) > 1
    views = read_views(model, paths, progress=progress)
    results = explain_views(m, views, target=t, batch_size=batch_size, progress=progress)
    from tqdm.auto import tqdm

    with Outputs(paths) as tx:
        bar = tqdm(list(zip(views, results)), desc="writing", unit="figure", disable=progress_off(progress, 2),
                   file=sys.stderr)
        for k, (view, (exp, i)) in enumerate(bar):
            tx.add(plan.figures[k], partial(save_figure, explain_plot(model, view, exp, i)))
            if plan.masks is not None:
                tx.add(plan.masks[k], partial(_save_mask, exp, i))
        tx.commit()
    if plan.folder:
        click.echo(f"wrote {len(paths)} figures to {plan.figures[0].parent}"
                   + (f" and {len(paths)} masks to {plan.masks[0].parent}" if plan.masks else ""))
        return
    exp, i = results[0]
    if exp.target is not None:
        cls = int(exp.target[i])
        click.echo(f"explained class '{label_of(model, cls)}' (index {cls})")
    top = top_predictions(model, None if exp.probs is None else exp.probs[i], k=1)
    if top:
        click.echo(f"top prediction: {top[0][0]} ({percent(top[0][1])})")
    click.echo(f"wrote {plan.figures[0]}")
    if plan.masks:
        click.echo(f"wrote {plan.masks[0]}")
