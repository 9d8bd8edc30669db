"""Swin: window attention in image coordinates equals a per-token loop; rollout across stages; batch consistency."""

import pytest
import timm
import torch
import transformers

import vitlens
from swin_oracle import block_inputs, loop_attention, swin_blocks
from vitlens.models.swin import merge_matrix


def hf_swin(image=32, window=4, depths=(2, 2, 2), heads=(1, 2, 4), head=True):
    cfg = transformers.SwinConfig(image_size=image, patch_size=2, embed_dim=8, depths=list(depths),
                                  num_heads=list(heads), window_size=window, num_labels=5)
    cls = transformers.SwinForImageClassification if head else transformers.SwinModel
    return cls(cfg).eval()


def hf_swinv2(image=32, window=4, depths=(2, 2, 2), heads=(1, 2, 4), head=True):
    cfg = transformers.Swinv2Config(image_size=image, patch_size=2, embed_dim=8, depths=list(depths),
                                    num_heads=list(heads), window_size=window, num_labels=5)
    cls = transformers.Swinv2ForImageClassification if head else transformers.Swinv2Model
    return cls(cfg).eval()


def timm_swin(image=32, window=4, depths=(2, 2, 2), heads=(1, 2, 4)):
    return timm.create_model("swin_tiny_patch4_window7_224", pretrained=False, img_size=image, patch_size=2,
                             embed_dim=8, depths=depths, num_heads=heads, window_size=window, num_classes=5).eval()


def timm_swinv2(image=32, window=4, depths=(2, 2, 2), heads=(1, 2, 4)):
    return timm.create_model("swinv2_tiny_window8_256", pretrained=False, img_size=image, patch_size=2, embed_dim=8,
                             depths=depths, num_heads=heads, window_size=window, num_classes=5).eval()


CONFIGS = {
    # grids 16, 8, 4: divisible by window 4; the last stage is one unshifted window
    "hf-w4": (lambda: hf_swin(32, 4), 32),
    # grids 28, 14, 7 with window 7: the last stage is one unshifted window
    "hf-w7": (lambda: hf_swin(56, 7), 56),
    # grids 18, 9, 5 with window 4: padded (not divisible) in every stage, shifted windows with padding
    "hf-w4-padded": (lambda: hf_swin(36, 4), 36),
    # Swinv2 (cosine attention, continuous position bias, post-norm): same windows as v1
    "hfv2-w4": (lambda: hf_swinv2(32, 4), 32),
    "hfv2-w4-padded": (lambda: hf_swinv2(36, 4), 36),
    "timm-w4": (lambda: timm_swin(32, 4), 32),
    "timm-w7": (lambda: timm_swin(56, 7), 56),
    "timm-w4-padded": (lambda: timm_swin(36, 4), 36),
    "timmv2-w4": (lambda: timm_swinv2(32, 4), 32),
    "timmv2-w4-padded": (lambda: timm_swinv2(36, 4), 36),
}


def _build(name):
    torch.manual_seed(0)
    builder, size = CONFIGS[name]
    module = builder()
    with torch.no_grad():  # random relative position biases, so that the bias lookup matters
        for p in module.parameters():
            if p.ndim == 2 and p.shape[0] in (9, 49, 13 * 13, 7 * 7):
                p.normal_()
    return module, torch.randn(2, 3, size, size)


@pytest.mark.parametrize("name", list(CONFIGS))
def test_global_attention_equals_per_token_loop(name):
    module, x = _build(name)
    model = vitlens.wrap(module)
    with torch.no_grad(), model.record() as rec:
        model(x)
    inputs = block_inputs(module, x)
    blocks = swin_blocks(module)
    assert len(rec.captured()) == len(blocks) == len(inputs)
    shifted = 0
    for i, (blk, (hs, grid)) in enumerate(zip(blocks, inputs)):
        want = loop_attention(blk, hs, grid, timm_style=name.startswith("timm"))
        if name.startswith("timmv2") or name.startswith("hfv2"):
            assert type(blk).__name__ in ("SwinTransformerV2Block", "Swinv2Layer")
        got = rec.probs[i]
        assert got.shape == want.shape
        torch.testing.assert_close(got, want, atol=2e-5, rtol=1e-4)
        shifted += rec.meta[i]["shift"][0] > 0
        win = rec.meta[i]["window_id"].reshape(-1)
        assert (got[..., win[:, None] != win[None, :]] == 0).all()  # exactly 0 across windows
    assert shifted >= 2  # the configurations exercise shifted windows


def test_merge_matrix_by_hand():
    m = merge_matrix((3, 2))  # parents (0,0),(0,1),(1,0),(1,1) -> child 0; (2,0),(2,1) -> child 1
    want = torch.tensor([[0.25, 0.25, 0.25, 0.25, 0, 0], [0, 0, 0, 0, 0.5, 0.5]])
    torch.testing.assert_close(m, want)


@pytest.mark.parametrize("name", ["hf-w4-padded", "hfv2-w4-padded", "timm-w4"])
def test_rollout_across_stages_matches_dense_product(name):
    module, x = _build(name)
    model = vitlens.wrap(module)
    plan = model.stage_plan(tuple(x.shape[-2:]))
    with torch.no_grad(), model.record() as rec:
        model(x)
    exp = vitlens.Rollout(model, discard_ratio=0.3, start_layer=1).explain(x)
    for b in range(x.shape[0]):
        result, stage = torch.eye(plan.layouts[0].num_tokens, dtype=torch.float64), 0
        for i, p in enumerate(rec.probs):
            while stage < plan.block_stage[i]:
                result = plan.transitions[stage].double() @ result
                stage += 1
            if i < 1:
                continue
            a = p[b].double().mean(0)
            n = a.shape[0]
            k = int(0.3 * n * n)
            flat = a.flatten().clone()
            low = sorted(range(n * n), key=lambda t: float(flat[t]))[:k]
            for t in low:
                if t != 0:
                    flat[t] = 0
            a = 0.5 * flat.view(n, n) + 0.5 * torch.eye(n, dtype=torch.float64)
            a = a / a.sum(-1, keepdim=True)
            result = a @ result
        want = result.mean(0).view(plan.layouts[0].grid)
        torch.testing.assert_close(exp.maps[b].double(), want / want.max(), atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("method", ["attention", "rollout", "grad_rollout"])
@pytest.mark.parametrize("name", ["hf-w4-padded", "hfv2-w4", "timm-w7", "timmv2-w4-padded"])
def test_swin_batch_equals_one_by_one(method, name):
    module, x = _build(name)
    m = vitlens.METHODS[method](vitlens.wrap(module), **({"query": (3, 5)} if method == "attention" else {}))
    whole = m.explain(x)
    parts = [m.explain(x[i : i + 1]) for i in range(x.shape[0])]
    torch.testing.assert_close(whole.maps, torch.cat([p.maps for p in parts]), atol=1e-5, rtol=1e-4)


# A 12 px image with 2 px patches: a 6x6 token grid (token (r, c) has index 6 r + c), window 4, and the second block
# shifted by 2. Both libraries work on an 8x8 grid (two rows and columns of padding) cut into 2x2 windows of 4x4,
# numbered row-major; a token's place inside its window is 4 * (row % 4) + col % 4 of its position on that grid.
#   HF pads first, then rolls by -2: token row r sits on row (r - 2) % 8, so rows 2..5 -> 0..3 (window row 0) and
#     rows 0, 1 -> 6, 7 (window row 1, where the padding rows sit on 4, 5).
#   timm rolls the 6x6 grid first, then pads: row r sits on row (r - 2) % 6, so rows 2..5 -> 0..3 and rows 0, 1 ->
#     4, 5 (window row 1, padding on 6, 7).
# Columns alike. (query token, key token) -> (window, query place, key place), worked out from those rules:
HAND_ENTRIES = {
    "hf": [((0, 0), (1, 1), (3, 10, 15)),  # (0, 0) on (6, 6), (1, 1) on (7, 7): window (1, 1) = 3
           ((0, 1), (1, 0), (3, 11, 14)),
           ((2, 2), (5, 5), (0, 0, 15)),  # (2, 2) on (0, 0), (5, 5) on (3, 3): window 0, unmasked
           ((0, 3), (1, 5), (2, 9, 15))],  # (0, 3) on (6, 1), (1, 5) on (7, 3): window (1, 0) = 2
    "timm": [((0, 0), (1, 1), (3, 0, 5)),  # (0, 0) on (4, 4), (1, 1) on (5, 5): window 3
             ((0, 1), (1, 0), (3, 1, 4)),
             ((2, 2), (5, 5), (0, 0, 15)),
             ((0, 3), (1, 5), (2, 1, 7))],  # (0, 3) on (4, 1), (1, 5) on (5, 3): window 2
}


def _tiny_shifted(kind):
    torch.manual_seed(0)
    if kind == "hf":
        module = hf_swin(12, 4, depths=(2,), heads=(2,))  # one stage: HF cannot run a 3x3 second stage
        layer = swin_blocks(module)[1]
        assert (int(layer.window_size), int(layer.shift_size)) == (4, 2)
        return module, layer, lambda out: out[1]
    module = timm_swin(12, 4, depths=(2, 2), heads=(2, 2))
    blk = swin_blocks(module)[1]
    assert (blk.window_size[0], blk.shift_size[0]) == (4, 2)
    return module, blk.attn.attn_drop, lambda out: out


@pytest.mark.parametrize("kind", ["hf", "timm"])
def test_shifted_padded_window_entries_by_hand(kind):
    """Entries of block 1's global attention and of its gradient equal the window entries named in HAND_ENTRIES,
    grabbed from the model by an own hook; tokens of the wrapped-around corner attend only to each other."""
    module, site, raw_of = _tiny_shifted(kind)
    model = vitlens.wrap(module)
    x = torch.randn(2, 3, 12, 12)
    grabbed = {}
    handle = site.register_forward_hook(lambda m, a, out: grabbed.__setitem__("raw", raw_of(out)))
    try:
        with model.record(grads=True) as rec:
            logits = model(x)
            grads = rec.grads(logits[:, 1], retain_graph=True)
            raw = grabbed["raw"]
            (raw_grad,) = torch.autograd.grad(logits[:, 1].sum(), raw)
    finally:
        handle.remove()
    assert raw.shape == (2 * 4, 2, 16, 16)  # batch-major: window w of image b is b * 4 + w
    probs, grad, raw = rec.probs[1].detach(), grads[1], raw.detach()
    assert probs.shape == grad.shape == (2, 2, 36, 36)
    for (qr, qc), (kr, kc), (w, i, j) in HAND_ENTRIES[kind]:
        q, k = 6 * qr + qc, 6 * kr + kc
        for b in range(2):
            torch.testing.assert_close(probs[b, :, q, k], raw[b * 4 + w, :, i, j], atol=0, rtol=0)
            torch.testing.assert_close(grad[b, :, q, k], raw_grad[b * 4 + w, :, i, j], atol=0, rtol=0)
        assert float(probs[:, :, q, k].min()) > 0
    # (0, 0)'s window also holds padding and tokens of other shift regions, all masked: its row lives on the four
    # corner tokens (0, 0), (0, 1), (1, 0), (1, 1) = indices 0, 1, 6, 7 and sums to 1 there
    corner = [0, 1, 6, 7]
    row = probs[:, :, 0]
    torch.testing.assert_close(row[..., corner].sum(-1), torch.ones(2, 2))
    assert float(row[..., [t for t in range(36) if t not in corner]].abs().max()) < 1e-6
    # (2, 2) sits in the unmasked window 0 with the 16 tokens of rows and columns 2..5: all of its row's mass there
    inner = [6 * r + c for r in range(2, 6) for c in range(2, 6)]
    torch.testing.assert_close(probs[:, :, 14, inner].sum(-1), torch.ones(2, 2))
    # gradients flow back only inside windows: exactly 0 between tokens of different windows, not 0 everywhere
    win = rec.meta[1]["window_id"].reshape(-1)
    assert (grad[..., win[:, None] != win[None, :]] == 0).all() and float(grad.abs().sum()) > 0


def test_swin_attention_maps_on_first_grid_and_backbone():
    module, x = _build("hf-w4")
    exp = vitlens.AttentionMaps(vitlens.wrap(module), query=(5, 6)).explain(x)
    assert exp.extras["per_head"].shape == (2, 6, 4, 16, 16)
    assert exp.extras["num_heads"].tolist() == [1, 1, 2, 2, 4, 4]
    backbone = vitlens.wrap(hf_swin(head=False))
    assert vitlens.Rollout(backbone).explain(x).maps.shape == (2, 16, 16)


def test_swin_patch_view_rows_and_per_window():
    from vitlens.viz.swin_view import swin_patch_view

    module, x = _build("hf-w4-padded")
    model = vitlens.wrap(module)
    with torch.no_grad(), model.record() as rec:
        model(x)
    grid = rec.meta[3]["grid"]  # stage 1, block 1 (shifted)
    v = swin_patch_view(model, x, stage=1, block=1, patch=(2, 7))
    assert v.block == 3 and v.shift == (2, 2)
    row = rec.probs[3][:, :, 2 * grid[1] + 7].reshape(2, -1, *grid)
    torch.testing.assert_close(v.maps[:, :-1], row)
    torch.testing.assert_close(v.maps[:, -1], row.mean(1))
    every = swin_patch_view(model, x, stage=1, block=1)
    assert len(every.patches) == len(torch.unique(rec.meta[3]["window_id"]))
    # each window holds exactly its own centre patch's attention
    for r, c in every.patches:
        w = rec.meta[3]["window_id"]
        inside = w == w[r, c]
        want = rec.probs[3][:, :, r * grid[1] + c].reshape(2, -1, *grid)
        torch.testing.assert_close(every.maps[:, :-1][..., inside], want[..., inside])


def test_swin_cli_view_and_errors(tmp_path, capsys):
    from PIL import Image

    from vitlens.cli import main

    hf_swin(36, 4).save_pretrained(tmp_path / "swin")
    Image.new("RGB", (50, 40), (120, 30, 200)).save(tmp_path / "img.png")
    base = ["swin", str(tmp_path / "img.png"), "--model", str(tmp_path / "swin")]
    assert main([*base, "--stage", "1", "--block", "1", "--out", str(tmp_path / "v.png")]) == 0
    assert Image.open(tmp_path / "v.png").size[0] > 300
    for extra, msg in [(["--stage", "3"], "--stage must be in 0..2"), (["--block", "2"], "--block must be in 0..1"),
                       (["--patch", "30,1"], "outside stage 0's 18x18"), (["--patch", "mean"], "--patch must be")]:
        capsys.readouterr()
        assert main([*base, *extra, "--out", str(tmp_path / "bad.png")]) == 2
        err = capsys.readouterr().err.strip()
        assert msg in err and len(err.splitlines()) == 1
        assert not (tmp_path / "bad.png").exists()
    from factories import hf_vit

    hf_vit().save_pretrained(tmp_path / "vit")
    vit = ["swin", str(tmp_path / "img.png"), "--model", str(tmp_path / "vit"), "--out", str(tmp_path / "b.png")]
    assert main(vit) == 2
    assert "not a Swin model" in capsys.readouterr().err


def test_timm_swin_input_size_mismatch_is_one_clear_line():
    from vitlens.errors import VitlensError

    model = vitlens.wrap(timm_swin(32, 4))
    with pytest.raises(VitlensError, match="takes 32x32 inputs, got 64x64"):
        vitlens.Rollout(model).explain(torch.randn(1, 3, 64, 64))


@pytest.mark.parametrize("name", ["hf-w4", "hfv2-w4", "timm-w4", "timmv2-w4"])
def test_swin_record_restores_the_model_even_after_an_error(name):
    module, x = _build(name)
    model = vitlens.wrap(module)

    def state():
        hooks = sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in module.modules())
        flags = [getattr(m, "fused_attn", None) for m in module.modules()]
        impls = [m.config._attn_implementation for m in module.modules() if hasattr(m, "config")]
        return hooks, flags, impls

    before = state()
    with pytest.raises(RuntimeError, match="boom"), model.record(grads=True):
        model(x)
        raise RuntimeError("boom")
    assert state() == before


def test_swinv2_loads_from_a_local_folder_and_predicts_like_the_module(tmp_path):
    module, x = _build("hfv2-w4")
    module.save_pretrained(tmp_path / "v2")
    model = vitlens.load_model(str(tmp_path / "v2"))
    assert model.family == "hf-swin" and model.num_blocks == 6
    with torch.no_grad():
        torch.testing.assert_close(model(x), module(pixel_values=x).logits)
