"""Class names: an index or a label name (case-insensitive, ImageNet-style synonyms) -> a checked class index."""

from __future__ import annotations

import difflib
from typing import Any

import torch

from vitlens.errors import VitlensError


def resolve_target(model: Any, target: str | int | None) -> int | None:
    """A class index from an index or a label name, checked against the model's head (None stays None)."""
    if target is None:
        return None
    if not model.has_head:
        model.check_target(0, torch.zeros(1, 1))  # raises the backbone error
    text = str(target).strip()
    try:
        index = int(text)
    except ValueError:
        index = find_label(model, text)
    model.check_target(index, torch.zeros(1, model.num_classes))
    return index


def find_label(model: Any, name: str) -> int:
    """The index of the class called ``name``: exact (case-insensitive) or one comma-separated synonym."""
    labels = [str(lbl) for lbl in (getattr(model, "labels", None) or [])]
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
