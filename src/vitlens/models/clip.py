"""transformers CLIP vision towers through the generic adapter.

`CLIPVisionModel` embeds the image with a CLS token, applies a pre-layernorm, runs the encoder and returns as
``pooler_output`` the post-layernormed CLS token: readout 'cls', a backbone (features [B, D]).
`CLIPVisionModelWithProjection` returns ``image_embeds``, that pooled CLS token projected: readout 'cls', a backbone.
`CLIPForImageClassification` feeds its classifier the mean of the patch tokens (CLS excluded): readout 'mean' with
one prefix token, logits [B, C].
"""

from __future__ import annotations

from torch import nn

from vitlens.images import Preprocess
from vitlens.models.generic import GenericAdapter
from vitlens.models.registry import register_adapter

CLIP_CLASSES = ("CLIPVisionModel", "CLIPVisionModelWithProjection", "CLIPForImageClassification")
HF_ATTENTION = "**encoder.layers.*.self_attn"


def is_hf_clip_vision(module: nn.Module) -> bool:
    """A transformers CLIP vision model (not the two-tower CLIPModel)."""
    return type(module).__module__.startswith("transformers.") and type(module).__name__ in CLIP_CLASSES


class HFClipModel(GenericAdapter):
    """A transformers CLIP vision tower (see the module docstring for the readouts)."""

    family = "hf-clip"

    def __init__(self, module: nn.Module, preprocess: Preprocess | None = None) -> None:
        readout = "mean" if type(module).__name__ == "CLIPForImageClassification" else "cls"
        super().__init__(module, HF_ATTENTION, "hf", num_prefix_tokens=1, readout=readout, preprocess=preprocess)


register_adapter(
    "hf-clip", is_hf_clip_vision, HFClipModel,
    "transformers CLIPVisionModel(WithProjection) backbones (CLS readout), CLIPForImageClassification (patch mean)",
)
