"""load_model: modules, save_pretrained folders, hf: specs, timm with local weights, embedded models, bad specs."""

import json

import pytest
import torch
from safetensors.torch import save_file

import vitlens
from factories import hf_deit, hf_dinov2, hf_vit, timm_vit
from vitlens.errors import VitlensError
from vitlens.models import hf as hf_mod
from vitlens.models import zoo


def _same_logits(a, b, x):
    with torch.no_grad():
        torch.testing.assert_close(a(x), b(x))


@pytest.mark.parametrize("builder", [hf_vit, lambda: hf_deit(True), hf_dinov2, lambda: hf_vit(head=False)])
def test_save_pretrained_folder_loads_by_path_and_hf_spec(tmp_path, builder):
    module = builder()
    module.save_pretrained(tmp_path / "m")
    x = torch.randn(2, 3, 32, 32)
    for spec in (str(tmp_path / "m"), f"hf:{tmp_path / 'm'}"):
        model = vitlens.load_model(spec)
        assert type(model.module) is type(module)
        _same_logits(model, vitlens.wrap(module), x)
        assert model.preprocess.size == (32, 32)


def test_preprocessor_config_is_used(tmp_path):
    module = hf_vit()
    module.save_pretrained(tmp_path)
    (tmp_path / "preprocessor_config.json").write_text(json.dumps(
        {"image_mean": [0.5, 0.5, 0.5], "image_std": [0.25, 0.25, 0.25], "size": {"height": 48, "width": 40},
         "resample": 2}))
    model = vitlens.load_model(tmp_path)
    assert model.preprocess.mean == (0.5, 0.5, 0.5) and model.preprocess.std == (0.25, 0.25, 0.25)
    assert model.preprocess.size == (48, 40) and model.preprocess.interpolation == "bilinear"
    assert vitlens.load_model(tmp_path, image_size=64).preprocess.size == (64, 64)


def test_labels_and_multilabel_from_config(tmp_path):
    module = hf_vit(id2label={i: f"class{i}" for i in range(5)}, problem_type="multi_label_classification")
    module.save_pretrained(tmp_path)
    model = vitlens.load_model(tmp_path)
    assert model.labels == [f"class{i}" for i in range(5)]
    assert model.multi_label
    logits = torch.tensor([[0.0, 2.0, -2.0, 0.0, 0.0]])
    torch.testing.assert_close(model.probabilities(logits), logits.sigmoid())


TINY = dict(img_size=32, patch_size=8, embed_dim=32, depth=3, num_heads=4, num_classes=5)


def test_timm_with_local_weights_file(tmp_path):
    module = timm_vit()
    save_file(module.state_dict(), tmp_path / "w.safetensors")
    torch.save({"state_dict": module.state_dict()}, tmp_path / "w.pth")
    x = torch.randn(2, 3, 32, 32)
    for w in ("w.safetensors", "w.pth"):
        model = vitlens.load_model("timm:vit_tiny_patch16_224", weights=tmp_path / w, model_kwargs=TINY)
        _same_logits(model, vitlens.wrap(module), x)
    assert model.preprocess.size == (32, 32)
    (tmp_path / "bad.safetensors").write_bytes(b"not a file")
    with pytest.raises(VitlensError, match="cannot read weights"):
        vitlens.load_model("timm:vit_tiny_patch16_224", weights=tmp_path / "bad.safetensors", model_kwargs=TINY)
    with pytest.raises(VitlensError, match="weights file not found"):
        vitlens.load_model("timm:vit_tiny_patch16_224", weights=tmp_path / "none.pth", model_kwargs=TINY)


def test_timm_weights_that_do_not_fit(tmp_path):
    save_file({"nonsense": torch.zeros(2)}, tmp_path / "w.safetensors")
    with pytest.raises(VitlensError, match="do not fit"):
        vitlens.load_model("timm:vit_tiny_patch16_224", weights=tmp_path / "w.safetensors", model_kwargs=TINY)


def test_embedded_models_load_from_the_zoo_folder(tmp_path, monkeypatch):
    hf_vit().save_pretrained(tmp_path / "tiny-vit")
    monkeypatch.setattr(zoo, "ZOO_DIR", tmp_path)
    assert list(zoo.zoo_models()) == ["tiny-vit"]
    model = vitlens.load_model("vitlens:tiny-vit")
    assert model.num_blocks == 3
    with pytest.raises(VitlensError, match="no embedded model 'nope'; available: tiny-vit"):
        vitlens.load_model("vitlens:nope")


@pytest.mark.parametrize("spec, msg", [
    ("nonsense", "cannot load model 'nonsense'"),
    ("timm:not_a_model_name", "unknown timm model"),
    ("hf:org/not-on-this-machine", "could not load Hugging Face hub model"),
])
def test_bad_specs_give_one_clear_line(spec, msg, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(VitlensError, match=msg) as e:
        vitlens.load_model(spec)
    assert "\n" not in str(e.value)


def test_folder_without_config(tmp_path):
    with pytest.raises(VitlensError, match="has no config.json"):
        vitlens.load_model(tmp_path)


def test_bad_device_and_image_size():
    with pytest.raises(VitlensError, match="no CUDA GPU"):
        vitlens.load_model(hf_vit(), device="cuda")
    with pytest.raises(VitlensError, match="image-size"):
        vitlens.load_model(hf_vit(), image_size=0)


def test_unsupported_hf_family():
    import transformers

    cfg = transformers.ConvNextConfig(num_channels=3, hidden_sizes=[8, 8, 8, 8], depths=[1, 1, 1, 1])
    with pytest.raises(VitlensError, match="model type 'convnext'.* not a supported ViT-family model.*wrap_by_names"):
        vitlens.wrap(transformers.ConvNextForImageClassification(cfg))


def test_hf_preprocess_fallback_is_imagenet():
    pre = hf_mod.hf_preprocess(hf_vit().config)
    assert pre.mean == vitlens.images.IMAGENET_MEAN and pre.size == (32, 32)


def test_hub_name_loads_from_the_local_hub_cache_offline(tmp_path, monkeypatch):
    """The hub path is real code: an offline hub cache laid out as huggingface_hub writes it serves `hf:ORG/NAME`."""
    snapshot = tmp_path / "models--someorg--tiny-vit" / "snapshots" / ("0" * 40)
    hf_vit().save_pretrained(snapshot)
    (snapshot / "preprocessor_config.json").write_text(json.dumps({"image_mean": [0.5] * 3, "image_std": [0.5] * 3}))
    (tmp_path / "models--someorg--tiny-vit" / "refs").mkdir()
    (tmp_path / "models--someorg--tiny-vit" / "refs" / "main").write_text("0" * 40)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path))
    import huggingface_hub.constants as c

    monkeypatch.setattr(c, "HF_HUB_CACHE", str(tmp_path))
    monkeypatch.setattr(c, "HF_HUB_OFFLINE", True)
    model = vitlens.load_model("hf:someorg/tiny-vit")
    assert model.num_blocks == 3 and model.preprocess.mean == (0.5, 0.5, 0.5)


def test_timm_input_size_mismatch_is_one_clear_line_and_dynamic_models_accept_it():
    model = vitlens.wrap(timm_vit())
    with pytest.raises(VitlensError, match="takes 32x32 inputs, got 48x40"):
        vitlens.Rollout(model).explain(torch.randn(1, 3, 48, 40))
    dynamic = vitlens.wrap(timm_vit(dynamic_img_size=True))
    assert vitlens.Rollout(dynamic).explain(torch.randn(1, 3, 48, 40)).maps.shape == (1, 6, 5)


def test_timm_swin_preprocessing_and_labels_are_the_timm_vit_ones():
    """Regression: TimmSwinModel built its own Preprocess and dropped the interpolation, the labels and the crop
    guard. Any timm model now goes through timm_preprocess / timm_labels: same pretrained_cfg -> same result."""
    import timm

    cfg = dict(mean=(0.5, 0.4, 0.3), std=(0.2, 0.25, 0.3), interpolation="bilinear", crop_pct=0.9)
    swin = timm.create_model("swin_tiny_patch4_window7_224", pretrained=False, img_size=32, patch_size=2, embed_dim=8,
                             depths=(2, 2), num_heads=(1, 2), window_size=4, num_classes=1000)
    vit = timm_vit(num_classes=1000)
    for extra in (cfg, {**cfg, "crop_pct": None, "interpolation": "random"}):
        swin.pretrained_cfg = vit.pretrained_cfg = extra
        got, want = vitlens.wrap(swin), vitlens.wrap(vit)
        assert got.preprocess == want.preprocess
    assert vitlens.wrap(swin).preprocess == vitlens.Preprocess((32, 32), (0.5, 0.4, 0.3), (0.2, 0.25, 0.3), 1.0)
    swin.pretrained_cfg = vit.pretrained_cfg = cfg
    assert vitlens.wrap(swin).preprocess.interpolation == "bilinear" and vitlens.wrap(swin).preprocess.crop_pct == 0.9
    labels = vitlens.wrap(swin).labels
    assert labels is not None and len(labels) == 1000 and labels == vitlens.wrap(vit).labels
    assert labels[0].startswith("tench")
