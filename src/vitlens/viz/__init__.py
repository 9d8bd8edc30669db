"""Overlays and figures (matplotlib Agg, no pyplot state)."""

from vitlens.viz.figures import (
    compare_figure,
    explain_figure,
    heads_figure,
    layers_figure,
    save_figure,
    write_index,
)
from vitlens.viz.overlay import overlay

__all__ = [
    "compare_figure", "explain_figure", "heads_figure", "layers_figure", "overlay", "save_figure", "write_index",
]
