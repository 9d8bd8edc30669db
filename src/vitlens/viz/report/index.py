"""Writing one report for `vitlens demo` (its index.html links them, see `vitlens.viz.figures.write_index`)."""

from __future__ import annotations

from pathlib import Path

from vitlens.models.base import VitModel


def write_report(model: VitModel, image: str | Path, path: str | Path) -> Path:
    """Write the report of ``image`` under ``model`` to ``path`` (default methods and size budget)."""
    from vitlens.viz.report.build import report

    return report(image, model).save(path)
