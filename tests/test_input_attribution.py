"""IG, InputXGradient and Saliency through captum: hand-written Riemann and Gauss-Legendre sums, completeness,
plain autograd for the one-pass methods, channel and patch pooling by hand, batch == one by one, callable targets
on a backbone, Swin's first-stage grid."""

import numpy as np
import pytest
import torch

import vitlens
from factories import build, hf_vit, timm_vit
from test_swin import _build as build_swin
from vitlens.errors import VitlensError

pytest.importorskip("captum", reason="captum (test extra) not installed")
from vitlens.methods.input_attribution import InputXGradient, IntegratedGradients, Saliency  # noqa: E402


def _tiny(depth=2):
    torch.manual_seed(0)
    module = timm_vit(depth=depth)
    return module, vitlens.wrap(module), torch.randn(2, 3, 32, 32)


def _grad(module, x, score):
    x = x.clone().requires_grad_(True)
    (g,) = torch.autograd.grad(score(module(x)).sum(), x)
    return g


def _class(t):
    return lambda out: out.gather(1, t[:, None])[:, 0]


def _pool_by_hand(pixels: np.ndarray, p: int) -> np.ndarray:
    b, h, w = pixels.shape
    return np.array([[[pixels[k, r * p:(r + 1) * p, c * p:(c + 1) * p].mean() for c in range(w // p)]
                      for r in range(h // p)] for k in range(b)])


@pytest.mark.parametrize("rule", ["riemann_right", "riemann_left", "gausslegendre"])
def test_ig_equals_a_hand_written_sum(rule):
    module, model, x = _tiny()
    t = torch.tensor([3, 1])
    n = 7
    if rule == "gausslegendre":
        nodes, weights = np.polynomial.legendre.leggauss(n)
        alphas, steps = (nodes + 1) / 2, weights / 2
    else:
        k = np.arange(1, n + 1) if rule == "riemann_right" else np.arange(n)
        alphas, steps = k / n, np.full(n, 1 / n)
    total = sum(float(s) * _grad(module, a * x, _class(t)) for a, s in zip(alphas, steps))
    want = (x * total).abs().sum(1)  # baseline 0: (x - 0) * integral of the gradient; |.| summed over RGB
    exp = IntegratedGradients(model, n_steps=n, quadrature=rule, internal_batch_size=3, pool="pixel").explain(x, t)
    np.testing.assert_allclose(exp.extras["raw"].numpy(), want.numpy(), rtol=1e-4, atol=1e-6)
    assert exp.maps.shape == (2, 32, 32) and exp.target.tolist() == [3, 1]


def test_ig_completeness_and_black_baseline():
    module, model, x = _tiny()
    t = torch.tensor([0, 4])
    ig = IntegratedGradients(model, n_steps=64, baseline="black", channels="signed", pool="patch")
    exp = ig.explain(x, t)
    x0 = ig.baseline_of(x)
    std = torch.tensor(model.preprocess.std, dtype=x.dtype).view(3, 1, 1)
    mean = torch.tensor(model.preprocess.mean, dtype=x.dtype).view(3, 1, 1)
    torch.testing.assert_close(x0[0] * std + mean, torch.zeros(3, 32, 32, dtype=x.dtype))  # black in pixels
    with torch.no_grad():
        gap = _class(t)(module(x)) - _class(t)(module(x0))
    total = exp.extras["pixels"].sum((1, 2))
    torch.testing.assert_close(total, gap, rtol=1e-3, atol=1e-4)  # completeness: sum = f(x) - f(baseline)
    assert float(exp.extras["delta"].abs().max()) < 1e-3 * float(gap.abs().max()) + 1e-4
    want = _pool_by_hand(exp.extras["pixels"].numpy(), 8)
    np.testing.assert_allclose(exp.extras["raw"].numpy(), want, rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(exp.maps.numpy(), want / np.abs(want).reshape(2, -1).max(1)[:, None, None],
                               rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("cls", [Saliency, InputXGradient])
def test_one_pass_methods_equal_autograd_and_pool_by_hand(cls):
    module, model, x = _tiny(depth=3)
    with torch.no_grad():
        top = module(x).argmax(-1)
    g = _grad(module, x, _class(top))
    a = g if cls is Saliency else x * g
    exp = cls(model).explain(x)  # top-1 by default, resolved on the same forward
    assert exp.target.tolist() == top.tolist()
    pixels = a.abs().sum(1).numpy()
    np.testing.assert_allclose(exp.extras["pixels"].numpy(), pixels, rtol=1e-4, atol=1e-7)
    want = _pool_by_hand(pixels, 8)
    np.testing.assert_allclose(exp.extras["raw"].numpy(), want, rtol=1e-4, atol=1e-7)
    np.testing.assert_allclose(exp.maps.numpy(), want / want.reshape(2, -1).max(1)[:, None, None], rtol=1e-4)
    signed = cls(model, channels="signed").explain(x, target=top)
    np.testing.assert_allclose(signed.extras["pixels"].numpy(), a.sum(1).numpy(), rtol=1e-4, atol=1e-7)
    torch.testing.assert_close(exp.logits, module(x).detach())


@pytest.mark.parametrize("name", ["ig", "saliency"])
def test_batch_equals_one_by_one(name):
    module, x = build("timm-deit-distilled")
    opts = {"n_steps": 5, "internal_batch_size": 4} if name == "ig" else {}
    m = vitlens.METHODS[name](vitlens.wrap(module), **opts)
    whole = m.explain(x, target=[0, 2, 4])
    parts = [m.explain(x[i: i + 1], target=[0, 2, 4][i]) for i in range(3)]
    torch.testing.assert_close(whole.extras["raw"], torch.cat([p.extras["raw"] for p in parts]), rtol=1e-4,
                               atol=1e-7)


@pytest.mark.parametrize("name", ["ig", "ixg", "saliency"])
def test_callable_target_on_a_backbone(name):
    torch.manual_seed(0)
    module = hf_vit(head=False)
    model = vitlens.wrap(module)
    x = torch.randn(2, 3, 32, 32)
    direction = torch.randn(32)

    def score(feats):
        return feats @ direction

    m = vitlens.METHODS[name](model, **({"n_steps": 4, "quadrature": "riemann_right"} if name == "ig" else {}))
    exp = m.explain(x, target=score)
    run = lambda inp: model(inp)  # noqa: E731 - the backbone's pooled features

    if name == "ig":
        want = x * sum(_grad(run, k / 4 * x, score) for k in range(1, 5)) / 4
    else:
        g = _grad(run, x, score)
        want = g if name == "saliency" else x * g
    torch.testing.assert_close(exp.extras["pixels"], want.abs().sum(1), rtol=1e-4, atol=1e-6)
    assert exp.target is None and exp.probs is None
    with pytest.raises(VitlensError, match="backbone"):
        m.explain(x)


def test_swin_first_stage_grid_and_errors():
    module, x = build_swin("hf-w4")
    model = vitlens.wrap(module)
    exp = Saliency(model).explain(x)
    assert exp.maps.shape == (2, *model.layout((32, 32)).grid) == (2, 16, 16)
    with pytest.raises(VitlensError, match="n_steps"):
        IntegratedGradients(model, n_steps=0)
    with pytest.raises(VitlensError, match="pool"):
        Saliency(model, pool="window")
