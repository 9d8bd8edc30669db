"""`vitlens run`: explain every image of a data set with several methods into a resumable Parquet + Zarr store, on
this machine (a DataLoader with workers) or on Ray Data (`--engine ray`)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import click

from vitlens.cli.common import echo_notes, model_options, parse_timm_kwargs
from vitlens.cli.methods import map_methods, method_options, pop_options
from vitlens.errors import VitlensError

ENGINES = ("local", "ray")


def method_names(text: str) -> list[str]:
    """The comma-separated ``--methods``, checked against the map methods (each once, in order)."""
    known = list(map_methods())
    names = list(dict.fromkeys(t.strip() for t in text.split(",") if t.strip()))
    if not names:
        raise VitlensError(f"--methods is empty; give a comma-separated list of {', '.join(known)}")
    bad = [n for n in names if n not in known]
    if bad:
        raise VitlensError(f"unknown method {bad[0]!r}; use one of {', '.join(known)}")
    return names


@click.command()
@model_options
@click.option("--data", required=True, metavar="FOLDER|scenes|LIST",
              help="A folder of images (searched recursively; ids are paths relative to it), 'scenes' (the held-out "
                   "scenes of `vitlens evaluate`) or a .txt list of image paths, one a line.")
@click.option("--methods", default="rollout", show_default=True, metavar="A,B,...",
              help=f"Methods to run on every image: {', '.join(map_methods())}.")
@method_options()
@click.option("--target", default=None, metavar="CLASS",
              help="Class index or name explained by class-specific methods [default: each image's top-1 class].")
@click.option("--top-k", type=click.IntRange(min=0, max=1000), default=5, show_default=True,
              help="Classes (and probabilities) recorded per image.")
@click.option("--n", "n", type=click.IntRange(min=1), default=None,
              help="Only the first N images of the listing [default: all; 500 for scenes].")
@click.option("--out", required=True, metavar="DIR",
              help="The store: a new folder, or the store of an interrupted run with the same options (resumes).")
@click.option("--engine", type=click.Choice(ENGINES), default="local", show_default=True,
              help="local: this process explains, DataLoader workers read images; ray: Ray Data model actors.")
@click.option("--workers", type=click.IntRange(min=0, max=256), default=2, show_default=True,
              help="DataLoader worker processes (local; 0 reads in this process) or model actors (ray).")
@click.option("--ray-address", default=None, metavar="ADDRESS",
              help="A running Ray cluster (e.g. ray://head:10001 or auto) [default: start Ray on this machine].")
@click.option("--batch-size", type=click.IntRange(min=1, max=4096), default=16, show_default=True,
              help="Images per batch (one committed part of the store each).")
def run(model_spec: str, weights: str | None, timm_kwargs: str | None, image_size: int | None, device: str,
        data: str, methods: str, target: str | None, top_k: int, n: int | None, out: str, engine: str, workers: int,
        ray_address: str | None, batch_size: int, **options: Any) -> None:
    """Explain every image of --data with every method into the store --out (resumable: run it again to finish)."""
    from vitlens.scale.job import Job
    from vitlens.scale.listing import list_items
    from vitlens.scale.store import StoreWriter, check_store_folder

    given = pop_options(options)
    names = method_names(methods)
    if engine == "ray" and workers < 1:
        raise VitlensError("--engine ray needs --workers 1 or more (the number of model actors)")
    if ray_address and engine != "ray":
        raise VitlensError("--ray-address is for --engine ray; add --engine ray or drop it")
    folder = Path(out)
    for parent in [folder, *folder.parents]:
        if parent.exists() and not parent.is_dir():
            raise VitlensError(f"--out {out}: {parent} is a file, not a folder")
    check_store_folder(folder)  # before the model loads
    items = list_items(data, n, exclude=folder)
    kwargs = parse_timm_kwargs(timm_kwargs)
    job = Job(model_spec, tuple(names), given, weights, kwargs, image_size, device, target, top_k)
    # the driver checks the job and records its settings; with Ray the actors load the model on their own devices
    explainer, notes = job.build(device="cpu" if engine == "ray" else None)
    echo_notes(notes)
    with StoreWriter(folder, job.settings(data, explainer)) as store:
        try:
            if store.next:
                click.echo(f"resuming {folder}: {len(store.done())} images already done", err=True)
            if engine == "ray":
                from vitlens.scale.ray_engine import run_ray

                summary = run_ray(job, items, store, batch_size=batch_size, workers=workers, address=ray_address)
            else:
                from vitlens.scale.local import run_local

                summary = run_local(explainer, items, store, batch_size=batch_size, workers=workers)
        except BaseException:
            store.abandon()  # nothing committed: leave no half-made store behind
            raise
    done = summary.explained + summary.errors
    click.echo(f"explained {summary.explained} images with {', '.join(m.name for m in explainer.methods)} "
               f"({summary.maps} maps) in {summary.seconds:.1f} s, {summary.images_per_second:.1f} images/s"
               + (f"; {summary.skipped} were already done" if summary.skipped else ""))
    if summary.errors:
        click.echo(f"{summary.errors} of {done} images could not be read and were skipped; their paths and errors "
                   "are in the store's errors table (vitlens.scale.open_store(OUT).errors())")
    click.echo(f"wrote {folder} ({summary.total} images listed)")
