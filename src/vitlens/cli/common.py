"""Option groups and small helpers shared by the command modules: model options, images, notes."""

from __future__ import annotations

import json
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import click
from PIL import Image

from vitlens.errors import VitlensError
from vitlens.images import find_images, load_image
from vitlens.models.base import VitModel
from vitlens.models.loading import load_model


def model_options(f: Callable) -> Callable:
    """--model, --weights, --timm-kwargs, --image-size, --device."""
    options = [
        click.option("--model", "model_spec", required=True, metavar="SPEC",
                     help="A local HF folder, hf:ORG/NAME, timm:NAME (with --weights FILE) or vitlens:NAME."),
        click.option("--weights", type=click.Path(dir_okay=False), default=None,
                     help="Local .safetensors/.pth state dict for a timm:NAME model."),
        click.option("--timm-kwargs", default=None, metavar="JSON",
                     help='timm.create_model keyword arguments, e.g. \'{"img_size": 32, "depth": 2}\'.'),
        click.option("--image-size", type=int, default=None, help="Resize inputs to N x N pixels."),
        click.option("--device", default="cpu", show_default=True, help="cpu or cuda."),
    ]
    for option in reversed(options):
        f = option(f)
    return f


def parse_timm_kwargs(text: str | None) -> dict[str, Any]:
    """A JSON object of timm.create_model keyword arguments (e.g. '{"img_size": 32}'); None -> {}."""
    if not text:
        return {}
    try:
        kwargs = json.loads(text)
    except (json.JSONDecodeError, RecursionError) as e:
        msg = e.msg if isinstance(e, json.JSONDecodeError) else "nested too deeply"
        raise VitlensError(f"--timm-kwargs is not valid JSON ({msg}); give an object like '{{\"img_size\": 32}}'") \
            from None
    if not isinstance(kwargs, dict):
        raise VitlensError(f"--timm-kwargs must be a JSON object of keyword arguments, got {type(kwargs).__name__}")
    return kwargs


def load(model_spec: str, weights: str | None, timm_kwargs: str | None, image_size: int | None,
         device: str) -> VitModel:
    """`load_model` with the command line's model options."""
    kwargs = parse_timm_kwargs(timm_kwargs)
    if kwargs and not str(model_spec).startswith("timm:"):
        raise VitlensError(f"--timm-kwargs only applies to timm:NAME models, not {model_spec!r}")
    return load_model(model_spec, weights=weights, image_size=image_size, device=device, model_kwargs=kwargs)


def collect_images(inputs: Sequence[str | Path]) -> list[Path]:
    """Expand folders into their images and check every path is a readable file (decoding happens later)."""
    if not inputs:
        raise VitlensError("no image given; pass image files or a folder (IMAGE... or --image_path)")
    paths = find_images(inputs)
    for p in paths:
        if not p.is_file():
            load_image(p)  # raises the clear 'not found' / 'is a folder' / 'not a regular file' error
    return paths


def progress_off(progress: bool, n: int) -> bool | None:
    """tqdm's ``disable``: off unless asked and there are several items; None lets tqdm drop it on non-TTYs."""
    return None if progress and n > 1 else True


def read_views(model: Any, paths: Sequence[Path], progress: bool = False) -> list[Image.Image]:
    """Decode every image (any mode, EXIF-rotated) and return the views the model sees; fails on the first bad one."""
    from tqdm.auto import tqdm

    bar = tqdm(paths, desc="reading", unit="image", disable=progress_off(progress, len(paths)), file=sys.stderr)
    return [model.preprocess.view(load_image(p)) for p in bar]


def one_image(image: str, model: Any) -> tuple[Path, Image.Image]:
    """The path and model view of the one image a command takes."""
    paths = collect_images([image])
    if len(paths) != 1:
        raise VitlensError(f"{image} holds {len(paths)} images; this command takes one image file")
    return paths[0], read_views(model, paths)[0]


def out_png(out: str) -> Path:
    """``--out`` checked to be a .png file name (not a folder)."""
    p = Path(out)
    if p.suffix.lower() != ".png":
        raise VitlensError(f"--out {out} should be a .png file")
    if p.is_dir():
        raise VitlensError(f"--out {out} is a folder; give a .png file name")
    return p


def echo_notes(notes: Sequence[str]) -> None:
    """Print notes (one line each) on stderr."""
    for n in notes:
        click.echo(n, err=True)
