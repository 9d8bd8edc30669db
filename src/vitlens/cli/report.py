"""`vitlens report`: one offline HTML page to explore an image's attention, rollout and class maps."""

from __future__ import annotations

from typing import Any

import click

from vitlens.cli.common import collect_images, echo_notes, load, model_options
from vitlens.cli.methods import method_options, pop_options
from vitlens.cli.outputs import write_all
from vitlens.errors import VitlensError


@click.command("report")
@click.argument("image", type=click.Path())
@model_options
@click.option("--out", required=True, metavar="FILE.html", help="The page to write (one self-contained file).")
@click.option("--methods", default=None, metavar="NAMES",
              help="Comma-separated registered methods to precompute per class [default: grad_rollout].")
@click.option("--lime", "with_lime", is_flag=True, default=False, help="Also LIME maps for each listed class.")
@click.option("--top-k", type=click.IntRange(min=1, max=50), default=5, show_default=True,
              help="Classes listed (and explained) in the page.")
@click.option("--max-mb", type=click.FloatRange(min=0.1), default=5.0, show_default=True,
              help="Size budget: the attention is stored with the finest encoding that fits.")
@method_options(["lime"])
def report(image: str, model_spec: str, weights: str | None, timm_kwargs: str | None, image_size: int | None,
           device: str, out: str, methods: str | None, with_lime: bool, top_k: int, max_mb: float,
           **options: Any) -> None:
    """An interactive page: each patch's attention per block and head, rollout built up block by block (any head
    fusion, discard ratio), class maps for the top classes, opacity, colour map, PNG download. No network needed."""
    from pathlib import Path

    from vitlens.viz.report import report as build

    dest = Path(out)
    if dest.suffix.lower() not in (".html", ".htm"):
        raise VitlensError(f"--out {out} should be an .html file")
    lime_given = pop_options(options, ["lime"])
    notes = [] if with_lime or not lime_given else ["note: LIME options are ignored without --lime"]
    model = load(model_spec, weights, timm_kwargs, image_size, device)
    paths = collect_images([image])
    if len(paths) != 1:
        raise VitlensError(f"{image} holds {len(paths)} images; `vitlens report` takes one image file")
    names = None if methods is None else [m for m in methods.split(",") if m.strip()]
    page = build(paths[0], model, methods=names, lime=with_lime, top_k=top_k, max_bytes=int(max_mb * 1e6),
                 method_options={"lime": {**lime_given, "progress": True}} if with_lime else None)
    echo_notes(notes + page.notes)
    written = write_all([(dest, lambda tmp: tmp.write_text(page.html, encoding="utf-8"))], paths)[0]
    info = page.info
    stored = "as the model's float32 values" if info["bits"] == 32 else \
        f"as {info['encoding']} codes per row, each value within {info['max_error']:.1e}"
    worst = max(info["rollout_error"], key=info["rollout_error"].get)
    fusion, discard = worst.split("/")
    rollout = "equal to the library's" if info["rollout_error"][worst] == 0 else \
        f"within {info['rollout_error'][worst]:.1e} of the library's, largest at {fusion} fusion, discard {discard}"
    click.echo(f"wrote {written} ({info['bytes'] / 1e6:.2f} MB; attention {stored}; rollout {rollout})")
