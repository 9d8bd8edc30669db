"""Forward passes with some patch tokens removed (LIME's ``hide='drop'``): needs to know where a ViT adds its
position embedding, so it lives next to the adapters."""

from __future__ import annotations

from typing import Any

import torch

from vitlens.errors import VitlensError
from vitlens.models.timm_adapter import is_timm_vit


class TokenDropper:
    """Runs a ViT on one image with some patch tokens removed after the patch and position embedding.

    Supported: timm VisionTransformer (any pooling) and transformers ViTForImageClassification. Embeddings are
    computed once per image; each perturbed forward only runs the blocks on the prefix tokens plus the kept patches.
    """

    def __init__(self, model, image: torch.Tensor) -> None:
        module: Any = getattr(model, "module", None)
        self.kind = None
        if module is not None and is_timm_vit(module):
            self.kind = "timm"
        elif module is not None and type(module).__name__ == "ViTForImageClassification":
            self.kind = "hf-vit"
        if self.kind is None:
            name = type(module if module is not None else model).__name__
            raise VitlensError(f"hide='drop' needs a timm VisionTransformer or a transformers "
                               f"ViTForImageClassification; got {name}. Use hide='mean' or 'blur'")
        self.module = module
        with torch.no_grad():
            x = image[None] if image.ndim == 3 else image  # one image, or a batch whose rows __call__ pairs with
            if self.kind == "timm":
                tok = module._pos_embed(module.patch_embed(x))  # timm's own position embedding (private API)
                tok = module.norm_pre(module.patch_drop(tok))
                self.num_prefix = int(module.num_prefix_tokens)
            else:
                tok = module.vit.embeddings(x)
                self.num_prefix = 1
        self.tokens = tok  # [1, P + N, D]
        self.num_patches = tok.shape[1] - self.num_prefix

    def __call__(self, keep: torch.Tensor) -> torch.Tensor:
        """Logits for samples ``keep`` [n, N] (bool per patch) that all keep the same number of patches (zero too);
        built from a batch of B images, sample i is image i (n == B)."""
        n = keep.shape[0]
        idx = keep.nonzero()[:, 1].view(n, int(keep[0].sum())) + self.num_prefix
        prefix = torch.arange(self.num_prefix, device=keep.device).expand(n, -1)
        idx = torch.cat([prefix, idx], 1)
        tok = self.tokens.expand(n, -1, -1).gather(1, idx[..., None].expand(-1, -1, self.tokens.shape[-1]))
        m = self.module
        if self.kind == "timm":
            tok = m.norm(m.blocks(tok))
            return m.forward_head(tok)
        for layer in m.vit.layers:
            tok = layer(tok, None)
        return m.classifier(m.vit.layernorm(tok)[:, 0])
