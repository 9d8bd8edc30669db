"""The uniform verb: ``Method(model, **options).explain(x, target=None) -> Explanation``."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from PIL import Image

from vitlens.errors import VitlensError
from vitlens.models.base import VitModel

Target = int | Sequence[int] | torch.Tensor | None
Images = torch.Tensor | Image.Image | Sequence[Image.Image]


class Method:
    """Base class: holds the model and turns images into a batch on the model's device."""

    name = "method"

    def __init__(self, model: VitModel) -> None:
        if not isinstance(model, VitModel):
            from vitlens.models.loading import load_model

            model = load_model(model)
        self.model = model

    def batch(self, x: Images) -> torch.Tensor:
        """A [B, 3, H, W] batch on the model's device; PIL images go through the model's preprocessing."""
        if isinstance(x, Image.Image) or (isinstance(x, (list, tuple)) and x and isinstance(x[0], Image.Image)):
            x, _ = self.model.preprocess(x)
        if not isinstance(x, torch.Tensor):
            raise VitlensError(f"expected an image tensor [B, 3, H, W] or PIL images, got {type(x).__name__}")
        if x.ndim == 3:
            x = x[None]
        return x.to(self.model.device, torch.float32)

    def probs_or_none(self, logits: torch.Tensor) -> torch.Tensor | None:
        """Class probabilities when the model has a head."""
        return self.model.probabilities(logits) if self.model.has_head else None

    def explain(self, x: Images, target: Target = None):
        """Explain a batch; class-agnostic methods ignore ``target``."""
        raise NotImplementedError


def check_choice(name: str, value: str, choices: Sequence[str]) -> str:
    """Raise a clear error unless value is one of choices."""
    if value not in choices:
        raise VitlensError(f"{name} must be one of {', '.join(choices)}; got {value!r}")
    return value


def check_range(name: str, value: float, lo: float, hi: float, hi_open: bool = False) -> float:
    """Raise a clear error unless lo <= value <= hi (or < hi when hi_open)."""
    ok = lo <= value < hi if hi_open else lo <= value <= hi
    if not ok:
        raise VitlensError(f"{name} must be in [{lo}, {hi}{')' if hi_open else ']'}; got {value}")
    return float(value)
