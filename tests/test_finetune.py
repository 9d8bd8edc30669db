"""Fine-tuning (issue 15) on tiny transformers and timm ViT and Swin models: only the intended parameters train, zero
adapters and zero LoRA leave the output unchanged, adapters sit where the papers put them (hand-written block
forwards as oracles), merged LoRA equals unmerged LoRA and the hand-merged weight, the loss falls on a learnable task,
and a saved model reloads with the same outputs."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from torch import nn

from factories import hf_vit, timm_vit
from test_swin import hf_swin, timm_swin
from vitlens.errors import VitlensError
from vitlens.models.loading import load_model, wrap
from vitlens.train.adapters import ADAPTER_NAME, PLACEMENTS, Bottleneck, find_blocks, insert_adapters
from vitlens.train.finetune import (
    Settings,
    build_classifier,
    logits,
    parse_method,
    prepare,
    run_finetune,
    save_finetuned,
)
from vitlens.train.finetune_data import TaskData
from vitlens.train.lora import LORA_NAME, insert_lora, merge_lora

pytestmark = pytest.mark.usefixtures("one_torch_thread")

FAMILIES = {"hf-vit": hf_vit, "hf-swin": lambda: hf_swin(depths=(1, 1), heads=(1, 2)),
            "timm-vit": lambda: timm_vit(depth=2), "timm-swin": lambda: timm_swin(depths=(1, 1), heads=(1, 2))}
METHODS = ("head", "full", "adapter:attn", "adapter:mlp", "adapter:both", "adapter:parallel", "lora")


def toy_task(n_train: int = 18, n_eval: int = 6, seed: int = 0, learnable: bool = False) -> TaskData:
    """32 px RGB images, 3 classes; ``learnable``: the class is which third of the image (top/middle/bottom) is
    bright, on a noisy grey background."""
    rng = np.random.default_rng(seed)
    n = n_train + n_eval
    labels = np.arange(n) % 3
    images = rng.integers(60, 120, (n, 32, 32, 3)).astype(np.uint8)
    if learnable:
        for i, c in enumerate(labels):
            images[i, 11 * c: 11 * c + 10] = 230
    return TaskData("toy", images[:n_train], labels[:n_train].astype(np.int64), images[n_train:],
                    labels[n_train:].astype(np.int64), ["a", "b", "c"], False)


def _randomise_zero_parts(module: nn.Module) -> None:
    """Give adapters' up-projections and LoRA's B non-zero values (as after training)."""
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for m in module.modules():
            if isinstance(m, Bottleneck):
                m.up.weight.copy_(torch.randn(m.up.weight.shape, generator=g) * 0.2)
                m.up.bias.copy_(torch.randn(m.up.bias.shape, generator=g) * 0.2)
            lora = getattr(m, LORA_NAME, None)
            if lora is not None:
                for b in lora.B:
                    b.copy_(torch.randn(b.shape, generator=g) * 0.2)


# ---------------------------------------------------------------- only the intended parameters change


@pytest.mark.parametrize("family", FAMILIES)
def test_only_intended_parameters_change(family):
    model = wrap(FAMILIES[family]())
    task = toy_task()
    for method in METHODS:
        before: dict[str, torch.Tensor] = {}

        def snapshot(m: nn.Module, into: dict = before) -> None:
            into.update({k: v.clone() for k, v in m.state_dict().items()})

        mod, result = run_finetune(model, task, Settings(method=method, epochs=1, batch_size=6), progress=False,
                                   on_ready=snapshot)
        after = mod.state_dict()
        assert set(after) == set(before)
        changed = {k for k in before if not torch.equal(before[k], after[k])}
        head = {k for k in after if k.startswith(("classifier.", "head."))}
        added = {k for k in after if ADAPTER_NAME in k or LORA_NAME in k}
        assert head and changed >= head, (family, method)
        params = dict(mod.named_parameters())
        if method == "full":
            assert result.trainable_params == result.total_params == sum(p.numel() for p in params.values())
            first = find_blocks(mod)[0].name
            assert any(k.startswith(first + ".") for k in changed), (family, "the backbone must train")
            assert not added
            continue
        assert changed == head | added, (family, method, sorted(changed ^ (head | added))[:4])
        if method == "head":
            assert not added
        else:
            kind = ADAPTER_NAME if method.startswith("adapter") else LORA_NAME
            assert added and all(kind in k for k in added)
        assert result.trainable_params == sum(params[k].numel() for k in head | added if k in params)


def test_adapter_counts_and_placement_sites():
    module = build_classifier(wrap(hf_vit()), ["a", "b"], False)
    blocks = find_blocks(module)
    assert len(blocks) == 3
    expected = {"attn": 3, "mlp": 3, "both": 6, "parallel": 3}
    for placement in PLACEMENTS:
        m = copy.deepcopy(module)
        added = insert_adapters(m, placement, dim=5)
        assert len(added) == expected[placement]
        width = 32
        assert all(sum(p.numel() for p in a.parameters()) == 2 * width * 5 + 5 + width for a in added)


# ---------------------------------------------------------------- zero initialisation, placement oracles


@pytest.mark.parametrize("family", FAMILIES)
def test_zero_adapters_and_lora_leave_outputs_unchanged(family):
    torch.manual_seed(0)
    module = build_classifier(wrap(FAMILIES[family]()), ["a", "b", "c"], False).eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        ref = logits(module, x)
    for method in METHODS[2:]:
        m = copy.deepcopy(module)
        prepare(m, Settings(method=method))
        with torch.no_grad():
            out = logits(m, x)
        assert torch.equal(out, ref), (family, method)
        _randomise_zero_parts(m)  # the check above can fail: once the zero parts move, the output moves
        with torch.no_grad():
            assert not torch.allclose(logits(m, x), ref, atol=1e-4), (family, method)


def _block_by_hand(attn, norm1, mlp, norm2, x, adapters):
    """A pre-norm transformer block by hand (no layer scale, no drop path), with adapters where Houlsby / He et al.
    put them."""
    a = attn(norm1(x))
    if "attn" in adapters:
        a = a + adapters["attn"](a)
    h = x + a
    m = mlp(norm2(h))
    if "mlp" in adapters:
        m = m + adapters["mlp"](m)
    out = h + m
    return out + adapters["parallel"](x) if "parallel" in adapters else out


def _hf_vit_layer(layer, x, adapters):
    """transformers ViTLayer by hand."""
    return _block_by_hand(lambda y: layer.attention(y)[0], layer.layernorm_before, layer.mlp, layer.layernorm_after,
                          x, adapters)


def _timm_block(block, x, adapters):
    """timm ViT Block by hand."""
    return _block_by_hand(block.attn, block.norm1, block.mlp, block.norm2, x, adapters)


@pytest.mark.parametrize("kind", ["hf", "timm"])
@pytest.mark.parametrize("placement", PLACEMENTS)
def test_adapter_placement_matches_hand_written_block(kind, placement):
    torch.manual_seed(0)
    module = (hf_vit() if kind == "hf" else timm_vit(depth=2)).eval()
    block = find_blocks(module)[0].module
    plain = copy.deepcopy(block)
    insert_adapters(module, placement, dim=6)
    _randomise_zero_parts(module)
    b = find_blocks(module)[0]
    adapters = {}
    if placement in ("attn", "both"):
        adapters["attn"] = getattr(b.attn_out, ADAPTER_NAME)
    if placement in ("mlp", "both"):
        adapters["mlp"] = getattr(b.mlp_out, ADAPTER_NAME)
    if placement == "parallel":
        adapters["parallel"] = getattr(b.module, ADAPTER_NAME)
    x = torch.randn(2, 17, 32)
    with torch.no_grad():
        got = b.module(x)
        got = got[0] if isinstance(got, tuple) else got
        want = (_hf_vit_layer if kind == "hf" else _timm_block)(plain, x, adapters)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("family", ["hf-vit", "timm-vit", "hf-swin", "timm-swin"])
def test_lora_equals_hand_merged_weights_and_merge(family):
    torch.manual_seed(0)
    module = build_classifier(wrap(FAMILIES[family]()), ["a", "b", "c"], False).eval()
    reference = copy.deepcopy(module)
    insert_lora(module, rank=3, alpha=6.0)
    _randomise_zero_parts(module)
    # oracle: W + (alpha / r) B A on the q and v rows only, written into a plain copy
    with torch.no_grad():
        for b, rb in zip(find_blocks(module), find_blocks(reference), strict=True):
            for lin, rlin in zip(b.qkv, rb.qkv, strict=True):
                lora = getattr(lin, LORA_NAME)
                for (start, stop), a, bb in zip(lora.slices, lora.A, lora.B, strict=True):
                    rlin.weight[start:stop] += 2.0 * bb @ a
            if len(b.qkv) == 1:  # fused: the k third is untouched, q and v thirds are
                assert [s for s in getattr(b.qkv[0], LORA_NAME).slices] == [(0, b.qkv[0].out_features // 3),
                                                                          (2 * b.qkv[0].out_features // 3,
                                                                           b.qkv[0].out_features)]
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        unmerged, oracle = logits(module, x), logits(reference, x)
        assert merge_lora(module) == sum(len(b.qkv) for b in find_blocks(module))
        merged = logits(module, x)
    torch.testing.assert_close(unmerged, oracle, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(merged, unmerged, rtol=1e-4, atol=1e-5)
    assert not any(LORA_NAME in k for k in module.state_dict())


# ---------------------------------------------------------------- learning, saving, reloading


@pytest.mark.parametrize("method", ["head", "adapter:both", "lora", "full"])
def test_loss_decreases_on_a_learnable_task(method):
    torch.manual_seed(0)
    model = wrap(hf_vit(num_hidden_layers=2))
    task = toy_task(n_train=48, n_eval=24, learnable=True)
    _, result = run_finetune(model, task, Settings(method=method, epochs=10, batch_size=12, lr=1e-2), progress=False)
    first, last = np.mean(result.loss[:4]), np.mean(result.loss[-4:])
    assert last < 0.8 * first, (method, first, last)
    assert result.epochs[-1]["loss"] < result.epochs[0]["loss"]
    assert result.epochs[-1]["accuracy"] >= 0.9, (method, result.epochs)
    assert len(result.epochs) == 10 and all("accuracy" in e for e in result.epochs)


@pytest.mark.parametrize(("factory", "method"), [(hf_vit, "adapter:both"), (hf_vit, "adapter:parallel"),
                                                 (hf_vit, "lora"), (hf_vit, "full"),
                                                 (lambda: hf_swin(depths=(1, 1), heads=(1, 2)), "adapter:mlp")])
def test_saved_model_reloads_with_the_same_outputs(tmp_path, factory, method):
    model = wrap(factory())
    task = toy_task()
    settings = Settings(method=method, epochs=1, batch_size=6, lr=1e-2)
    module, _ = run_finetune(model, task, settings, progress=False)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        want = logits(module, x)
    files = save_finetuned(module, tmp_path / "out", settings, 32, model.preprocess.mean, model.preprocess.std, {})
    names = {p.name for p in files}
    assert {"config.json", "model.safetensors", "preprocessor_config.json", "metrics.json"} <= names
    assert ("adapters.safetensors" in names) == method.startswith("adapter")
    again = load_model(str(tmp_path / "out"))
    assert again.labels == ["a", "b", "c"] and again.preprocess.size == (32, 32)
    with torch.no_grad():
        torch.testing.assert_close(again(x), want, rtol=1e-4, atol=1e-5)
    from vitlens.methods.rollout import Rollout

    assert Rollout(again).explain(x).maps.shape[0] == 2


def test_timm_lora_saves_a_state_dict_that_timm_loads(tmp_path):
    model = wrap(timm_vit(depth=2))
    settings = Settings(method="lora", epochs=1, batch_size=6, lr=1e-2)
    module, _ = run_finetune(model, toy_task(), settings, progress=False)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        want = logits(module, x)
    save_finetuned(module, tmp_path, settings, 32, model.preprocess.mean, model.preprocess.std, {})
    again = load_model("timm:vit_tiny_patch16_224", weights=tmp_path / "model.safetensors",
                       model_kwargs=dict(img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=4, num_classes=3))
    with torch.no_grad():
        torch.testing.assert_close(again(x), want, rtol=1e-4, atol=1e-5)
    with pytest.raises(VitlensError, match="transformers models"):
        save_finetuned(module, tmp_path / "b", Settings(method="adapter"), 32, (0.5,) * 3, (0.5,) * 3, {})


def test_broken_adapter_folder_is_one_clear_error(tmp_path):
    model = wrap(hf_vit())
    settings = Settings(method="adapter", placement="mlp", epochs=1, batch_size=6)
    module, _ = run_finetune(model, toy_task(), settings, progress=False)
    save_finetuned(module, tmp_path, settings, 32, (0.5,) * 3, (0.5,) * 3, {})
    with pytest.raises(VitlensError, match="no place for"):  # its adapters would be dropped silently otherwise
        build_classifier(load_model(str(tmp_path)), ["a", "b"], False)
    (tmp_path / "adapters.safetensors").unlink()
    with pytest.raises(VitlensError, match="adapters.safetensors is missing"):
        load_model(str(tmp_path))


@pytest.mark.parametrize(("kwargs", "match"), [
    ({"method": "adapters"}, "unknown fine-tuning method"), ({"method": "adapter:side"}, "unknown adapter placement"),
    ({"method": "lora:attn"}, "takes no placement"), ({"epochs": 0}, "--epochs"), ({"lr": float("nan")}, "--lr"),
    ({"lr": -1.0}, "--lr"), ({"weight_decay": float("inf")}, "--weight-decay"), ({"adapter_dim": 0}, "--adapter-dim"),
    ({"lora_rank": 0}, "--lora-rank"), ({"batch_size": 0}, "--batch-size"), ({"seed": -1}, "--seed")])
def test_settings_refuse_bad_values(kwargs, match):
    with pytest.raises(VitlensError, match=match):
        Settings(**kwargs)


def test_parse_method():
    assert parse_method("adapter:parallel") == ("adapter", "parallel")
    assert parse_method("adapter", "attn") == ("adapter", "attn")
    assert parse_method("lora") == ("lora", None)
    assert Settings(method="adapter").label == "adapter:both"


def test_the_schedule_is_constant():
    """run_finetune asks loop.train for no warmup and a floor of 1 x lr: the learning rate never moves."""
    from vitlens.train.loop import lr_at

    assert all(lr_at(p, 1e-3, 0.0, 1.0) == pytest.approx(1e-3, rel=1e-12) for p in np.linspace(0, 1, 21))
