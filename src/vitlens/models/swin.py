"""Swin Transformer adapters: window attention mapped back to image token coordinates, stages joined by merging.

A Swin block computes attention inside M x M windows of a (padded, cyclically shifted) token grid. vitlens hands
methods the same [B, heads, N, N] attention a ViT block has, over the stage's H x W token grid in image coordinates:
the cyclic shift undone, padding tokens removed, entries between tokens of different windows exactly 0 (so rows
lose the mass that went to padding tokens, which the model really attends to). Patch merging joins stages: each
merged token is the mean of its 2x2 parents (of those inside the grid), the linear map rollout uses between grids.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from vitlens._utils import pair
from vitlens.errors import VitlensError
from vitlens.images import Preprocess
from vitlens.layout import StagePlan, TokenLayout
from vitlens.models.base import AttentionSite, VitModel
from vitlens.models.registry import register_adapter


def window_index(grid: tuple[int, int], window: tuple[int, int], shift: tuple[int, int],
                 pad_then_roll: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """For every token of an H x W grid (row-major), its window index and its position inside the window.

    HF pads the grid to a multiple of the window and then rolls it by -shift (``pad_then_roll=True``); timm rolls
    the unpadded grid and pads afterwards. Windows are numbered row-major over the padded grid, as
    ``window_partition`` orders them.
    """
    (h, w), (mh, mw), (sh, sw) = grid, window, shift
    hp, wp = math.ceil(h / mh) * mh, math.ceil(w / mw) * mw
    ri = torch.arange(hp)[:, None].expand(hp, wp)
    rj = torch.arange(wp)[None, :].expand(hp, wp)
    if pad_then_roll:
        oi, oj = (ri + sh) % hp, (rj + sw) % wp
        valid = (oi < h) & (oj < w)
    else:
        valid = (ri < h) & (rj < w)
        oi, oj = (ri + sh) % h, (rj + sw) % w
    win = (ri // mh) * (wp // mw) + rj // mw
    tok = (ri % mh) * mw + rj % mw
    token = (oi * w + oj)[valid]
    win_of = torch.empty(h * w, dtype=torch.long)
    tok_of = torch.empty(h * w, dtype=torch.long)
    win_of[token] = win[valid]
    tok_of[token] = tok[valid]
    return win_of, tok_of


def windows_to_global(raw: torch.Tensor, win_of: torch.Tensor, tok_of: torch.Tensor) -> torch.Tensor:
    """[B*nW, heads, M^2, M^2] window attention -> [B, heads, N, N] over the grid's tokens (0 across windows)."""
    num_windows = int(win_of.max()) + 1
    n_win_total = raw.shape[0]
    if n_win_total % num_windows:
        raise VitlensError(f"window attention has {n_win_total} windows, not a multiple of {num_windows}")
    b = n_win_total // num_windows
    a = raw.reshape(b, num_windows, *raw.shape[1:]).transpose(1, 2)  # [B, heads, nW, T, T]
    win_of, tok_of = win_of.to(raw.device), tok_of.to(raw.device)
    g = a[:, :, win_of[:, None], tok_of[:, None], tok_of[None, :]]
    same = (win_of[:, None] == win_of[None, :]).to(raw.dtype)
    return g * same


def merge_matrix(grid: tuple[int, int]) -> torch.Tensor:
    """[N_next, N] patch-merging map of an H x W grid: merged token (i, j) is the mean of parents (2i+a, 2j+b)."""
    h, w = grid
    h2, w2 = math.ceil(h / 2), math.ceil(w / 2)
    i, j = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")
    child = ((i // 2) * w2 + j // 2).reshape(-1)
    m = torch.zeros(h2 * w2, h * w)
    m[child, torch.arange(h * w)] = 1.0
    return m / m.sum(1, keepdim=True)


def _remove_then(handles: list, undo_more: Callable[[], None]) -> Callable[[], None]:
    """An undo that removes the adapter's own hooks, then runs `undo_more`."""

    def undo() -> None:
        for h in handles:
            h.remove()
        undo_more()

    return undo


class _SwinBase(VitModel):
    """What both Swin adapters share: window geometry per block, the stage plan, mean readout."""

    pad_then_roll = True

    def _stage_of_blocks(self) -> list[int]:
        raise NotImplementedError

    def _stage_grids(self, image_size: tuple[int, int]) -> list[tuple[int, int]]:
        ph, pw = self.patch_size
        grid = (math.ceil(image_size[0] / ph), math.ceil(image_size[1] / pw))
        grids = [grid]
        for _ in range(max(self._stage_of_blocks())):
            grid = (math.ceil(grid[0] / 2), math.ceil(grid[1] / 2))
            grids.append(grid)
        return grids

    def layout(self, image_size: tuple[int, int]) -> TokenLayout:
        """First-stage layout (no prefix tokens), where maps are drawn."""
        return TokenLayout(0, self._stage_grids(image_size)[0], "mean")

    def stage_plan(self, image_size: tuple[int, int]) -> StagePlan:
        """One layout per stage, mean readout, patch-merging maps between stages."""
        grids = self._stage_grids(image_size)
        return StagePlan(
            tuple(TokenLayout(0, g, "mean") for g in grids),
            tuple(self._stage_of_blocks()),
            tuple(merge_matrix(g) for g in grids[:-1]),
        )

    def _globalize(self, raw: torch.Tensor, stage: int, grid: tuple[int, int], window: tuple[int, int],
                   shift: tuple[int, int]):
        win_of, tok_of = window_index(grid, window, shift, self.pad_then_roll)
        meta = {"stage": stage, "grid": grid, "window": window, "shift": shift, "window_id": win_of.view(grid)}
        return raw, (lambda t: windows_to_global(t, win_of, tok_of)), meta


class HFSwinModel(_SwinBase):
    """transformers SwinForImageClassification / SwinModel, and Swinv2 (same windows: pad, then roll).

    Swinv2 layers hand back their attention only when asked (`output_attentions`); while recording, a pre-hook asks
    each layer for it, so the model's own outputs stay as the caller configured them."""

    family = "hf-swin"

    def __init__(self, module: nn.Module, preprocess: Preprocess | None = None) -> None:
        from vitlens.models.hf import hf_labels, hf_preprocess

        cfg: Any = module.config  # a transformers SwinConfig / Swinv2Config (untyped library)
        self.config: Any = cfg
        has_head = type(module).__name__.endswith("ForImageClassification")
        self._layers = [m for m in module.modules() if type(m).__name__ in ("SwinLayer", "Swinv2Layer")]
        self._depths = list(cfg.depths)
        super().__init__(
            module, preprocess or hf_preprocess(cfg), num_classes=cfg.num_labels if has_head else None,
            labels=hf_labels(cfg) if has_head else None,
            multi_label=getattr(cfg, "problem_type", None) == "multi_label_classification",
            patch_size=pair(cfg.patch_size),
        )

    def _stage_of_blocks(self) -> list[int]:
        return [s for s, d in enumerate(self._depths) for _ in range(d)]

    def _attention_sites(self) -> list[AttentionSite]:
        stages = self._stage_of_blocks()
        return [(layer, self._extractor(layer, stages[i])) for i, layer in enumerate(self._layers)]

    def _extractor(self, layer: Any, stage: int) -> Callable:
        # layer: a transformers SwinLayer / Swinv2Layer (untyped library), read for its window and shift
        def extract(module, args, kwargs, output):
            raw = output[1] if isinstance(output, tuple) and len(output) > 1 else None
            if raw is None:
                return None
            dims = args[1] if len(args) > 1 else kwargs["input_dimensions"]
            grid = (int(dims[0]), int(dims[1]))
            m, s = int(layer.window_size), int(layer.shift_size)
            return self._globalize(raw, stage, grid, (m, m), (s, s))

        return extract

    def _use_explicit_attention(self) -> Callable[[], None]:
        from vitlens.models.hf import use_eager_attention

        undo_eager = use_eager_attention(self.module)
        if self.config.model_type != "swinv2":
            return undo_eager

        def ask_for_attention(module, args, kwargs):
            if len(args) > 2:
                return (*args[:2], True, *args[3:]), kwargs
            return args, {**kwargs, "output_attentions": True}

        handles = [layer.register_forward_pre_hook(ask_for_attention, with_kwargs=True) for layer in self._layers]
        return _remove_then(handles, undo_eager)

    def _run(self, x: torch.Tensor) -> torch.Tensor:
        out = self.module(pixel_values=x)
        return out.logits if self.has_head else out.pooler_output


class TimmSwinModel(_SwinBase):
    """timm SwinTransformer and SwinTransformerV2 (blocks take and return (B, H, W, C); roll, then pad)."""

    family = "timm-swin"
    pad_then_roll = False

    def __init__(self, module: nn.Module, preprocess: Preprocess | None = None) -> None:
        if getattr(module, "global_pool", "avg") not in ("avg", ""):
            raise VitlensError(f"timm Swin with global_pool={module.global_pool!r} is not supported; use 'avg'")
        timm_swin: Any = module  # timm SwinTransformer / SwinTransformerV2 (untyped library)
        self._blocks = [blk for stage in timm_swin.layers for blk in stage.blocks]
        self._stages = [s for s, stage in enumerate(timm_swin.layers) for _ in stage.blocks]
        self._grid_of: dict[int, tuple[int, int]] = {}
        from vitlens.models.timm_adapter import timm_labels, timm_preprocess

        num_classes = int(getattr(module, "num_classes", 0) or 0)
        super().__init__(module, preprocess or timm_preprocess(module), num_classes=num_classes or None,
                         labels=timm_labels(module), patch_size=pair(timm_swin.patch_embed.patch_size))

    def _stage_of_blocks(self) -> list[int]:
        return self._stages

    def _attention_sites(self) -> list[AttentionSite]:
        return [(blk.attn.attn_drop, self._extractor(i, blk)) for i, blk in enumerate(self._blocks)]

    def _extractor(self, i: int, blk: Any) -> Callable:
        # blk: a timm SwinTransformerBlock (untyped library), read for its window and shift
        def extract(module, args, kwargs, output):
            return self._globalize(output, self._stages[i], self._grid_of[i], pair(blk.window_size),
                                   pair(blk.shift_size, minimum=0))

        return extract

    def _use_explicit_attention(self) -> Callable[[], None]:
        from vitlens.models.timm_adapter import unfuse

        undo_fused = unfuse([blk.attn for blk in self._blocks])

        def remember(i: int):
            def pre(module, args):
                self._grid_of[i] = (int(args[0].shape[1]), int(args[0].shape[2]))

            return pre

        handles = [blk.register_forward_pre_hook(remember(i)) for i, blk in enumerate(self._blocks)]
        return _remove_then(handles, undo_fused)

    def _run(self, x: torch.Tensor) -> torch.Tensor:
        from vitlens.models.timm_adapter import check_input_size

        check_input_size(self.module, x)
        return self.module(x)


def is_hf_swin(module: nn.Module) -> bool:
    """transformers Swin or Swinv2 model."""
    return getattr(getattr(module, "config", None), "model_type", None) in ("swin", "swinv2")


def is_timm_swin(module: nn.Module) -> bool:
    """timm SwinTransformer or SwinTransformerV2."""
    names = ("SwinTransformer", "SwinTransformerV2")
    return any(c.__module__.startswith("timm.") and c.__name__ in names for c in type(module).mro())


register_adapter(
    "timm-swin", is_timm_swin, TimmSwinModel, "timm SwinTransformer and SwinTransformerV2 (window attention, stages)"
)
register_adapter(
    "hf-swin", is_hf_swin, HFSwinModel, "transformers Swin / Swinv2 (ForImageClassification or Model)"
)
