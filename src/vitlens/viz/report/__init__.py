"""The interactive explorer: `report(image, model)` builds ONE offline HTML page (no network, no external URL) in which
a user picks a patch to see its attention for any block and head (Swin: per stage, windows drawn, shift undone),
drags a block slider to watch rollout build up with any head fusion and discard ratio (recomputed in the page from
the embedded attention), switches between precomputed methods and target classes, sets the overlay's opacity and
colour map, and downloads the view as PNG. `Report` shows itself inline in Jupyter.

Files: ``attention.py`` (capture and per-row quantisation), ``maps.py`` (precomputed methods), ``page.py`` (packing
and the template), ``build.py`` (`report`), and the page assets ``template.html``, ``report.js``, ``report.css``.
"""

from vitlens.viz.report.build import MAX_BYTES, Report, report

__all__ = ["MAX_BYTES", "Report", "report"]
