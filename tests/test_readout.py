"""The VALUES of `TokenLayout.readout_weights()` (which the rollout oracles take as given) against the model itself.

Independent derivation: make everything after the last block linear (the norms that follow it become identities,
every classifier gets the same random matrix W, zero bias), so that logits = W sum_i w_i t_i for the last block's
output tokens t_i, whatever the pooling. Then d (u . logits) / d t_i = w_i W^T u: perturbing the last block's output
by a zero tensor and taking autograd's gradient recovers every w_i. A head that concatenates pooled vectors (DINOv2:
[CLS; patch mean]) gets W once per part, i.e. equal parts, and the weights are compared after dividing by their sum,
the convention readout_weights() follows (they sum to 1).
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

import vitlens
from factories import FAMILIES, IMG, build
from swin_oracle import swin_blocks
from test_swin import hf_swin, timm_swin
from vitlens.layout import TokenLayout

# name -> (modules after the last block made identities, classifier Linear layers), as dotted paths
LINEARISE = {
    "hf-vit": (["vit.layernorm"], ["classifier"]),
    "hf-deit-teacher": (["deit.layernorm"], ["cls_classifier", "distillation_classifier"]),
    "hf-deit": (["deit.layernorm"], ["classifier"]),
    "hf-dinov2": (["dinov2.layernorm"], ["classifier"]),
    "hf-dinov2-registers": (["dinov2_with_registers.layernorm"], ["classifier"]),
    "hf-beit": (["beit.layernorm", "beit.pooler.layernorm"], ["classifier"]),
    "timm-vit": (["norm", "fc_norm"], ["head"]),
    "timm-vit-avg": (["norm", "fc_norm"], ["head"]),
    "timm-vit-registers": (["norm", "fc_norm"], ["head"]),
    "timm-deit-distilled": (["norm", "fc_norm"], ["head", "head_dist"]),
    "hf-swin": (["swin.layernorm"], ["classifier"]),
    "timm-swin": (["norm"], ["head.fc"]),
}
SWIN = {"hf-swin": lambda: hf_swin(32, 4), "timm-swin": lambda: timm_swin(32, 4)}
# what each family must come out as: a wrong mix (say CLS + patch mean for a CLS-only head) fails by value
EXPECTED_READOUT = {"hf-vit": "cls", "hf-deit-teacher": "cls+dist", "hf-deit": "cls", "hf-dinov2": "cls+mean",
                    "hf-dinov2-registers": "cls+mean", "hf-beit": "mean", "timm-vit": "cls", "timm-vit-avg": "mean",
                    "timm-vit-registers": "cls", "timm-deit-distilled": "cls+dist", "hf-swin": "mean",
                    "timm-swin": "mean"}


def _replace(module: nn.Module, path: str, new: nn.Module) -> None:
    parent, _, name = path.rpartition(".")
    setattr(module.get_submodule(parent) if parent else module, name, new)


def _last_block(module: nn.Module) -> nn.Module:
    if "Swin" in type(module).__name__:
        return swin_blocks(module)[-1]
    if type(module).__module__.startswith("timm."):
        return module.blocks[-1]
    return [m for m in module.modules() if type(m).__name__.endswith("Layer")][-1]


def _build(name: str) -> tuple[nn.Module, torch.Tensor]:
    if name in SWIN:
        torch.manual_seed(0)
        return SWIN[name]().eval(), torch.randn(2, 3, IMG, IMG)
    return build(name)


def derived_weights(name: str) -> tuple[torch.Tensor, TokenLayout]:
    """(w [B, N] from the gradient of the linearised head, divided by its sum; the layout of the last block's
    stage), for a model of family ``name``."""
    module, x = _build(name)
    model = vitlens.wrap(module)  # wrap first: its layout describes the unmodified model
    plan = model.stage_plan(tuple(x.shape[-2:]))
    layout = plan.layouts[plan.block_stage[-1]]
    module = module.double()
    norms, heads = LINEARISE[name]
    for path in norms:
        _replace(module, path, nn.Identity())
    torch.manual_seed(1)
    classes = module.get_submodule(heads[0]).out_features
    parts = 2 if "dinov2" in name else 1  # DINOv2's classifier reads [CLS; patch mean]: W on each part
    dim = module.get_submodule(heads[0]).in_features // parts
    w_cls = torch.randn(classes, dim, dtype=torch.float64)
    for path in heads:
        head = module.get_submodule(path)
        with torch.no_grad():
            head.weight.copy_(w_cls.repeat(1, parts))
            head.bias.zero_()
    delta = {}

    def perturb(mod, args, out):
        t = out[0] if isinstance(out, tuple) else out
        d = torch.zeros_like(t, requires_grad=True)
        delta["d"] = d
        return (t + d, *out[1:]) if isinstance(out, tuple) else t + d

    handle = _last_block(module).register_forward_hook(perturb)
    try:
        logits = model(x.double())
    finally:
        handle.remove()
    u = torch.randn_like(logits)
    (jac,) = torch.autograd.grad((logits * u).sum(), delta["d"])
    jac = jac.reshape(x.shape[0], -1, dim)  # timm Swin's [B, H, W, C] -> row-major tokens
    v = u @ w_cls  # [B, D]: d (u . logits) / d t_i = w_i v
    w = (jac * v[:, None]).sum(-1) / (v * v).sum(-1, keepdim=True)
    # the head is exactly a weighted sum of tokens: nothing of the gradient is left outside w_i v
    torch.testing.assert_close(jac, w[..., None] * v[:, None], atol=1e-10, rtol=1e-8)
    return w / w.sum(-1, keepdim=True), layout


@pytest.mark.parametrize("name", list(LINEARISE))
def test_readout_weights_equal_the_heads_gradient(name):
    got, layout = derived_weights(name)
    assert layout.readout == EXPECTED_READOUT[name]
    if name in FAMILIES:
        assert FAMILIES[name][3] == EXPECTED_READOUT[name]
    want = layout.readout_weights(dtype=torch.float64)
    assert got.shape[-1] == want.shape[0]
    for row in got:
        torch.testing.assert_close(row, want, atol=1e-9, rtol=1e-7)


def test_the_derivation_tells_readouts_apart():
    """The derivation is sharp enough to catch a wrong mix: DINOv2's classifier is not CLS-only nor patch-mean
    only, and a mean-pooled BEiT is not CLS + patch mean."""
    got, _ = derived_weights("hf-dinov2")
    for wrong in ("cls", "mean"):
        assert not torch.allclose(got[0], TokenLayout(1, (4, 4), wrong).readout_weights(dtype=torch.float64))
    got, _ = derived_weights("hf-beit")
    assert not torch.allclose(got[0], TokenLayout(1, (4, 4), "cls+mean").readout_weights(dtype=torch.float64))
