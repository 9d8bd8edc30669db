"""GAE (Chefer et al. 2021): a hand-worked 3-token case, a plain per-block loop on every family kind (Swin across
stages), independent gradients, start_layer, batch == one by one and callable targets on a backbone."""

import pytest
import torch

import vitlens
from factories import build, hf_vit
from oracles import retain_grad_attention
from test_swin import _build as build_swin
from vitlens.errors import VitlensError
from vitlens.layout import StagePlan, TokenLayout
from vitlens.methods.gae import GaeAccumulator, GenericAttention, gae_fuse


def test_three_tokens_by_hand():
    """1 CLS + a 1x2 patch grid, 2 heads, 2 blocks. Per-head clamp then mean (GradRollout's mean-then-clamp would give
    row 0 of block 0 = clamp(mean([1,-1,1],[0,2,-2])) = [0.5, 0.5, 0] instead of [0.5, 1, 0.5])."""
    z = [0.0, 0.0, 0.0]
    a0 = torch.tensor([[[0.5, 0.25, 0.25], [0, 1, 0], [0, 0, 1]], [[0.2, 0.4, 0.4], [0, 1, 0], [0, 0, 1]]])
    g0 = torch.tensor([[[2.0, -4, 4], z, z], [[0.0, 5, -5], z, z]])
    # head 0: A*G row 0 = [1, -1, 1] -> [1, 0, 1]; head 1: [0, 2, -2] -> [0, 2, 0]; mean: F0 row 0 = [0.5, 1, 0.5]
    a1 = torch.tensor([[[0.5, 0, 0.5], [0, 1, 0], [0.5, 0, 0.5]], [[0, 0, 1.0], [0, 1, 0], [1, 0, 0]]])
    g1 = torch.tensor([[[0.0, 0, 4], z, [4, 0, 0]], [[0, 0, -1.0], z, z]])
    # head 0: A*G = 2 at (0, 2) and (2, 0); head 1: -1 at (0, 2) -> 0; mean: F1 = 1 at (0, 2) and (2, 0)
    f0, f1 = gae_fuse(a0[None], g0[None])[0], gae_fuse(a1[None], g1[None])[0]
    torch.testing.assert_close(f0, torch.tensor([[0.5, 1, 0.5], z, z]))
    torch.testing.assert_close(f1, torch.tensor([[0.0, 0, 1], z, [1, 0, 0]]))
    # R1 = I + F0 = [[1.5, 1, .5], [0, 1, 0], [0, 0, 1]]; R2 = R1 + F1 R1: row 0 += R1 row 2, row 2 += R1 row 0
    plan = StagePlan((TokenLayout(1, (1, 2), "cls"),), (0, 0))
    acc = GaeAccumulator(plan, start_layer=0)
    acc.add(0, f0[None])
    acc.add(1, f1[None])
    torch.testing.assert_close(acc.result[0], torch.tensor([[1.5, 1, 1.5], [0, 1, 0], [1.5, 1, 1.5]]))
    torch.testing.assert_close(acc.map(), torch.tensor([[[1.0, 1.5]]]))  # R2[0, 1:] on the 1x2 grid
    late = GaeAccumulator(plan, start_layer=1)  # block 0 counts as nothing: R = I + F1
    late.add(0, f0[None])
    late.add(1, f1[None])
    torch.testing.assert_close(late.map(), torch.tensor([[[0.0, 1.0]]]))


def loop_gae(probs, grads, plan, start_layer):
    """One sample, float64, plain loops over blocks and heads: R = I; R = R + mean_h clamp(G_h A_h, 0) @ R."""
    r, stage = torch.eye(plan.layouts[0].num_tokens, dtype=torch.float64), 0
    for i, (a, g) in enumerate(zip(probs, grads)):
        while stage < plan.block_stage[i]:
            r = plan.transitions[stage].double() @ r
            stage += 1
        if i < start_layer:
            continue
        fused = torch.zeros_like(r[:, :1].expand(-1, a.shape[-1]).clone())
        for h in range(a.shape[0]):
            fused += torch.clamp(a[h].double() * g[h].double(), min=0) / a.shape[0]
        r = r + fused @ r
    w = plan.layouts[stage].readout_weights(dtype=torch.float64)
    first = plan.layouts[0]
    return (w @ r)[first.num_prefix:].view(first.grid)


def _probs_and_grads(model, x, score_fn):
    with model.record(grads=True) as rec:
        out = model(x)
        grads = rec.grads(score_fn(out))
    return [p.detach() for p in rec.probs], grads


@pytest.mark.parametrize(("name", "start_layer"), [
    ("hf-vit", 0), ("hf-deit-teacher", 1), ("hf-dinov2-registers", 0), ("hf-beit", 1), ("timm-vit-avg", 0),
    ("timm-deit-distilled", 1), ("timm-vit-registers", 0), ("hf-w4-padded", 3), ("timm-w4-padded", 0)])
def test_matches_plain_loop(name, start_layer):
    """start_layer 3 on Swin: the stage-0 transition is crossed before the first block counted (R starts as it)."""
    module, x = build_swin(name) if name in ("hf-w4-padded", "timm-w4-padded") else build(name)
    model = vitlens.wrap(module)
    target = torch.arange(x.shape[0]) % 5
    exp = GenericAttention(model, start_layer=start_layer).explain(x, target=target)
    probs, grads = _probs_and_grads(model, x, lambda out: out.gather(1, target[:, None])[:, 0])
    plan = model.stage_plan(tuple(x.shape[-2:]))
    for b in range(x.shape[0]):
        want = loop_gae([p[b] for p in probs], [g[b] for g in grads], plan, start_layer)
        torch.testing.assert_close(exp.extras["raw"][b].double(), want, atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(exp.maps[b].double(), want / want.max(), atol=1e-5, rtol=1e-4)
    assert exp.maps.shape == (x.shape[0], *plan.layouts[0].grid) and exp.target.tolist() == target.tolist()


def test_gradients_from_an_independent_path():
    """HF ViT: the gradients come from an attention function that retains its own softmax's gradient."""
    module, x = build("hf-vit")
    model = vitlens.wrap(module)
    target = torch.tensor([4, 0, 2])
    exp = GenericAttention(model).explain(x, target=target)
    with torch.no_grad(), model.record() as rec:
        model(x)
    grads = retain_grad_attention(module, x, target)
    plan = model.stage_plan(tuple(x.shape[-2:]))
    for b in range(3):
        want = loop_gae([p[b] for p in rec.probs], [g[b] for g in grads], plan, 0)
        torch.testing.assert_close(exp.extras["raw"][b].double(), want, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("name", ["timm-deit-distilled", "hf-w4-padded"])
def test_batch_equals_one_by_one(name):
    module, x = build_swin(name) if name == "hf-w4-padded" else build(name)
    m = GenericAttention(vitlens.wrap(module))
    whole = m.explain(x)
    parts = [m.explain(x[i: i + 1]) for i in range(x.shape[0])]
    torch.testing.assert_close(whole.maps, torch.cat([p.maps for p in parts]), atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(whole.extras["raw"], torch.cat([p.extras["raw"] for p in parts]), atol=1e-5,
                               rtol=1e-4)


def test_callable_target_on_a_backbone():
    model = vitlens.wrap(hf_vit(head=False))
    x = torch.randn(2, 3, 32, 32)
    direction = torch.randn(32)
    exp = vitlens.METHODS["gae"](model).explain(x, target=lambda feats: feats @ direction)
    probs, grads = _probs_and_grads(model, x, lambda feats: feats @ direction)
    plan = model.stage_plan((32, 32))
    for b in range(2):
        torch.testing.assert_close(exp.extras["raw"][b].double(), loop_gae([p[b] for p in probs],
                                   [g[b] for g in grads], plan, 0), atol=1e-5, rtol=1e-4)
    assert exp.target is None and exp.probs is None
    with pytest.raises(VitlensError, match="backbone"):
        GenericAttention(model).explain(x)
    with pytest.raises(VitlensError, match="start_layer"):
        GenericAttention(model, start_layer=3)
