"""Attention flow: the layered max-flow solver against networkx and hand-worked graphs; the method against a
networkx max flow on the model's own attention graph (authors' construction), batch against one by one, Swin."""

import networkx as nx
import numpy as np
import pytest
import torch

import vitlens
from factories import build
from vitlens.errors import VitlensError
from vitlens.layered_flow import layered_max_flow
from vitlens.methods.flow import AttentionFlow


def nx_flow(source: np.ndarray, mats: list[np.ndarray], sink: int) -> float:
    """Max flow by networkx on the whole layered graph (every level-0 node kept), float capacities."""
    g = nx.DiGraph()
    top = len(mats)
    for i, c in enumerate(source):
        g.add_edge("src", (top, i), capacity=float(c))
    for k in range(top, 0, -1):
        m = mats[k - 1]
        for i in range(m.shape[0]):
            for j in range(m.shape[1]):
                g.add_edge((k, i), (k - 1, j), capacity=float(m[i, j]))
    g.add_node((0, sink))
    return nx.maximum_flow_value(g, "src", (0, sink))


def test_hand_worked_two_levels():
    # sigma -> (2,0) cap 1; (2,0) -> (1,0), (1,1) cap 0.5 each; (1,0) -> t=1 cap 0.3, (1,1) -> t=1 cap 0.6
    m0 = np.array([[[0.7, 0.3], [0.4, 0.6]]])
    m1 = np.array([[[0.5, 0.5], [0.9, 0.1]]])
    src = np.array([[1.0, 0.0]])
    flows, gaps = layered_max_flow(src, [m0], [0, 1])
    np.testing.assert_allclose(flows, [[0.7, 0.3]], rtol=1e-12)
    flows, gaps = layered_max_flow(src, [m0, m1], [0, 1])
    # to t=1: min(0.5, 0.3) + min(0.5, 0.6) = 0.8; to t=0: min(0.5, 0.7) + min(0.5, 0.4) = 0.9
    np.testing.assert_allclose(flows, [[0.9, 0.8]], rtol=1e-12)
    assert (gaps <= 1e-12).all()


def test_hand_worked_rerouting():
    # a greedy first path must be undone: only the residual back edge gives the max flow 2
    # sigma -> a, b (1 each); a -> c, d (1 each); b -> c (1); c -> t (1), d -> t (1)
    src = np.array([[1.0, 1.0]])  # level 2: a, b
    m1 = np.array([[[1.0, 1.0], [1.0, 0.0]]])  # level 2 -> level 1 (c, d)
    m0 = np.array([[[1.0, 0.0], [1.0, 0.0]]])  # level 1 -> level 0 (t = 0)
    flows, _ = layered_max_flow(src, [m0, m1], [0, 1])
    np.testing.assert_allclose(flows, [[2.0, 0.0]])


@pytest.mark.parametrize("kind", ["random", "ties", "zeros"])
def test_solver_equals_networkx(kind):
    rng = np.random.default_rng({"random": 0, "ties": 1, "zeros": 2}[kind])
    for _ in range(6):
        depth = int(rng.integers(1, 5))
        sizes = [int(v) for v in rng.integers(1, 9, size=depth + 1)]
        mats = []
        for k in range(depth):
            m = rng.random((2, sizes[k + 1], sizes[k]))
            if kind == "ties":
                m = np.round(m * 3) / 3  # many equal capacities and exact zeros
            if kind == "zeros":
                m[rng.random(m.shape) < 0.5] = 0.0
            mats.append(m)
        src = rng.random((2, sizes[-1]))
        if kind == "zeros":
            src[:, 0] = 0.0
        flows, gaps = layered_max_flow(src, mats, range(sizes[0]))
        for b in range(2):
            for t in range(sizes[0]):
                want = nx_flow(src[b], [m[b] for m in mats], t)
                assert flows[b, t] == pytest.approx(want, rel=1e-9, abs=1e-12)
                assert gaps[b, t] <= 1e-12 * max(flows[b, t], 1.0)


def test_solver_attention_sized_case_against_networkx():
    # 4 levels of 17 tokens, softmax rows with the residual, as attention flow builds them
    rng = np.random.default_rng(3)
    mats = []
    for _ in range(4):
        a = np.exp(3 * rng.normal(size=(17, 17)))
        a = 0.5 * a / a.sum(1, keepdims=True) + 0.5 * np.eye(17)
        mats.append((a / a.sum(1, keepdims=True))[None])
    src = np.eye(17)[:1]
    flows, _ = layered_max_flow(src, mats, range(17))
    want = [nx_flow(src[0], [m[0] for m in mats], t) for t in range(17)]
    np.testing.assert_allclose(flows[0], want, rtol=1e-9)


def test_solver_rejects_bad_capacities():
    with pytest.raises(VitlensError, match="non-negative"):
        layered_max_flow(np.ones((1, 2)), [-np.ones((1, 2, 2))], [0])
    with pytest.raises(VitlensError, match="must be"):
        layered_max_flow(np.ones((1, 3)), [np.ones((1, 2, 2))], [0])


def _fused(model, x, fusion="mean", w=0.5):
    """Each block's (1 - w) fused + w I, rows normalised, in float64 numpy (a plain re-implementation)."""
    with torch.no_grad(), model.record() as rec:
        model(x)
    out = []
    for p in rec.probs:
        p = p.double().numpy()
        a = {"mean": p.mean(1), "max": p.max(1), "min": p.min(1)}[fusion]
        a = (1 - w) * a + w * np.eye(a.shape[-1])
        out.append(a / a.sum(-1, keepdims=True))
    return out


@pytest.mark.parametrize("name", ["hf-vit", "timm-deit-distilled", "hf-dinov2-registers", "timm-vit-avg", "hf-beit"])
def test_method_equals_networkx_on_model_attention(name):
    module, x = build(name)
    model = vitlens.wrap(module)
    x = x[:2]
    layout = model.layout(tuple(x.shape[-2:]))
    opts = dict(head_fusion="max", residual_weight=0.3) if name == "hf-vit" else {}
    exp = AttentionFlow(model, **opts).explain(x)
    mats = _fused(model, x, opts.get("head_fusion", "mean"), opts.get("residual_weight", 0.5))
    w = layout.readout_weights().double().numpy()
    for b in range(2):
        want = [nx_flow(w, [m[b] for m in mats], t) for t in range(layout.num_prefix, layout.num_tokens)]
        np.testing.assert_allclose(exp.extras["flow"][b].flatten().numpy(), want, rtol=1e-9)
    assert exp.maps.shape == (2, *layout.grid) and exp.maps.dtype == torch.float32
    torch.testing.assert_close(exp.maps.amax((1, 2)), torch.ones(2))
    assert exp.extras["gap"] <= 1e-11 and exp.method == "flow"


def test_cls_readout_is_the_authors_flow_from_the_output_cls_node():
    # the authors: maximum_flow_value(G, output CLS node, input node) with edges from layer l+1 down to layer l
    module, x = build("timm-vit")
    model = vitlens.wrap(module)
    x = x[:1]
    mats = _fused(model, x)
    g = nx.DiGraph()
    n = mats[0].shape[-1]
    for layer, a in enumerate(mats):
        for i in range(n):
            for j in range(n):
                g.add_edge((layer + 1) * n + i, layer * n + j, capacity=float(a[0, i, j]))
    want = [nx.maximum_flow_value(g, len(mats) * n, t) for t in range(1, n)]
    got = AttentionFlow(model).explain(x).extras["flow"][0].flatten().numpy()
    np.testing.assert_allclose(got, want, rtol=1e-9)


def test_batch_equals_one_by_one():
    module, x = build("hf-deit-teacher")
    method = AttentionFlow(vitlens.wrap(module))
    full = method.explain(x)
    for b in range(x.shape[0]):
        one = method.explain(x[b: b + 1])
        torch.testing.assert_close(one.extras["flow"][0], full.extras["flow"][b], rtol=1e-10, atol=1e-13)
        torch.testing.assert_close(one.maps[0], full.maps[b])


def test_swin_through_the_stage_plan_equals_networkx():
    import transformers

    torch.manual_seed(0)
    cfg = transformers.SwinConfig(image_size=16, patch_size=2, embed_dim=8, depths=[1, 1], num_heads=[1, 2],
                                  window_size=4, num_labels=5)
    model = vitlens.wrap(transformers.SwinForImageClassification(cfg).eval())
    x = torch.randn(1, 3, 16, 16)
    plan = model.stage_plan((16, 16))
    exp = AttentionFlow(model).explain(x)
    a0, a1 = (m[0] for m in _fused(model, x))
    merge = plan.transitions[0].double().numpy()  # [16, 64]: each merged token takes 1/4 of its 2x2 parents
    w = plan.layouts[1].readout_weights().double().numpy()  # mean of the 16 last-stage tokens
    sinks = [0, 9, 27, 36, 63]
    want = [nx_flow(w, [a0, merge, a1], t) for t in sinks]
    np.testing.assert_allclose(exp.extras["flow"][0].flatten().numpy()[sinks], want, rtol=1e-9)
    assert exp.maps.shape == (1, 8, 8)


def test_declared_options_are_checked():
    module, _ = build("timm-vit")
    with pytest.raises(VitlensError, match="head_fusion"):
        AttentionFlow(vitlens.wrap(module), head_fusion="median")
    with pytest.raises(VitlensError, match="residual_weight"):
        AttentionFlow(vitlens.wrap(module), residual_weight=1.5)
    assert vitlens.methods.METHODS["flow"] is AttentionFlow


def test_missing_numba_is_one_clear_line(monkeypatch):
    import sys

    from vitlens import layered_flow

    layered_flow._engine.cache_clear()
    monkeypatch.setitem(sys.modules, "numba", None)
    try:
        with pytest.raises(VitlensError, match=r"needs numba: pip install 'vitlens\[flow\]'"):
            layered_max_flow(np.ones((1, 2)), [np.ones((1, 2, 2))], [0])
    finally:
        layered_flow._engine.cache_clear()
