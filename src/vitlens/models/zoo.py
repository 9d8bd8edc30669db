"""Embedded models shipped inside the package (`vitlens:NAME`)."""

from __future__ import annotations

import json
from importlib import resources
from pathlib import Path

from vitlens.errors import VitlensError

ZOO_DIR = Path(str(resources.files("vitlens.models"))) / "zoo"
# A packaged folder holding source.json is not loadable as it is: {"kind": "converted"} (vitlens:dinov2-small, built
# from another package's file into the user cache) or {"kind": "assembled", "backbone": NAME, "weights": FILE} (the
# packaged fine-tuned tensors laid over a converted backbone, written once into the user cache); see model_folder.
SOURCE_FILE = "source.json"


def zoo_models() -> dict[str, Path]:
    """Names of the embedded models and their packaged folders (a save_pretrained folder, or one with source.json)."""
    if not ZOO_DIR.is_dir():
        return {}
    return {p.name: p for p in sorted(ZOO_DIR.iterdir())
            if (p / "config.json").is_file() or (p / SOURCE_FILE).is_file()}


def _source(folder: Path) -> dict | None:
    try:
        return json.loads((folder / SOURCE_FILE).read_text())
    except (OSError, ValueError):
        return None


def model_folder(name: str) -> Path:
    """A save_pretrained folder for embedded model ``name``: its packaged folder, or for a converted or assembled
    model the folder built once in the user cache (see `vitlens.models.dinov2_onnx`)."""
    found = zoo_models()
    if name not in found:
        have = ", ".join(found) or "none installed"
        raise VitlensError(f"no embedded model {name!r}; available: {have} (see `vitlens models`)")
    source = _source(found[name])
    if source is None:
        return found[name]
    from vitlens.models import dinov2_onnx

    if source.get("kind") == "converted":
        return dinov2_onnx.ensure_dinov2_small()
    return dinov2_onnx.ensure_assembled(found[name], model_folder(str(source["backbone"])), source)


def model_card(name: str) -> str | None:
    """The model card text of an embedded model, if it ships one."""
    card = zoo_models().get(name, Path("/nonexistent")) / "MODEL_CARD.md"
    return card.read_text() if card.is_file() else None


def model_summary(name: str) -> str:
    """One line about an embedded model: architecture and test metrics from its metrics.json, and its card's path."""
    folder = zoo_models().get(name)
    if folder is None:
        return ""
    source = _source(folder)
    if source is not None and source.get("kind") == "converted":
        card = folder / "MODEL_CARD.md"
        return f"{source.get('summary', 'converted model')}; card: {card}"
    try:
        info = json.loads((folder / "metrics.json").read_text())
        arch = json.loads((folder / "config.json").read_text())["architectures"][0]
        t = info["test"]
        text = f"{arch}, test mAP {t['mAP']:.3f}, per-item recall {t['per_item_recall']:.3f}"
    except (OSError, ValueError, KeyError, IndexError, TypeError):
        text = "no metrics"
    card = folder / "MODEL_CARD.md"
    return f"{text}; card: {card}" if card.is_file() else text
