"""Model loading and adapters."""

from vitlens.models.base import VitModel
from vitlens.models.loading import FAMILIES, load_model, wrap

__all__ = ["FAMILIES", "VitModel", "load_model", "wrap"]
