"""Occlusion: the batched windows against a slow loop that covers one window at a time."""

from __future__ import annotations

import pytest
import torch

from vitlens.errors import VitlensError
from vitlens.images import Preprocess
from vitlens.methods.lime import ImageClassifier
from vitlens.methods.occlusion import Occlusion

IDENTITY = Preprocess(size=(20, 24), mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0))


def _net() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3, padding=1), torch.nn.ReLU(), torch.nn.AdaptiveAvgPool2d(3),
                               torch.nn.Flatten(), torch.nn.Linear(36, 5)).eval()


def slow_occlusion(net, x, target, window, stride, fill, probs=True):
    """One window at a time, by slicing."""
    score = (lambda z: net(z).softmax(-1)) if probs else net
    with torch.no_grad():
        base = score(x[None])[0, target]
        h, w = x.shape[-2:]
        rows = []
        for y0 in range(0, h - window[0] + 1, stride[0]):
            row = []
            for x0 in range(0, w - window[1] + 1, stride[1]):
                z = x.clone()
                z[:, y0 : y0 + window[0], x0 : x0 + window[1]] = fill[:, y0 : y0 + window[0], x0 : x0 + window[1]]
                row.append(base - score(z[None])[0, target])
            rows.append(torch.stack(row))
    return torch.stack(rows)


@pytest.mark.parametrize("baseline", [0.0, 0.7, "mean"])
@pytest.mark.parametrize("window,stride", [((4, 6), (4, 6)), ((5, 5), (3, 2))])
def test_batched_equals_slow_loop(baseline, window, stride):
    net = _net()
    x = torch.rand(2, 3, 20, 24)
    occ = Occlusion(ImageClassifier(net, IDENTITY), window=window, stride=stride, baseline=baseline, batch_size=7,
                    output="logits")
    exp = occ.explain(x, target=[1, 3])
    for b, t in enumerate([1, 3]):
        fill = x[b].mean((1, 2), keepdim=True).expand_as(x[b]) if baseline == "mean" else torch.full_like(x[b],
                                                                                                          baseline)
        ref = slow_occlusion(net, x[b], t, window, stride, fill, probs=False)
        assert torch.allclose(exp.extras["drop"][b], ref, atol=1e-5)
        pos = ref.clamp_min(0)
        assert torch.allclose(exp.maps[b], pos / pos.max(), atol=1e-5)


def test_probabilities_are_the_default():
    net = _net()
    x = torch.rand(3, 20, 24)
    exp = Occlusion(ImageClassifier(net, IDENTITY), window=10, baseline=0.0).explain(x, target=2)
    ref = slow_occlusion(net, x, 2, (10, 10), (10, 10), torch.zeros_like(x), probs=True)
    assert torch.allclose(exp.extras["drop"][0], ref, atol=1e-7)


def test_logits_blur_and_batch_size_invariance():
    net = _net()
    x = torch.rand(1, 3, 20, 24)
    a = Occlusion(net, window=4, baseline="blur", batch_size=1, output="logits").explain(x)
    b = Occlusion(net, window=4, baseline="blur", batch_size=64, output="logits").explain(x)
    assert a.maps.shape == (1, 5, 6)
    assert torch.allclose(a.extras["drop"], b.extras["drop"], atol=1e-5)


def test_bad_options():
    with pytest.raises(VitlensError, match="window"):
        Occlusion(_net(), window=0)
    with pytest.raises(VitlensError, match="baseline"):
        Occlusion(_net(), baseline="zeros")
    with pytest.raises(VitlensError, match="larger"):
        Occlusion(ImageClassifier(_net(), IDENTITY), window=30).explain(torch.rand(1, 3, 20, 24))
