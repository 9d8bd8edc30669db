"""`vitlens evaluate`: faithfulness, localisation and sanity scores of methods (and three baseline maps) on images
with ground truth; resumable per-image CSV, a markdown table of means with 95% bootstrap intervals, curve plots."""

from __future__ import annotations

from functools import partial
from pathlib import Path
from typing import Any, cast

import click
from matplotlib.figure import Figure

from vitlens.cli.common import echo_notes, load, model_options
from vitlens.cli.outputs import write_all
from vitlens.errors import VitlensError
from vitlens.eval.removal import FORWARD_BATCH

CSV_NAME = "scores.csv"
TABLE_NAME = "table.md"


def _names(text: str | None, known: list[str], what: str) -> list[str] | None:
    if text is None:
        return None
    names = [t.strip() for t in text.split(",") if t.strip()]
    if not names:
        raise VitlensError(f"--{what} is empty; give a comma-separated list of {', '.join(known)}")
    bad = [n for n in names if n not in known]
    if bad:
        raise VitlensError(f"unknown {what[:-1]} {bad[0]!r}; use one of {', '.join(known)}")
    return list(dict.fromkeys(names))


@click.command()
@model_options
@click.option("--data", required=True, metavar="scenes|FOLDER",
              help="'scenes' (held-out two-object scenes with masks) or a folder of NAME.png with NAME.mask.png "
                   "and/or NAME.json boxes.")
@click.option("--methods", default=None, metavar="A,B,...",
              help="Registered methods to evaluate [default: every attention/gradient method that applies]. The "
                   "baselines random, gaussian and cls_attention are always added.")
@click.option("--metrics", default=None, metavar="A,B,...",
              help="positive,negative,deletion,insertion,pointing,energy,segmentation,sanity [default: all].")
@click.option("--n", "n", type=click.IntRange(min=1, max=1_000_000), default=500, show_default=True,
              help="Images to evaluate (the first N).")
@click.option("--out", required=True, metavar="DIR", help="Output folder (a run there with the same options resumes).")
@click.option("--baseline", type=click.Choice(["zero", "mean", "blur", "drop"]), default="zero", show_default=True,
              help="What replaces removed patches: 0 after normalisation, the image mean, a blur, or dropped tokens.")
@click.option("--targets", default="pred,gt", show_default=True, metavar="pred,gt",
              help="Explain the predicted class, each ground-truth class, or both.")
@click.option("--batch-size", type=click.IntRange(min=1, max=4096), default=16, show_default=True,
              help="Images per batch (one CSV append each).")
@click.option("--forward-batch", type=click.IntRange(min=1, max=65536), default=FORWARD_BATCH, show_default=True,
              help="Perturbed images per forward pass.")
@click.option("--sanity-blocks", type=click.IntRange(min=1), default=None,
              help="Blocks re-initialised from the top for the sanity test [default: all].")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of the random baseline and re-init.")
@click.option("--maps", default=None, metavar="STORE",
              help="Read the methods' maps from the store of a `vitlens run` with the same model and data instead of "
                   "computing them [default --methods: the store's]; class-specific maps explain the top-1 class, "
                   "so use --targets pred with them.")
def evaluate(model_spec: str, weights: str | None, timm_kwargs: str | None, image_size: int | None, device: str,
             data: str, methods: str | None, metrics: str | None, n: int, out: str, baseline: str, targets: str,
             batch_size: int, forward_batch: int, sanity_blocks: int | None, seed: int, maps: str | None) -> None:
    """Score explanation methods against each other and three baseline maps, and print the table."""
    from vitlens.cli.methods import map_methods
    from vitlens.eval.data import load_samples
    from vitlens.eval.explainers import BASELINE_MAPS, explainers
    from vitlens.eval.metrics import METRICS, make_metrics
    from vitlens.eval.run import TARGET_KINDS, header
    from vitlens.eval.run import evaluate as run_eval
    from vitlens.eval.store import ResumableCSV
    from vitlens.eval.summary import curve_figures, markdown, summary
    from vitlens.methods import METHODS
    from vitlens.viz.figures import save_figure

    kinds = _names(targets, list(TARGET_KINDS), "targets") or list(TARGET_KINDS)
    metric_names = _names(metrics, list(METRICS), "metrics") or list(METRICS)
    method_names = _names(methods, [*METHODS, *BASELINE_MAPS], "methods")
    folder = Path(out)
    if folder.exists() and not folder.is_dir():
        raise VitlensError(f"--out {out} is a file; give a folder")
    store = _open_maps(maps, model_spec, weights, timm_kwargs, image_size, data) if maps is not None else None
    model = load(model_spec, weights, timm_kwargs, image_size, device)
    if method_names is None:
        method_names = list(store.methods) if store is not None else \
            [k for k, m in map_methods().items() if m.applies_to(model) and k != "attention"]
    samples = load_samples(model, data, n)
    if store is None:
        exps = explainers(model, method_names, seed)
    else:
        keys = [s.key or s.name for s in samples]
        exps = explainers(model, method_names, seed, store, keys)
        _check_complete(store, keys, [e.name for e in exps if e.name in store.methods])
    echo_notes([f"note: {e.note}" for e in exps if e.note])
    if sanity_blocks is not None and sanity_blocks > model.num_blocks:
        raise VitlensError(f"--sanity-blocks {sanity_blocks} exceeds the model's {model.num_blocks} blocks")
    mets = make_metrics(metric_names, baseline=baseline, forward_batch=forward_batch, sanity_blocks=sanity_blocks,
                        seed=seed)
    settings: dict[str, Any] = {"model": model_spec, "weights": weights, "timm_kwargs": timm_kwargs,
                                "image_size": image_size, "data": data,
                                "methods": [e.name for e in exps], "metrics": metric_names, "baseline": baseline,
                                "targets": kinds, "batch_size": batch_size, "sanity_blocks": sanity_blocks,
                                "seed": seed}
    if store is not None:
        settings["maps"] = str(store.path.resolve())
    store = ResumableCSV(folder / CSV_NAME, header(mets), settings)
    if store.done:
        click.echo(f"resuming: {len(store.done)} of {len(samples)} images already scored"
                   + (f" ({store.dropped} incomplete rows dropped)" if store.dropped else ""), err=True)
    run_eval(model, samples, exps, mets, store, batch_size=batch_size, kinds=kinds, progress=True)
    rows = [r for r in store.read() if int(r["image"]) < len(samples)]  # a run resumed with a smaller --n
    names = [e.name for e in exps]
    notes = [f"model {model_spec}, data {data}, {len(samples)} images, removal baseline '{baseline}'",
             "means with 95% bootstrap intervals (1000 resamples); arrows: higher or lower is better",
             *[e.note for e in exps if e.note]]
    table = markdown(summary(rows, mets, names), mets, "vitlens evaluate", notes)
    figs = curve_figures(rows, mets, names)
    outputs: list[tuple[str | Path, Any]] = [(folder / TABLE_NAME, lambda p: Path(p).write_text(table))]
    outputs += [(folder / f"{stem}.png", partial(save_figure, cast(Figure, fig))) for stem, fig in figs.items()]
    write_all(outputs)
    click.echo(table)
    click.echo(f"wrote {folder / CSV_NAME}, {folder / TABLE_NAME} and {len(figs)} plots to {folder}")


def _same(a: Any, b: Any) -> bool:
    """Equal settings values, local paths compared after resolving them."""
    if isinstance(a, str) and isinstance(b, str) and Path(a).exists() and Path(b).exists():
        return Path(a).resolve() == Path(b).resolve()
    return bool(a == b)


def _open_maps(maps: str, model_spec: str, weights: str | None, timm_kwargs: str | None, image_size: int | None,
               data: str) -> Any:
    """The store of ``--maps``, checked to hold maps of this model and data."""
    from vitlens.cli.common import parse_timm_kwargs
    from vitlens.scale.listing import describe_data
    from vitlens.scale.store import open_store

    store = open_store(maps)
    st = store.settings
    ours = {"model": model_spec, "weights": weights, "model_kwargs": parse_timm_kwargs(timm_kwargs),
            "image_size": image_size, "data": describe_data(data)}
    for key, value in ours.items():
        if not _same(st.get(key), value):
            raise VitlensError(f"--maps {maps} was written with {key} {st.get(key)!r}, not {value!r}; evaluate with "
                               "the store's model and data, or run `vitlens run` for these")
    return store


def _check_complete(store: Any, keys: list[str], methods: list[str]) -> None:
    missing = [(k, m) for k in keys for m in methods if not store.has(k, m)]
    if missing:
        k, m = missing[0]
        raise VitlensError(f"--maps {store.path} lacks {len(missing)} of the {len(keys) * len(methods)} maps needed "
                           f"(e.g. {m} of {k!r}); run `vitlens run` again on the same data to complete it")
