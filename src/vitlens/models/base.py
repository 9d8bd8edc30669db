"""`VitModel`: the one interface methods see, whatever the architecture underneath."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager
from typing import Any

import torch
from torch import nn

from vitlens.capture import AttentionRecord, StreamFn, record
from vitlens.errors import VitlensError
from vitlens.images import Preprocess
from vitlens.layout import StagePlan, TokenLayout

# (module to hook, extract(module, args, kwargs, output)). extract returns the probabilities [B, H, N, N] in global
# token coordinates, or (raw, to_global, meta) when the model computes them in another shape (Swin's windows): raw is
# the tensor the model used (gradients are taken with respect to it), to_global maps it (and its gradient) to
# [B, H, N, N], meta describes the block's geometry. None means the block produced no weights.
AttentionSite = tuple[nn.Module, Callable[[nn.Module, Any, Any, Any], Any]]


class VitModel:
    """A ViT-family model with what explanation methods need to know about it.

    Adapters (one per family) override ``_attention_sites``, ``_use_explicit_attention``, ``_run`` and ``layout``.
    Methods only call ``forward``, ``layout``, ``record`` and read ``num_blocks``, ``num_classes``, ``labels``.
    """

    family = "generic"

    def __init__(
        self,
        module: nn.Module,
        preprocess: Preprocess,
        num_classes: int | None,
        labels: Sequence[str] | None = None,
        multi_label: bool = False,
        patch_size: tuple[int, int] = (16, 16),
    ) -> None:
        self.module = module
        self.preprocess = preprocess
        self.num_classes = num_classes
        self.labels = list(labels) if labels is not None else None
        self.multi_label = multi_label
        self.patch_size = patch_size
        self._grad_input = False
        if not self._attention_sites():
            raise VitlensError(f"{type(module).__name__} has no attention blocks that vitlens can hook")

    # ---- adapter interface -------------------------------------------------------------------------------------
    def _attention_sites(self) -> list[AttentionSite]:
        """One (module, extractor) per block, in forward order."""
        raise NotImplementedError

    def _use_explicit_attention(self) -> Callable[[], None]:
        """Switch fused attention kernels off so probabilities exist; return the function that undoes it."""
        raise NotImplementedError

    def _run(self, x: torch.Tensor) -> torch.Tensor:
        """Call the wrapped module and return logits [B, C] (or pooled features [B, D] for a backbone)."""
        raise NotImplementedError

    def layout(self, image_size: tuple[int, int]) -> TokenLayout:
        """Token layout (of the first stage, where maps are drawn) for an input of this (height, width)."""
        raise NotImplementedError

    def stage_plan(self, image_size: tuple[int, int]) -> StagePlan:
        """Stages of token grids and the maps between them; a plain ViT has one stage."""
        return StagePlan((self.layout(image_size),), (0,) * self.num_blocks, ())

    # ---- public -------------------------------------------------------------------------------------------------
    def block_modules(self) -> list[nn.Module]:
        """The transformer blocks, one per attention block in forward order: for each attention site, the nearest
        module at or above it that is an item of a ``ModuleList``/``Sequential`` (timm ``blocks.i``, transformers
        ``encoder.layer.i``, Swin stages' blocks). A block's first input and first output are its tokens (see
        `block_tokens`, `vitlens.taps.tap_tokens`). Adapters whose blocks sit elsewhere override this."""
        parent: dict[int, nn.Module] = {}
        for owner in self.module.modules():
            for child in owner.children():
                parent.setdefault(id(child), owner)
        blocks = []
        for site, _ in self._attention_sites():
            m: nn.Module | None = site
            while m is not None and not isinstance(parent.get(id(m)), (nn.ModuleList, nn.Sequential)):
                m = parent.get(id(m))
            if m is None:
                raise VitlensError(f"cannot find the block around {type(site).__name__}: it is in no list of blocks")
            blocks.append(m)
        return blocks

    @property
    def num_blocks(self) -> int:
        """Number of attention blocks."""
        return len(self._attention_sites())

    @property
    def device(self) -> torch.device:
        """Device of the model's parameters."""
        return next(self.module.parameters()).device

    @property
    def has_head(self) -> bool:
        """Whether the model outputs class scores (class-specific methods need that)."""
        return self.num_classes is not None

    def to(self, device: torch.device | str) -> VitModel:
        """Move the wrapped module; returns self."""
        self.module.to(device)
        return self

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits [B, C] for a classifier, pooled features [B, D] for a backbone."""
        if x.ndim != 4 or x.shape[1] != 3:
            raise VitlensError(f"expected an image batch [B, 3, H, W], got shape {tuple(x.shape)}")
        ph, pw = self.patch_size
        if x.shape[-2] % ph or x.shape[-1] % pw:
            raise VitlensError(
                f"image size {tuple(x.shape[-2:])} is not a multiple of the patch size {self.patch_size}; "
                "resize it (e.g. --image-size)"
            )
        x = x.to(self.device)
        if self._grad_input:
            x = x.detach().requires_grad_(True)
        return self._run(x)

    __call__ = forward

    def probabilities(self, logits: torch.Tensor) -> torch.Tensor:
        """Softmax over classes, or per-class sigmoid for a multi-label head."""
        return class_probabilities(logits, self.multi_label)

    def check_target(self, target: int | Sequence[int] | torch.Tensor | None, logits: torch.Tensor) -> torch.Tensor:
        """Resolve the target class per sample (top-1 when None), with clear errors."""
        if not self.has_head:
            raise VitlensError(
                f"{type(self.module).__name__} is a backbone without a classification head; class-specific methods "
                "need one (use a *ForImageClassification model, or a class-agnostic method such as rollout)"
            )
        return target_indices(target, logits)

    def record(
        self, grads: bool = False, blocks: Sequence[int] | None = None, stream: StreamFn | None = None
    ) -> AbstractContextManager[AttentionRecord]:
        """Capture attention during forwards; see `vitlens.capture.record`."""
        return record(self, grads=grads, blocks=blocks, stream=stream)

    def __repr__(self) -> str:
        name = type(self.module).__name__
        return f"{type(self).__name__}({name}, blocks={self.num_blocks}, classes={self.num_classes})"


def block_tokens(value: Any) -> torch.Tensor:
    """The token tensor in a block's first input or its output, as the model holds it: a tensor, or the first item of
    a tuple (or of a transformers output); [B, N, C], or a Swin grid [B, H, W, C] (see `flat_tokens`). Gradients
    must be taken with respect to this tensor, not a reshaped copy."""
    t = value[0] if isinstance(value, (tuple, list)) else value
    if not isinstance(t, torch.Tensor) and hasattr(t, "to_tuple"):
        t = t.to_tuple()[0]
    if not isinstance(t, torch.Tensor) or t.ndim not in (3, 4):
        raise VitlensError(f"a block passed {type(t).__name__} where tokens [B, N, C] were expected")
    return t


def flat_tokens(t: torch.Tensor) -> torch.Tensor:
    """[B, N, C] tokens as they are, a Swin grid [B, H, W, C] flattened row-major to [B, H*W, C]."""
    return t.flatten(1, 2) if t.ndim == 4 else t


def class_probabilities(logits: torch.Tensor, multi_label: bool = False) -> torch.Tensor:
    """Softmax over classes [B, C], or per-class sigmoid for a multi-label head."""
    return logits.sigmoid() if multi_label else logits.softmax(-1)


def target_indices(target: int | Sequence[int] | torch.Tensor | None, logits: torch.Tensor) -> torch.Tensor:
    """The target class per sample of ``logits`` [B, C]: top-1 when None, one index for all, or one per sample."""
    b, c = logits.shape
    if target is None:
        return logits.argmax(-1)
    t = torch.as_tensor(target, device=logits.device).long().reshape(-1)
    if t.numel() == 1:
        t = t.expand(b)
    if t.numel() != b:
        raise VitlensError(f"got {t.numel()} targets for a batch of {b}; give one target or one per image")
    if bool(((t < 0) | (t >= c)).any()):
        raise VitlensError(f"target class {t.tolist()} out of range: the model has {c} classes (0..{c - 1})")
    return t


def label_of(model, index: int) -> str:
    """The class name of ``index`` for any model with an optional ``labels`` list ('class N' when it has none)."""
    labels = getattr(model, "labels", None)
    return str(labels[index]) if labels and 0 <= index < len(labels) else f"class {index}"


def top_labels(model, probs: torch.Tensor, k: int) -> list[tuple[str, float]]:
    """The ``k`` most probable (label, probability) pairs of one sample's probabilities [C]."""
    p = torch.as_tensor(probs).detach().float().cpu().reshape(-1)
    vals, idx = p.topk(min(k, p.numel()))
    return [(label_of(model, int(i)), float(v)) for v, i in zip(vals, idx)]
