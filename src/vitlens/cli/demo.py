"""`vitlens demo`: the seed report's figures for the shipped scenes with the embedded model, and an index.html."""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from functools import partial
from importlib import resources
from pathlib import Path
from typing import Any

import click
import torch
from matplotlib.figure import Figure
from PIL import Image

from vitlens.cli.common import collect_images, progress_off, read_views
from vitlens.cli.outputs import Outputs
from vitlens.errors import VitlensError
from vitlens.methods import Rollout
from vitlens.models.base import VitModel
from vitlens.models.loading import load_model
from vitlens.viz import plots
from vitlens.viz.figures import save_figure, write_index
from vitlens.viz.report.index import write_report

DEMO_NOTE = (
    "note: no embedded trained model is installed yet; this demo uses a randomly initialised ViT built on the spot, "
    "so its maps show the method, not learned behaviour"
)
DEMO_MODEL = "scenes-vit"
DEMO_MODELS = ("scenes-dinov2", DEMO_MODEL)  # the first that is installed and loads is used
PHOTO_MODEL = "dinov2-small"  # the real photos' model (needs the dinov2 extra, see vitlens.models.dinov2_onnx)


@dataclass
class DemoResult:
    """What `run_demo` wrote: the figures (caption, path), the index page, and any note to show the user."""

    figures: list[tuple[str, Path]] = field(default_factory=list)
    index: Path | None = None
    note: str = ""
    model: str = ""
    reports: list[Path] = field(default_factory=list)


def random_vit(seed: int = 0, num_labels: int = 10) -> VitModel:
    """A small randomly initialised transformers ViT (224 px, patch 16, hidden 192, 6 blocks, 3 heads), seeded."""
    from vitlens.models.hf import import_transformers

    transformers = import_transformers()  # one clear error when it is missing or cannot load
    names = {i: f"class {i}" for i in range(num_labels)}
    cfg = transformers.ViTConfig(image_size=224, patch_size=16, hidden_size=192, num_hidden_layers=6,
                                 num_attention_heads=3, intermediate_size=768, num_labels=num_labels,
                                 id2label=names, label2id={v: k for k, v in names.items()})
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        module = transformers.ViTForImageClassification(cfg)
    return load_model(module)


def demo_inputs(model_name: str = DEMO_MODEL,
                assets: str | Path | None = None) -> tuple[VitModel | None, list[Path], str]:
    """The demo's (trained model or None, images, note): the embedded scenes model with the shipped scene images when
    both are installed; else None (use `random_vit`) with the bundled cat photo and the note saying so.
    ``assets`` overrides the package's assets folder."""
    assets = Path(assets) if assets is not None else Path(str(resources.files("vitlens"))) / "assets"
    scenes = _scene_images(assets / "scenes")
    _, model, note = pick_demo_model((model_name,) if model_name != DEMO_MODEL else DEMO_MODELS)
    if model is not None and scenes:
        return model, scenes, note
    return None, [assets / "demo_cat.png"], DEMO_NOTE


def pick_demo_model(names: Sequence[str] = DEMO_MODELS) -> tuple[str, VitModel | None, str]:
    """(name, model, note) of the first embedded model of ``names`` that is installed and loads; the note says in one
    line why a preferred one was passed over (e.g. vitlens:scenes-dinov2 without the dinov2 extra)."""
    from vitlens.models import zoo

    found, notes = zoo.zoo_models(), list[str]()
    for name in names:
        if name not in found:
            continue
        try:
            return name, load_model(f"vitlens:{name}"), "; ".join(notes)
        except VitlensError as e:
            notes.append(f"note: vitlens:{name} is not available ({e}); falling back")
    return "", None, "; ".join(notes)


def photo_model() -> tuple[VitModel | None, str]:
    """`vitlens:dinov2-small` for the real photos, or None and a one-line note when it cannot be loaded."""
    from vitlens.models import zoo

    if PHOTO_MODEL not in zoo.zoo_models():
        return None, ""
    try:
        return load_model(f"vitlens:{PHOTO_MODEL}"), ""
    except VitlensError as e:
        return None, f"note: no real-photo figures: {e}"


def scene_classes(image: Path) -> list[int] | None:
    """The classes of the objects in a shipped demo scene (from its folder's scenes.json), or None if unknown."""
    index = image.parent / "scenes.json"
    try:
        for s in json.loads(index.read_text())["scenes"]:
            if s["image"] == image.name:
                return [int(c) for c in s["classes"]]
    except (OSError, json.JSONDecodeError, KeyError, TypeError, ValueError):
        pass
    return None


def _scene_images(folder: Path) -> list[Path]:
    index = folder / "scenes.json"
    if index.is_file():
        try:
            names = [s["image"] for s in json.loads(index.read_text())["scenes"]]
            return [folder / n for n in names if (folder / n).is_file()]
        except (json.JSONDecodeError, KeyError, TypeError):
            pass
    return sorted(p for p in folder.glob("*.png") if "_mask" not in p.stem) if folder.is_dir() else []


def _rollout_plot(model: VitModel, view: Image.Image, **options: Any) -> Figure:
    exp = Rollout(model, **options).explain(model.preprocess.tensor(view)[None])
    return plots.explain_plot(model, view, exp)


def run_demo(out: str | Path, device: str = "cpu", progress: bool = False, model: VitModel | None = None,
             images: Sequence[str | Path] | None = None, note: str | None = None,
             photos: VitModel | None = None) -> DemoResult:
    """Write the demo figures and an index.html into ``out`` (all or nothing): per image the heads grid, rollout
    with mean fusion and with max fusion (discard 0.9), rollout after every block, and grad rollout for each object's
    class (or the top classes). Without ``model``/``images`` it uses `demo_inputs` (and `random_vit`). With
    ``photos`` (`vitlens:dinov2-small`), also the real photos of `vitlens.viz.photos`: heads grid, and last-block
    attention and rollout with the artifact patches boxed, before and after ``exclude_artifacts``."""
    from tqdm.auto import tqdm

    from vitlens.viz.photos import photo_jobs, real_photos

    out = Path(out)
    if out.exists() and not out.is_dir():
        raise VitlensError(f"--out {out} is a file; the demo writes a folder")
    if model is None or images is None:
        found, default_images, default_note = demo_inputs()
        model = model or found or random_vit()
        images = default_images if images is None else images
        note = default_note if note is None else note
    model = load_model(model, device=device)
    paths = collect_images(images)
    views = read_views(model, paths)
    result = DemoResult(note=note or "", model=type(model.module).__name__)
    jobs: list[tuple[str, str, Callable[[Image.Image], Figure]]] = [
        ("heads", "raw attention of the CLS token, per block and head", partial(plots.heads_plot, model)),
        ("rollout_mean", "attention rollout, mean head fusion", partial(_rollout_plot, model, head_fusion="mean")),
        ("rollout_max", "attention rollout, max head fusion, discard 0.9",
         partial(_rollout_plot, model, head_fusion="max", discard_ratio=0.9)),
        ("layers", "attention rollout after every block", partial(plots.layers_plot, model)),
    ]
    grad = model.has_head
    pictures = real_photos() if photos is not None else {}
    more = photo_jobs(load_model(photos, device=device)) if photos is not None else []
    bar = tqdm(total=len(views) * (len(jobs) + grad) + len(pictures) * len(more), desc="demo", unit="figure",
               disable=progress_off(progress, 2), file=sys.stderr)
    with bar, Outputs(paths) as tx:
        for path, view in zip(paths, views):
            image_jobs = list(jobs)
            if grad:
                classes = scene_classes(path)
                caption = "gradient rollout for " + ("each object's class" if classes else "the top classes")
                image_jobs.append(("grad_rollout", caption, partial(plots.grad_top_plot, model, classes=classes)))
            for suffix, caption, job in image_jobs:
                target = tx.add(out / f"{path.stem}_{suffix}.png", partial(save_figure, job(view)))
                result.figures.append((f"{path.name}: {caption}", target))
                bar.update(1)
            result.reports.append(tx.add(out / f"{path.stem}_report.html", partial(write_report, model, path)))
        for name, photo in pictures.items():
            view = photos.preprocess.view(photo) if photos is not None else photo
            for suffix, caption, job in more:
                target = tx.add(out / f"photo_{name}_{suffix}.png", partial(save_figure, job(view)))
                result.figures.append((f"{name} (photo): {caption}", target))
                bar.update(1)
        entries = [(cap, os.path.relpath(p, out)) for cap, p in result.figures]
        title = f"vitlens demo ({result.model}, {model.num_blocks} blocks)"
        links = [(f"{p.name.removesuffix('_report.html')}: interactive report", p.name) for p in result.reports]
        page = partial(write_index, title=title, entries=entries, note=result.note.removeprefix("note: "),
                       links=links)
        result.index = tx.add(out / "index.html", page)
        tx.commit()
    return result


@click.command()
@click.option("--out", default="vitlens-demo", show_default=True, metavar="DIR", help="Folder for the figures.")
@click.option("--device", default="cpu", show_default=True)
def demo(out: str, device: str) -> None:
    """Write example figures (heads, rollout variants, rollout per block, grad rollout) and an index.html."""
    name, model, note = pick_demo_model()
    images = _scene_images(Path(str(resources.files("vitlens"))) / "assets" / "scenes")
    if model is None or not images:
        model, images, note = demo_inputs()
    photos, photo_note = photo_model()
    note = "; ".join(n for n in (note, photo_note) if n)
    if note:
        click.echo(note)
    result = run_demo(out, device=device, progress=True, model=model or random_vit(), images=images, note=note,
                      photos=photos)
    click.echo(f"model: {f'vitlens:{name} ' if model is not None and name else ''}({result.model})")
    for path in [p for _, p in result.figures] + result.reports:
        click.echo(f"wrote {path}")
    click.echo(f"open {result.index} to see them all")
