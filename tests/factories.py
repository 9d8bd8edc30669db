"""Tiny random-weight models of every supported family, built from configs (no hub)."""

from __future__ import annotations

import timm
import torch
import transformers

IMG = 32  # input side for square models; patch 8 -> 4x4 grid


def _common(**kw) -> dict:
    base = dict(image_size=IMG, patch_size=8, hidden_size=32, num_hidden_layers=3, num_attention_heads=4,
                intermediate_size=64, num_labels=5, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    base.update(kw)
    return base


def hf_vit(head: bool = True, **kw) -> torch.nn.Module:
    cfg = transformers.ViTConfig(**_common(**kw))
    return (transformers.ViTForImageClassification(cfg) if head else transformers.ViTModel(cfg)).eval()


def hf_deit(teacher: bool = True) -> torch.nn.Module:
    cfg = transformers.DeiTConfig(**_common())
    cls = transformers.DeiTForImageClassificationWithTeacher if teacher else transformers.DeiTForImageClassification
    return cls(cfg).eval()


def hf_dinov2(head: bool = True, registers: int = 0) -> torch.nn.Module:
    kw = _common(mlp_ratio=2)
    kw.pop("intermediate_size")
    kw.pop("attention_probs_dropout_prob")
    if registers:
        cfg = transformers.Dinov2WithRegistersConfig(num_register_tokens=registers, **kw)
        cls = transformers.Dinov2WithRegistersForImageClassification if head else transformers.Dinov2WithRegistersModel
    else:
        cfg = transformers.Dinov2Config(**kw)
        cls = transformers.Dinov2ForImageClassification if head else transformers.Dinov2Model
    return cls(cfg).eval()


def hf_beit(mean_pool: bool = True) -> torch.nn.Module:
    cfg = transformers.BeitConfig(**_common(use_relative_position_bias=True, use_mean_pooling=mean_pool))
    return transformers.BeitForImageClassification(cfg).eval()


def timm_vit(**kw) -> torch.nn.Module:
    args = dict(pretrained=False, img_size=IMG, patch_size=8, embed_dim=32, depth=3, num_heads=4, num_classes=5)
    args.update(kw)
    return timm.create_model("vit_tiny_patch16_224", **args).eval()


def timm_deit_distilled() -> torch.nn.Module:
    return timm.create_model("deit_tiny_distilled_patch16_224", pretrained=False, img_size=IMG, patch_size=8,
                             embed_dim=32, depth=3, num_heads=4, num_classes=5).eval()


def timm_eva(**kw) -> torch.nn.Module:
    """timm Eva (rotary embeddings by default); q/v biases randomised (timm initialises them to 0)."""
    from timm.models.eva import Eva

    args = dict(img_size=IMG, patch_size=8, embed_dim=32, depth=3, num_heads=4, num_classes=5, use_rot_pos_emb=True)
    args.update(kw)
    module = Eva(**args)
    with torch.no_grad():
        for name, p in module.named_parameters():
            if name.endswith(("q_bias", "v_bias")):
                p.normal_()
    return module.eval()


_VISION = dict(image_size=IMG, patch_size=8, hidden_size=32, intermediate_size=64, num_hidden_layers=3,
               num_attention_heads=4)
_TEXT = dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2, vocab_size=50,
             max_position_embeddings=8, bos_token_id=0, eos_token_id=1, pad_token_id=1)


def hf_clip(kind: str = "vision", **kw) -> torch.nn.Module:
    """transformers CLIP vision tower: kind 'vision' (CLIPVisionModel), 'projection' (...WithProjection) or
    'classifier' (CLIPForImageClassification, 5 labels)."""
    vision = transformers.CLIPVisionConfig(projection_dim=16, **{**_VISION, **kw})
    if kind == "classifier":
        cfg = transformers.CLIPConfig(text_config=_TEXT, vision_config=vision.to_dict(), num_labels=5)
        return transformers.CLIPForImageClassification(cfg).eval()
    cls = transformers.CLIPVisionModelWithProjection if kind == "projection" else transformers.CLIPVisionModel
    return cls(vision).eval()


def hf_siglip(kind: str = "vision", **kw) -> torch.nn.Module:
    """transformers SigLIP vision tower: kind 'vision' (SiglipVisionModel with its MAP head) or 'classifier'."""
    vision = transformers.SiglipVisionConfig(**{**_VISION, **kw})
    if kind == "classifier":
        cfg = transformers.SiglipConfig(text_config=_TEXT, vision_config=vision.to_dict(), num_labels=5)
        return transformers.SiglipForImageClassification(cfg).eval()
    return transformers.SiglipVisionModel(vision).eval()


# name -> (builder, input (H, W), expected num_prefix, expected readout)
FAMILIES = {
    "hf-vit": (lambda: hf_vit(), (IMG, IMG), 1, "cls"),
    "hf-vit-backbone": (lambda: hf_vit(head=False), (IMG, IMG), 1, "cls"),
    "hf-vit-nonsquare-p4": (lambda: hf_vit(image_size=(16, 24), patch_size=4), (16, 24), 1, "cls"),
    "hf-deit-teacher": (lambda: hf_deit(True), (IMG, IMG), 2, "cls+dist"),
    "hf-deit": (lambda: hf_deit(False), (IMG, IMG), 2, "cls"),
    "hf-dinov2": (lambda: hf_dinov2(), (IMG, IMG), 1, "cls+mean"),
    "hf-dinov2-backbone": (lambda: hf_dinov2(head=False), (IMG, IMG), 1, "cls"),
    "hf-dinov2-registers": (lambda: hf_dinov2(registers=4), (IMG, IMG), 5, "cls+mean"),
    "hf-beit": (lambda: hf_beit(), (IMG, IMG), 1, "mean"),
    "hf-beit-cls": (lambda: hf_beit(mean_pool=False), (IMG, IMG), 1, "cls"),
    "timm-vit": (lambda: timm_vit(), (IMG, IMG), 1, "cls"),
    "timm-vit-avg": (lambda: timm_vit(global_pool="avg", class_token=False), (IMG, IMG), 0, "mean"),
    "timm-vit-registers": (lambda: timm_vit(reg_tokens=4), (IMG, IMG), 5, "cls"),
    "timm-vit-nonsquare-p4": (lambda: timm_vit(img_size=(16, 28), patch_size=4), (16, 28), 1, "cls"),
    "timm-deit-distilled": (timm_deit_distilled, (IMG, IMG), 2, "cls+dist"),
}
# families added through the generic adapter (models/generic.py): also in FAMILIES, so every shared test covers them
GENERIC_FAMILIES = {
    "timm-eva02-rope-avg": (lambda: timm_eva(), (IMG, IMG), 1, "mean"),
    "timm-eva-rope-attn-registers-token": (
        lambda: timm_eva(attn_type="rope", num_reg_tokens=2, global_pool="token", qkv_fused=False), (IMG, IMG), 3,
        "cls"),
    "timm-eva-abs-nonsquare-p4": (lambda: timm_eva(img_size=(16, 24), patch_size=4, use_rot_pos_emb=False),
                                  (16, 24), 1, "mean"),
    "hf-clip-vision": (lambda: hf_clip("vision"), (IMG, IMG), 1, "cls"),
    "hf-clip-projection": (lambda: hf_clip("projection"), (IMG, IMG), 1, "cls"),
    "hf-clip-classifier": (lambda: hf_clip("classifier"), (IMG, IMG), 1, "mean"),
    "hf-siglip-vision": (lambda: hf_siglip("vision"), (IMG, IMG), 0, "mean"),
    "hf-siglip-classifier": (lambda: hf_siglip("classifier"), (IMG, IMG), 0, "mean"),
}
FAMILIES.update(GENERIC_FAMILIES)


def build(name: str):
    """(module, input batch of 3 images) for a family name, seeded."""
    torch.manual_seed(0)
    builder, (h, w), _, _ = FAMILIES[name]
    module = builder()
    return module, torch.randn(3, 3, h, w)
