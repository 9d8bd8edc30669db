"""Rollout, GradRollout and AttentionMaps against plain-loop references, hand-worked examples and batch splits."""

import math

import numpy as np
import pytest
import torch

import vitlens
from factories import FAMILIES, build, hf_vit, timm_vit
from oracles import directional_derivative, loop_rollout, retain_grad_attention
from vitlens.errors import VitlensError
from vitlens.methods.rollout import add_residual, discard_lowest


def test_discard_and_residual_by_hand_3x3():
    a = torch.tensor([[[0.10, 0.50, 0.40], [0.20, 0.70, 0.10], [0.30, 0.05, 0.65]]])
    # N^2 = 9, ratio 0.34 -> floor(3.06) = 3 lowest: 0.05 (2,1), 0.10 (0,0: kept), 0.10 (1,2)
    kept = discard_lowest(a, 0.34)
    want = torch.tensor([[[0.10, 0.50, 0.40], [0.20, 0.70, 0.00], [0.30, 0.00, 0.65]]])
    torch.testing.assert_close(kept, want)
    r = add_residual(want, 0.5, normalize=True)
    row0 = torch.tensor([0.55, 0.25, 0.20])  # (0.05+0.5, 0.25, 0.2) sums to 1.0
    row1 = torch.tensor([0.10, 0.85, 0.00]) / 0.95
    row2 = torch.tensor([0.15, 0.00, 0.825]) / 0.975
    torch.testing.assert_close(r[0], torch.stack([row0, row1, row2]))
    torch.testing.assert_close(add_residual(want, 0.0, normalize=False), want)
    # ratio 0.7 -> floor(6.3) = 6 lowest zeroed; [0, 0] = 0.10 survives
    most = discard_lowest(a, 0.7)
    torch.testing.assert_close(most, torch.tensor([[[0.10, 0.50, 0.0], [0.0, 0.70, 0.0], [0.0, 0.0, 0.65]]]))


def test_discard_cuts_ties_in_row_major_order():
    # five equal values 0.2 and the cut falls among them: the first ones in row-major order go (as the explorer page)
    a = torch.tensor([[[0.9, 0.2, 0.2], [0.2, 0.5, 0.2], [0.2, 0.1, 0.6]]]).repeat(3, 1, 1)
    # floor(0.45 * 9) = 4 lowest: 0.1 (2,1), then the ties (0,1), (0,2), (1,0)
    want = torch.tensor([[0.9, 0.0, 0.0], [0.0, 0.5, 0.2], [0.2, 0.0, 0.6]])
    torch.testing.assert_close(discard_lowest(a, 0.45), want.expand(3, 3, 3))
    # and the same as a plain loop over sorted (value, index) pairs for random matrices with many ties
    g = torch.Generator().manual_seed(0)
    m = torch.randint(0, 4, (5, 6, 6), generator=g).float() / 4
    for ratio in (0.2, 0.5, 0.8):
        k = int(ratio * 36)
        ref = m.clone().reshape(5, 36)
        for b in range(5):
            order = sorted(range(36), key=lambda e: (float(ref[b, e]), e))
            keep0 = ref[b, 0].item()
            ref[b, order[:k]] = 0.0
            ref[b, 0] = keep0
        torch.testing.assert_close(discard_lowest(m, ratio), ref.view(5, 6, 6))


def _captured(model, x):
    with torch.no_grad(), model.record() as rec:
        model(x)
    return [p.double().numpy() for p in rec.probs]


OPTIONS = [
    dict(),
    dict(head_fusion="max", discard_ratio=0.6),
    dict(head_fusion="min", discard_ratio=0.5, start_layer=1, residual_weight=0.3, normalize=False),
]


@pytest.mark.parametrize("name", list(FAMILIES))
@pytest.mark.parametrize("opts", OPTIONS, ids=["default", "max-discard", "min-start-noNorm"])
def test_rollout_matches_plain_loop(name, opts):
    module, x = build(name)
    model = vitlens.wrap(module)
    layout = model.layout(tuple(x.shape[-2:]))
    exp = vitlens.Rollout(model, per_layer=True, **opts).explain(x)
    attns = _captured(model, x)
    w = layout.readout_weights().double().numpy()
    for b in range(x.shape[0]):
        ref = loop_rollout([a[b] for a in attns], w, layout.num_prefix, layout.grid, **opts)
        np.testing.assert_allclose(exp.maps[b].numpy(), ref[-1], atol=2e-5)
        np.testing.assert_allclose(exp.extras["per_layer"][b].numpy(), np.stack(ref), atol=2e-5)
    assert exp.maps.dtype == torch.float32 and exp.maps.shape == (x.shape[0], *layout.grid)


def test_seed_report_variant_is_expressible():
    """No normalisation, A + I (no halving), first block skipped: the constant factor 2 per block cancels."""
    module, x = build("hf-vit")
    model = vitlens.wrap(module)
    attns = _captured(model, x)
    result = np.eye(attns[0].shape[-1])
    for a in attns[1:]:
        result = (a[0].mean(0) + np.eye(len(result))) @ result
    want = result[0, 1:].reshape(4, 4)
    got = vitlens.Rollout(model, normalize=False, residual_weight=0.5, start_layer=1).explain(x[:1]).maps[0]
    np.testing.assert_allclose(got.numpy(), want / want.max(), atol=1e-5)


@pytest.mark.parametrize("name", ["hf-vit", "hf-deit-teacher", "hf-dinov2-registers", "hf-beit"])
def test_grad_rollout_matches_loop_with_independent_gradients(name):
    module, x = build(name)
    model = vitlens.wrap(module)
    layout = model.layout(tuple(x.shape[-2:]))
    target = torch.tensor([1, 3, 0])
    exp = vitlens.GradRollout(model, discard_ratio=0.5).explain(x, target=target)
    assert exp.target.tolist() == [1, 3, 0]
    attns = _captured(model, x)
    grads = [g.double().numpy() for g in retain_grad_attention(module, x, target)]
    w = layout.readout_weights().double().numpy()
    for b in range(x.shape[0]):
        # vit-explain's order: mean over heads of attention * gradient, then clamp at 0 (one fused "head")
        weighted = [np.clip((a[b] * g[b]).mean(0, keepdims=True), 0, None) for a, g in zip(attns, grads)]
        ref = loop_rollout(weighted, w, layout.num_prefix, layout.grid, discard_ratio=0.5)
        np.testing.assert_allclose(exp.maps[b].numpy(), ref[-1], atol=2e-5)


def test_gradients_belong_to_their_own_blocks():
    """vit-explain's issue #6: gradients were paired with blocks in reverse. Each block's gradient must equal the
    directional derivative of the score when only that block's attention is perturbed."""
    torch.manual_seed(1)
    module = timm_vit(depth=4).double()
    model = vitlens.wrap(module)
    x = torch.randn(2, 3, 32, 32, dtype=torch.float64)
    target = torch.tensor([2, 4])
    with model.record(grads=True) as rec:
        logits = model(x)
        grads = rec.grads(logits.gather(1, target[:, None]))
    for block in range(4):
        delta = torch.randn_like(rec.probs[block])
        want = directional_derivative(module, x, target, block, delta)
        got = float((grads[block] * delta).sum())
        assert math.isclose(got, want, rel_tol=1e-6, abs_tol=1e-9), (block, got, want)


@pytest.mark.parametrize("method", ["attention", "rollout", "grad_rollout"])
@pytest.mark.parametrize("name", ["hf-vit", "timm-deit-distilled", "hf-dinov2-registers"])
def test_batch_equals_samples_one_by_one(method, name):
    module, x = build(name)
    m = vitlens.METHODS[method](vitlens.wrap(module))
    whole = m.explain(x)
    parts = [m.explain(x[i : i + 1]) for i in range(x.shape[0])]
    torch.testing.assert_close(whole.maps, torch.cat([p.maps for p in parts]), atol=1e-5, rtol=1e-4)
    for key in whole.extras:
        if whole.extras[key].ndim > 1:
            torch.testing.assert_close(whole.extras[key], torch.cat([p.extras[key] for p in parts]), atol=1e-5,
                                       rtol=1e-4)


def test_attention_maps_queries_match_captured_rows():
    module, x = build("timm-vit-registers")
    model = vitlens.wrap(module)
    attns = _captured(model, x)
    p = 5  # 1 CLS + 4 registers
    cls = vitlens.AttentionMaps(model, "cls").explain(x).extras["per_head"]
    patch = vitlens.AttentionMaps(model, (2, 3)).explain(x).extras["per_head"]
    mean = vitlens.AttentionMaps(model, "mean").explain(x).extras["per_head"]
    for layer, a in enumerate(attns):
        np.testing.assert_allclose(cls[:, layer].numpy(), a[:, :, 0, p:].reshape(3, 4, 4, 4), atol=1e-6)
        np.testing.assert_allclose(patch[:, layer].numpy(), a[:, :, p + 2 * 4 + 3, p:].reshape(3, 4, 4, 4), atol=1e-6)
        np.testing.assert_allclose(mean[:, layer].numpy(), a.mean(2)[:, :, p:].reshape(3, 4, 4, 4), atol=1e-6)


def test_options_out_of_range_are_refused():
    model = vitlens.wrap(hf_vit())
    for kwargs, msg in [
        (dict(head_fusion="median"), "head_fusion"),
        (dict(discard_ratio=1.0), "discard_ratio"),
        (dict(discard_ratio=-0.1), "discard_ratio"),
        (dict(start_layer=3), "start_layer"),
        (dict(residual_weight=1.5), "residual_weight"),
    ]:
        with pytest.raises(VitlensError, match=msg):
            vitlens.Rollout(model, **kwargs)
    with pytest.raises(VitlensError, match="out of range"):
        vitlens.GradRollout(model).explain(torch.randn(1, 3, 32, 32), target=5)
    with pytest.raises(VitlensError, match="outside the 4x4 patch grid"):
        vitlens.AttentionMaps(model, (4, 0)).explain(torch.randn(1, 3, 32, 32))


def test_backbone_refuses_class_specific_methods_but_runs_rollout():
    model = vitlens.wrap(hf_vit(head=False))
    x = torch.randn(2, 3, 32, 32)
    assert vitlens.Rollout(model).explain(x).maps.shape == (2, 4, 4)
    with pytest.raises(VitlensError, match="backbone without a classification head"):
        vitlens.GradRollout(model).explain(x)


def test_no_cls_model_refuses_cls_query():
    model = vitlens.wrap(build("timm-vit-avg")[0])
    with pytest.raises(VitlensError, match="no CLS token"):
        vitlens.AttentionMaps(model, "cls").explain(torch.randn(1, 3, 32, 32))
