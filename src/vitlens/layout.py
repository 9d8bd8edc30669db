"""Where the tokens of a ViT-family model sit: prefix tokens, the patch grid, how the model pools."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from vitlens.errors import VitlensError

READOUTS = ("cls", "cls+dist", "mean", "cls+mean")


@dataclass(frozen=True)
class TokenLayout:
    """Token coordinates of one forward pass.

    ``num_prefix`` tokens (CLS, distillation, registers) come first, then the ``grid`` = (gh, gw) of patch tokens in
    row-major order. ``readout`` says how the model pools its tokens into the vector its head sees:

    - ``"cls"``: the CLS token (index 0);
    - ``"cls+dist"``: the mean of the CLS (0) and distillation (1) tokens (DeiT with a distillation head);
    - ``"mean"``: the mean of the patch tokens (BEiT's default head, timm ``global_pool='avg'``, Swin);
    - ``"cls+mean"``: half the CLS token, half the mean of the patch tokens (DINOv2's classifier concatenates them).
    """

    num_prefix: int
    grid: tuple[int, int]
    readout: str = "cls"

    def __post_init__(self) -> None:
        if self.readout not in READOUTS:
            raise ValueError(f"readout must be one of {READOUTS}, got {self.readout!r}")
        if self.readout != "mean" and self.num_prefix < 1:
            raise ValueError(f"readout {self.readout!r} needs a CLS token, but the layout has no prefix tokens")
        if self.readout == "cls+dist" and self.num_prefix < 2:
            raise ValueError("readout 'cls+dist' needs a distillation token at index 1")

    @property
    def num_patches(self) -> int:
        """Number of patch tokens."""
        return self.grid[0] * self.grid[1]

    @property
    def num_tokens(self) -> int:
        """Sequence length N = prefix + patches."""
        return self.num_prefix + self.num_patches

    @property
    def has_cls(self) -> bool:
        """Whether token 0 is a CLS token (every readout but 'mean' pools from it)."""
        return self.num_prefix >= 1

    def readout_weights(
        self, device: torch.device | str | None = None, dtype: torch.dtype = torch.float32
    ) -> torch.Tensor:
        """Weights w [N] such that the pooled representation is sum_i w_i * token_i (before any final norm)."""
        w = torch.zeros(self.num_tokens, device=device, dtype=dtype)
        patches = slice(self.num_prefix, self.num_tokens)
        if self.readout == "cls":
            w[0] = 1.0
        elif self.readout == "cls+dist":
            w[0] = w[1] = 0.5
        elif self.readout == "mean":
            w[patches] = 1.0 / self.num_patches
        else:  # cls+mean
            w[0] = 0.5
            w[patches] = 0.5 / self.num_patches
        return w

    def patch_index(self, row: int, col: int) -> int:
        """Token index of patch (row, col); raises a clear error when it lies outside the grid."""
        gh, gw = self.grid
        if not (0 <= row < gh and 0 <= col < gw):
            raise VitlensError(f"patch ({row}, {col}) is outside the {gh}x{gw} patch grid (0<=row<{gh}, 0<=col<{gw})")
        return self.num_prefix + row * gw + col


@dataclass(frozen=True)
class StagePlan:
    """The token grids of a hierarchical model and the linear maps between them.

    ``layouts[s]`` is stage s's layout, ``block_stage[i]`` the stage of block i, and ``transitions[s]`` the
    [N_{s+1}, N_s] matrix that carries stage s's tokens to stage s+1's (Swin's patch merging: each merged token is
    the mean of its 2x2 parents). A plain ViT has one stage and no transitions.
    """

    layouts: tuple[TokenLayout, ...]
    block_stage: tuple[int, ...]
    transitions: tuple[torch.Tensor, ...] = ()

    def chain(self, stage: int) -> torch.Tensor | None:
        """[N_stage, N_0] product of the transitions up to ``stage`` (None for stage 0)."""
        out = None
        for t in self.transitions[:stage]:
            out = t if out is None else t @ out
        return out

    def ancestors(self, stage: int) -> torch.Tensor | None:
        """[N_0, N_stage] 0/1 matrix: which stage-``stage`` token each first-stage token was merged into."""
        c = self.chain(stage)
        return None if c is None else (c > 0).to(c.dtype).T
