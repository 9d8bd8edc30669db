"""record(): captured attention equals attention recomputed by hand; the model is left exactly as it was."""

import pytest
import torch

import vitlens
from factories import FAMILIES, build, hf_vit, timm_vit
from oracles import attention_modules, recompute_attention
from vitlens.errors import VitlensError


@pytest.mark.parametrize("name", list(FAMILIES))
def test_captured_attention_equals_hand_recomputation(name):
    module, x = build(name)
    model = vitlens.wrap(module)
    _, size, num_prefix, readout = FAMILIES[name]
    layout = model.layout(size)
    assert (layout.num_prefix, layout.readout) == (num_prefix, readout)
    expected = recompute_attention(module, x)
    with torch.no_grad(), model.record() as rec:
        model(x)
    assert rec.captured() == list(range(model.num_blocks)) == list(range(len(expected)))
    for got, want in zip(rec.probs, expected):
        assert got.shape == (x.shape[0], want.shape[1], layout.num_tokens, layout.num_tokens)
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("name", list(FAMILIES))
def test_readout_weights_cover_exactly_the_tokens_the_head_reads(name):
    """Independent check of the pooling: in the last block, attention output row j only reaches token j, so the
    logits' gradient with respect to that output is non-zero exactly on the tokens the head pools."""
    module, x = build(name)
    model = vitlens.wrap(module)
    last = attention_modules(module)[-1]
    grabbed = {}

    def hook(m, a, out):
        t = out[0] if isinstance(out, tuple) else out
        t.retain_grad()
        grabbed["t"] = t

    h = last.register_forward_hook(hook)
    try:
        model.forward(x).sum().backward()
    finally:
        h.remove()
    support = grabbed["t"].grad.abs().sum((0, 2)) > 0
    w = model.layout(tuple(x.shape[-2:])).readout_weights()
    assert torch.equal(support, w > 0)


def _state(module):
    flags = [getattr(m, "fused_attn", None) for m in module.modules()]
    impls = [m.config._attn_implementation for m in module.modules() if hasattr(m, "config")]
    hooks = sum(len(m._forward_hooks) + len(m._forward_pre_hooks) + len(m._backward_hooks) for m in module.modules())
    return dict(flags=flags, impls=impls, hooks=hooks, training=[m.training for m in module.modules()],
                grad=[p.requires_grad for p in module.parameters()])


@pytest.mark.parametrize("builder", [hf_vit, timm_vit])
@pytest.mark.parametrize("grads", [False, True])
def test_model_state_restored_even_after_an_error(builder, grads):
    module = builder()
    model = vitlens.wrap(module)
    module.train()  # wrap puts it in eval; the user's mode must come back after record
    next(module.parameters()).requires_grad_(False)
    before = _state(module)
    with pytest.raises(RuntimeError, match="boom"), model.record(grads=grads):
        model(torch.randn(1, 3, 32, 32))
        raise RuntimeError("boom")
    assert _state(module) == before
    with model.record(grads=grads) as rec:
        model(torch.randn(1, 3, 32, 32))
    assert len(rec.captured()) == model.num_blocks
    assert _state(module) == before


def test_error_inside_a_hook_still_removes_every_hook():
    module = hf_vit()
    model = vitlens.wrap(module)
    before = _state(module)

    def bad_stream(i, p):
        raise ValueError("consumer failed")

    with pytest.raises(ValueError, match="consumer failed"), model.record(stream=bad_stream):
        model(torch.randn(1, 3, 32, 32))
    assert _state(module) == before


def test_record_leaves_outputs_unchanged_and_restores_fused_kernels():
    module = timm_vit()
    model = vitlens.wrap(module)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        fused = model(x)
        with model.record():
            explicit = model(x)
    torch.testing.assert_close(fused, explicit, atol=1e-5, rtol=1e-4)
    assert all(b.attn.fused_attn for b in module.blocks)


def test_hf_sdpa_model_is_switched_to_eager_and_back():
    module = hf_vit()
    module.set_attn_implementation("sdpa")
    model = vitlens.wrap(module)
    with torch.no_grad(), model.record() as rec:
        model(torch.randn(1, 3, 32, 32))
    assert all(p is not None for p in rec.probs)
    assert module.config._attn_implementation == "sdpa"


def test_blocks_selection_and_streaming():
    model = vitlens.wrap(timm_vit())
    seen = []
    with torch.no_grad(), model.record(blocks=[0, -1], stream=lambda i, p: seen.append((i, p.shape))) as rec:
        model(torch.randn(2, 3, 32, 32))
    assert [i for i, _ in seen] == [0, 2]
    assert rec.captured() == []  # streamed blocks are not stored
    with pytest.raises(VitlensError, match="out of range"), model.record(blocks=[7]):
        pass


def test_grads_need_record_with_grads():
    model = vitlens.wrap(hf_vit())
    with torch.no_grad(), model.record() as rec:
        out = model(torch.randn(1, 3, 32, 32))
    with pytest.raises(VitlensError, match="record\\(grads=True\\)"):
        rec.grads(out[:, 0])


def test_module_without_attention_is_refused():
    with pytest.raises(VitlensError, match="not a supported ViT-family model"):
        vitlens.wrap(torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3)))


def _grads_of_one_run(model, x, target):
    """d logit[target] / d probs of every block from a single, un-nested record."""
    with model.record(grads=True) as rec:
        out = model(x)
    return rec.grads(out[:, target])


@pytest.mark.parametrize("builder", [hf_vit, timm_vit])
def test_nested_records_with_grads_keep_both_gradients(builder):
    """An inner record(grads=True) must not switch the outer record's gradients off when it exits."""
    torch.manual_seed(0)
    module = builder()
    model = vitlens.wrap(module)
    x = torch.randn(2, 3, 32, 32)
    want = _grads_of_one_run(model, x, 1)
    before = _state(module)
    with model.record(grads=True) as outer:
        with model.record(grads=True) as inner:
            out = model(x)
            got_inner = inner.grads(out[:, 1], retain_graph=True)
        got_outer_same_pass = outer.grads(out[:, 1])
        out = model(x)  # a forward after the inner record closed: still with gradients
        got_outer = outer.grads(out[:, 1])
    assert _state(module) == before
    for got in (got_inner, got_outer_same_pass, got_outer):
        assert len(got) == len(want) == model.num_blocks
        for g, w in zip(got, want):
            torch.testing.assert_close(g, w, atol=1e-6, rtol=1e-5)
    assert any(float(w.abs().sum()) > 0 for w in want)  # the comparison is not between zeros


def test_records_closed_out_of_order_restore_the_model():
    """Records entered by hand and closed outer-first: gradients stay on while one is open, every flag comes back."""
    module = hf_vit()
    model = vitlens.wrap(module)
    next(module.parameters()).requires_grad_(False)
    before = _state(module)
    x = torch.randn(1, 3, 32, 32)
    want = _grads_of_one_run(model, x, 0)
    a, b = model.record(grads=True), model.record(grads=True)
    a.__enter__()
    rec = b.__enter__()
    a.__exit__(None, None, None)  # the outer one closes first
    out = model(x)
    got = rec.grads(out[:, 0])
    b.__exit__(None, None, None)
    assert _state(module) == before
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, atol=1e-6, rtol=1e-5)
