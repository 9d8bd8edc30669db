"""vitlens: see what a Vision Transformer looks at, exactly."""

from vitlens.capture import AttentionRecord, record
from vitlens.errors import VitlensError
from vitlens.explanation import Explanation
from vitlens.images import Preprocess, load_image
from vitlens.layout import TokenLayout
from vitlens.methods import METHODS, AttentionMaps, GradRollout, Rollout
from vitlens.methods.lime import Lime
from vitlens.methods.occlusion import Occlusion
from vitlens.models import VitModel, load_model, wrap
from vitlens.whatif import apply_edit, parse_edit, whatif

__version__ = "0.1.0"

__all__ = [
    "METHODS", "AttentionMaps", "AttentionRecord", "Explanation", "GradRollout", "Lime", "Occlusion", "Preprocess",
    "Rollout", "TokenLayout", "VitModel", "VitlensError", "apply_edit", "load_image", "load_model", "parse_edit",
    "record", "whatif", "wrap",
]
