"""`load_model(spec)`: one entry point for modules, HF folders or hub names, timm names and embedded models."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

from torch import nn

from vitlens.errors import VitlensError
from vitlens.images import check_tokens
from vitlens.models import zoo
from vitlens.models.base import VitModel
from vitlens.models.registry import FamiliesView, find_adapter

SPEC_HELP = "an nn.Module, 'hf:ORG/NAME', a local HF folder, 'timm:NAME' (with optional weights=FILE) or 'vitlens:NAME'"

FAMILIES: Mapping[str, str] = FamiliesView()  # {adapter name: description}, read live from the registry


def wrap(module: nn.Module) -> VitModel:
    """Wrap an already built model with the first registered adapter that recognises it (see `registry`)."""
    spec = find_adapter(module)
    if spec is not None:
        return spec.build(module.eval())
    kind = getattr(getattr(module, "config", None), "model_type", None)
    what = f"{type(module).__name__} (transformers model type {kind!r})" if kind else type(module).__name__
    raise VitlensError(
        f"{what} is not a supported ViT-family model (adapters: {', '.join(FAMILIES)}); name its attention "
        "modules with vitlens.models.wrap_by_names(module, attention='blocks.*.attn', kind='timm' or 'hf')"
    )


def load_model(
    spec: str | Path | nn.Module | VitModel,
    *,
    weights: str | Path | None = None,
    image_size: int | None = None,
    device: str | None = None,
    model_kwargs: dict | None = None,
) -> VitModel:
    """Load a ViT-family model from ``spec``; see SPEC_HELP.

    ``weights`` is a local .safetensors/.pth state dict for a ``timm:NAME`` model (hub weights otherwise), and
    ``model_kwargs`` go to ``timm.create_model`` (e.g. ``num_classes``, ``img_size``). ``image_size`` overrides the
    preprocessing size.
    """
    if image_size is not None and image_size < 1:
        raise VitlensError(f"--image-size must be a positive number of pixels, got {image_size}")
    model = _load(spec, weights, image_size, model_kwargs or {})
    check_tokens(model.preprocess.size, model.patch_size)  # every family: attention memory grows with tokens^2
    if device is not None:
        model.to(_check_device(device))
    return model


def _load(spec, weights, image_size, model_kwargs: dict) -> VitModel:
    if not isinstance(spec, (str, Path)) and (weights is not None or model_kwargs):
        raise VitlensError("weights and model kwargs are for timm:NAME specs, not for an already built model")
    if isinstance(spec, VitModel):
        model = spec
    elif isinstance(spec, nn.Module):
        model = wrap(spec)
    else:
        text = str(spec)
        if text.startswith("timm:"):
            from vitlens.models.timm_adapter import load_timm

            return load_timm(text[5:], weights=weights, image_size=image_size, **model_kwargs)
        if weights is not None or model_kwargs:
            raise VitlensError("weights and model kwargs are for timm:NAME models; an HF folder holds its own")
        from vitlens.models.hf import load_hf

        if text.startswith("vitlens:"):
            return load_hf(str(zoo.model_folder(text[8:])), image_size=image_size)
        if text.startswith("hf:"):
            return load_hf(text[3:], image_size=image_size)
        if Path(text).is_dir():
            if not (Path(text) / "config.json").is_file():
                raise VitlensError(f"folder {text} has no config.json; pass a folder written by save_pretrained")
            return load_hf(text, image_size=image_size)
        raise VitlensError(f"cannot load model {text!r}: expected {SPEC_HELP}")
    if image_size:
        model.preprocess = model.preprocess.with_size(image_size)
    return model


def _check_device(device: str) -> str:
    import torch

    if device.startswith("cuda") and not torch.cuda.is_available():
        raise VitlensError(f"device {device!r} asked for, but no CUDA GPU is available; use --device cpu")
    if not (device == "cpu" or device.startswith("cuda") or device == "mps"):
        raise VitlensError(f"unknown device {device!r}; use cpu or cuda")
    return device
