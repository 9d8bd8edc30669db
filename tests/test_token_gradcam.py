"""Token Grad-CAM and the block taps it stands on: block_modules and tap_tokens on every family, the Grad-CAM formula
by hand, pytorch-grad-cam's own weighting on the same activations, Swin stages upsampled by hand, batch == one by
one, callable targets on a backbone."""

import numpy as np
import pytest
import torch

import vitlens
from factories import FAMILIES, build, hf_vit, timm_vit
from test_swin import CONFIGS as SWIN
from test_swin import _build as build_swin
from vitlens.errors import VitlensError
from vitlens.methods.token_gradcam import TokenGradCAM
from vitlens.models.base import flat_tokens
from vitlens.taps import tap_tokens


def _any(name):
    return build_swin(name) if name in SWIN else build(name)


def own_blocks(module):
    """The blocks found without vitlens: timm ``blocks`` / Swin stages, transformers ``*Layer`` modules."""
    if hasattr(module, "blocks"):
        return list(module.blocks)
    if hasattr(module, "layers") and type(module).__module__.startswith("timm."):
        return [b for stage in module.layers for b in stage.blocks]
    return [m for m in module.modules() if type(m).__name__.endswith("Layer")]


@pytest.mark.parametrize("name", [*FAMILIES, "hf-w4-padded", "hfv2-w4", "timm-w4-padded", "timmv2-w4"])
def test_block_modules_and_taps(name):
    module, x = _any(name)
    model = vitlens.wrap(module)
    blocks = model.block_modules()
    assert len(blocks) == model.num_blocks and len({id(b) for b in blocks}) == len(blocks)
    assert [id(b) for b in blocks] == [id(b) for b in own_blocks(module)]
    plan = model.stage_plan(tuple(x.shape[-2:]))
    with torch.no_grad(), tap_tokens(model, range(model.num_blocks), "input") as ins, \
            tap_tokens(model, range(model.num_blocks), "output") as outs:
        model(x)
    for i in range(model.num_blocks):
        assert flat_tokens(ins[i]).shape[:2] == (x.shape[0], plan.layouts[plan.block_stage[i]].num_tokens)
        if i + 1 < model.num_blocks and plan.block_stage[i + 1] == plan.block_stage[i]:
            torch.testing.assert_close(flat_tokens(ins[i + 1]), flat_tokens(outs[i]))  # a block feeds the next
    assert all(not b._forward_pre_hooks and not b._forward_hooks for b in blocks)  # hooks removed on exit
    with pytest.raises(VitlensError, match="out of range"), tap_tokens(model, [model.num_blocks], "input"):
        pass


def hand_cam(tokens: np.ndarray, grads: np.ndarray) -> np.ndarray:
    """One sample, plain loops: w_c = mean over patches of G[p, c]; cam_p = max(0, sum_c w_c A[p, c])."""
    p, c = tokens.shape
    w = [sum(grads[q, k] for q in range(p)) / p for k in range(c)]
    return np.array([max(0.0, sum(w[k] * tokens[q, k] for k in range(c))) for q in range(p)])


def _own_hook_cam(module, model, x, target, block_module, num_prefix, score=None):
    """Tokens entering ``block_module`` and their gradient, by a pre-hook of the test's own."""
    got = {}

    def pre(mod, args, kwargs):
        t = args[0] if args else kwargs["hidden_states"]
        got["t"] = t
        t.retain_grad()

    x = x.clone().requires_grad_(True)
    handle = block_module.register_forward_pre_hook(pre, with_kwargs=True)
    try:
        out = model(x) if score is None else model(x)
        s = out.gather(1, target[:, None])[:, 0] if score is None else score(out)
        s.sum().backward()
    finally:
        handle.remove()
        module.zero_grad(set_to_none=True)
    t, g = flat_tokens(got["t"].detach()).double(), flat_tokens(got["t"].grad).double()
    return [hand_cam(t[b, num_prefix:].numpy(), g[b, num_prefix:].numpy()) for b in range(x.shape[0])]


@pytest.mark.parametrize("name", ["timm-vit", "hf-vit-nonsquare-p4", "hf-dinov2-registers", "timm-deit-distilled",
                                  "hf-beit"])
@pytest.mark.parametrize("block", [-1, 0])
def test_formula_by_hand(name, block):
    module, x = build(name)
    model = vitlens.wrap(module)
    layout = model.layout(tuple(x.shape[-2:]))
    target = torch.tensor([1, 4, 2])
    exp = TokenGradCAM(model, block=block).explain(x, target=target)
    want = _own_hook_cam(module, model, x, target, own_blocks(module)[block], layout.num_prefix)
    for b in range(3):
        np.testing.assert_allclose(exp.extras["raw"][b].numpy().ravel(), want[b], rtol=1e-4, atol=1e-6)
        np.testing.assert_allclose(exp.maps[b].numpy().ravel(), want[b] / want[b].max(), rtol=1e-4, atol=1e-6)
    assert exp.maps.shape == (3, *layout.grid) and int(exp.extras["block"]) == block % 3


def test_equals_pytorch_grad_cam_weighting():
    """pytorch-grad-cam's GradCAM on the same activations: its target layer is the block before the last one (whose
    output is the last block's input), CLS removed and reshaped to the grid by a reshape_transform; its own
    get_cam_image weights and sums them, then ReLU as in its compute_cam_per_layer."""
    pytest.importorskip("pytorch_grad_cam", reason="pytorch-grad-cam (PyPI grad-cam, test extra) not installed")
    from pytorch_grad_cam import GradCAM
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

    torch.manual_seed(0)
    module = timm_vit(img_size=(16, 24), patch_size=4, depth=3)  # a 4x6 grid: no square assumed
    x = torch.randn(2, 3, 16, 24)
    target = [3, 1]

    def reshape(t):
        return t[:, 1:].reshape(t.shape[0], 4, 6, t.shape[-1]).permute(0, 3, 1, 2)

    cam = GradCAM(model=module, target_layers=[module.blocks[-2]], reshape_transform=reshape)
    try:
        out = cam.activations_and_grads(x)
        targets = [ClassifierOutputTarget(t) for t in target]
        sum(tg(o) for tg, o in zip(targets, out)).backward()
        acts = cam.activations_and_grads.activations[0].numpy()
        grads = cam.activations_and_grads.gradients[0].numpy()
        theirs = np.maximum(cam.get_cam_image(x, module.blocks[-2], targets, acts, grads, False), 0)
    finally:
        cam.activations_and_grads.release()
    exp = TokenGradCAM(vitlens.wrap(module)).explain(x, target=target)
    np.testing.assert_allclose(exp.extras["raw"].numpy(), theirs, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("name", ["hf-w4-padded", "timm-w7"])
@pytest.mark.parametrize("block", [1, 2, 5])
def test_swin_stage_grid_upsampled_by_hand(name, block):
    """A block of stage s: Grad-CAM on the stage's grid, each first-stage patch (r, c) taking the value of its
    merged token (r // 2^s, c // 2^s)."""
    module, x = build_swin(name)
    model = vitlens.wrap(module)
    plan = model.stage_plan(tuple(x.shape[-2:]))
    s = plan.block_stage[block]
    target = torch.tensor([0, 3])
    exp = TokenGradCAM(model, block=block).explain(x, target=target)
    want = _own_hook_cam(module, model, x, target, own_blocks(module)[block], 0)
    (gh, gw), (sh, sw) = plan.layouts[0].grid, plan.layouts[s].grid
    for b in range(2):
        stage_map = want[b].reshape(sh, sw)
        up = np.array([[stage_map[r // 2 ** s, c // 2 ** s] for c in range(gw)] for r in range(gh)])
        np.testing.assert_allclose(exp.extras["raw"][b].numpy(), up, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("name", ["hf-dinov2-registers", "timm-w4-padded"])
def test_batch_equals_one_by_one(name):
    module, x = _any(name)
    m = TokenGradCAM(vitlens.wrap(module), block=-2)
    whole = m.explain(x)
    parts = [m.explain(x[i: i + 1]) for i in range(x.shape[0])]
    torch.testing.assert_close(whole.extras["raw"], torch.cat([p.extras["raw"] for p in parts]), atol=1e-5,
                               rtol=1e-4)


def test_callable_target_on_a_backbone_and_errors():
    module = hf_vit(head=False)
    model = vitlens.wrap(module)
    x = torch.randn(2, 3, 32, 32)
    direction = torch.randn(32)
    exp = vitlens.METHODS["gradcam"](model).explain(x, target=lambda f: f @ direction)
    want = _own_hook_cam(module, model, x, None, own_blocks(module)[-1], 1, score=lambda f: f @ direction)
    for b in range(2):
        np.testing.assert_allclose(exp.extras["raw"][b].numpy().ravel(), want[b], rtol=1e-4, atol=1e-6)
    with pytest.raises(VitlensError, match="block must be in"):
        TokenGradCAM(model, block=3)
    with pytest.raises(VitlensError, match="backbone"):
        TokenGradCAM(model).explain(x)
