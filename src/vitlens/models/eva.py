"""timm Eva / EVA-02 (`timm.models.eva.Eva`) through the generic adapter.

Eva blocks hold an `EvaAttention` (or timm's `AttentionRope`): rotary position embeddings are applied to q and k of
the patch tokens, then, with ``fused_attn`` False, ``softmax(q k^T * scale)`` goes through ``attn_drop`` before the
values; that output is what vitlens captures. Readout follows ``global_pool``: 'token' reads the CLS token, the
'avg' family the mean of the patch tokens (prefix tokens excluded, as timm pools them).
"""

from __future__ import annotations

from typing import Any

from torch import nn

from vitlens.errors import VitlensError
from vitlens.images import Preprocess
from vitlens.models.generic import GenericAdapter
from vitlens.models.registry import register_adapter


def is_timm_eva(module: nn.Module) -> bool:
    """Whether ``module`` is a timm Eva (EVA, EVA-02, and the other models timm builds from that class)."""
    return any(c.__module__.startswith("timm.") and c.__name__ == "Eva" for c in type(module).mro())


class TimmEvaModel(GenericAdapter):
    """A timm Eva: attention at ``blocks.*.attn`` (fused flag ``fused_attn``, probabilities at ``attn_drop``)."""

    family = "timm-eva"

    def __init__(self, module: nn.Module, preprocess: Preprocess | None = None) -> None:
        pool = getattr(module, "global_pool", "avg")
        if pool == "token":
            readout = "cls"
        elif pool in ("avg", "avgmax", "max"):
            readout = "mean"
        else:
            raise VitlensError(
                f"timm Eva with global_pool={pool!r} is not supported (rollout needs 'token' or 'avg' pooling); "
                "recreate the model with global_pool='token' or 'avg'"
            )
        timm_module: Any = module
        super().__init__(module, "blocks.*.attn", "timm", num_prefix_tokens=int(timm_module.num_prefix_tokens),
                         readout=readout, preprocess=preprocess)


register_adapter(
    "timm-eva", is_timm_eva, TimmEvaModel,
    "timm Eva / EVA-02 (rotary position embeddings, register tokens, CLS or mean pooling)",
)
