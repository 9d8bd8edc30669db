"""LRP rules (vitlens.methods.lrp_rules), TransformerAttribution and AttnLRP: hand-worked rules, an explicit
relevance-form oracle (tests/lrp_oracle.py), conservation, batch == one by one, Swin, refusals."""

import pytest
import torch

import lrp_oracle
import vitlens
from factories import build, timm_vit
from test_swin import _build as build_swin
from vitlens.errors import VitlensError
from vitlens.methods import METHODS
from vitlens.methods.attnlrp import AttnLRP
from vitlens.methods.lrp_rules import CHEFER, LRPRules, attnlrp_rules, lrp_mode
from vitlens.methods.transformer_attribution import TransformerAttribution


def _relevance(rules: LRPRules, fn, *inputs: torch.Tensor, start: torch.Tensor) -> tuple[list, list]:
    """(relevance x * g, plain gradient) of each input, for output relevance given as the start gradient."""
    xs = [t.clone().requires_grad_(True) for t in inputs]
    with lrp_mode(rules) as mode:
        y = fn(*xs)
    plain = torch.autograd.grad(y, xs, start, retain_graph=True)
    with mode.relevance():
        g = torch.autograd.grad(y, xs, start)
    return [x.detach() * gi for x, gi in zip(xs, g)], list(plain)


def test_epsilon_rule_linear_relu_linear_by_hand():
    # x = (1, 2); z1 = W1 x + b1 = (-0.5, 3); relu -> (0, 3); y = W2 h = 6. Relevance 6 at y (gradient 1), eps = 1:
    # layer 2: contributions (0, 6), R_h = c * 6 / (6 + 1) = (0, 36/7); ReLU: identity;
    # layer 1: unit 2 contributions (2, 2), z = 3, R_x = (2, 2) * (36/7) / (3 + 1) = (18/7, 18/7)
    w1, b1 = torch.tensor([[1.0, -1.0], [2.0, 1.0]]), torch.tensor([0.5, -1.0])
    w2 = torch.tensor([[1.0, 2.0]])
    rules = attnlrp_rules(1.0)

    def net(x):
        return torch.nn.functional.linear(torch.relu(torch.nn.functional.linear(x, w1, b1)), w2)

    (r,), (plain,) = _relevance(rules, net, torch.tensor([1.0, 2.0]), start=torch.tensor([1.0]))
    torch.testing.assert_close(r, torch.tensor([18 / 7, 18 / 7]))
    torch.testing.assert_close(plain, torch.tensor([4.0, 2.0]))  # the same graph still gives the true gradient
    (r0,), _ = _relevance(attnlrp_rules(0.0), net, torch.tensor([1.0, 2.0]), start=torch.tensor([1.0]))
    # z-rule (eps 0): R_h = (0, 6); R_x = (2, 2) * 6 / 3 = (4, 4); the bias -1 takes -1 * 6 / 3 = -2
    torch.testing.assert_close(r0, torch.tensor([4.0, 4.0]))


def test_alpha1_beta0_linear_by_hand():
    # contributions w_kj x_j: unit 0 (1, -2) -> positive (1, 0), Z+ = 1; unit 1 (-1, 4) -> (0, 4), Z+ = 4.
    # relevance at the outputs (3, 7): R_x = (3 * 1/1, 7 * 4/4) = (3, 7); biases take nothing.
    w, b = torch.tensor([[1.0, 1.0], [-1.0, -2.0]]), torch.tensor([5.0, 6.0])
    y = torch.tensor([4.0, 9.0])  # W x + b
    (r,), _ = _relevance(CHEFER, lambda x: torch.nn.functional.linear(x, w, b), torch.tensor([1.0, -2.0]),
                         start=torch.tensor([3.0, 7.0]) / y)
    torch.testing.assert_close(r, torch.tensor([3.0, 7.0]))


def test_positive_part_equals_the_sum_of_positive_terms_even_where_it_cancels():
    """Z+ from the forward output and |W| |x| (one product) against sum_j max(w_kj x_j, 0) term by term, on outputs
    with no positive term (Z+ exactly 0), a nearly-all-negative output, a huge bias, and random ones."""
    from vitlens.methods.lrp_rules import positive_part

    torch.manual_seed(0)
    w = torch.randn(6, 5)
    w[0] = -1.0  # with x > 0: no positive term
    w[1] = torch.tensor([-1.0, -1.0, -1.0, -1.0, 1e-6])  # Z+ 1e-6 against |W||x| ~ 5: cancels without the fallback
    x = torch.rand(4, 5) + 0.5
    b = torch.randn(6)
    b[2] = 1e6
    out = torch.nn.functional.linear(x, w, b)
    w_split = torch.cat([w.clamp(min=0), w.clamp(max=0)], 1)
    z = positive_part(x, out, b, w_split, w.abs() / 2)
    want = (w[None] * x[:, None]).clamp(min=0).sum(-1)
    assert (z[:, 0] == 0).all()
    torch.testing.assert_close(z, want, rtol=1e-5, atol=0)
    # stabilised: Z+ + 1e-9, and +inf where Z+ is 0 (dividing by it is Chefer's safe_divide)
    stab = positive_part(x, out, b, w_split, w.abs() / 2, 1e-9)
    torch.testing.assert_close(stab, torch.where(want == 0, torch.inf, want + 1e-9), rtol=1e-5, atol=0)
    zero = torch.zeros(1, 5)  # |W| |x| = 0 and no bias: Z+ = 0 is found, not divided by 1e-9
    assert torch.isinf(positive_part(zero, torch.nn.functional.linear(zero, w), None, w_split, w.abs() / 2, 1e-9)).all()


def test_live_rows_finds_rows_with_any_non_zero_value():
    from vitlens.methods.lrp_rules import live_rows

    g = torch.zeros(2, 4, 3)
    g[0, 0] = torch.tensor([1.0, 2.0, 3.0])
    g[1, 2] = torch.tensor([0.0, 0.0, -1e-30])  # first value 0, yet live
    assert live_rows(g).tolist() == [0, 6]
    assert live_rows(torch.ones(2, 4, 3)) is None  # dense: no pruning
    dense = torch.ones(2, 4, 3)
    dense[0, :, 0] = 0  # first values 0 but every row live
    assert live_rows(dense) is None


def test_alpha1_beta0_rule_on_sparse_rows_equals_the_dense_rule(monkeypatch):
    """A gradient that is zero on most rows (the last block under a CLS readout) takes the pruned path; forcing the
    dense path gives the same relevance."""
    import vitlens.methods.lrp_rules as rules

    torch.manual_seed(1)
    w, b, x = torch.randn(5, 4), torch.randn(5), torch.randn(3, 6, 4)
    start = torch.zeros(3, 6, 5)
    start[:, 0] = torch.randn(3, 5)
    start[2, 4] = torch.randn(5)
    calls = []
    real = rules._z_plus_rows
    monkeypatch.setattr(rules, "_z_plus_rows", lambda g, *a: calls.append(g.numel() // g.shape[-1]) or real(g, *a))
    (sparse,), _ = _relevance(CHEFER, lambda v: torch.nn.functional.linear(v, w, b), x, start=start)
    monkeypatch.setattr(rules, "SPARSE_ROWS", 2.0)
    (dense,), _ = _relevance(CHEFER, lambda v: torch.nn.functional.linear(v, w, b), x, start=start)
    assert calls == [4, 18]  # 4 live rows of 18, then all of them
    torch.testing.assert_close(sparse, dense, rtol=0, atol=0)
    assert (sparse[:, 1:4] == 0).all() and sparse[:, 0].abs().sum() > 0


def test_chefer_add_rule_by_hand():
    # z = a + b = (4, 1), R_z = (2, 5): z-rule R_a = (0.5, 10) (sum 10.5), R_b = (1.5, -5) (sum -3.5), total 7;
    # shares |10.5| : |-3.5| = 3 : 1 -> R_a scaled to sum 5.25, R_b to sum 1.75
    a, b = torch.tensor([[1.0, 2.0]]), torch.tensor([[3.0, -1.0]])
    (ra, rb), _ = _relevance(CHEFER, lambda u, v: u + v, a, b, start=torch.tensor([[2.0, 5.0]]) / (a + b))
    torch.testing.assert_close(ra, torch.tensor([[0.25, 5.0]]))
    torch.testing.assert_close(rb, torch.tensor([[-0.75, 2.5]]))


def _tiny(seed: int = 0, biases: bool = True):
    """timm ViT: 2 blocks, 8 wide, 2 heads, 16 px with 8 px patches (4 patches + CLS = 5 tokens); weights ~N(0, 0.4)
    so that attention is far from uniform."""
    torch.manual_seed(seed)
    module = timm_vit(depth=2, embed_dim=8, num_heads=2, img_size=16)
    with torch.no_grad():
        for name, p in module.named_parameters():
            if not biases and (name.endswith("bias") or name in ("pos_embed", "cls_token")):
                p.zero_()
            elif name.endswith("norm1.weight") or name.endswith("norm2.weight") or name == "norm.weight":
                p.normal_(1.0, 0.3)
            else:
                p.normal_(0.0, 0.4)
    return module, torch.randn(3, 3, 16, 16)


@pytest.mark.parametrize("start_layer", [0, 1])
def test_transformer_attribution_equals_explicit_oracle(start_layer, monkeypatch):
    import vitlens.methods.lrp_rules as rules

    pruned = []  # the last block's MLP and projection see the CLS rows alone: their pruned rule is checked too
    real = rules.live_rows
    monkeypatch.setattr(rules, "live_rows", lambda g: pruned.append(r := real(g)) or r)
    module, x = _tiny()
    exp = TransformerAttribution(vitlens.wrap(module), start_layer=start_layer).explain(x, target=[0, 3, 4])
    for b, t in enumerate([0, 3, 4]):
        want = lrp_oracle.chefer_map(module, x[b], t, start_layer).float()
        torch.testing.assert_close(exp.maps[b], want, rtol=2e-4, atol=1e-5 * float(want.abs().max()))
    assert exp.maps.shape == (3, 2, 2) and exp.maps.dtype == torch.float32
    assert [r.tolist() for r in pruned if r is not None] == [[0, 5, 10]] * 3  # fc2, fc1, proj: CLS of 3 images


def test_attnlrp_pixels_equal_explicit_oracle():
    module, x = _tiny(1)
    exp = AttnLRP(vitlens.wrap(module), epsilon=1e-6).explain(x, target=2)
    for b in range(3):
        want = lrp_oracle.relevance(module, x[b], 2, "attnlrp", eps=1e-6)["pixels"].sum(0).float()
        scale = float(want.abs().max())
        torch.testing.assert_close(exp.extras["pixel"][b], want, rtol=1e-3, atol=2e-4 * scale)
        torch.testing.assert_close(exp.maps[b], want.reshape(2, 8, 2, 8).sum((1, 3)), rtol=1e-3, atol=1e-3 * scale)


def test_attnlrp_conserves_relevance_up_to_the_softmax_term_without_biases():
    """No biases, LayerNorm shifts, position embedding or CLS token: every rule but the softmax's conserves, so
    pixel relevance + what each softmax drops (sum R(A) - sum R(scores), from A and the relevance gradient at A)
    equals the target logit. Tolerance: 1e-4 relative (float32)."""
    module, x = _tiny(2, biases=False)
    model = vitlens.wrap(module)
    pixels = []
    handle = module.register_forward_pre_hook(lambda m, args: pixels.append(args[0]))
    with model.record(grads=True) as rec:
        with lrp_mode(attnlrp_rules(0.0)) as mode:
            logits = model(x)
        score = logits[:, 1]
        with mode.relevance():
            g_attn = rec.grads(score, retain_graph=True)
            (g_px,) = torch.autograd.grad(score.sum(), pixels[0])
    handle.remove()
    total = (pixels[0].detach() * g_px).flatten(1).sum(1)
    leak = torch.zeros(3, dtype=torch.float64)
    for a, g in zip(rec.probs, g_attn):
        a, g = a.detach().double(), g.double()
        r_out = (a * g).sum((1, 2, 3))
        # scores = log A + a constant per row; the softmax rule x * (R - s sum R) ignores that constant
        r_in = (a.clamp_min(1e-300).log() * a * (g - (a * g).sum(-1, keepdim=True))).sum((1, 2, 3))
        leak += r_out - r_in
    torch.testing.assert_close(total.double() + leak, score.detach().double(), rtol=1e-4, atol=1e-6)
    assert float(leak.abs().max()) > 1e-3 * float(score.detach().abs().max())  # the check is not vacuous
    exp = AttnLRP(model, epsilon=0.0).explain(x, target=1)
    torch.testing.assert_close(exp.extras["total"].double(), total.double(), rtol=1e-5, atol=1e-6)


def test_attnlrp_without_attention_products_conserves_exactly():
    """With q and k weights 0 every softmax is uniform with scores 0 (its rule drops R(A) entirely) and, without
    biases, the value path carries the rest: pixel relevance + sum R(A) over the blocks is the logit."""
    module, x = _tiny(3, biases=False)
    with torch.no_grad():
        for blk in module.blocks:
            blk.attn.qkv.weight[:16].zero_()
    model = vitlens.wrap(module)
    exp = AttnLRP(model, epsilon=0.0).explain(x, target=4)
    with model.record(grads=True) as rec:
        with lrp_mode(attnlrp_rules(0.0)) as mode:
            logits = model(x)
        with mode.relevance():
            g = rec.grads(logits[:, 4])
    dropped = sum((a * gi).sum((1, 2, 3)) for a, gi in zip(rec.probs, g))
    torch.testing.assert_close(exp.extras["total"] + dropped, exp.extras["score"], rtol=1e-4, atol=1e-6)


FAMILY_CASES = ["hf-vit", "hf-deit-teacher", "hf-dinov2-registers", "hf-beit", "timm-deit-distilled", "timm-vit-avg"]


@pytest.mark.parametrize("method", ["transformer_attribution", "attnlrp"])
@pytest.mark.parametrize("name", FAMILY_CASES + ["swin:hf-w4-padded", "swin:timm-w4-padded"])
def test_batch_equals_one_by_one(method, name):
    module, x = build_swin(name[5:]) if name.startswith("swin:") else build(name)
    x = x[:2]
    m = METHODS[method](vitlens.wrap(module))
    whole = m.explain(x)
    parts = [m.explain(x[i: i + 1]) for i in range(x.shape[0])]
    got, want = whole.maps, torch.cat([p.maps for p in parts])
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4 * float(want.abs().max()))
    assert float(want.abs().max()) > 0
    assert got.shape[1:] == vitlens.wrap(module).stage_plan(tuple(x.shape[-2:])).layouts[0].grid


def test_callable_target_equals_index_target():
    module, x = build("hf-vit")
    model = vitlens.wrap(module)
    for cls in (TransformerAttribution, AttnLRP):
        by_index = cls(model).explain(x, target=2)
        by_fn = cls(model).explain(x, target=lambda out: out[:, 2])
        torch.testing.assert_close(by_fn.maps, by_index.maps)


def test_attnlrp_pixel_pool_and_per_patch_sums():
    module, x = build("timm-vit")
    model = vitlens.wrap(module)
    pix = AttnLRP(model, pool="pixel").explain(x)
    patch = AttnLRP(model).explain(x)
    assert pix.maps.shape == (3, 32, 32) and patch.maps.shape == (3, 4, 4)
    torch.testing.assert_close(patch.maps, pix.maps.reshape(3, 4, 8, 4, 8).sum((2, 4)), rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(patch.maps.flatten(1).sum(1), patch.extras["total"], rtol=1e-4, atol=1e-6)


def test_models_without_rules_are_refused_in_one_line():
    module, x = build_swin("hfv2-w4")  # cosine attention (F.normalize): no LRP rule
    for cls in (TransformerAttribution, AttnLRP):
        with pytest.raises(VitlensError, match="no LRP rule for the operation 'normalize'") as e:
            cls(vitlens.wrap(module)).explain(x)
        assert "\n" not in str(e.value)


def test_transformer_attribution_per_layer_ends_at_the_map_and_options_are_checked():
    module, x = build("hf-deit-teacher")
    exp = TransformerAttribution(vitlens.wrap(module), per_layer=True).explain(x)
    torch.testing.assert_close(exp.extras["per_layer"][:, -1], exp.maps)
    with pytest.raises(VitlensError, match="start_layer"):
        TransformerAttribution(vitlens.wrap(module), start_layer=3)
    with pytest.raises(VitlensError, match="pool"):
        AttnLRP(vitlens.wrap(module), pool="token")
