"""LeGrad (Bousselham, Boggust, Chaybouti, Strobelt, Kuehne 2024): per-layer gradients of the attention maps."""

from __future__ import annotations

from contextlib import ExitStack
from typing import Any

import torch

from vitlens.errors import VitlensError
from vitlens.explanation import Explanation, max_normalize
from vitlens.methods.base import GradientMethod, Images, Option, Target, register
from vitlens.methods.rollout import START
from vitlens.models.base import block_tokens


def legrad_layer(grad: torch.Tensor, rows: torch.Tensor | None, num_prefix: int) -> torch.Tensor:
    """One block's LeGrad map from d s^l / d A^l [B, H, N, N]: ReLU, mean over heads, then the mean over all query
    rows (``rows`` None, as the authors) or the readout-weighted rows (``rows`` [N]); prefix key columns dropped
    -> [B, P]."""
    g = grad.clamp_min(0).mean(1)
    row = g.mean(1) if rows is None else torch.einsum("n,bnm->bm", rows, g)
    return row[:, num_prefix:]


def _replace_tokens(output: Any, tokens: torch.Tensor) -> Any:
    """``output`` of a block with its token tensor replaced by ``tokens`` (tensor or first item of a tuple)."""
    if isinstance(output, torch.Tensor):
        return tokens
    if isinstance(output, tuple):
        return (tokens, *output[1:])
    raise VitlensError(f"legrad cannot pass stacked tokens through a block returning {type(output).__name__}")


@register
class LeGrad(GradientMethod):
    """LeGrad, as its authors define it (paper arXiv 2404.03214; their code, and torchcam 0.5's LeGrad): for every
    block l from ``start_layer``, s^l is the target score of the model's own head applied to the tokens leaving
    block l (the model's final norm, pooling and classifier, as if the later blocks were skipped; for the last block
    that is the model's output); the block's map is ReLU(d s^l / d A^l) averaged over heads and query tokens, A^l
    being block l's attention probabilities only (not the earlier blocks'), on the patch keys (prefix keys dropped).
    The maps are averaged over blocks and divided by their maximum (the authors min-max scale; with non-negative
    maps the two differ only by the minimum), raw average in ``extras['raw']``, per block in
    ``extras['per_layer']``. ``rows='readout'`` weights the query rows by the model's readout instead of averaging
    them all. One forward pass: copies of the tokens leaving every block, cut from the graph, are stacked into a
    batch that goes through the head together; one backward through the head gives d s^l / d z^l for every block,
    then each block's attention gradient is that vector pulled back through block l alone (a backward from the
    score itself would also walk every later block, with zero gradients, once per block). Plain ViTs only:
    a Swin stage's tokens do not fit the head, which reads the last stage."""

    name = "legrad"
    description = "per block, ReLU of d(head score of its tokens) / d(its attention), mean over heads, rows, blocks"
    families = ("vit",)
    options = (START, Option("rows", str, "all", "Query rows averaged: all (the authors) or the readout's rows.",
                             choices=("all", "readout")))
    start_layer: int
    rows: str

    def __init__(self, model, start_layer: int = 0, rows: str = "all") -> None:
        super().__init__(model)
        self.set_options(start_layer=start_layer, rows=rows)
        self.check_start_layer()
        if len(self.model.stage_plan(self.model.preprocess.size).layouts) > 1:
            raise VitlensError("legrad applies to plain ViTs: the head of a hierarchical model (Swin) reads only "
                               "its last stage; use gae, gradcam or grad_rollout")

    def explain(self, x: Images, target: Target = None) -> Explanation:
        """LeGrad maps for a batch; ``target`` as in `GradientMethod.score` (top-1 of the final output by default)."""
        x = self.batch(x)
        layout = self.model.layout(tuple(x.shape[-2:]))
        n, b = self.model.num_blocks, x.shape[0]
        blocks = list(range(self.start_layer, n))
        mods = self.model.block_modules()
        outs: dict[int, torch.Tensor] = {}
        leaves: list[torch.Tensor] = []
        with ExitStack() as stack:
            rec = stack.enter_context(self.model.record(grads=True, blocks=blocks))

            def keep(module: Any, args: Any, output: Any, i: int) -> Any:
                outs[i] = block_tokens(output)
                if i == n - 1:  # the head sees every block's tokens, stacked along the batch, cut from the graph
                    leaves.extend(outs[j].detach().requires_grad_(True) for j in blocks)
                    return _replace_tokens(output, torch.cat(leaves, 0))
                return None

            for i in blocks:
                handle = mods[i].register_forward_hook(lambda m, a, o, i=i: keep(m, a, o, i))
                stack.callback(handle.remove)
            stacked = self.model(x)
            if stacked.shape[0] != b * len(blocks) or len(leaves) != len(blocks):
                raise VitlensError(f"{type(self.model.module).__name__} does not pass its last block's tokens "
                                   "straight to its head; legrad cannot score the earlier blocks")
            per_block = stacked.view(len(blocks), b, *stacked.shape[1:])
            logits = per_block[-1]
            _, t = self.score(logits, target)
            fixed = target if callable(target) and not isinstance(target, torch.Tensor) else t
            scores = torch.stack([self.score(per_block[k], fixed)[0] for k in range(len(blocks))])
            # d s^l / d (tokens leaving block l), through the head only (the stacked copies are cut from the blocks)
            token_grads = torch.autograd.grad(scores.sum(), leaves)
            rows = None if self.rows == "all" else layout.readout_weights(x.device, torch.float32)
            maps = []
            for k, i in enumerate(blocks):
                # chain rule through block l alone: d s^l / d A^l = (d s^l / d z^l) . (d z^l / d A^l)
                g = rec.grads((outs[i] * token_grads[k]).sum(), retain_graph=k < len(blocks) - 1, blocks=[i])[i]
                maps.append(legrad_layer(g.float(), rows, layout.num_prefix).reshape(b, *layout.grid))
        per_layer = torch.stack(maps, 1)
        raw = per_layer.mean(1)
        logits = logits.detach()
        return Explanation(maps=max_normalize(raw), method=self.name, params=self.params, target=t, logits=logits,
                           probs=self.probs_or_none(logits), extras={"raw": raw, "per_layer": per_layer,
                                                                     "per_layer_blocks": torch.tensor(blocks)})
