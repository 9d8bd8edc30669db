"""LIME: planted linear weights recovered, seeding, batch-size invariance, the ridge against sklearn, token drop."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from vitlens.errors import VitlensError
from vitlens.images import Preprocess
from vitlens.methods.lime import Lime, lime_kernel, weighted_ridge
from vitlens.methods.segmentation import grid_segments
from vitlens.models.classifier import CallableClassifier

IDENTITY = Preprocess(size=(32, 32), mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0))
torch.manual_seed(0)
W_TRUE = torch.randn(3, 16)
B_TRUE = torch.tensor([0.5, -1.0, 2.0])


def planted(x: torch.Tensor) -> torch.Tensor:
    """Logits = W p + b, p[s] = mean of channel 0 over 8x8 cell s (1 when shown on a white image, 0 when hidden)."""
    p = F.avg_pool2d(x[:, :1], 8).flatten(1)  # [B, 16], cells in row-major order = grid segment ids
    return p @ W_TRUE.T + B_TRUE


def model() -> CallableClassifier:
    return CallableClassifier(planted, preprocess=IDENTITY)


WHITE = torch.ones(3, 32, 32)


def lime(**kw) -> Lime:
    opts = dict(segmentation="grid", n_segments=16, num_samples=300, batch_size=64, hide=0.0, output="logits",
                alpha=1e-6)
    opts.update(kw)
    return Lime(model(), **opts)


def test_grid_segments_match_the_planted_cells():
    seg = grid_segments(32, 32, 16)
    assert seg.max() == 15 and (seg[:8, :8] == 0).all() and (seg[8:16, 8:16] == 5).all()


def test_recovers_planted_weights_for_every_class():
    exp = lime().explain(WHITE, target=2)
    cw = exp.extras["class_weights"][0]  # [C, S]
    assert torch.allclose(cw, W_TRUE, atol=1e-4)
    assert torch.allclose(exp.extras["weights"][0], W_TRUE[2], atol=1e-4)
    assert exp.extras["intercept"][0].item() == pytest.approx(B_TRUE[2].item(), abs=1e-4)
    assert exp.extras["score"][0].item() == pytest.approx(1.0, abs=1e-6)
    # maps: positive weights painted on the cells, divided by the max
    pos = W_TRUE[2].clamp_min(0)
    expected = (pos / pos.max())[torch.from_numpy(grid_segments(32, 32, 16))]
    assert torch.allclose(exp.maps[0], expected, atol=1e-4)
    assert exp.maps.shape == (1, 32, 32)


def test_ridge_matches_sklearn():
    from sklearn.linear_model import Ridge

    g = torch.Generator().manual_seed(1)
    z = torch.randint(0, 2, (80, 7), generator=g).bool()
    y = torch.randn(80, 2, generator=g, dtype=torch.float64)
    w = lime_kernel(z, 0.25)
    coef, icpt, r2 = weighted_ridge(z, y, w, alpha=1.0)
    for c in range(2):
        ref = Ridge(alpha=1.0).fit(z.numpy().astype(float), y[:, c].numpy(), sample_weight=w.numpy())
        assert np.allclose(coef[c].numpy(), ref.coef_, atol=1e-8)
        assert icpt[c].item() == pytest.approx(ref.intercept_, abs=1e-8)
        assert r2[c].item() == pytest.approx(ref.score(z.numpy().astype(float), y[:, c].numpy(), w.numpy()), abs=1e-8)


def test_kernel_is_lime_s():
    from sklearn.metrics import pairwise_distances

    z = torch.tensor([[1, 1, 1, 1], [1, 0, 1, 0], [0, 0, 0, 1]]).bool()
    d = pairwise_distances(z.numpy().astype(float), np.ones((1, 4)), metric="cosine").ravel()
    assert np.allclose(lime_kernel(z, 0.25).numpy(), np.sqrt(np.exp(-(d**2) / 0.25**2)))


def test_same_seed_same_result_and_other_seed_other_masks():
    a = lime(seed=3, alpha=1.0).explain(WHITE)
    b = lime(seed=3, alpha=1.0).explain(WHITE)
    assert torch.equal(a.extras["class_weights"], b.extras["class_weights"])
    assert not torch.equal(lime(seed=3).sample_masks(16), lime(seed=4).sample_masks(16))
    assert lime().sample_masks(16)[0].all()


def test_batch_size_does_not_change_the_result():
    a = lime(batch_size=7, alpha=1.0).explain(WHITE)
    b = lime(batch_size=300, alpha=1.0).explain(WHITE)
    assert torch.equal(a.extras["class_weights"], b.extras["class_weights"])


class ShapeLog:
    """A classifier wrapper recording the batch size of every forward."""

    def __init__(self, inner) -> None:
        self.inner, self.rows = inner, []

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        self.rows.append(x.shape[0])
        return self.inner(x)

    def __getattr__(self, name):
        return getattr(self.inner, name)


@pytest.mark.parametrize("hide", [0.5, "drop"])
def test_a_real_vit_gives_bit_identical_weights_for_every_batch_size(hide):
    """A float32 ViT forward is not bitwise the same for every batch shape; LIME's forwards always run in chunks of
    FORWARD_CHUNK rows starting at the same samples, so every batch size gives the same bits."""
    from tests.factories import hf_vit

    from vitlens.methods.base import FORWARD_CHUNK
    from vitlens.models.loading import wrap

    torch.manual_seed(0)
    vit = wrap(hf_vit().eval())
    x = torch.randn(3, *vit.preprocess.size)
    results, logs = [], []
    for batch_size in (1, 33, 64, 500):
        m = Lime(vit, segmentation="grid", n_segments=16, num_samples=150, batch_size=batch_size, hide=hide, seed=5)
        m.model = log = ShapeLog(m.model)
        results.append(m.explain(x).extras["class_weights"])
        logs.append(log.rows)
    assert all(torch.equal(results[0], r) for r in results[1:])
    if hide != "drop":  # token dropping runs the model's blocks directly
        assert logs[0] == [1] + [FORWARD_CHUNK] * (150 // FORWARD_CHUNK) + [150 % FORWARD_CHUNK]
        assert all(rows == logs[0] for rows in logs[1:])


def test_mean_hide_paints_each_segment_with_its_mean():
    m = lime(hide="mean")
    x = torch.rand(3, 32, 32)
    seg = torch.from_numpy(grid_segments(32, 32, 16))
    hidden = m.hidden_image(x, seg, 16)
    assert torch.allclose(hidden[:, :8, :8], x[:, :8, :8].mean((1, 2))[:, None, None].expand(3, 8, 8), atol=1e-6)


def test_slic_segmentation_and_plain_nn_module():
    pytest.importorskip("skimage")
    net = torch.nn.Sequential(torch.nn.AdaptiveAvgPool2d(2), torch.nn.Flatten(), torch.nn.Linear(12, 4))
    img = torch.rand(1, 3, 32, 32)
    exp = Lime(net, segmentation="slic", n_segments=10, num_samples=40, batch_size=16).explain(img)
    assert exp.maps.shape == (1, 32, 32) and exp.extras["class_weights"].shape[:2] == (1, 4)
    assert int(exp.extras["num_segments"][0]) == int(exp.extras["segments"].max()) + 1


def test_bad_options():
    with pytest.raises(VitlensError, match="segmentation"):
        lime(segmentation="watershed")
    with pytest.raises(VitlensError, match="hide"):
        lime(hide="purple")
    with pytest.raises(VitlensError, match="grid"):
        lime(segmentation="slic", hide="drop")
    with pytest.raises(VitlensError, match="num_samples"):
        lime(num_samples=1)


def test_drop_removes_tokens_timm():
    """With no segment hidden, dropping is the plain forward; hiding a cell equals the model on the kept tokens."""
    from factories import timm_vit
    from vitlens.models.loading import load_model

    torch.manual_seed(0)
    vm = load_model(timm_vit())
    x = torch.randn(1, 3, 32, 32)
    m = Lime(vm, segmentation="grid", n_segments=4, num_samples=30, batch_size=8, hide="drop")
    exp = m.explain(x)
    assert exp.extras["class_weights"].shape == (1, 5, 4)
    from vitlens.models.token_drop import TokenDropper

    d = TokenDropper(vm, x[0])
    full = torch.ones(1, 16, dtype=torch.bool)
    assert torch.allclose(d(full), vm(x), atol=1e-5)
    # oracle: timm with patch_drop keeping the same tokens, done by hand through the module
    keep = full.clone()
    keep[0, :4] = False
    mod = vm.module
    with torch.no_grad():
        t = mod._pos_embed(mod.patch_embed(x))
        t = torch.cat([t[:, :1], t[:, 1 + 4 :]], 1)
        ref = mod.forward_head(mod.norm(mod.blocks(t)))
        assert torch.allclose(d(keep), ref, atol=1e-5)
    a = Lime(vm, segmentation="grid", n_segments=4, num_samples=30, batch_size=3, hide="drop").explain(x)
    assert torch.allclose(a.extras["class_weights"], exp.extras["class_weights"], atol=1e-5)


def _hf_vit_on_tokens(module, x: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """Oracle: logits of the HF ViT's own forward when its embedding layer's output is replaced by the CLS token and
    the KEPT patches only, each embedding built by hand (patch pixels . conv weight + bias + its position)."""
    emb = module.vit.embeddings
    conv = emb.patch_embeddings.projection
    ph, pw = conv.kernel_size
    gw = x.shape[-1] // pw
    pos = emb.position_embeddings[0]  # [1 + N, D]: CLS first, then patches row-major
    tokens = [emb.cls_token[0, 0] + pos[0]]
    for t in keep.nonzero()[:, 0].tolist():
        r, c = divmod(t, gw)
        patch = x[0, :, r * ph : (r + 1) * ph, c * pw : (c + 1) * pw]
        tokens.append((conv.weight * patch).sum((1, 2, 3)) + conv.bias + pos[1 + t])
    handle = emb.register_forward_hook(lambda m, a, out: torch.stack(tokens)[None])
    try:
        return module(pixel_values=x).logits
    finally:
        handle.remove()


def test_drop_hf_vit_partial_keep_equals_the_model_on_the_kept_tokens():
    """HF ViT token dropping with patches really dropped (different patterns, same count, batched) against the
    model's own forward on hand-built embeddings of the kept patches; keeping every patch is the plain forward."""
    from factories import hf_vit
    from vitlens.models.loading import load_model
    from vitlens.models.token_drop import TokenDropper

    torch.manual_seed(0)
    vm = load_model(hf_vit())
    x = torch.randn(1, 3, 32, 32)
    d = TokenDropper(vm, x[0])
    g = torch.Generator().manual_seed(3)
    keep = torch.zeros(4, 16, dtype=torch.bool)
    for row in keep:
        row[torch.randperm(16, generator=g)[:9]] = True
    assert len({tuple(r.tolist()) for r in keep}) == 4  # four different patterns of 9 kept patches
    with torch.no_grad():
        got = d(keep)
        full = vm(x)
        for k, row in enumerate(keep):
            want = _hf_vit_on_tokens(vm.module, x, row)
            torch.testing.assert_close(got[k : k + 1], want, atol=1e-5, rtol=1e-4)
            assert not torch.allclose(want, full, atol=1e-3)  # dropping changed the output
        torch.testing.assert_close(d(torch.ones(1, 16, dtype=torch.bool)), full, atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(_hf_vit_on_tokens(vm.module, x, torch.ones(16, dtype=torch.bool)), full,
                                   atol=1e-5, rtol=1e-4)
    exp = Lime(vm, segmentation="grid", n_segments=4, num_samples=20, hide="drop").explain(x)
    assert exp.maps.shape == (1, 32, 32)
