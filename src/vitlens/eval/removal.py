"""Removing patches from images for the faithfulness curves: what takes a removed patch's place, and the batched
forwards of every (image, step) pair.

Baselines: ``zero`` (0 after the model's normalisation, i.e. the dataset mean colour, as Chefer et al. remove
patches), ``mean`` (each image's own mean colour), ``blur`` (a Gaussian blur of the image, as RISE's insertion
canvas) and ``drop`` (the patch tokens are removed after the position embedding, ViTs only; see `TokenDropper`).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F

from vitlens.errors import VitlensError

BASELINES = ("zero", "mean", "blur", "drop")
BLUR_SIGMA = 5.0  # pixels; RISE blurs its insertion canvas with a kernel of this order
FORWARD_BATCH = 64  # perturbed images per forward: on the CPU 64 ran 1.4x faster than 256-512 (cache-sized activations)


def check_baseline(baseline: str) -> str:
    """``baseline`` if it is one of `BASELINES`, else a one-line error."""
    if baseline not in BASELINES:
        raise VitlensError(f"unknown removal baseline {baseline!r}; use one of {', '.join(BASELINES)}")
    return baseline


def gaussian_blur(x: torch.Tensor, sigma: float = BLUR_SIGMA) -> torch.Tensor:
    """Separable Gaussian blur of [B, C, H, W] (reflect padding, kernel radius 3 sigma, clipped to the image)."""
    radius = max(1, min(int(3 * sigma), min(x.shape[-2:]) - 1))
    t = torch.arange(-radius, radius + 1, device=x.device, dtype=x.dtype)
    k = torch.exp(-0.5 * (t / sigma) ** 2)
    k = k / k.sum()
    c = x.shape[1]
    y = F.conv2d(F.pad(x, (radius, radius, 0, 0), mode="reflect"), k.view(1, 1, 1, -1).expand(c, 1, 1, -1), groups=c)
    return F.conv2d(F.pad(y, (0, 0, radius, radius), mode="reflect"), k.view(1, 1, -1, 1).expand(c, 1, -1, 1),
                    groups=c)


def fill_image(x: torch.Tensor, baseline: str) -> torch.Tensor:
    """What removed pixels become, [B, 3, H, W] in the model's input space, for an image baseline."""
    if baseline == "zero":
        return torch.zeros_like(x)
    if baseline == "mean":
        return x.mean((2, 3), keepdim=True).expand_as(x)
    if baseline == "blur":
        return gaussian_blur(x)
    raise VitlensError(f"{baseline!r} is not an image baseline")


class Remover:
    """Scores images with chosen patches removed: ``logits(x, keeps)`` with ``x`` [R, 3, H, W] and ``keeps`` a list
    of bool [R, gh, gw] (True = the patch stays), one per step, returns logits [S, R, C].

    Image baselines paste the fill over the removed cells (the cell grid is the map's grid, resized to the image with
    nearest neighbours) and run all S*R images in forwards of ``forward_batch``. ``drop`` runs one forward per step
    (every row of a step keeps the same number of patches, as the curves remove the same count from each image).
    """

    def __init__(self, model: Any, baseline: str = "zero", forward_batch: int = FORWARD_BATCH) -> None:
        self.model = model
        self.baseline = check_baseline(baseline)
        if forward_batch < 1:
            raise VitlensError(f"forward batch must be at least 1, got {forward_batch}")
        self.forward_batch = int(forward_batch)
        if baseline == "drop":
            module = getattr(model, "module", None)
            kind = type(module).__name__ if module is not None else type(model).__name__
            from vitlens.models.timm_adapter import is_timm_vit

            if module is None or not (is_timm_vit(module) or kind == "ViTForImageClassification"):
                raise VitlensError(f"baseline 'drop' needs a timm VisionTransformer or a transformers "
                                   f"ViTForImageClassification, got {kind}; use --baseline zero, mean or blur")

    @torch.no_grad()
    def logits(self, x: torch.Tensor, keeps: Sequence[torch.Tensor]) -> torch.Tensor:
        """Logits [S, R, C] of the R images with each step's patches kept."""
        if not keeps:
            raise VitlensError("no perturbation steps to score")
        if self.baseline == "drop":
            return self._drop(x, keeps)
        fill = fill_image(x, self.baseline)
        h, w = x.shape[-2:]
        flat = torch.stack([k for k in keeps]).flatten(0, 1)  # [S*R, gh, gw]
        out = []
        r = x.shape[0]
        for s in range(0, flat.shape[0], self.forward_batch):
            k = flat[s : s + self.forward_batch]
            rows = torch.arange(s, s + k.shape[0], device=x.device) % r
            m = F.interpolate(k[:, None].float(), size=(h, w), mode="nearest").bool()
            out.append(self.model(torch.where(m, x[rows], fill[rows])).float())
        return torch.cat(out).view(len(keeps), r, -1)

    def _drop(self, x: torch.Tensor, keeps: Sequence[torch.Tensor]) -> torch.Tensor:
        from vitlens.models.token_drop import TokenDropper

        dropper = TokenDropper(self.model, x)
        if keeps[0][0].numel() != dropper.num_patches:
            raise VitlensError(f"baseline 'drop' needs maps on the model's {dropper.num_patches}-patch grid, got "
                               f"{tuple(keeps[0].shape[1:])}")
        out = []
        for k in keeps:
            k = k.flatten(1)
            counts = k.sum(1)
            if bool((counts != counts[0]).any()):
                raise VitlensError("token dropping needs the same number of kept patches in every image of a step")
            out.append(dropper(k).float())
        return torch.stack(out)
