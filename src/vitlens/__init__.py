"""vitlens: see what a Vision Transformer looks at, exactly.

The public names below are imported on first use, so `import vitlens` (and the command line's start) stays quick.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

_WHERE = {
    "AttentionRecord": "vitlens.capture", "record": "vitlens.capture",
    "VitlensError": "vitlens.errors",
    "Explanation": "vitlens.explanation",
    "Preprocess": "vitlens.images", "load_image": "vitlens.images",
    "TokenLayout": "vitlens.layout",
    "METHODS": "vitlens.methods", "AttentionMaps": "vitlens.methods", "GradRollout": "vitlens.methods",
    "Rollout": "vitlens.methods", "Lime": "vitlens.methods", "Occlusion": "vitlens.methods",
    "VitModel": "vitlens.models", "load_model": "vitlens.models", "wrap": "vitlens.models",
    "apply_edit": "vitlens.methods.whatif", "parse_edit": "vitlens.methods.whatif", "whatif": "vitlens.methods.whatif",
    "report": "vitlens.viz.report",
    "GenericAttention": "vitlens.methods.gae",
    "LeGrad": "vitlens.methods.legrad",
    "TokenGradCAM": "vitlens.methods.token_gradcam",
    "IntegratedGradients": "vitlens.methods.input_attribution",
    "InputXGradient": "vitlens.methods.input_attribution",
    "Saliency": "vitlens.methods.input_attribution",
    "AttentionFlow": "vitlens.methods.flow",
    "TransformerAttribution": "vitlens.methods.transformer_attribution",
    "AttnLRP": "vitlens.methods.attnlrp",
    "wrap_by_names": "vitlens.models",
    "GenericAdapter": "vitlens.models",
    "open_store": "vitlens.scale",
}

__all__ = [
    "AttentionFlow", "AttentionMaps", "AttentionRecord", "AttnLRP", "Explanation", "GenericAdapter",
    "GenericAttention", "GradRollout", "InputXGradient", "IntegratedGradients", "LeGrad", "Lime", "METHODS",
    "Occlusion", "Preprocess", "Rollout", "Saliency", "TokenGradCAM", "TokenLayout", "TransformerAttribution",
    "VitModel", "VitlensError", "apply_edit", "load_image", "load_model", "open_store", "parse_edit", "record",
    "report", "whatif", "wrap", "wrap_by_names",
]


def __getattr__(name: str) -> Any:
    if name in _WHERE:
        value = getattr(importlib.import_module(_WHERE[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'vitlens' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted([*globals(), *_WHERE])


if TYPE_CHECKING:
    from vitlens.capture import AttentionRecord, record
    from vitlens.errors import VitlensError
    from vitlens.explanation import Explanation
    from vitlens.images import Preprocess, load_image
    from vitlens.layout import TokenLayout
    from vitlens.methods import METHODS, AttentionMaps, GradRollout, Lime, Occlusion, Rollout
    from vitlens.methods.attnlrp import AttnLRP
    from vitlens.methods.flow import AttentionFlow
    from vitlens.methods.gae import GenericAttention
    from vitlens.methods.input_attribution import InputXGradient, IntegratedGradients, Saliency
    from vitlens.methods.legrad import LeGrad
    from vitlens.methods.token_gradcam import TokenGradCAM
    from vitlens.methods.transformer_attribution import TransformerAttribution
    from vitlens.methods.whatif import apply_edit, parse_edit, whatif
    from vitlens.models import GenericAdapter, VitModel, load_model, wrap, wrap_by_names
    from vitlens.scale import open_store
    from vitlens.viz.report import report
