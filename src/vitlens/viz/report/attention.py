"""Every block's attention as the report embeds it: each token's row over the tokens it can attend to (all tokens in
a ViT, its window in Swin), as float32 values or quantised per row to 8- or 16-bit codes with one scale per row."""

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


# 16-bit relative codes: code = 2048 e + m (e < 32, m < 2048) stands for 2^(e - 31) (1 + m / 2048) times the row's
# scale (its maximum), code 0 for 0: every value from 2^-31 of the row maximum up keeps 12 significant bits
RELATIVE_VALUES = np.concatenate([[0.0], np.ldexp(1.0 + (np.arange(1, 65536) & 2047) / 2048.0,
                                                  (np.arange(1, 65536) >> 11) - 31)])


def relative_codes(ratio: np.ndarray) -> np.ndarray:
    """16-bit relative codes (`RELATIVE_VALUES`) of ``ratio`` in [0, 1] (value / row maximum), rounded to the
    nearest; below 2^-31 (and 0) code 0."""
    f, ex = np.frexp(ratio)  # ratio = f 2^ex, f in [0.5, 1)
    m = np.rint((2.0 * f - 1.0) * 2048.0).astype(np.int64)
    e = ex.astype(np.int64) + 30 + (m == 2048)  # a mantissa that rounds up to 2 carries into the exponent
    m[m == 2048] = 0
    codes = np.clip(e, 0, 31) * 2048 + m
    return np.where((ratio > 0) & (e >= 0), codes, 0).astype(np.uint16)


@dataclass(frozen=True)
class Encoding:
    """How the page stores attention: ``bits`` 32 (float32 values), 16 or 8 (codes per row); ``sqrt``: 8-bit
    square-root codes; ``relative``: 16-bit relative codes (`RELATIVE_VALUES`); ``floor``: the least step of 8-bit
    linear codes."""

    bits: int
    floor: float = 0.0
    sqrt: bool = False
    relative: bool = False

    @property
    def name(self) -> str:
        """'float32', '16-bit relative', '8-bit square-root', '8-bit linear, step >= 2^-12.5', ..."""
        if self.bits == 32:
            return "float32"
        kind = "relative" if self.relative else "square-root" if self.sqrt else "linear"
        floor = f", step >= 2^{np.log2(self.floor):g}" if self.floor else ""
        return f"{self.bits}-bit {kind}{floor}"


@dataclass
class Quantised:
    """Every block's attention as the page stores it. ``bits`` 32: the captured float32 values themselves (``codes``;
    ``scales`` all 1). 16 or 8: integer codes per row, value = code * scale, or with ``sqrt`` (8 bits only) value =
    code^2 * scale: square-root codes, finer for the small values that carry much of a peaked row's mass; with
    ``relative`` (16 bits only) value = RELATIVE_VALUES[code] * scale, the scale being the row's maximum: 12
    significant bits at every magnitude, which min fusion needs (its rollout is made of the smallest values). At 8 bits
    the prefix tokens' rows (CLS, distillation, registers) are also stored as 16-bit linear codes (``wide``,
    ``wide_scales``), which the page reads in their place: a ViT's readout row weighs on the rollout at every depth
    as much as all its other rows together, so its precision is what the maps need most."""

    bits: int
    floor: float
    sqrt: bool
    codes: np.ndarray  # uint8, uint16 or float32: all blocks, heads, rows concatenated
    scales: np.ndarray  # float32, one per (block, head, token)
    wide: np.ndarray = field(default_factory=lambda: np.zeros(0, np.uint16))  # prefix rows, 8-bit storage only
    wide_scales: np.ndarray = field(default_factory=lambda: np.zeros(0, np.float32))  # one per (block, head, prefix)
    relative: bool = False

    @property
    def encoding(self) -> Encoding:
        """The `Encoding` these codes were made with."""
        return Encoding(self.bits, self.floor, self.sqrt, self.relative)


def _codes(values: np.ndarray, lengths: np.ndarray, bits: int, floor: float,
           sqrt: bool = False, relative: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """Per-row codes of ``values`` [H, E] (rows of ``lengths``) and their scales [H, N]."""
    top = (1 << bits) - 1
    starts = np.concatenate([[0], np.cumsum(lengths)[:-1]])
    rowmax = np.maximum.reduceat(values, starts, axis=1)  # [H, N]
    scale = np.maximum(rowmax if relative else rowmax / (top * top if sqrt else top), floor).astype(np.float32)
    scale[scale <= 0] = 1.0  # an all-zero row: codes 0
    per = np.repeat(scale, lengths, axis=1).astype(np.float64)
    ratio = values / per
    if relative:
        return relative_codes(np.clip(ratio, 0.0, 1.0)), scale
    codes = np.clip(np.rint(np.sqrt(ratio) if sqrt else ratio), 0, top).astype(np.uint8 if bits <= 8 else np.uint16)
    return codes, scale


def quantise(blocks: list[BlockAttention], bits: int, floor: float = 0.0, sqrt: bool = False,
             relative: bool = False) -> Quantised:
    """Every block's rows as ``bits``-bit codes: 32 keeps the float32 values; 16 and 8 code each row with scale =
    max(row max / (2^bits - 1), ``floor``), code = round(value / scale) (error at most scale / 2; a ``floor`` above
    zero coarsens rows whose values are all small, near-uniform attention, so that they compress better); ``sqrt``
    (8 bits): scale = row max / 255^2, code = round(sqrt(value / scale)); ``relative`` (16 bits): scale = row max,
    `relative_codes` (relative error at most 2^-12). At 8 bits the prefix tokens' rows are stored again as 16-bit
    linear codes (see `Quantised`)."""
    codes, scales, wide, wide_scales = [], [], [], []
    for b in blocks:
        lengths = b.row_lengths()
        if bits == 32:
            codes.append(b.values.astype(np.float32).reshape(-1))
            scales.append(np.ones(b.heads * b.tokens, np.float32))
            continue
        c, sc = _codes(b.values, lengths, bits, floor, sqrt and bits == 8, relative and bits == 16)
        codes.append(c.reshape(-1))
        scales.append(sc.reshape(-1))
        if bits == 8 and b.prefix:
            end = int(lengths[:b.prefix].sum())
            c16, sc16 = _codes(b.values[:, :end], lengths[:b.prefix], 16, 0.0)
            wide.append(c16.reshape(-1))
            wide_scales.append(sc16.reshape(-1))
    dtype = {32: np.float32, 16: np.uint16}.get(bits, np.uint8)
    return Quantised(bits, floor, sqrt and bits == 8, np.concatenate(codes) if codes else np.zeros(0, dtype),
                     np.concatenate(scales) if scales else np.zeros(0, np.float32),
                     np.concatenate(wide) if wide else np.zeros(0, np.uint16),
                     np.concatenate(wide_scales) if wide_scales else np.zeros(0, np.float32), relative and bits == 16)


def max_error(q: Quantised, blocks: list[BlockAttention]) -> float:
    """The largest difference between a value the page reads back and the captured one (measured; only for an
    encoding that is rendered, not for every one tried)."""
    return max((float(np.abs(v - b.values).max(initial=0.0)) for v, b in zip(dequantise(q, blocks), blocks)),
               default=0.0)


def dequantise(q: Quantised, blocks: list[BlockAttention]) -> list[np.ndarray]:
    """Per block, the stored values [H, E] that the page reads back (float64)."""
    out, c, s, w, ws = [], 0, 0, 0, 0
    for b in blocks:
        h, e = b.values.shape
        n = b.tokens
        lengths = b.row_lengths()
        per = np.repeat(q.scales[s:s + h * n].reshape(h, n).astype(np.float64), lengths, axis=1)
        codes = q.codes[c:c + h * e].reshape(h, e)
        if q.relative:
            values = RELATIVE_VALUES[codes] * per
        else:
            codes = codes.astype(np.float64)
            values = (codes * codes if q.sqrt else codes) * per
        if q.bits == 8 and b.prefix:
            end = int(lengths[:b.prefix].sum())
            per = np.repeat(q.wide_scales[ws:ws + h * b.prefix].reshape(h, b.prefix).astype(np.float64),
                            lengths[:b.prefix], axis=1)
            values[:, :end] = q.wide[w:w + h * end].reshape(h, end).astype(np.float64) * per
            w += h * end
            ws += h * b.prefix
        out.append(values)
        c += h * e
        s += h * n
    return out


# Tried in order until the report fits its size budget: the float32 values themselves (the page's rollout is then the
# library's, at every fusion and discard ratio), 16-bit relative then linear codes (the report keeps whichever of
# the two that fit gives the page a rollout closer to the library's: relative codes hold small values, which min
# fusion needs; linear ones hold near-uniform rows, which discarding needs), 8-bit square-root codes (peaked rows,
# as trained models have), 8-bit linear codes, then 8-bit linear codes whose step never falls below 2^-16, 2^-15.5,
# ..., 2^-8 (near-uniform rows, as in randomly initialised models, are what make attention incompressible).
ENCODINGS: tuple[Encoding, ...] = (Encoding(32), Encoding(16, relative=True), Encoding(16), Encoding(8, sqrt=True),
                                   Encoding(8), *(Encoding(8, 2.0 ** (-e / 2)) for e in range(32, 15, -1)))
