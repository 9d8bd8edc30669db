"""The generic adapter (attention modules by name) and the families built on it: timm Eva, transformers CLIP and
SigLIP vision towers. Oracles: attention recomputed by hand from each block's input and q/k weights, the model's
own head applied to the readout of its final tokens, rollout one image at a time, the model's state before/after."""

import math

import pytest
import torch
import transformers
from torch import nn

import vitlens
from factories import GENERIC_FAMILIES, build, hf_clip, hf_siglip, hf_vit, timm_eva, timm_vit
from oracles import forward_inputs, recompute_attention, timm_query_key
from vitlens.errors import VitlensError
from vitlens.models import GenericAdapter, wrap_by_names
from vitlens.models.clip import HFClipModel
from vitlens.models.eva import TimmEvaModel
from vitlens.models.generic import name_pattern
from vitlens.models.registry import adapters, find_adapter
from vitlens.models.siglip import HFSiglipModel

ADAPTER = {"timm-eva": TimmEvaModel, "hf-clip": HFClipModel, "hf-siglip": HFSiglipModel}


def _adapter_class(name: str) -> type:
    return next(cls for prefix, cls in ADAPTER.items() if name.startswith(prefix))


def _state(module: nn.Module) -> dict:
    """Everything record() may touch: fused flags, attention implementations, hooks, modes, requires_grad."""
    return dict(
        flags=[getattr(m, "fused_attn", None) for m in module.modules()],
        impls=[m.config._attn_implementation for m in module.modules() if hasattr(m, "config")],
        hooks=sum(len(m._forward_hooks) + len(m._forward_pre_hooks) + len(m._backward_hooks) for m in module.modules()),
        training=[m.training for m in module.modules()],
        grad=[p.requires_grad for p in module.parameters()],
    )


# ---- the families --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", list(GENERIC_FAMILIES))
def test_family_is_registered_and_attention_equals_hand_recomputation(name):
    module, x = build(name)
    model = vitlens.load_model(module)
    assert type(model) is _adapter_class(name)
    _, size, num_prefix, readout = GENERIC_FAMILIES[name]
    layout = model.layout(size)
    assert (layout.num_prefix, layout.readout) == (num_prefix, readout)
    expected = recompute_attention(module, x)
    with torch.no_grad(), model.record() as rec:
        model(x)
    assert model.num_blocks == len(expected) == 3
    for got, want in zip(rec.probs, expected):
        assert got.shape == (x.shape[0], want.shape[1], layout.num_tokens, layout.num_tokens)
        torch.testing.assert_close(got, want, atol=1e-5, rtol=0)


def test_eva_rope_is_part_of_the_oracle():
    """The rotary embedding changes the attention: an oracle that ignored it would not match (so it is exercised)."""
    module, x = build("timm-eva02-rope-avg")
    assert module.rope is not None
    attn = module.blocks[0].attn
    (args, kwargs), *_ = forward_inputs(module, x, [attn])
    assert kwargs["rope"] is not None
    q, k = timm_query_key(attn, args[0])
    no_rope = (q @ k.transpose(-1, -2) / math.sqrt(attn.head_dim)).softmax(-1)
    assert (no_rope - recompute_attention(module, x)[0]).abs().max() > 1e-3


@pytest.mark.parametrize("name", list(GENERIC_FAMILIES))
def test_readout_weights_reproduce_the_models_output(name):
    """The model's own output equals its head applied to sum_i w_i * token_i of the final tokens (w: readout)."""
    module, x = build(name)
    model = vitlens.wrap(module)
    w = model.layout(tuple(x.shape[-2:])).readout_weights()
    with torch.no_grad():
        got = model(x)
        if name.startswith("timm-eva"):
            feats = module.forward_features(x)
            want = module.head(module.fc_norm(torch.einsum("n,bnd->bd", w, feats)))
        else:
            vision = getattr(module, "vision_model", module)
            last = vision(pixel_values=x).last_hidden_state
            pooled = torch.einsum("n,bnd->bd", w, last)
            kind = type(module).__name__
            if kind.endswith("ForImageClassification"):
                want = module.classifier(pooled)
            elif kind == "SiglipVisionModel":  # the MAP head pools; vitlens's readout is the patch mean (docstring)
                want = module.head(last)
                assert not torch.allclose(want, pooled)
                pooled_features = last.mean(1)
                torch.testing.assert_close(pooled, pooled_features)
            else:  # CLIP: post-layernormed CLS (then projected)
                want = vision.post_layernorm(pooled)
                if hasattr(module, "visual_projection"):
                    want = module.visual_projection(want)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    assert model.has_head == (got.shape[-1] == 5)


def test_siglip_probe_attention_equals_hand_recomputation():
    torch.manual_seed(0)
    module = hf_siglip("vision")
    model = vitlens.wrap(module)
    x = torch.randn(2, 3, 32, 32)
    got = model.probe_attention(x)
    with torch.no_grad():
        last = module(pixel_values=x).last_hidden_state
        mha = module.head.attention
        d, heads = mha.embed_dim, mha.num_heads
        wq, wk, _ = mha.in_proj_weight.split(d)
        bq, bk, _ = mha.in_proj_bias.split(d)
        q = (module.head.probe @ wq.T + bq).reshape(1, 1, heads, -1).transpose(1, 2)  # [1, h, 1, d/h]
        k = (last @ wk.T + bk).reshape(2, -1, heads, d // heads).transpose(1, 2)  # [B, h, N, d/h]
        want = (q @ k.transpose(-1, -2) / math.sqrt(d // heads)).softmax(-1).mean(1)[:, 0]
    torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-5)
    assert _state(module)["hooks"] == 0
    with pytest.raises(VitlensError, match="no attention-pooling head"):
        vitlens.wrap(hf_siglip("vision", vision_use_head=False)).probe_attention(x)


@pytest.mark.parametrize("name", ["timm-eva02-rope-avg", "timm-eva-rope-attn-registers-token", "hf-clip-vision",
                                  "hf-clip-classifier", "hf-siglip-vision"])
def test_rollout_batch_equals_one_by_one(name):
    module, x = build(name)
    rollout = vitlens.Rollout(vitlens.wrap(module))
    whole = rollout.explain(x).maps
    parts = torch.cat([rollout.explain(x[i : i + 1]).maps for i in range(x.shape[0])])
    torch.testing.assert_close(whole, parts, atol=1e-5, rtol=1e-4)
    assert whole.shape == (3, 4, 4)


@pytest.mark.parametrize("name", ["timm-eva02-rope-avg", "hf-clip-classifier", "hf-siglip-classifier"])
def test_record_restores_flags_and_leaves_no_hooks(name):
    module, x = build(name)
    model = vitlens.wrap(module)
    module.train()  # the user's mode must come back
    before = _state(module)
    with model.record(grads=True) as rec:
        logits = model(x)
        grads = rec.grads(logits[:, 0])
        during = _state(module)
    assert all(g is not None and g.shape == p.shape for g, p in zip(grads, rec.probs))
    assert during != before  # something really was switched (eager / fused off, hooks on)
    assert _state(module) == before
    with pytest.raises(RuntimeError, match="boom"), model.record():
        raise RuntimeError("boom")
    assert _state(module) == before


def test_family_errors():
    with pytest.raises(VitlensError, match="global_pool='map' is not supported"):
        vitlens.wrap(timm_eva(global_pool="map"))
    assert find_adapter(transformers.CLIPTextModel(transformers.CLIPTextConfig(
        hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2, vocab_size=50))) is None


def test_clip_and_siglip_folders_load_through_load_model(tmp_path):
    x = torch.randn(2, 3, 32, 32)
    for i, module in enumerate([hf_clip("vision"), hf_clip("classifier"), hf_siglip("classifier")]):
        module.save_pretrained(tmp_path / str(i))
        model = vitlens.load_model(tmp_path / str(i))
        assert type(model.module) is type(module) and model.preprocess.size == (32, 32)
        with torch.no_grad():
            torch.testing.assert_close(model(x), vitlens.wrap(module)(x))


def test_families_come_from_the_registry():
    names = [s.name for s in adapters()]
    assert {"timm-vit", "timm-swin", "hf-swin", "hf-vit", "timm-eva", "hf-clip", "hf-siglip"} <= set(names)
    assert dict(vitlens.models.FAMILIES) == {s.name: s.description for s in adapters()}


def test_a_new_adapter_is_one_registration():
    from vitlens.models import registry

    class Tiny(nn.Module):
        pass

    try:
        registry.register_adapter("tiny-test", lambda m: isinstance(m, Tiny), lambda m: ("wrapped", m), "test only")
        assert vitlens.models.FAMILIES["tiny-test"] == "test only"
        assert vitlens.wrap(Tiny())[0] == "wrapped"
    finally:
        registry._SPECS.pop("tiny-test", None)
    with pytest.raises(VitlensError, match="not a supported ViT-family model.*wrap_by_names"):
        vitlens.wrap(Tiny())


# ---- the generic adapter on an architecture vitlens does not know ---------------------------------------------------
class Mixer(nn.Module):
    """Attention written from scratch: a fused path behind a differently named flag, probabilities through `drop`."""

    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.heads, self.use_sdpa = heads, True
        self.to_qkv = nn.Linear(dim, 3 * dim)
        self.drop = nn.Dropout(0.0)
        self.out = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, c = x.shape
        q, k, v = self.to_qkv(x).reshape(b, n, 3, self.heads, c // self.heads).permute(2, 0, 3, 1, 4)
        if self.use_sdpa:
            y = nn.functional.scaled_dot_product_attention(q, k, v)
        else:
            y = self.drop((q @ k.transpose(-1, -2) * (c // self.heads) ** -0.5).softmax(-1)) @ v
        return self.out(y.transpose(1, 2).reshape(b, n, c))


class Layer(nn.Module):
    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.norm, self.mix, self.mlp = nn.LayerNorm(dim), Mixer(dim, heads), nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.mix(self.norm(x))
        return x + self.mlp(x).relu()


class HomeMadeViT(nn.Module):
    """CLS token + 4x4 patches (patch 4 on 16x16 images), 3 layers, a head on the CLS token."""

    def __init__(self, dim: int = 16, heads: int = 2, depth: int = 3, classes: int = 4) -> None:
        super().__init__()
        self.embed = nn.Conv2d(3, dim, 4, 4)
        self.cls = nn.Parameter(torch.randn(1, 1, dim))
        self.pos = nn.Parameter(torch.randn(1, 17, dim))
        self.layers = nn.ModuleList(Layer(dim, heads) for _ in range(depth))
        self.head = nn.Linear(dim, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        t = self.embed(x).flatten(2).transpose(1, 2)
        t = torch.cat([self.cls.expand(len(t), -1, -1), t], 1) + self.pos
        for layer in self.layers:
            t = layer(t)
        return self.head(t[:, 0])


def _home_made_attention(module: HomeMadeViT, x: torch.Tensor) -> list[torch.Tensor]:
    """softmax(q k^T / sqrt(d)) per layer from each Mixer's input, by hand."""
    mixers = [layer.mix for layer in module.layers]
    out = []
    for m, (args, _) in zip(mixers, forward_inputs(module, x, mixers)):
        h = args[0]
        b, n, c = h.shape
        d = c // m.heads
        qkv = (h @ m.to_qkv.weight.T + m.to_qkv.bias).reshape(b, n, 3, m.heads, d)
        q, k = qkv[:, :, 0].transpose(1, 2), qkv[:, :, 1].transpose(1, 2)
        out.append((q @ k.transpose(-1, -2) / math.sqrt(d)).softmax(-1))
    return out


def _home_made():
    torch.manual_seed(0)
    return HomeMadeViT().eval(), torch.randn(3, 3, 16, 16)


def test_unknown_architecture_is_refused_with_the_way_out():
    with pytest.raises(VitlensError, match="not a supported ViT-family model.*wrap_by_names") as e:
        vitlens.wrap(HomeMadeViT())
    assert "\n" not in str(e.value)


def test_generic_adapter_captures_an_unknown_architecture_exactly():
    module, x = _home_made()
    model = wrap_by_names(module, "layers.*.mix", fused_flag="use_sdpa", probs_at="drop", num_prefix_tokens=1,
                          patch_size=4, num_classes=4)
    assert model.attention_names == ["layers.0.mix", "layers.1.mix", "layers.2.mix"]
    assert model.layout((16, 16)).grid == (4, 4) and model.layout((16, 16)).readout == "cls"
    before = _state(module)
    with torch.no_grad(), model.record() as rec:
        logits = model(x)
        assert all(layer.mix.use_sdpa is False for layer in module.layers)
    assert _state(module) == before and all(layer.mix.use_sdpa for layer in module.layers)
    for got, want in zip(rec.probs, _home_made_attention(module, x)):
        torch.testing.assert_close(got, want, atol=1e-5, rtol=0)
    with torch.no_grad():
        torch.testing.assert_close(logits, module(x))
    rollout = vitlens.Rollout(model)
    whole = rollout.explain(x).maps
    torch.testing.assert_close(whole, torch.cat([rollout.explain(x[i : i + 1]).maps for i in range(3)]), atol=1e-5,
                               rtol=1e-4)
    # class-specific methods work through the generic adapter too: gradients in block order
    exp = vitlens.GradRollout(model).explain(x, target=1)
    assert exp.maps.shape == (3, 4, 4)


def test_generic_adapter_defaults_match_the_built_in_adapters():
    """Defaults just work: timm-style ('blocks.*.attn', fused_attn, attn_drop) and HF-style attention by name."""
    for module, kwargs in [(timm_vit(reg_tokens=2), {}),
                           (hf_vit(), dict(attention="**layers.*.attention", kind="hf"))]:
        x = torch.randn(2, 3, 32, 32)
        generic = GenericAdapter(module, **kwargs)
        builtin = vitlens.wrap(module)
        assert generic.layout((32, 32)) == builtin.layout((32, 32))
        assert generic.num_classes == builtin.num_classes == 5 and generic.patch_size == (8, 8)
        with torch.no_grad(), generic.record() as a:
            ya = generic(x)
        with torch.no_grad(), builtin.record() as b:
            yb = builtin(x)
        torch.testing.assert_close(ya, yb)
        for p, q, want in zip(a.probs, b.probs, recompute_attention(module, x)):
            torch.testing.assert_close(p, q)
            torch.testing.assert_close(p, want, atol=1e-5, rtol=0)


@pytest.mark.parametrize("pattern, name, hit", [
    ("blocks.*.attn", "blocks.0.attn", True),
    ("blocks.*.attn", "blocks.11.attn", True),
    ("blocks.*.attn", "blocks.0.attn.attn_drop", False),
    ("blocks.*.attn", "stages.blocks.0.attn", False),
    ("**layers.*.self_attn", "vision_model.encoder.layers.3.self_attn", True),
    ("**layers.*.self_attn", "layers.3.self_attn", True),
    ("**layers.*.self_attn", "layers.3.self_attn.q_proj", False),
    ("layers.?.mix", "layers.7.mix", True),
    ("layers.?.mix", "layers.10.mix", False),
])
def test_name_patterns(pattern, name, hit):
    assert bool(name_pattern(pattern).fullmatch(name)) is hit


@pytest.mark.parametrize("kwargs, msg", [
    (dict(attention="blocks.*.attention"), "no submodule of HomeMadeViT matches attention='blocks.*.attention'"),
    (dict(attention="layers.*.mix", probs_at="drop"), "has no attribute 'fused_attn'; pass fused_flag="),
    (dict(attention="layers.*.mix", fused_flag="use_sdpa"), "has no child module 'attn_drop'; pass probs_at="),
    (dict(attention="layers.*.mix", fused_flag="use_sdpa", probs_at="drop"), "patch size.*pass patch_size="),
    (dict(attention="layers.*.mix", kind="jax"), "kind must be one of"),
    (dict(attention=[3]), "attention takes name patterns or modules"),
    (dict(attention="layers.*.mix", fused_flag="use_sdpa", probs_at="drop", patch_size=4, readout="max"),
     "readout must be one of"),
    (dict(attention="layers.*.mix", fused_flag="use_sdpa", probs_at="drop", patch_size=4, num_prefix_tokens=0,
          readout="cls"), "needs a CLS token"),
])
def test_generic_adapter_errors_are_one_line_and_name_the_fix(kwargs, msg):
    with pytest.raises(VitlensError, match=msg) as e:
        wrap_by_names(HomeMadeViT(), **kwargs)
    assert "\n" not in str(e.value)


def test_generic_adapter_takes_modules_and_a_run_function():
    module, x = _home_made()
    mixers = [layer.mix for layer in module.layers]
    model = GenericAdapter(module, mixers, fused_flag="use_sdpa", probs_at="drop", patch_size=4, num_classes=None,
                           run=lambda m, images: m(images).softmax(-1))
    assert not model.has_head and model.num_blocks == 3
    with torch.no_grad():
        torch.testing.assert_close(model(x), module(x).softmax(-1))
    with pytest.raises(VitlensError, match="not a submodule"):
        GenericAdapter(module, [nn.Linear(2, 2)], fused_flag="use_sdpa", probs_at="drop", patch_size=4)
