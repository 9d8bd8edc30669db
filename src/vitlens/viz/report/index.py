"""Linking reports from a figure index page (`vitlens demo`'s index.html)."""

from __future__ import annotations

import html
from collections.abc import Sequence
from pathlib import Path
from urllib.parse import quote

from vitlens.models.base import VitModel


def write_report(model: VitModel, image: str | Path, path: str | Path) -> Path:
    """Write the report of ``image`` under ``model`` to ``path`` (default methods and size budget)."""
    from vitlens.viz.report.build import report

    return report(image, model).save(path)


def link_reports(index: str | Path, reports: Sequence[tuple[str, str | Path]]) -> Path:
    """Add a list of links, ``reports`` = (caption, page path relative to the index's folder), right after the
    heading of an index page written by `vitlens.viz.figures.write_index`. Captions are HTML-escaped and paths
    URL-encoded per segment, as that page does for its images."""
    index = Path(index)
    if not reports:
        return index
    text = index.read_text(encoding="utf-8")
    items = "".join(f'<li><a href="{html.escape(quote(Path(src).as_posix(), safe="/"))}">{html.escape(cap)}</a></li>'
                    for cap, src in reports)
    section = f'\n<section class="reports"><h2>Interactive reports</h2><ul>{items}</ul></section>'
    at = text.find("</h1>")  # the page's own heading: its title is escaped, so it holds no other '</h1>'
    at = at + len("</h1>") if at >= 0 else text.rfind("</body>")
    index.write_text(text[:at] + section + text[at:], encoding="utf-8")
    return index
