"""Model loading and adapters."""

from vitlens.models.base import VitModel
from vitlens.models.generic import GenericAdapter, wrap_by_names
from vitlens.models.loading import FAMILIES, load_model, wrap
from vitlens.models.registry import AdapterSpec, register_adapter

__all__ = ["FAMILIES", "AdapterSpec", "GenericAdapter", "VitModel", "load_model", "register_adapter", "wrap",
           "wrap_by_names"]
