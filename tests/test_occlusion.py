"""Occlusion: the batched windows against a slow loop that covers one window at a time; the image-sized map against
a per-pixel loop and a hand-worked 4x4 example."""

from __future__ import annotations

import pytest
import torch

from vitlens.errors import VitlensError
from vitlens.images import Preprocess
from vitlens.methods.occlusion import Occlusion
from vitlens.models.classifier import CallableClassifier

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


def slow_pixel_map(drop, starts_y, starts_x, window, size):
    """Each pixel's mean drop over the windows that cover it, one pixel at a time (0 where no window covers it)."""
    h, w = size
    out = torch.zeros(h, w)
    for r in range(h):
        for c in range(w):
            covering = [drop[i, j] for i, y0 in enumerate(starts_y) for j, x0 in enumerate(starts_x)
                        if y0 <= r < y0 + window[0] and x0 <= c < x0 + window[1]]
            if covering:
                out[r, c] = sum(covering) / len(covering)
    return out


@pytest.mark.parametrize("baseline", [0.0, 0.7, "mean"])
@pytest.mark.parametrize("window,stride", [((4, 6), (4, 6)), ((5, 5), (3, 2)), ((7, 6), (4, 5))])
def test_batched_equals_slow_loop(baseline, window, stride):
    net = _net()
    x = torch.rand(2, 3, 20, 24)
    occ = Occlusion(CallableClassifier(net, IDENTITY), window=window, stride=stride, baseline=baseline, batch_size=7,
                    output="logits")
    exp = occ.explain(x, target=[1, 3])
    assert exp.maps.shape == (2, 20, 24)
    for b, t in enumerate([1, 3]):
        fill = x[b].mean((1, 2), keepdim=True).expand_as(x[b]) if baseline == "mean" else torch.full_like(x[b],
                                                                                                          baseline)
        ref = slow_occlusion(net, x[b], t, window, stride, fill, probs=False)
        assert torch.allclose(exp.extras["drop"][b], ref, atol=1e-5)
        pos = ref.clamp_min(0)
        assert torch.allclose(exp.extras["grid"][b], pos / pos.max(), atol=1e-5)
        ys = list(range(0, 20 - window[0] + 1, stride[0]))
        xs = list(range(0, 24 - window[1] + 1, stride[1]))
        pixel = slow_pixel_map(ref, ys, xs, window, (20, 24))
        assert torch.allclose(exp.extras["pixel_drop"][b], pixel, atol=1e-5)
        assert torch.allclose(exp.maps[b], pixel.clamp_min(0) / pixel.clamp_min(0).max(), atol=1e-5)


def _linear_probe(weight: torch.Tensor):
    """Toy classifier: logit 0 = sum over pixels of ``weight`` * channel 0, logit 1 = 0."""

    def fn(z: torch.Tensor) -> torch.Tensor:
        s = (z[:, 0] * weight).sum((1, 2))
        return torch.stack([s, torch.zeros_like(s)], 1)

    return fn


def test_hand_worked_4x4_window_2_stride_1():
    """Covering a window with 0 drops logit 0 by the sum of ``weight`` inside it: S[i, j] = 4 W[i, j] + 10 for
    W = arange(16) as 4x4. A pixel's value is the mean of S over the (1, 2 or 4) windows that cover it."""
    weight = torch.arange(16.0).view(4, 4)
    x = torch.zeros(1, 3, 4, 4)
    x[:, 0] = 1.0
    model = CallableClassifier(_linear_probe(weight), Preprocess(size=(4, 4), mean=(0.0,) * 3, std=(1.0,) * 3))
    exp = Occlusion(model, window=2, stride=1, baseline=0.0, output="logits").explain(x, target=0)
    grid = torch.tensor([[10.0, 14, 18], [26, 30, 34], [42, 46, 50]])
    pixel = torch.tensor([[10.0, 12, 16, 18],  # (0, 1): (10 + 14) / 2; (1, 1): (10 + 14 + 26 + 30) / 4 = 20
                          [18, 20, 24, 26],
                          [34, 36, 40, 42],
                          [42, 44, 48, 50]])
    torch.testing.assert_close(exp.extras["drop"][0], grid)
    torch.testing.assert_close(exp.extras["pixel_drop"][0], pixel)
    torch.testing.assert_close(exp.maps[0], pixel / 50)
    torch.testing.assert_close(exp.extras["coverage"], torch.tensor([[1, 2, 2, 1], [2, 4, 4, 2], [2, 4, 4, 2],
                                                                     [1, 2, 2, 1]]))


def test_pixels_no_window_covers_are_zero():
    """5x5 image, window 2, stride 2: windows start at 0 and 2, so row 4 and column 4 are never covered."""
    weight = torch.ones(5, 5)
    x = torch.zeros(1, 3, 5, 5)
    x[:, 0] = 1.0
    model = CallableClassifier(_linear_probe(weight), Preprocess(size=(5, 5), mean=(0.0,) * 3, std=(1.0,) * 3))
    exp = Occlusion(model, window=2, stride=2, baseline=0.0, output="logits").explain(x, target=0)
    want = torch.zeros(5, 5)
    want[:4, :4] = 4.0  # each covered pixel lies in exactly one window, whose 4 pixels each carry weight 1
    torch.testing.assert_close(exp.extras["pixel_drop"][0], want)
    assert int(exp.extras["coverage"][4].sum()) == int(exp.extras["coverage"][:, 4].sum()) == 0
    assert bool(torch.isfinite(exp.maps).all())


def test_batch_equals_one_by_one():
    net = _net()
    x = torch.rand(3, 3, 20, 24)
    occ = Occlusion(CallableClassifier(net, IDENTITY), window=(6, 5), stride=(3, 4), baseline="blur", batch_size=5)
    together = occ.explain(x, target=[0, 4, 2])
    for b, t in enumerate([0, 4, 2]):
        alone = occ.explain(x[b : b + 1], target=t)
        for key in ("drop", "grid", "pixel_drop"):
            torch.testing.assert_close(together.extras[key][b], alone.extras[key][0], atol=1e-6, rtol=1e-5)
        torch.testing.assert_close(together.maps[b], alone.maps[0], atol=1e-6, rtol=1e-5)


def test_probabilities_are_the_default():
    net = _net()
    x = torch.rand(3, 20, 24)
    exp = Occlusion(CallableClassifier(net, IDENTITY), window=10, baseline=0.0).explain(x, target=2)
    ref = slow_occlusion(net, x, 2, (10, 10), (10, 10), torch.zeros_like(x), probs=True)
    assert torch.allclose(exp.extras["drop"][0], ref, atol=1e-7)


def test_logits_blur_and_batch_size_invariance():
    net = _net()
    x = torch.rand(1, 3, 20, 24)
    a = Occlusion(net, window=4, baseline="blur", batch_size=1, output="logits").explain(x)
    b = Occlusion(net, window=4, baseline="blur", batch_size=64, output="logits").explain(x)
    assert a.maps.shape == (1, 20, 24) and a.extras["grid"].shape == (1, 5, 6)
    assert torch.allclose(a.extras["drop"], b.extras["drop"], atol=1e-5)


def test_a_real_vit_gives_bit_identical_drops_for_every_batch_size():
    from tests.factories import hf_vit

    from vitlens.models.loading import wrap

    torch.manual_seed(0)
    vit = wrap(hf_vit().eval())
    x = torch.randn(1, 3, *vit.preprocess.size)
    drops = [Occlusion(vit, window=4, stride=2, baseline="blur", batch_size=b).explain(x).extras["drop"]
             for b in (1, 40, 500)]
    assert all(torch.equal(drops[0], d) for d in drops[1:])


def test_bad_options():
    with pytest.raises(VitlensError, match="window"):
        Occlusion(_net(), window=0)
    with pytest.raises(VitlensError, match="baseline"):
        Occlusion(_net(), baseline="zeros")
    with pytest.raises(VitlensError, match="larger"):
        Occlusion(CallableClassifier(_net(), IDENTITY), window=30).explain(torch.rand(1, 3, 20, 24))


def test_image_sized_map_is_drawn_pixel_for_pixel():
    """The figures blend ``maps[0]`` over the preprocessed view: an image-sized map must land on the same pixels
    (no stretching of a window grid over the image)."""
    import numpy as np
    from PIL import Image

    from vitlens.viz.overlay import colormap, overlay

    weight = torch.zeros(20, 24)
    weight[12:, 18:] = 1.0  # only the bottom-right corner matters
    x = torch.ones(1, 3, 20, 24)
    model = CallableClassifier(_linear_probe(weight), IDENTITY)
    m = Occlusion(model, window=4, stride=2, baseline=0.0, output="logits").explain(x, target=0).maps[0]
    assert float(m[:10, :].abs().max()) == 0 and float(m[:, :16].abs().max()) == 0  # no window reaching it, no drop
    view = Image.fromarray(np.full((20, 24, 3), 128, np.uint8))
    got = np.asarray(overlay(view, m.numpy(), alpha=1.0), dtype=np.float32) / 255
    want = colormap("jet")(m.numpy())[..., :3]
    assert np.abs(got - want).max() <= 1 / 255 + 1e-6
