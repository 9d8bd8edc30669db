"""`vitlens finetune` (one model, one method: a model folder, metrics.json and a rollout before/after figure) and
`vitlens finetune-compare` (models x methods x seeds: a results table in markdown and CSV, and a plot)."""

from __future__ import annotations

import json
import math
import os
import shutil
import tempfile
from pathlib import Path

import click
import numpy as np
import torch

from vitlens.cli.common import load, model_options
from vitlens.cli.outputs import write_all
from vitlens.errors import VitlensError
from vitlens.models.base import VitModel

METRICS_NAME = "metrics.json"
FIGURE_NAME = "rollout_before_after.png"
LOG_NAME = "runs.jsonl"
ROLLOUT_MEASURED = 64  # held-out images whose rollout is compared before and after
TABLE_MD, TABLE_CSV, PLOT_NAME = "results.md", "results.csv", "accuracy_vs_params.png"


def check_out_dir(out: str) -> Path:
    """An output folder that exists or can be created: one clear error before any work otherwise."""
    path = Path(out)
    if path.exists() and not path.is_dir():
        raise VitlensError(f"--out {path} is a file; give a folder")
    probe = path
    while not probe.exists():
        probe = probe.parent
    if not probe.is_dir() or not os.access(probe, os.W_OK | os.X_OK):
        raise VitlensError(f"cannot write to {probe} (for --out {path}); give a folder you can write to")
    return path


def _task_size(model: VitModel, image_size: int | None) -> int:
    h, w = model.preprocess.size
    if h != w:
        raise VitlensError(f"the model's input is {h}x{w}; fine-tuning uses square images: pass --image-size N")
    return int(h)


def _finite(name: str, value: float, positive: bool) -> None:
    if not math.isfinite(value) or value < 0 or (positive and value == 0):
        raise VitlensError(f"{name} must be a finite number {'> 0' if positive else '>= 0'}, got {value}")


def _threads(n: int | None) -> None:
    if n:
        torch.set_num_threads(n)


def _data_options(f):
    options = [
        click.option("--data", required=True, metavar="FOLDER|fashion-mnist|scenes",
                     help="A folder with one sub-folder of images per class, 'fashion-mnist' (single items, 10 "
                          "classes) or 'scenes' (multi-label vitlens scenes)."),
        click.option("--n-train", type=click.IntRange(1, 60000), default=1000, show_default=True,
                     help="Training images drawn for fashion-mnist / scenes (a FOLDER uses all)."),
        click.option("--n-eval", type=click.IntRange(1, 10000), default=500, show_default=True,
                     help="Held-out images for fashion-mnist / scenes (from the test split)."),
        click.option("--eval-fraction", type=float, default=0.2, show_default=True,
                     help="Share of each class of a FOLDER held out for evaluation."),
        click.option("--epochs", type=int, default=10, show_default=True, help="Passes over the training set."),
        click.option("--lr", type=float, default=1e-3, show_default=True, help="AdamW learning rate (constant)."),
        click.option("--weight-decay", type=float, default=1e-4, show_default=True, help="AdamW weight decay."),
        click.option("--batch-size", type=int, default=32, show_default=True, help="Images per step."),
        click.option("--adapter-dim", type=int, default=64, show_default=True, help="Bottleneck adapter width."),
        click.option("--lora-rank", type=int, default=8, show_default=True, help="LoRA rank (q and v)."),
        click.option("--lora-alpha", type=float, default=16.0, show_default=True,
                     help="LoRA scale numerator (the update is alpha / rank x B A)."),
        click.option("--threads", type=click.IntRange(0, 256), default=0,
                     help="torch CPU threads (0: torch's default)."),
    ]
    for option in reversed(options):
        f = option(f)
    return f


@click.command()
@model_options
@_data_options
@click.option("--method", required=True, metavar="head|full|adapter|lora",
              help="What trains: the head; everything; bottleneck adapters and the head; LoRA on q, v and the head.")
@click.option("--adapter-placement", default="both", show_default=True, metavar="attn|mlp|both|parallel",
              help="Where adapters go: after attention, after the MLP, both, or in parallel to each block.")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of the head, adapters and batch order.")
@click.option("--rollout-images", type=click.IntRange(0, 16), default=4, show_default=True,
              help="Held-out images in the rollout before/after figure (0: no figure).")
@click.option("--out", required=True, metavar="DIR", help="Folder for the model, metrics.json and the figure.")
def finetune(model_spec: str, weights: str | None, timm_kwargs: str | None, image_size: int | None, device: str,
             data: str, n_train: int, n_eval: int, eval_fraction: float, epochs: int, lr: float, weight_decay: float,
             batch_size: int, adapter_dim: int, lora_rank: int, lora_alpha: float, threads: int, method: str,
             adapter_placement: str, seed: int, rollout_images: int, out: str) -> None:
    """Fine-tune a ViT or Swin classifier and save it where `vitlens explain --model DIR` reads it."""
    from vitlens.models.hf import is_hf_model
    from vitlens.train.finetune import Settings, check_saveable, normalise, parse_method, run_finetune, save_finetuned
    from vitlens.train.finetune_data import load_task
    from vitlens.train.finetune_rollout import map_correlation, rollout_figure, rollout_maps

    name, place = parse_method(method, adapter_placement)
    settings = Settings(method=name, placement=place, adapter_dim=adapter_dim, lora_rank=lora_rank,
                        lora_alpha=lora_alpha, epochs=epochs, lr=lr, weight_decay=weight_decay, batch_size=batch_size,
                        seed=seed)
    _finite("--eval-fraction", eval_fraction, True)
    folder = check_out_dir(out)
    _threads(threads)
    model = load(model_spec, weights, timm_kwargs, image_size, device)
    check_saveable(model.module, settings.method)
    size = _task_size(model, image_size)
    task = load_task(data, size, n_train, n_eval, eval_fraction)
    pre = model.preprocess
    shown = min(rollout_images, len(task.eval_images))
    # rollout before/after on up to ROLLOUT_MEASURED held-out images (the correlation), the first `shown` drawn
    measured = min(len(task.eval_images), max(shown, ROLLOUT_MEASURED)) if shown else 0
    x_fig = normalise(task.eval_images[:measured], pre.mean, pre.std)
    before: list = []

    def on_ready(module) -> None:
        if shown:
            before.append(rollout_maps(module, x_fig))

    click.echo(f"fine-tuning {model_spec} ({settings.label}) on {task.name}: {len(task.train_images)} training, "
               f"{len(task.eval_images)} held-out images at {size} px", err=True)
    module, result = run_finetune(model, task, settings, on_ready=on_ready)
    info = {"model": model_spec, **result.as_dict(), "machine": _machine()}
    info.pop("loss")
    info["final_train_loss"] = float(sum(result.loss[-20:]) / max(1, len(result.loss[-20:])))
    figure = None
    if shown:
        after = rollout_maps(module, x_fig)
        corr = map_correlation(before[0], after)
        info["rollout_before_after"] = {
            "images": measured, "mean_correlation": float(np.nanmean(corr)), "per_image_correlation": corr,
            "mean_abs_change": float(np.mean(np.abs(after - before[0])))}
        captions = [task.classes[int(y)] if not task.multi_label else "scene" for y in task.eval_labels[:shown]]
        figure = rollout_figure(list(task.eval_images[:shown]), before[0][:shown], after[:shown],
                                f"{model_spec}: attention rollout before / after {settings.label} fine-tuning",
                                captions)
    with tempfile.TemporaryDirectory(prefix="vitlens-finetune-") as tmp:
        files = save_finetuned(module, Path(tmp), settings, size, pre.mean, pre.std, info)
        outputs = [(folder / p.name, lambda dst, src=p: shutil.copyfile(src, dst)) for p in files]
        if figure is not None:
            from vitlens.viz.figures import save_figure

            outputs.append((folder / FIGURE_NAME, lambda dst, fig=figure: save_figure(fig, dst)))
        written = write_all(outputs)
    share = 100 * result.trainable_params / max(1, result.total_params)
    click.echo(f"held-out {result.metric}: {result.final:.4f} after {settings.epochs} epochs "
               f"({result.epoch_seconds:.1f} s per epoch); trainable parameters {result.trainable_params:,} of "
               f"{result.total_params:,} ({share:.2f}%)")
    if "rollout_before_after" in info:
        roll = info["rollout_before_after"]
        click.echo(f"rollout before vs after fine-tuning: mean correlation {roll['mean_correlation']:.3f} over "
                   f"{roll['images']} held-out images (figure: {folder / FIGURE_NAME})")
    click.echo(f"wrote {len(written)} files to {folder}" + (f" (explain it: vitlens explain --model {folder} ...)"
                                                           if is_hf_model(module) else ""))


def _machine() -> str:
    from vitlens.train.finetune_compare import machine

    return machine()


@click.command("finetune-compare")
@click.option("--models", required=True, metavar="A,B", help="Model specs, comma-separated (e.g. vitlens:dinov2-small,"
              "vitlens:scenes-swin).")
@click.option("--methods", default="head,adapter:attn,adapter:mlp,adapter:both,adapter:parallel,lora,full",
              show_default=True, metavar="M,...", help="head, full, lora, adapter:attn|mlp|both|parallel.")
@click.option("--seeds", type=click.IntRange(1, 100), default=3, show_default=True, help="Seeds 0..N-1 per cell.")
@click.option("--image-size", "image_sizes", default=None, metavar="N|N,M",
              help="Training size in pixels: one for all models, or one per model [default: each model's own].")
@_data_options
@click.option("--out", required=True, metavar="DIR",
              help="Folder for results.md, results.csv, the plot and runs.jsonl (a rerun resumes from it).")
def finetune_compare(models: str, methods: str, seeds: int, image_sizes: str | None, data: str, n_train: int,
                     n_eval: int, eval_fraction: float, epochs: int, lr: float, weight_decay: float, batch_size: int,
                     adapter_dim: int, lora_rank: int, lora_alpha: float, threads: int, out: str) -> None:
    """Run fine-tuning methods on several models with several seeds and write the comparison table and plot."""
    from vitlens.models.loading import load_model
    from vitlens.train.finetune_compare import (
        GridSpec,
        check_methods,
        csv_table,
        machine,
        markdown_table,
        plot_summary,
        run_grid,
        split_list,
        summarise,
    )
    from vitlens.train.finetune_data import load_task

    specs = split_list(models, "--models")
    labels = check_methods(split_list(methods, "--methods"))
    sizes: list[int | None] = [None] * len(specs)
    if image_sizes is not None:
        try:
            given = [int(s) for s in image_sizes.split(",")]
        except ValueError:
            raise VitlensError(f"--image-size must be whole numbers, got {image_sizes!r}") from None
        if len(given) not in (1, len(specs)) or any(s < 1 for s in given):
            raise VitlensError(f"--image-size takes one positive size, or one per model ({len(specs)}); "
                               f"got {image_sizes!r}")
        sizes = list(given * len(specs) if len(given) == 1 else given)
    spec = GridSpec(data=data, epochs=epochs, lr=lr, weight_decay=weight_decay, batch_size=batch_size,
                    n_train=n_train, n_eval=n_eval, adapter_dim=adapter_dim, lora_rank=lora_rank,
                    lora_alpha=lora_alpha)
    for label in labels:
        spec.settings(label, 0)  # every number checked before any work
    _finite("--eval-fraction", eval_fraction, True)
    folder = check_out_dir(out)
    _threads(threads)
    loaded, tasks = [], {}
    for s, size in zip(specs, sizes, strict=True):
        model = load_model(s, image_size=size)
        side = _task_size(model, size)
        if side not in tasks:
            tasks[side] = load_task(data, side, n_train, n_eval, eval_fraction)
        loaded.append((s, model, tasks[side]))
    folder.mkdir(parents=True, exist_ok=True)
    click.echo(f"{len(specs)} models x {len(labels)} methods x {seeds} seeds on {data}; {machine()}", err=True)
    rows = run_grid(loaded, labels, list(range(seeds)), spec, folder / LOG_NAME,
                    say=lambda line: click.echo(line, err=True))
    summary = summarise(rows)
    note = (f"{data}: {len(loaded[0][2].train_images)} training / {len(loaded[0][2].eval_images)} held-out images; "
            f"{epochs} epochs, AdamW lr {lr:g} (constant), weight decay {weight_decay:g}, batch {batch_size}; "
            f"adapter dim {adapter_dim}, LoRA rank {lora_rank} (alpha {lora_alpha:g}); seeds 0-{seeds - 1}; "
            f"image size {', '.join(f'{s}: {t[2].train_images.shape[1]} px' for s, t in zip(specs, loaded))}; "
            f"ran on {machine()}.")
    md = markdown_table(summary, note)
    written = write_all([
        (folder / TABLE_MD, lambda p: p.write_text(md)),
        (folder / TABLE_CSV, lambda p: p.write_text(csv_table(summary))),
        (folder / PLOT_NAME, lambda p: _save_plot(plot_summary(summary), p)),
        (folder / "summary.json", lambda p: p.write_text(json.dumps(summary, indent=2) + "\n")),
    ])
    click.echo(md)
    click.echo(f"wrote {', '.join(str(p) for p in written)}")


def _save_plot(fig, path: Path) -> None:
    from vitlens.viz.figures import save_figure

    save_figure(fig, path)
