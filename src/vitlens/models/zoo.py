"""Embedded models shipped inside the package (`vitlens:NAME`)."""

from __future__ import annotations

import json
from importlib import resources
from pathlib import Path

ZOO_DIR = Path(str(resources.files("vitlens.models"))) / "zoo"


def zoo_models() -> dict[str, Path]:
    """Names of the embedded models and their folders (each a save_pretrained folder)."""
    if not ZOO_DIR.is_dir():
        return {}
    return {p.name: p for p in sorted(ZOO_DIR.iterdir()) if (p / "config.json").is_file()}


def model_card(name: str) -> str | None:
    """The model card text of an embedded model, if it ships one."""
    card = zoo_models().get(name, Path("/nonexistent")) / "MODEL_CARD.md"
    return card.read_text() if card.is_file() else None


def model_summary(name: str) -> str:
    """One line about an embedded model: architecture and test metrics from its metrics.json, and its card's path."""
    folder = zoo_models().get(name)
    if folder is None:
        return ""
    try:
        info = json.loads((folder / "metrics.json").read_text())
        arch = json.loads((folder / "config.json").read_text())["architectures"][0]
        t = info["test"]
        text = f"{arch}, test mAP {t['mAP']:.3f}, per-item recall {t['per_item_recall']:.3f}"
    except (OSError, ValueError, KeyError, IndexError, TypeError):
        text = "no metrics"
    card = folder / "MODEL_CARD.md"
    return f"{text}; card: {card}" if card.is_file() else text
