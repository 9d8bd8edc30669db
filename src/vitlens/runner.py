"""The jobs behind the command line, usable from Python too: load and validate, explain images in batches, draw.

Everything that can fail on user input (model, options, target class, images, output names) is checked by the
functions here before anything is written, so a failed command leaves no half-written output.
"""

from __future__ import annotations

import difflib
import json
import os
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from functools import partial
from importlib import resources
from pathlib import Path
from typing import Any

import numpy as np
import torch
from matplotlib.figure import Figure
from PIL import Image

from vitlens.errors import VitlensError
from vitlens.explanation import Explanation
from vitlens.images import find_images, load_image
from vitlens.methods import METHODS, AttentionMaps, GradRollout, Rollout
from vitlens.methods.attention import Query, parse_query
from vitlens.methods.base import Method
from vitlens.models.base import VitModel, label_of, top_labels
from vitlens.models.loading import load_model
from vitlens.viz.figures import compare_figure, explain_figure, heads_figure, layers_figure, percent, save_figure

ROLLOUT_OPTIONS = ("head_fusion", "discard_ratio", "start_layer", "residual_weight", "normalize")
_APPLIES = {
    "attention": ("query",),
    "rollout": ROLLOUT_OPTIONS,
    "grad_rollout": ("discard_ratio", "start_layer", "residual_weight", "normalize"),
}
_OPTION_FLAGS = {
    "head_fusion": "--head-fusion", "discard_ratio": "--discard-ratio", "start_layer": "--start-layer",
    "residual_weight": "--residual-weight", "normalize": "--no-normalize", "query": "--query",
}
DEMO_NOTE = (
    "note: no embedded trained model is installed yet; this demo uses a randomly initialised ViT built on the spot, "
    "so its maps show the method, not learned behaviour"
)
DEMO_MODEL = "scenes-vit"


# ---- models ---------------------------------------------------------------------------------------------------------
def parse_timm_kwargs(text: str | None) -> dict[str, Any]:
    """A JSON object of timm.create_model keyword arguments (e.g. '{"img_size": 32, "depth": 2}'); None -> {}."""
    if not text:
        return {}
    try:
        kwargs = json.loads(text)
    except json.JSONDecodeError as e:
        example = '{"img_size": 32}'
        raise VitlensError(f"--timm-kwargs is not valid JSON ({e.msg}); give an object like '{example}'") from None
    if not isinstance(kwargs, dict):
        raise VitlensError(f"--timm-kwargs must be a JSON object of keyword arguments, got {type(kwargs).__name__}")
    return kwargs


def load(spec: str, *, weights: str | Path | None = None, image_size: int | None = None, device: str = "cpu",
         timm_kwargs: dict[str, Any] | None = None) -> VitModel:
    """`load_model` for the CLI; ``timm_kwargs`` go to timm.create_model."""
    if timm_kwargs and not str(spec).startswith("timm:"):
        raise VitlensError(f"--timm-kwargs only applies to timm:NAME models, not {spec!r}")
    return load_model(spec, weights=weights, image_size=image_size, device=device, model_kwargs=timm_kwargs)


def resolve_target(model: VitModel, target: str | int | None) -> int | None:
    """A class index from an index or a label name (case-insensitive); checked against the model's head."""
    if target is None:
        return None
    if not model.has_head:
        model.check_target(0, torch.zeros(1, 1))  # raises the backbone error
    text = str(target).strip()
    try:
        index = int(text)
    except ValueError:
        index = _find_label(model, text)
    model.check_target(index, torch.zeros(1, model.num_classes))
    return index


def _find_label(model: VitModel, name: str) -> int:
    labels = [str(lbl) for lbl in (model.labels or [])]
    if not labels:
        raise VitlensError(f"the model has no class names, so --target {name!r} cannot be matched; give a class index")
    key = name.casefold()
    exact = [i for i, lbl in enumerate(labels) if lbl.casefold() == key]
    if not exact:  # ImageNet-style "tabby, tabby cat": match any comma-separated synonym
        exact = [i for i, lbl in enumerate(labels) if key in (p.strip().casefold() for p in lbl.split(","))]
    if len(exact) == 1:
        return exact[0]
    if len(exact) > 1:
        raise VitlensError(f"class name {name!r} matches classes {exact}; give the class index instead")
    close = difflib.get_close_matches(name, labels, n=3, cutoff=0.6)
    hint = f"did you mean {', '.join(repr(c) for c in close)}? " if close else ""
    shown = ", ".join(labels[:10]) + (", ..." if len(labels) > 10 else "")
    raise VitlensError(f"unknown class name {name!r}; {hint}classes: {shown} (or give an index 0..{len(labels) - 1})")


# ---- methods --------------------------------------------------------------------------------------------------------
def make_method(model: VitModel, method: str, per_layer: bool = False, **options: Any) -> tuple[Method, list[str]]:
    """Build ``method`` with the ``options`` given (None = default); returns it with notes about options that do not
    apply to it. A class-specific method on a model without a head fails here, before any work."""
    if method not in METHODS:
        raise VitlensError(f"unknown method {method!r}; use one of {', '.join(METHODS)}")
    unknown = set(options) - set(_OPTION_FLAGS)
    if unknown:
        raise TypeError(f"unknown options {sorted(unknown)}")
    given = {k: v for k, v in options.items() if v is not None}
    notes = [f"note: {_OPTION_FLAGS[k]} does not apply to {method}; ignored"
             for k in given if k not in _APPLIES[method]]
    kw = {k: v for k, v in given.items() if k in _APPLIES[method]}
    if method == "attention":
        q = kw.get("query", "cls")
        return AttentionMaps(model, query=parse_query(q) if isinstance(q, str) else tuple(q)), notes
    if method == "grad_rollout":
        if not model.has_head:
            model.check_target(None, torch.zeros(1, 1))  # raises the backbone error
        return GradRollout(model, per_layer=per_layer, **kw), notes
    return Rollout(model, per_layer=per_layer, **kw), notes


def prepare_explain(model: VitModel, method: str, target: str | int | None = None,
                    **options: Any) -> tuple[Method, int | None, list[str]]:
    """`make_method` plus the target class (index or name) for grad rollout; class-agnostic methods ignore the
    target with a note. Everything is validated here."""
    m, notes = make_method(model, method, **options)
    if target is not None and method != "grad_rollout":
        notes.append(f"note: {method} is class-agnostic; the target class is ignored (use --method grad_rollout)")
        target = None
    return m, resolve_target(model, target), notes


def describe(exp: Explanation, model: VitModel, index: int = 0) -> str:
    """A one-line title saying what a map shows: method, class (for class-specific maps) and options."""
    p = exp.params
    if exp.method == "attention":
        return f"attention of the {query_text(p.get('query', 'cls'))}, last block, mean of heads"
    opts = []
    if "head_fusion" in p:
        opts.append(f"{p['head_fusion']} fusion")
    opts.append(f"discard {p.get('discard_ratio', 0.0):g}")
    if p.get("start_layer"):
        opts.append(f"from block {p['start_layer']}")
    if p.get("residual_weight", 0.5) != 0.5:
        opts.append(f"residual {p['residual_weight']:g}")
    if p.get("normalize") is False:
        opts.append("rows not normalised")
    if exp.method == "grad_rollout" and exp.target is not None:
        t = int(exp.target[index])
        prob = f", {percent(float(exp.probs[index, t]))}" if exp.probs is not None else ""
        return f"grad rollout for '{label_of(model, t)}' (class {t}{prob}); {', '.join(opts)}"
    return f"rollout; {', '.join(opts)}"


def query_text(query: Query) -> str:
    """Words for a query: 'CLS token', 'mean of all tokens' or 'patch (r, c)'."""
    if query == "cls":
        return "CLS token"
    if query == "mean":
        return "mean of all tokens"
    return f"patch ({query[0]}, {query[1]})"


def top_predictions(model: VitModel, probs: torch.Tensor | np.ndarray | None, k: int = 5) -> list[tuple[str, float]]:
    """The ``k`` most probable (label, probability) pairs of one sample, or [] without a head."""
    if probs is None or not model.has_head:
        return []
    return top_labels(model, probs, k)


# ---- images ---------------------------------------------------------------------------------------------------------
def collect_images(inputs: Sequence[str | Path]) -> list[Path]:
    """Expand folders into their images and check every path exists (cheap; decoding happens in `read_views`)."""
    if not inputs:
        raise VitlensError("no image given; pass image files or a folder (IMAGE... or --image_path)")
    paths = find_images(inputs)
    for p in paths:
        if not p.is_file():
            load_image(p)  # raises the clear 'not found' / 'is a folder' error
    return paths


def read_views(model: VitModel, paths: Sequence[Path], progress: bool = False) -> list[Image.Image]:
    """Decode every image (any mode, EXIF-rotated) and return the views the model sees; fails on the first bad one."""
    from tqdm.auto import tqdm

    views = []
    for p in tqdm(paths, desc="reading", unit="image", disable=_bar(progress, len(paths)), file=sys.stderr):
        views.append(model.preprocess.view(load_image(p)))
    return views


def _bar(progress: bool, n: int) -> bool | None:
    """tqdm's ``disable``: off unless asked and there are several items; None lets tqdm drop it on non-TTYs."""
    return None if progress and n > 1 else True


# ---- explain --------------------------------------------------------------------------------------------------------
@dataclass
class Explained:
    """One image's result: its path, the view the model saw, and its row ``index`` of a batch ``explanation``."""

    path: Path
    view: Image.Image
    explanation: Explanation
    index: int

    @property
    def map(self) -> np.ndarray:
        """The relevance map [gh, gw] (max 1)."""
        return self.explanation.numpy()[self.index]

    @property
    def probs(self) -> torch.Tensor | None:
        """Class probabilities [C], or None without a head."""
        return None if self.explanation.probs is None else self.explanation.probs[self.index]

    @property
    def target(self) -> int | None:
        """The explained class for class-specific methods."""
        return None if self.explanation.target is None else int(self.explanation.target[self.index])


def explain_views(method: Method, paths: Sequence[Path], views: Sequence[Image.Image], target: int | None = None,
                  batch_size: int = 8, progress: bool = False) -> list[Explained]:
    """Explain prepared views in batches of ``batch_size``; one `Explained` per image, in order."""
    from tqdm.auto import tqdm

    if batch_size < 1:
        raise VitlensError(f"batch size must be at least 1, got {batch_size}")
    pre = method.model.preprocess
    out: list[Explained] = []
    with tqdm(total=len(views), desc=method.name, unit="image", disable=_bar(progress, len(views)),
              file=sys.stderr) as bar:
        for s in range(0, len(views), batch_size):
            chunk = views[s : s + batch_size]
            x = torch.stack([pre.tensor(v) for v in chunk])
            exp = method.explain(x, target=target)
            out.extend(Explained(paths[s + i], v, exp, i) for i, v in enumerate(chunk))
            bar.update(len(chunk))
    return out


def explain_plot(model: VitModel, item: Explained) -> Figure:
    """Image | overlay | top-5 predictions (when the model has a head) for one explained image."""
    top = top_predictions(model, item.probs)
    highlight = label_of(model, item.target) if item.target is not None else None
    return explain_figure(item.view, item.map, describe(item.explanation, model, item.index), top or None, highlight)


@dataclass
class OutputPlan:
    """Where `explain` writes: one figure (and optionally one mask) per input image."""

    figures: list[Path]
    masks: list[Path] | None = None
    folder: bool = False


def plan_outputs(inputs: Sequence[str | Path], paths: Sequence[Path], out: str | Path, method: str,
                 save_mask: str | Path | None = None) -> OutputPlan:
    """Output paths for ``paths``. One image file -> ``out`` is a .png file (or an existing folder); several images
    or a folder -> ``out`` is a folder receiving ``<stem>_<method>.png`` (and ``save_mask`` ``<stem>.npy``)."""
    out = Path(out)
    folder = len(paths) > 1 or any(Path(i).is_dir() for i in inputs)
    stems = [p.stem for p in paths]
    if folder:
        dupes = sorted({s for s in stems if stems.count(s) > 1})
        if dupes:
            raise VitlensError(f"several input images are named {dupes[0]!r}; their outputs would overwrite each "
                               "other: rename them or run them separately")
    figures = _targets(out, [f"{s}_{method}.png" for s in stems], folder, ".png", "--out")
    masks = None
    if save_mask is not None:
        masks = _targets(Path(save_mask), [f"{s}.npy" for s in stems], folder, ".npy", "--save-mask")
        if set(masks) & set(figures):
            raise VitlensError("--save-mask and --out name the same file")
    return OutputPlan(figures, masks, folder)


def _targets(out: Path, names: list[str], folder: bool, suffix: str, flag: str) -> list[Path]:
    for parent in [out, *out.parents]:
        if parent.exists() and not parent.is_dir() and (folder or parent != out):
            raise VitlensError(f"{flag} {out}: {parent} is a file, not a folder")
    if folder or out.is_dir():
        return [out / n for n in names]
    if out.suffix.lower() != suffix:
        raise VitlensError(f"{flag} {out} should end in {suffix} (or name a folder that exists)")
    return [out]


def write_outputs(model: VitModel, items: Sequence[Explained], plan: OutputPlan, progress: bool = False) -> None:
    """Draw and write each item's figure (and mask); every file is written atomically."""
    from tqdm.auto import tqdm

    for k, item in enumerate(tqdm(items, desc="writing", unit="figure", disable=_bar(progress, len(items)),
                                  file=sys.stderr)):
        write_output(partial(save_figure, explain_plot(model, item)), plan.figures[k])
        if plan.masks is not None:
            write_output(partial(_save_mask, item), plan.masks[k])


def _save_mask(item: Explained, path: Path) -> Path:
    return item.explanation.save(path, item.index)


def write_output(fn: Callable[[Path], Any], path: str | Path) -> Path:
    """Call ``fn(path)`` (an atomic writer), turning file-system errors into one clear VitlensError."""
    path = Path(path)
    try:
        fn(path)
    except OSError as e:
        raise VitlensError(f"cannot write {path}: {e.strerror or e}") from None
    return path


# ---- heads, layers, compare -----------------------------------------------------------------------------------------
def heads_plot(model: VitModel, view: Image.Image, query: str | Query = "cls") -> Figure:
    """The blocks x heads grid of raw attention maps for ``query`` ('cls', 'mean' or 'R,C')."""
    q = parse_query(query) if isinstance(query, str) else tuple(query)
    method = AttentionMaps(model, query=q)
    exp = method.explain(model.preprocess.tensor(view)[None])
    return heads_figure(view, exp.extras["per_head"][0], query_text(q), q if isinstance(q, tuple) else None)


def swin_plot(model: VitModel, view: Image.Image, stage: int, block: int, patch: str = "per-window") -> Figure:
    """Swin per-patch view: ``patch`` is 'R,C' in the stage's token grid or 'per-window' (each window's centre)."""
    from vitlens.swin_view import swin_patch_view
    from vitlens.viz.figures import swin_figure

    choice: Any = "per-window"
    if patch.strip().lower() != "per-window":
        q = parse_query(patch)
        if not isinstance(q, tuple):
            raise VitlensError(f"--patch must be ROW,COL or per-window; got {patch!r}")
        choice = q
    v = swin_patch_view(model, model.preprocess.tensor(view)[None], stage, block, choice)
    gh, gw = v.window_id.shape
    which = f"patch {choice}" if isinstance(choice, tuple) else "each window's centre patch"
    title = (f"Swin stage {stage}, block {block} (model block {v.block}; {gh}x{gw} tokens, shift {v.shift[0]}): "
             f"attention of {which}")
    return swin_figure(view, v.maps[0], v.window_id, v.patches, title)


def layers_plot(model: VitModel, view: Image.Image, **options: Any) -> Figure:
    """The input, then the rollout after every block (``options`` as `make_method` takes for rollout)."""
    method, _ = make_method(model, "rollout", per_layer=True, **options)
    exp = method.explain(model.preprocess.tensor(view)[None])
    title = "Attention rollout after every block: " + describe(exp, model).split("; ", 1)[1]
    return layers_figure(view, exp.extras["per_layer"][0], exp.extras["per_layer_blocks"].tolist(), title)


def compare_plot(model: VitModel, view: Image.Image, discard_ratio: float = 0.9, target: int | None = None,
                 start_layer: int | None = None) -> tuple[Figure, list[str]]:
    """The input beside rollout with mean, max and min head fusion and (with a head) grad rollout, all at
    ``discard_ratio``; returns the figure and notes (e.g. grad rollout left out for a backbone)."""
    x = model.preprocess.tensor(view)[None]
    panels, notes = [], []
    for fusion in ("mean", "max", "min"):
        exp = Rollout(model, head_fusion=fusion, discard_ratio=discard_ratio,
                      start_layer=start_layer or 0).explain(x)
        panels.append((describe(exp, model), exp.numpy()[0]))
    if model.has_head:
        exp = GradRollout(model, discard_ratio=discard_ratio, start_layer=start_layer or 0).explain(x, target)
        panels.append((describe(exp, model), exp.numpy()[0]))
    else:
        notes.append("note: the model has no classification head, so the grad rollout panel is left out")
    top = top_predictions(model, exp.probs[0] if exp.probs is not None else None, k=1)
    title = "Rollout variants" + (f" (top prediction: {top[0][0]}, {percent(top[0][1])})" if top else "")
    return compare_figure(view, panels, title), notes


def grad_top_plot(model: VitModel, view: Image.Image, k: int = 3, discard_ratio: float = 0.0,
                  classes: Sequence[int] | None = None) -> Figure:
    """The input beside grad rollout for each of ``classes`` (default: the model's ``k`` most probable classes)."""
    x = model.preprocess.tensor(view)[None]
    if classes is None:
        with torch.no_grad():
            probs = model.probabilities(model(x))[0]
        classes = probs.topk(min(k, probs.numel())).indices.tolist()
        title = f"Gradient rollout for the top {len(classes)} classes"
    else:
        title = "Gradient rollout for each object's class"
    method = GradRollout(model, discard_ratio=discard_ratio)
    targets = torch.as_tensor(list(classes))
    exp = method.explain(x.expand(len(targets), *x.shape[1:]), target=targets)
    panels = [(describe(exp, model, i), exp.numpy()[i]) for i in range(len(targets))]
    return compare_figure(view, panels, title)


# ---- demo -----------------------------------------------------------------------------------------------------------
@dataclass
class DemoResult:
    """What `run_demo` wrote: the figures (caption, path), the index page, and any note to show the user."""

    figures: list[tuple[str, Path]] = field(default_factory=list)
    index: Path | None = None
    note: str = ""
    model: str = ""


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
    from vitlens.models import zoo

    assets = Path(assets) if assets is not None else Path(str(resources.files("vitlens"))) / "assets"
    if model_name in zoo.zoo_models():
        scenes = _scene_images(assets / "scenes")
        if scenes:
            return load(f"vitlens:{model_name}"), scenes, ""
    return None, [assets / "demo_cat.png"], DEMO_NOTE


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


def run_demo(out: str | Path, device: str = "cpu", progress: bool = False, model: VitModel | None = None,
             images: Sequence[str | Path] | None = None, note: str | None = None) -> DemoResult:
    """Write the demo figures and an index.html into ``out``: per image the heads grid, rollout with mean fusion
    and with max fusion (discard 0.9), rollout after every block, and grad rollout for the top classes.
    Without ``model``/``images`` it uses `demo_inputs` (and `random_vit` when no trained model is installed)."""
    from tqdm.auto import tqdm

    from vitlens.viz.figures import write_index

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
        ("heads", "raw attention of the CLS token, per block and head", lambda v: heads_plot(model, v, "cls")),
        ("rollout_mean", "attention rollout, mean head fusion", lambda v: _explain_one(model, v, head_fusion="mean")),
        ("rollout_max", "attention rollout, max head fusion, discard 0.9",
         lambda v: _explain_one(model, v, head_fusion="max", discard_ratio=0.9)),
        ("layers", "attention rollout after every block", lambda v: layers_plot(model, v)),
    ]
    grad = model.has_head
    bar = tqdm(total=len(views) * (len(jobs) + grad), desc="demo", unit="figure", disable=_bar(progress, 2),
               file=sys.stderr)
    with bar:
        for path, view in zip(paths, views):
            image_jobs = list(jobs)
            if grad:
                classes = scene_classes(path)
                caption = "gradient rollout for " + ("each object's class" if classes else "the top classes")
                image_jobs.append(("grad_rollout", caption, partial(grad_top_plot, model, classes=classes)))
            for suffix, caption, job in image_jobs:
                target = write_output(partial(save_figure, job(view)), out / f"{path.stem}_{suffix}.png")
                result.figures.append((f"{path.name}: {caption}", target))
                bar.update(1)
    entries = [(cap, os.path.relpath(p, out)) for cap, p in result.figures]
    title = f"vitlens demo ({result.model}, {model.num_blocks} blocks)"
    page = partial(write_index, title=title, entries=entries, note=result.note.removeprefix("note: "))
    result.index = write_output(page, out / "index.html")
    return result


def _explain_one(model: VitModel, view: Image.Image, **options: Any) -> Figure:
    method, _ = make_method(model, "rollout", **options)
    items = explain_views(method, [Path("image")], [view])
    return explain_plot(model, items[0])
