"""Rollout's row-only path (block matrices kept, readout row times them at the end) against the matrix chain, and
the allocation-free residual against the identity-matrix formula; record() leaves train/eval modes as they were."""

import pytest
import torch

import vitlens
from factories import build
from test_swin import CONFIGS as SWIN
from test_swin import _build as swin_build
from vitlens.methods.rollout import ROW_ONLY_ELEMENTS, RolloutAccumulator, add_residual


@pytest.mark.parametrize("w", [0.0, 0.3, 0.5, 1.0])
@pytest.mark.parametrize("normalize", [True, False])
def test_add_residual_equals_identity_formula(w, normalize):
    a = torch.rand(2, 5, 5)
    a[0, 1] = 0.0  # a zero row: normalisation must not divide by zero
    before = a.clone()
    want = (1 - w) * a + w * torch.eye(5)
    if normalize:
        want = want / want.sum(-1, keepdim=True).clamp_min(torch.finfo(a.dtype).tiny)
    torch.testing.assert_close(add_residual(a, w, normalize), want, rtol=0, atol=1e-7)
    assert torch.equal(a, before)  # the input is not modified


def _both(model, x, **opts):
    """(row-only map, matrix-chain map) of the same rollout."""
    method = vitlens.Rollout(model, **opts)
    plan = model.stage_plan(tuple(x.shape[-2:]))
    maps = []
    for row_only in (True, False):
        acc = method.accumulator(plan, x.shape[0])
        acc.row_only = row_only
        with torch.no_grad(), model.record(stream=lambda i, p, acc=acc: acc.add(i, p.mean(1))):
            model(x)
        maps.append(acc.map())
    return maps


@pytest.mark.parametrize("name", ["hf-deit-teacher", "timm-vit-avg", "hf-dinov2-registers"])
@pytest.mark.parametrize("opts", [dict(), dict(start_layer=1, residual_weight=0.2, normalize=False)])
def test_row_only_equals_matrix_chain(name, opts):
    module, x = build(name)
    row, chain = _both(vitlens.wrap(module), x, **opts)
    torch.testing.assert_close(row, chain, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("name", ["hf-w4-padded", "timm-w4"])
@pytest.mark.parametrize("start_layer", [0, 3])  # 3: the first rolled-out block is past a stage transition
def test_row_only_equals_matrix_chain_across_swin_stages(name, start_layer):
    module, x = swin_build(name)
    row, chain = _both(vitlens.wrap(module), x, start_layer=start_layer)
    torch.testing.assert_close(row, chain, rtol=1e-5, atol=1e-7)


def test_rollout_uses_row_only_when_small_and_chain_for_per_layer():
    module, x = build("timm-vit")
    model = vitlens.wrap(module)
    plan = model.stage_plan(tuple(x.shape[-2:]))
    assert vitlens.Rollout(model).accumulator(plan, 3).row_only
    assert not vitlens.Rollout(model, per_layer=True).accumulator(plan, 3).row_only
    huge = ROW_ONLY_ELEMENTS // (model.num_blocks * plan.layouts[0].num_tokens ** 2) + 1
    assert not vitlens.Rollout(model).accumulator(plan, huge).row_only
    assert isinstance(vitlens.Rollout(model).accumulator(plan), RolloutAccumulator)
    # the public result is the same either way
    exp = vitlens.Rollout(model).explain(x)
    per = vitlens.Rollout(model, per_layer=True).explain(x)
    torch.testing.assert_close(exp.maps, per.maps, rtol=1e-5, atol=1e-6)


def test_record_restores_mixed_training_modes():
    module, x = build("timm-vit")
    model = vitlens.wrap(module)
    module.train()
    module.blocks[1].eval()
    before = [m.training for m in module.modules()]
    with torch.no_grad(), model.record():
        assert not any(m.training for m in module.modules())
        model(x)
    assert [m.training for m in module.modules()] == before
    module.eval()
    with model.record():
        pass
    assert not any(m.training for m in module.modules())


assert SWIN  # the Swin configurations are shared with test_swin
