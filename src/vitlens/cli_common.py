"""Option groups and small helpers shared by the command modules (`vitlens.cli`, `vitlens.cli_model_agnostic`)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import click

from vitlens import runner
from vitlens.errors import VitlensError


def _model_options(f: Callable) -> Callable:
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


def _load(model_spec: str, weights: str | None, timm_kwargs: str | None, image_size: int | None, device: str):
    return runner.load(model_spec, weights=weights, image_size=image_size, device=device,
                       timm_kwargs=runner.parse_timm_kwargs(timm_kwargs))


def _one_image(image: str, model) -> tuple[Path, object]:
    paths = runner.collect_images([image])
    if len(paths) != 1:
        raise VitlensError(f"{image} holds {len(paths)} images; this command takes one image file")
    return paths[0], runner.read_views(model, paths)[0]


def _out_png(out: str) -> Path:
    p = Path(out)
    if p.suffix.lower() != ".png":
        raise VitlensError(f"--out {out} should be a .png file")
    if p.is_dir():
        raise VitlensError(f"--out {out} is a folder; give a .png file name")
    return p
