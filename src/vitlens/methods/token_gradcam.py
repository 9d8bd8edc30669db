"""Grad-CAM over the patch tokens of one transformer block."""

from __future__ import annotations

import torch

from vitlens.errors import VitlensError
from vitlens.explanation import Explanation, max_normalize
from vitlens.methods.base import GradientMethod, Images, Option, Target, register
from vitlens.models.base import flat_tokens
from vitlens.taps import gradient_pass, tap_tokens


def token_cam(tokens: torch.Tensor, grads: torch.Tensor) -> torch.Tensor:
    """Grad-CAM of patch tokens [B, P, C] and their gradients: weights = gradient averaged over the tokens [B, C];
    map = ReLU(sum over channels of weight * token) [B, P]."""
    weights = grads.mean(1)
    return torch.einsum("bpc,bc->bp", tokens, weights).clamp_min(0)


@register
class TokenGradCAM(GradientMethod):
    """Grad-CAM (Selvaraju et al. 2017) over the tokens of block ``block`` (default the last block).

    Where the activations are taken: the tokens ENTERING the block, i.e. the residual stream that the block's
    pre-attention LayerNorm and its attention read (for the last block of a CLS model, the tokens whose mixing into
    the CLS token makes the prediction; the tokens leaving the last block no longer reach a CLS readout). They are
    caught by a forward pre-hook on the block module (`VitModel.block_modules`). Prefix tokens (CLS, distillation,
    registers) are removed; weights = d score / d token averaged over the patch tokens; map = ReLU(sum_c weight_c *
    token_c) on the block's own patch grid from the layout. Swin: the block's stage grid, carried to the first
    stage's grid by the stage plan's ancestor map (each first-stage patch takes its merged token's value, i.e.
    nearest upsampling). Maps divided by their maximum; the raw map is ``extras['raw']``."""

    name = "gradcam"
    description = "Grad-CAM over the patch tokens entering a block: ReLU(tokens . mean gradient over tokens)"
    options = (Option("block", int, -1, "Block whose input tokens are used (negative: from the end; default the last).",
                      lo=-4096, hi=4095),)
    block: int

    def __init__(self, model, block: int = -1) -> None:
        super().__init__(model)
        self.set_options(block=block)
        n = self.model.num_blocks
        if not -n <= self.block < n:
            raise VitlensError(f"block must be in [{-n}, {n - 1}] for a model with {n} blocks; got {self.block}")

    def explain(self, x: Images, target: Target = None) -> Explanation:
        """Grad-CAM maps for a batch; ``target`` as in `GradientMethod.score` (top-1 by default)."""
        x = self.batch(x)
        plan = self.model.stage_plan(tuple(x.shape[-2:]))
        i = self.block % self.model.num_blocks
        with gradient_pass(self.model), tap_tokens(self.model, [i], "input") as taps:
            logits = self.model(x)
            score, t = self.score(logits, target)
            (grad,) = torch.autograd.grad(score.sum(), taps[i])
        stage = plan.block_stage[i]
        layout = plan.layouts[stage]
        with torch.no_grad():
            tokens, grads = flat_tokens(taps[i].detach()), flat_tokens(grad)
            if tokens.shape[1] != layout.num_tokens:
                raise VitlensError(f"block {i} takes {tokens.shape[1]} tokens but the layout has {layout.num_tokens}")
            cam = token_cam(tokens[:, layout.num_prefix:].float(), grads[:, layout.num_prefix:].float())
            up = plan.ancestors(stage)
            if up is not None:
                cam = cam @ up.to(cam.device, cam.dtype).T
            raw = cam.reshape(-1, *plan.layouts[0].grid)
        return Explanation(maps=max_normalize(raw), method=self.name, params=self.params, target=t,
                           logits=logits.detach(), probs=self.probs_or_none(logits.detach()),
                           extras={"raw": raw, "block": torch.tensor(i)})
