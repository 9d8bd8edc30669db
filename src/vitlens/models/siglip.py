"""transformers SigLIP vision towers through the generic adapter."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from vitlens.errors import VitlensError
from vitlens.images import Preprocess
from vitlens.models.clip import HF_ATTENTION
from vitlens.models.generic import GenericAdapter
from vitlens.models.registry import register_adapter

SIGLIP_CLASSES = ("SiglipVisionModel", "SiglipForImageClassification")


def is_hf_siglip_vision(module: nn.Module) -> bool:
    """A transformers SigLIP vision model (not the two-tower SiglipModel)."""
    return type(module).__module__.startswith("transformers.") and type(module).__name__ in SIGLIP_CLASSES


class HFSiglipModel(GenericAdapter):
    """A transformers SigLIP vision tower: no CLS token (no prefix tokens), readout 'mean' of the patch tokens.

    `SiglipForImageClassification` feeds its classifier exactly that mean, so there the readout is exact.
    `SiglipVisionModel` pools with a multihead attention-pooling (MAP) head: a learned probe attends over the final
    tokens. That pooling is input-dependent (the probe's attention differs per image and per head) and is followed by
    the head's output projection and MLP, so no fixed weight vector over tokens describes it; vitlens reads such a
    backbone out as the uniform mean of the patch tokens, which covers exactly the tokens the probe reads (all of
    them) but not its weighting. `probe_attention` returns the probe's own attention for who needs it. Forward
    returns the MAP head's ``pooler_output`` (or the patch mean when the config has no head).
    """

    family = "hf-siglip"

    def __init__(self, module: nn.Module, preprocess: Preprocess | None = None) -> None:
        super().__init__(module, HF_ATTENTION, "hf", num_prefix_tokens=0, readout="mean", preprocess=preprocess)

    def probe_attention(self, x: torch.Tensor) -> torch.Tensor:
        """[B, N] attention of the MAP head's probe over the final tokens (mean over its heads, rows sum to 1)."""
        heads = [m for m in self.module.modules() if type(m).__name__ == "SiglipMultiheadAttentionPoolingHead"]
        head: Any = heads[0] if heads else None
        if head is None:
            raise VitlensError(f"{type(self.module).__name__} has no attention-pooling head (vision_use_head=False)")
        got: list[torch.Tensor] = []
        handle = head.attention.register_forward_hook(lambda m, a, out: got.append(out[1]))
        try:
            with torch.no_grad():
                self.forward(x)
        finally:
            handle.remove()
        return got[-1][:, 0]


register_adapter(
    "hf-siglip", is_hf_siglip_vision, HFSiglipModel,
    "transformers SiglipVisionModel (no CLS; patch-mean readout, see HFSiglipModel) and SiglipForImageClassification",
)
