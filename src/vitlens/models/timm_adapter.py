"""Adapter for timm VisionTransformer models (DeiT, distilled DeiT, register tokens, any patch size or grid)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from vitlens._utils import pair
from vitlens.errors import VitlensError
from vitlens.images import IMAGENET_MEAN, IMAGENET_STD, Preprocess
from vitlens.layout import TokenLayout
from vitlens.models.base import AttentionSite, VitModel
from vitlens.models.registry import register_adapter

INTERPOLATIONS = ("bilinear", "bicubic", "nearest", "lanczos")


def is_timm_vit(module: nn.Module) -> bool:
    """Whether ``module`` is a timm VisionTransformer (or subclass, e.g. the distilled DeiT)."""
    return any(c.__module__.startswith("timm.") and c.__name__ == "VisionTransformer" for c in type(module).mro())


def timm_preprocess(module: nn.Module) -> Preprocess:
    """Preprocessing of any timm model from its pretrained_cfg (mean, std, crop_pct, interpolation), with ImageNet
    defaults, at the built model's input size (pretrained_cfg keeps the hub default size)."""
    cfg = getattr(module, "pretrained_cfg", None) or {}
    img_size = getattr(module.patch_embed, "img_size", None)
    size = pair(img_size) if img_size is not None else pair(cfg.get("input_size", (3, 224, 224))[1:])
    interp = cfg.get("interpolation") or "bicubic"
    crop_pct = float(cfg.get("crop_pct") or 1.0)
    return Preprocess(
        size=size,
        mean=tuple(cfg.get("mean") or IMAGENET_MEAN),
        std=tuple(cfg.get("std") or IMAGENET_STD),
        crop_pct=crop_pct if 0 < crop_pct <= 1 else 1.0,
        interpolation=interp if interp in INTERPOLATIONS else "bicubic",
    )


def timm_labels(module: nn.Module) -> list[str] | None:
    """ImageNet-1k class names for a 1000-class timm head (None for other heads or when timm cannot say)."""
    num_classes = int(getattr(module, "num_classes", 0) or 0)
    if num_classes != 1000:
        return None
    try:
        from timm.data import ImageNetInfo

        info = ImageNetInfo("imagenet-1k")
        return [info.index_to_description(i) for i in range(1000)]
    except Exception:  # labels are a convenience; never fail a load over them
        return None


class TimmVitModel(VitModel):
    """A timm VisionTransformer."""

    family = "timm-vit"

    def __init__(self, module: nn.Module, preprocess: Preprocess | None = None) -> None:
        vit: Any = module  # a timm VisionTransformer (untyped library)
        pool = getattr(module, "global_pool", "token")
        distilled = getattr(module, "dist_token", None) is not None
        if distilled and not getattr(module, "distilled_training", False):
            self._readout = "cls+dist"
        elif pool == "token":
            self._readout = "cls"
        elif pool in ("avg", "avgmax", "max"):
            self._readout = "mean"
        else:
            raise VitlensError(
                f"timm global_pool={pool!r} is not supported (rollout needs 'token' or 'avg' pooling); "
                "recreate the model with global_pool='token' or 'avg'"
            )
        num_classes = int(getattr(module, "num_classes", 0) or 0)
        super().__init__(
            module,
            preprocess or timm_preprocess(module),
            num_classes=num_classes or None,
            labels=timm_labels(module),
            patch_size=pair(vit.patch_embed.patch_size),
        )

    @property
    def _vit(self) -> Any:
        """The wrapped timm VisionTransformer (timm is untyped: its attributes are read dynamically)."""
        return self.module

    def _attention_sites(self) -> list[AttentionSite]:
        sites: list[AttentionSite] = []
        for blk in getattr(self.module, "blocks", []):
            attn = getattr(blk, "attn", None)
            if attn is None or not hasattr(attn, "attn_drop"):
                return []
            sites.append((attn.attn_drop, _output))
        return sites

    def _use_explicit_attention(self) -> Callable[[], None]:
        return unfuse([blk.attn for blk in self._vit.blocks])

    def _run(self, x: torch.Tensor) -> torch.Tensor:
        check_input_size(self.module, x)
        return self.module(x)

    def layout(self, image_size: tuple[int, int]) -> TokenLayout:
        """Prefix tokens (CLS, distillation, registers), patch grid and pooling."""
        ph, pw = self.patch_size
        grid = (image_size[0] // ph, image_size[1] // pw)
        return TokenLayout(int(self._vit.num_prefix_tokens), grid, self._readout)


def unfuse(attns: list[nn.Module]) -> Callable[[], None]:
    """Switch timm attention modules to explicit softmax attention (``fused_attn = False``); return the undo.
    Modules without the flag (e.g. Swinv2's cosine attention, always explicit) are left alone."""
    # timm Attention modules (untyped library) and their fused_attn flags
    saved: list[tuple[Any, Any]] = [(a, a.fused_attn) for a in attns if hasattr(a, "fused_attn")]
    for a, _ in saved:
        a.fused_attn = False

    def undo() -> None:
        for a, flag in saved:
            a.fused_attn = flag

    return undo


def check_input_size(module: nn.Module, x: torch.Tensor) -> None:
    """One clear line when a fixed-size timm model gets another input size (timm would fail an assert)."""
    pe: Any = module.patch_embed  # a timm PatchEmbed (untyped library)
    size = pair(pe.img_size) if getattr(pe, "img_size", None) is not None else None
    dynamic = getattr(module, "dynamic_img_size", False) or not getattr(pe, "strict_img_size", True)
    if size is not None and not dynamic and tuple(x.shape[-2:]) != size:
        raise VitlensError(
            f"this timm model takes {size[0]}x{size[1]} inputs, got {x.shape[-2]}x{x.shape[-1]}; drop --image-size "
            "or create it with dynamic_img_size=True (--timm-kwargs '{\"dynamic_img_size\": true}')"
        )


def _output(module, args, kwargs, output) -> torch.Tensor:
    return output


def load_timm(name: str, weights: str | Path | None = None, image_size: int | None = None, **kwargs) -> VitModel:
    """Create a timm model: hub weights by default, or ``weights`` from a local .safetensors/.pth file."""
    try:
        import timm
    except ImportError:
        raise VitlensError("loading timm models needs timm: pip install 'vitlens[timm]'") from None
    except RuntimeError as e:  # a torchvision build that does not match torch breaks timm's import
        first = str(e).splitlines()[0]
        raise VitlensError(f"timm failed to import ({first}); install a torchvision that matches torch") from None
    if name not in timm.list_models() and name.split(".")[0] not in timm.list_models():
        raise VitlensError(f"unknown timm model {name!r}; see timm.list_models('vit*')")
    try:
        module = timm.create_model(name, pretrained=weights is None, **kwargs)
    except Exception as e:
        raise VitlensError(
            f"could not create timm model {name!r} with hub weights ({type(e).__name__}); offline? "
            "pass a local weights file (--weights FILE)"
        ) from None
    if weights is not None:
        try:
            module.load_state_dict(_read_state_dict(Path(weights)))
        except RuntimeError as e:
            first = str(e).strip().splitlines()[0][:160]
            raise VitlensError(f"weights {weights} do not fit timm model {name!r} ({first}); check the name") from None
    from vitlens.models.loading import wrap

    model = wrap(module.eval())
    if image_size:
        model.preprocess = model.preprocess.with_size(image_size)
    return model


def _read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    if not path.is_file():
        raise VitlensError(f"weights file not found: {path}")
    sd: Any  # a state dict, or a checkpoint holding one under 'state_dict' / 'model'
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            sd = load_file(str(path))
        else:
            sd = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        kind = type(e).__name__
        raise VitlensError(f"cannot read weights {path}: {kind}; expected a .safetensors or .pth state dict") from None
    for key in ("state_dict", "model"):
        if isinstance(sd, dict) and isinstance(sd.get(key), dict):
            sd = sd[key]
    return sd


register_adapter(
    "timm-vit",
    is_timm_vit,
    TimmVitModel,
    "timm VisionTransformer: ViT, DeiT, distilled DeiT, register tokens, any patch size, non-square grids",
)
