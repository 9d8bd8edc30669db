"""AttnLRP (Achtibat et al., ICML 2024): relevance of every input pixel, conserved through attention and LayerNorm."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from vitlens.errors import VitlensError
from vitlens.explanation import Explanation
from vitlens.methods.base import GradientMethod, Images, Option, Target, register
from vitlens.methods.lrp_rules import attnlrp_rules, lrp_mode

POOLS = ("patch", "pixel")


@register
class AttnLRP(GradientMethod):
    """Layer-wise relevance propagation with AttnLRP's rules (`attnlrp_rules` in `vitlens.methods.lrp_rules`): epsilon
    rule on linear layers and the patch convolution, identity rule on the LayerNorm normalisation and on GELU, the
    paper's softmax rule, the uniform rule (half each) on q @ k^T and A @ V. The relevance of the target score (the
    logit for a class index; ``score's gradient * output`` for a callable target) is carried down to the input pixels.

    Raw, signed values (not max-normalised): they add up to the score minus what the rules assign to constants.
    Biases, LayerNorm shifts, position embeddings, the CLS token and relative-position biases are additive constants:
    the z-rule gives each its share ``constant * gradient`` and that relevance stops there; the softmax rule keeps
    ``x * (R - s * sum R)`` and drops the rest (the paper's bias term of the softmax). ``extras['pixel']`` is the
    relevance per pixel [B, H, W] (summed over colour channels); ``maps`` are its sums over each patch of the first
    stage's grid (``pool='patch'``), or the pixel map itself (``pool='pixel'``). ``extras['total']`` is the relevance
    summed over the pixels [B] and ``extras['score']`` the explained score [B].
    """

    name = "attnlrp"
    description = "LRP with AttnLRP's attention and LayerNorm rules: signed input relevance summed per patch (raw)"
    options = (
        Option("pool", str, "patch", "Sum the pixel relevance per patch, or return the pixel map.", choices=POOLS),
        Option("epsilon", float, 1e-6, "Stabiliser of the epsilon rule on linear layers (0: z-rule).", lo=0.0, hi=1.0),
    )

    pool: str
    epsilon: float

    def __init__(self, model, pool: str = "patch", epsilon: float = 1e-6) -> None:
        GradientMethod.__init__(self, model)
        self.set_options(pool=pool, epsilon=epsilon)

    def explain(self, x: Images, target: Target = None) -> Explanation:
        """Input relevance for a batch; ``target`` defaults to each sample's top-1 class."""
        x = self.batch(x)
        seen: list[torch.Tensor] = []

        def grab(module: Any, args: tuple, kwargs: dict) -> None:
            first = [a for a in (*args, *kwargs.values()) if isinstance(a, torch.Tensor)]
            if first and not seen:
                seen.append(first[0])

        handle = self.model.module.register_forward_pre_hook(grab, with_kwargs=True)
        try:
            with self.model.record(grads=True, blocks=[]):
                with lrp_mode(attnlrp_rules(self.epsilon), type(self.model.module).__name__) as mode:
                    logits = self.model(x)
                score, t = self.score(logits, target)
                start = torch.autograd.grad(score.sum(), logits, retain_graph=True)[0]  # one-hot for a class index
                pixels = seen[0]
                with mode.relevance():
                    (g,) = torch.autograd.grad((logits * start).sum(), pixels)
        finally:
            handle.remove()
        pixel = (pixels.detach() * g).sum(1).float()  # [B, H, W]
        if pixel.shape[-2:] != x.shape[-2:]:
            name = type(self.model.module).__name__
            raise VitlensError(f"{name} resized its input; attnlrp needs the model to take the pixels as given")
        maps = pixel if self.pool == "pixel" else self._per_patch(pixel)
        logits = logits.detach()
        return Explanation(maps=maps, method=self.name, params=self.params, target=t, logits=logits,
                           probs=self.probs_or_none(logits),
                           extras={"pixel": pixel, "total": pixel.flatten(1).sum(1), "score": score.detach().float()})

    def _per_patch(self, pixel: torch.Tensor) -> torch.Tensor:
        """[B, H, W] -> sums over each patch of the first stage's token grid [B, gh, gw]."""
        grid = self.model.stage_plan(tuple(pixel.shape[-2:])).layouts[0].grid
        ph, pw = pixel.shape[-2] // grid[0], pixel.shape[-1] // grid[1]
        return F.avg_pool2d(pixel[:, None], (ph, pw))[:, 0] * (ph * pw)
