"""What the model-agnostic methods (LIME, occlusion, what-if) need from a model: the `ImageClassifier` protocol,
`CallableClassifier` (any callable mapping images to logits made into one) and `as_classifier`."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Protocol, runtime_checkable

import torch
from torch import nn

from vitlens.errors import VitlensError
from vitlens.images import Preprocess
from vitlens.models.base import VitModel, class_probabilities, target_indices

Target = int | Sequence[int] | torch.Tensor | None


@runtime_checkable
class ImageClassifier(Protocol):
    """An image classifier as the model-agnostic methods see it; every `VitModel` is one, and so is every
    `CallableClassifier`."""

    preprocess: Preprocess
    labels: list[str] | None
    num_classes: int | None
    multi_label: bool

    @property
    def patch_size(self) -> tuple[int, int] | None:
        """The ViT patch (h, w), or None for a model without patches."""
        ...

    @property
    def has_head(self) -> bool:
        """Whether the outputs are class scores."""
        ...

    @property
    def device(self) -> torch.device:
        """Where inputs must live."""
        ...

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        """Logits [B, C] of an image batch [B, 3, H, W]."""
        ...

    def probabilities(self, logits: torch.Tensor) -> torch.Tensor:
        """Class probabilities of ``logits``."""
        ...

    def check_target(self, target: Target, logits: torch.Tensor) -> torch.Tensor:
        """The target class per sample (top-1 when None), with clear errors."""
        ...


class CallableClassifier:
    """A plain callable [B, 3, H, W] -> logits [B, C] (a tensor or an object with ``.logits``) as an
    `ImageClassifier`; ``preprocess`` defaults to 224 px ImageNet normalisation."""

    family = "callable"
    has_head = True
    patch_size: tuple[int, int] | None = None

    def __init__(self, fn: Callable[[torch.Tensor], torch.Tensor], preprocess: Preprocess | None = None,
                 labels: Sequence[str] | None = None, multi_label: bool = False) -> None:
        if not callable(fn):
            raise VitlensError(f"expected a model or a callable mapping images to logits, got {type(fn).__name__}")
        self.module = fn
        self.preprocess = preprocess or Preprocess()
        self.labels = list(labels) if labels is not None else None
        self.multi_label = multi_label
        self.num_classes = len(self.labels) if self.labels else None

    @property
    def device(self) -> torch.device:
        """Device of the module's parameters (CPU for parameter-free callables)."""
        if isinstance(self.module, nn.Module):
            p = next(self.module.parameters(), None)
            if p is not None:
                return p.device
        return torch.device("cpu")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits [B, C]."""
        if x.ndim != 4 or x.shape[1] != 3:
            raise VitlensError(f"expected an image batch [B, 3, H, W], got shape {tuple(x.shape)}")
        out = self.module(x.to(self.device))
        out = getattr(out, "logits", out)
        if not isinstance(out, torch.Tensor) or out.ndim != 2:
            raise VitlensError("the model must return logits [B, C] (a tensor or an object with .logits)")
        return out

    __call__ = forward

    def probabilities(self, logits: torch.Tensor) -> torch.Tensor:
        """Softmax over classes (per-class sigmoid when multi_label)."""
        return class_probabilities(logits, self.multi_label)

    def check_target(self, target: Target, logits: torch.Tensor) -> torch.Tensor:
        """Target class per sample (top-1 when None), with clear errors."""
        return target_indices(target, logits)


def as_classifier(model, preprocess: Preprocess | None = None) -> ImageClassifier:
    """A `VitModel` or `CallableClassifier` as it is; a spec string or a ViT module vitlens knows -> `load_model`;
    any other callable / ``nn.Module`` -> `CallableClassifier` (``preprocess`` defaults to 224 px ImageNet)."""
    if isinstance(model, VitModel):
        return model
    if isinstance(model, CallableClassifier):
        return model
    from vitlens.models.loading import load_model

    if isinstance(model, str) or hasattr(model, "__fspath__"):
        return load_model(model)
    if isinstance(model, nn.Module):
        try:
            wrapped = load_model(model)
        except VitlensError:
            return CallableClassifier(model, preprocess)
        if preprocess is not None:
            wrapped.preprocess = preprocess
        return wrapped
    return CallableClassifier(model, preprocess)
