"""LoRA (Hu et al. 2021) on the query and value projections of transformers and timm ViT and Swin blocks.

W x becomes W x + (alpha / r) B A x for the q and v outputs, with A [r, in] drawn like a Linear weight and B [out, r]
zero, so the model is unchanged until the first step. For timm's fused ``qkv`` the update is added to the q and v
thirds of its output. `merge_lora` folds B A into W and removes the LoRA modules, leaving a plain model.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from vitlens.errors import VitlensError
from vitlens.train.adapters import find_blocks

LORA_NAME = "vitlens_lora"


class LoRA(nn.Module):
    """Low-rank updates of output slices of one Linear: slice (start, stop) gets scale * B_s A_s x."""

    def __init__(self, linear: nn.Linear, slices: list[tuple[int, int]], rank: int, alpha: float) -> None:
        super().__init__()
        self.slices = slices
        self.scale = alpha / rank
        ref = linear.weight
        self.A = nn.ParameterList()
        self.B = nn.ParameterList()
        for start, stop in slices:
            a = torch.empty(rank, linear.in_features, device=ref.device, dtype=ref.dtype)
            nn.init.kaiming_uniform_(a, a=math.sqrt(5))
            self.A.append(nn.Parameter(a))
            self.B.append(nn.Parameter(torch.zeros(stop - start, rank, device=ref.device, dtype=ref.dtype)))

    def delta(self, x: torch.Tensor, width: int) -> torch.Tensor:
        """The update of the whole output [..., width]: zero outside the adapted slices."""
        parts = []
        for (start, stop), a, b in zip(self.slices, self.A, self.B, strict=True):
            d = (x @ a.t()) @ b.t() * self.scale
            parts.append(nn.functional.pad(d, (start, width - stop)))
        return torch.stack(parts).sum(0)

    def weight_delta(self, width: int) -> torch.Tensor:
        """The same update as a weight matrix [width, in]."""
        dw = torch.zeros(width, self.A[0].shape[1], device=self.A[0].device, dtype=self.A[0].dtype)
        for (start, stop), a, b in zip(self.slices, self.A, self.B, strict=True):
            dw[start:stop] += (b @ a) * self.scale
        return dw


def _hook(module: nn.Module, args, output):
    return output + getattr(module, LORA_NAME).delta(args[0], output.shape[-1])


def insert_lora(module: nn.Module, rank: int = 8, alpha: float = 16.0) -> list[LoRA]:
    """Add LoRA of rank ``rank`` to the q and v projections of every block of ``module``; return the LoRA modules."""
    if isinstance(rank, bool) or not isinstance(rank, int) or rank < 1:
        raise VitlensError(f"LoRA rank must be a whole number >= 1, got {rank!r}")
    if not (isinstance(alpha, (int, float)) and math.isfinite(alpha) and alpha > 0):
        raise VitlensError(f"LoRA alpha must be a positive number, got {alpha!r}")
    added = []
    for b in find_blocks(module):
        if len(b.qkv) == 2:
            targets = [(lin, [(0, lin.out_features)]) for lin in b.qkv]
        else:
            qkv = b.qkv[0]
            third = qkv.out_features // 3
            targets = [(qkv, [(0, third), (2 * third, 3 * third)])]
        for lin, slices in targets:
            if hasattr(lin, LORA_NAME):
                raise VitlensError("the model already has LoRA; insert it once")
            lora = LoRA(lin, slices, rank, float(alpha))
            lin.add_module(LORA_NAME, lora)
            lin.register_forward_hook(_hook)
            added.append(lora)
    return added


@torch.no_grad()
def merge_lora(module: nn.Module) -> int:
    """Fold every LoRA update into its Linear's weight and remove the LoRA modules and hooks; returns how many."""
    n = 0
    for lin in list(module.modules()):
        lora = getattr(lin, LORA_NAME, None)
        if not isinstance(lin, nn.Linear) or not isinstance(lora, LoRA):
            continue
        lin.weight += lora.weight_delta(lin.out_features)
        for key, hook in list(lin._forward_hooks.items()):
            if hook is _hook:
                del lin._forward_hooks[key]
        delattr(lin, LORA_NAME)
        n += 1
    return n
