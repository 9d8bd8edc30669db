"""Embedded models shipped inside the package (`vitlens:NAME`)."""

from __future__ import annotations

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
