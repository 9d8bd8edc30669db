"""Every block's attention as the report embeds it: each token's row over the tokens it can attend to (all tokens in
a ViT, its window in Swin), quantised per row to 8- or 16-bit codes with one scale per row."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

from vitlens.models.base import VitModel


@dataclass
class BlockAttention:
    """One block's attention rows: ``values`` [heads, sum of row lengths], rows in token order; token ``i``'s row
    lists its value for every token of its group (``groups[i]``: the window of a Swin token, 0 for all tokens of a
    ViT), in increasing token order. ``prefix`` tokens come before the stage's ``grid`` of patch tokens."""

    stage: int
    grid: tuple[int, int]
    prefix: int
    groups: np.ndarray  # [N] int32
    values: np.ndarray  # [H, E] float32
    window: tuple[int, int] | None = None
    shift: tuple[int, int] | None = None

    @property
    def heads(self) -> int:
        """Number of heads."""
        return int(self.values.shape[0])

    @property
    def tokens(self) -> int:
        """Number of tokens N (prefix + patches)."""
        return int(self.groups.shape[0])

    def row_lengths(self) -> np.ndarray:
        """[N] length of each token's row (the size of its group)."""
        sizes = np.bincount(self.groups)
        return sizes[self.groups]

    def dense(self, values: np.ndarray | None = None) -> np.ndarray:
        """[H, N, N] attention (``values`` [H, E] in place of the captured ones, when given) with zeros outside each
        token's group."""
        values = self.values if values is None else values
        n = self.tokens
        out = np.zeros((self.heads, n, n), values.dtype)
        rows, cols = group_entries(self.groups)
        out[:, rows, cols] = values
        return out


@dataclass
class CapturedAttention:
    """Every block of one image, in forward order, and the model outputs of the same pass."""

    blocks: list[BlockAttention] = field(default_factory=list)
    logits: torch.Tensor | None = None


def group_entries(groups: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(row, column) of every stored entry: for each token in order, the tokens of its group in increasing order."""
    groups = np.asarray(groups)
    members = {int(g): np.flatnonzero(groups == g) for g in np.unique(groups)}
    rows = np.concatenate([np.full(len(members[int(g)]), i) for i, g in enumerate(groups)])
    cols = np.concatenate([members[int(g)] for g in groups])
    return rows, cols


def capture(model: VitModel, x: torch.Tensor) -> CapturedAttention:
    """One forward pass of ``x`` [1, 3, H, W] that keeps every block's attention rows (streamed: a Swin block's
    global [H, N, N] matrix is reduced to its windows as soon as it is computed)."""
    plan = model.stage_plan((int(x.shape[-2]), int(x.shape[-1])))
    out = CapturedAttention()
    holder: dict = {}

    def keep(i: int, probs: torch.Tensor) -> None:
        stage = plan.block_stage[i]
        layout = plan.layouts[stage]
        meta = holder["rec"].meta[i]
        p = probs[0].detach().float().cpu()
        if "window_id" in meta:
            groups = meta["window_id"].reshape(-1).cpu().numpy().astype(np.int32)
            if layout.num_prefix:
                groups = np.concatenate([np.full(layout.num_prefix, groups.max() + 1, np.int32), groups])
        else:
            groups = np.zeros(p.shape[-1], np.int32)
        rows, cols = group_entries(groups)
        values = p[:, torch.from_numpy(rows), torch.from_numpy(cols)].numpy()
        out.blocks.append(BlockAttention(
            stage=stage, grid=(layout.grid[0], layout.grid[1]), prefix=layout.num_prefix, groups=groups, values=values,
            window=tuple(meta["window"]) if "window" in meta else None,
            shift=tuple(meta["shift"]) if "shift" in meta else None))

    with torch.no_grad(), model.record(stream=keep) as rec:
        holder["rec"] = rec
        out.logits = model(x.to(model.device)).detach().float().cpu()
    return out


@dataclass
class Quantised:
    """Codes and per-row scales of every block's attention: value = code * scale (error at most scale / 2)."""

    bits: int
    floor: float
    codes: np.ndarray  # uint8 or uint16, all blocks, heads, rows concatenated
    scales: np.ndarray  # float32, one per (block, head, token)

    @property
    def max_error(self) -> float:
        """The largest possible difference between a stored value and the captured one."""
        return float(self.scales.max()) / 2 if self.scales.size else 0.0


def quantise(blocks: list[BlockAttention], bits: int, floor: float = 0.0) -> Quantised:
    """Each row's values as integer codes of ``bits`` bits: scale = max(row max / (2^bits - 1), ``floor``), code =
    round(value / scale). A ``floor`` above zero coarsens rows whose values are all small (near-uniform attention)
    so that they compress better; the error bound stays scale / 2."""
    top = (1 << bits) - 1
    dtype = np.uint8 if bits <= 8 else np.uint16
    codes, scales = [], []
    for b in blocks:
        lengths = b.row_lengths()
        starts = np.concatenate([[0], np.cumsum(lengths)[:-1]])
        rowmax = np.maximum.reduceat(b.values, starts, axis=1)  # [H, N]
        scale = np.maximum(rowmax / top, floor).astype(np.float32)
        scale[scale <= 0] = 1.0  # an all-zero row: codes 0
        per = np.repeat(scale, lengths, axis=1)
        codes.append(np.clip(np.rint(b.values / per), 0, top).astype(dtype).reshape(-1))
        scales.append(scale.reshape(-1))
    return Quantised(bits, floor, np.concatenate(codes) if codes else np.zeros(0, dtype),
                     np.concatenate(scales) if scales else np.zeros(0, np.float32))


def dequantise(q: Quantised, blocks: list[BlockAttention]) -> list[np.ndarray]:
    """Per block, the stored values [H, E] that the page reads back (float64)."""
    out, c, s = [], 0, 0
    for b in blocks:
        h, e = b.values.shape
        n = b.tokens
        per = np.repeat(q.scales[s:s + h * n].reshape(h, n).astype(np.float64), b.row_lengths(), axis=1)
        out.append(q.codes[c:c + h * e].reshape(h, e).astype(np.float64) * per)
        c += h * e
        s += h * n
    return out


# (bits, floor) tried in order until the report fits its size budget: 16-bit codes, 8-bit codes, then 8-bit codes
# whose step never falls below 2^-16, 2^-15, ... (near-uniform rows, as in randomly initialised models, are what
# make attention incompressible).
ENCODINGS: tuple[tuple[int, float], ...] = ((16, 0.0), (8, 0.0), *((8, 2.0 ** -e) for e in range(16, 7, -1)))
