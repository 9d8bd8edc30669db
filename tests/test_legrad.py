"""LeGrad: torchcam 0.5's LeGrad on a model both support, slow per-layer loops (a separate forward per block for
timm, an independent retain_grad attention for transformers, heads written out by hand), readout rows, batch == one
by one, callable targets on a backbone, Swin refused."""

import pytest
import torch
from torch import nn

import vitlens
from factories import build, hf_vit
from oracles import retained_attention
from test_swin import _build as build_swin
from vitlens.errors import VitlensError
from vitlens.methods.legrad import LeGrad, legrad_layer
from vitlens.models.generic import GenericAdapter


def test_layer_map_by_hand():
    """2 heads, 1 prefix + 2 patch tokens: ReLU, mean over heads, mean over (or readout-weighted) rows, keys 1:."""
    g = torch.tensor([[[[1.0, 2, -4], [0, 4, 2], [3, -1, 0]], [[-1.0, 0, 2], [0, -2, 2], [1, 1, 0]]]])
    # ReLU then head mean: [[.5, 1, 1], [0, 2, 2], [2, .5, 0]]; row mean: [2.5/3, 3.5/3, 3/3]
    torch.testing.assert_close(legrad_layer(g, None, 1), torch.tensor([[3.5 / 3, 1.0]]))
    torch.testing.assert_close(legrad_layer(g, torch.tensor([1.0, 0, 0]), 1), torch.tensor([[1.0, 1.0]]))


def _patch_grid(maps, layout):
    return torch.stack(maps, 1).mean(1).reshape(-1, *layout.grid)


def timm_slow(module, model, x, target, rows):
    """Per block l: a separate forward through blocks 0..l only, then timm's own norm and head; the gradient of that
    score with respect to block l's attention."""
    layout = model.layout(tuple(x.shape[-2:]))
    w = None if rows == "all" else layout.readout_weights()
    maps = []
    for i in range(len(module.blocks)):
        with model.record(grads=True, blocks=[i]) as rec:
            h = module.norm_pre(module.patch_drop(module._pos_embed(module.patch_embed(x.requires_grad_(True)))))
            for blk in module.blocks[: i + 1]:
                h = blk(h)
            s = module.forward_head(module.norm(h)).gather(1, target[:, None])[:, 0]
            g = rec.grads(s)[i].clamp_min(0).mean(1)
        row = g.mean(1) if w is None else torch.einsum("n,bnm->bm", w, g)
        maps.append(row[:, layout.num_prefix:].detach())
    return _patch_grid(maps, layout)


HF_HEADS = {  # the models' heads written out: logits from the tokens leaving a block
    "hf-vit": lambda m, z: m.classifier(m.vit.layernorm(z)[:, 0]),
    "hf-deit-teacher": lambda m, z: (m.cls_classifier(m.deit.layernorm(z)[:, 0])
                                     + m.distillation_classifier(m.deit.layernorm(z)[:, 1])) / 2,
    "hf-dinov2-registers": lambda m, z: m.classifier(torch.cat(
        [m.dinov2_with_registers.layernorm(z)[:, 0], m.dinov2_with_registers.layernorm(z)[:, 5:].mean(1)], -1)),
    "hf-beit": lambda m, z: m.classifier(m.beit.pooler.layernorm(z[:, 1:].mean(1))),
}


def hf_slow(module, model, x, score, head):
    """One forward with an attention function that retains its softmax's gradient and hooks of the test's own on
    the layers; per block l, backward from head(tokens leaving l) and read block l's attention gradient."""
    outs: list[torch.Tensor] = []
    layers = [m for m in module.modules() if type(m).__name__.endswith("Layer")]
    handles = [layer.register_forward_hook(lambda m, a, o: outs.append(o[0] if isinstance(o, tuple) else o))
               for layer in layers]
    layout = model.layout(tuple(x.shape[-2:]))
    maps = []
    try:
        with retained_attention(module) as probs:
            module(pixel_values=x)
            for i, z in enumerate(outs):
                for p in probs:
                    p.grad = None
                score(head(module, z)).sum().backward(retain_graph=True)
                maps.append(probs[i].grad.clamp_min(0).mean(1).mean(1)[:, layout.num_prefix:])
    finally:
        for h in handles:
            h.remove()
    return _patch_grid(maps, layout)


@pytest.mark.parametrize("name", ["timm-vit", "timm-deit-distilled", "timm-vit-avg"])
@pytest.mark.parametrize("rows", ["all", "readout"])
def test_timm_matches_separate_forward_per_block(name, rows):
    module, x = build(name)
    model = vitlens.wrap(module)
    target = torch.tensor([2, 0, 4])
    exp = LeGrad(model, rows=rows).explain(x, target=target)
    want = timm_slow(module, model, x, target, rows)
    torch.testing.assert_close(exp.extras["raw"], want, atol=1e-7, rtol=1e-4)
    torch.testing.assert_close(exp.maps, want / want.flatten(1).amax(1)[:, None, None], atol=1e-5, rtol=1e-4)
    assert exp.extras["per_layer"].shape == (3, 3, 4, 4) and exp.target.tolist() == [2, 0, 4]


@pytest.mark.parametrize("name", list(HF_HEADS))
def test_transformers_match_independent_gradients_and_heads(name):
    module, x = build(name)
    model = vitlens.wrap(module)
    target = torch.tensor([1, 3, 0])
    exp = LeGrad(model).explain(x, target=target)
    want = hf_slow(module, model, x, lambda out: out.gather(1, target[:, None])[:, 0], HF_HEADS[name])
    torch.testing.assert_close(exp.extras["raw"], want, atol=1e-7, rtol=1e-4)


def test_start_layer_averages_the_later_blocks_only():
    module, x = build("timm-vit")
    model = vitlens.wrap(module)
    full = LeGrad(model).explain(x, target=1)
    late = LeGrad(model, start_layer=1).explain(x, target=1)
    torch.testing.assert_close(late.extras["per_layer"], full.extras["per_layer"][:, 1:])
    torch.testing.assert_close(late.extras["raw"], full.extras["per_layer"][:, 1:].mean(1))


class _Block(nn.Module):
    """A pre-norm block around batch-first nn.MultiheadAttention (as torchvision's EncoderBlock), asking it for
    weights per head so that vitlens can record them."""

    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.ln_1, self.ln_2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.self_attention = nn.MultiheadAttention(dim, heads, batch_first=True)
        self.mlp = nn.Sequential(nn.Linear(dim, 2 * dim), nn.GELU(), nn.Linear(2 * dim, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.ln_1(x)
        mha = self.self_attention
        _, w = mha(h, h, h, need_weights=True, average_attn_weights=False)  # [B, heads, N, N]
        # nn.MultiheadAttention returns a reshaped copy of the weights it used; mix the values with the returned
        # weights (the same numbers) so that they are in the graph (torchcam replays the same product in its hook)
        b, n, d = h.shape
        dim = mha.embed_dim
        v = nn.functional.linear(h, mha.in_proj_weight[2 * dim:], mha.in_proj_bias[2 * dim:])
        v = v.view(b, n, mha.num_heads, d // mha.num_heads).transpose(1, 2)
        x = x + mha.out_proj((w @ v).transpose(1, 2).reshape(b, n, d))
        return x + self.mlp(self.ln_2(x))


class _TinyMHAViT(nn.Module):
    def __init__(self, dim: int = 16, depth: int = 3, classes: int = 5) -> None:
        super().__init__()
        self.patch = nn.Conv2d(3, dim, 8, 8)
        self.cls = nn.Parameter(torch.randn(1, 1, dim))
        self.pos = nn.Parameter(torch.randn(1, 17, dim))
        self.blocks = nn.ModuleList(_Block(dim, 2) for _ in range(depth))
        self.norm, self.head = nn.LayerNorm(dim), nn.Linear(dim, classes)

    def tail(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.head(self.norm(tokens)[:, 0])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        t = self.patch(x).flatten(2).transpose(1, 2)
        t = torch.cat([self.cls.expand(t.shape[0], -1, -1), t], 1) + self.pos
        for blk in self.blocks:
            t = blk(t)
        return self.tail(t)


def test_equals_torchcam_legrad():
    """torchcam 0.5's LeGrad needs blocks with an nn.MultiheadAttention child `self_attention` (torchvision's ViT);
    none of the supported families is built that way, so both run on a tiny model of such blocks, which vitlens wraps
    by name. torchcam's score_projection is that model's own head, which vitlens reaches by passing the stacked
    tokens of every block through it."""
    pytest.importorskip("torchcam", reason="torchcam (test extra, Python >= 3.11) not installed")
    from torchcam.methods import LeGrad as TorchcamLeGrad

    torch.manual_seed(0)
    module = _TinyMHAViT().eval()
    x = torch.randn(3, 3, 32, 32)
    target = [4, 1, 2]
    model = GenericAdapter(module, "blocks.*.self_attention", kind="hf", num_prefix_tokens=1,
                                   readout="cls", patch_size=8, num_classes=5, run=lambda m, t: m(t))
    ours = LeGrad(model).explain(x, target=target)
    with TorchcamLeGrad(module, list(module.blocks), score_projection=module.tail, prefix_tokens=1,
                        grid_shape=(4, 4)) as extractor:
        scores = module(x)
        theirs = extractor(target, scores, normalized=False)[0]
    torch.testing.assert_close(ours.extras["raw"], theirs.detach(), atol=1e-7, rtol=1e-4)


def test_batch_equals_one_by_one():
    module, x = build("hf-dinov2-registers")
    m = LeGrad(vitlens.wrap(module))
    whole = m.explain(x)
    parts = [m.explain(x[i: i + 1]) for i in range(x.shape[0])]
    torch.testing.assert_close(whole.extras["raw"], torch.cat([p.extras["raw"] for p in parts]), atol=1e-7,
                               rtol=1e-4)


def test_callable_target_on_a_backbone_and_swin_refused():
    module = hf_vit(head=False)
    model = vitlens.wrap(module)
    x = torch.randn(2, 3, 32, 32)
    direction = torch.randn(32)
    exp = vitlens.METHODS["legrad"](model).explain(x, target=lambda f: f @ direction)
    want = hf_slow(module, model, x, lambda f: f @ direction, lambda m, z: m.pooler(m.layernorm(z)))
    torch.testing.assert_close(exp.extras["raw"], want, atol=1e-7, rtol=1e-4)
    assert exp.target is None
    with pytest.raises(VitlensError, match="plain ViTs"):
        LeGrad(vitlens.wrap(build_swin("hf-w4")[0]))
    assert not LeGrad.applies_to(vitlens.wrap(build_swin("timm-w4")[0]))
