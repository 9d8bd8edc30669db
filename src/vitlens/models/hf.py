"""Adapter for Hugging Face transformers vision models (ViT, DeiT, DINOv2 with or without registers, BEiT)."""

from __future__ import annotations

import inspect
import json
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
from torch import nn

from vitlens._utils import pair
from vitlens.errors import VitlensError
from vitlens.images import IMAGENET_MEAN, IMAGENET_STD, Preprocess
from vitlens.layout import TokenLayout
from vitlens.models.base import AttentionSite, VitModel
from vitlens.models.registry import register_adapter

HF_FAMILIES = ("vit", "deit", "dinov2", "dinov2_with_registers", "beit")
_PIL_RESAMPLE = {0: "nearest", 1: "lanczos", 2: "bilinear", 3: "bicubic"}


def is_hf_model(module: nn.Module) -> bool:
    """Whether ``module`` is a transformers PreTrainedModel."""
    return any(c.__module__.startswith("transformers.") and c.__name__ == "PreTrainedModel" for c in type(module).mro())


def is_hf_vit(module: nn.Module) -> bool:
    """A transformers model of one of ``HF_FAMILIES`` (ViT, DeiT, DINOv2 with or without registers, BEiT)."""
    return is_hf_model(module) and getattr(module.config, "model_type", None) in HF_FAMILIES


def vision_config(config):
    """The vision part of a config: ``config.vision_config`` for two-tower configs (CLIP, SigLIP), else itself."""
    return getattr(config, "vision_config", None) or config


def attention_class(module: nn.Module) -> type | None:
    """The attention class a transformers model declares in ``_can_record_outputs['attentions']``."""
    spec = getattr(type(module), "_can_record_outputs", None) or {}
    target = spec.get("attentions")
    if isinstance(target, type):
        return target
    return getattr(target, "target_class", None)


def hf_preprocess(config, folder: str | Path | None = None) -> Preprocess:
    """Preprocessing from a folder's preprocessor_config.json, else ImageNet mean/std at the config's image size."""
    size = pair(getattr(vision_config(config), "image_size", 224))
    mean, std, crop_pct, interp = IMAGENET_MEAN, IMAGENET_STD, 1.0, "bicubic"
    path = Path(folder) / "preprocessor_config.json" if folder is not None else None
    if path is not None and path.is_file():
        try:
            pc = json.loads(path.read_text())
        except json.JSONDecodeError as e:
            raise VitlensError(f"{path} is not valid JSON ({e.msg}); fix or delete it") from None
        mean = tuple(pc.get("image_mean", mean))
        std = tuple(pc.get("image_std", std))
        interp = _PIL_RESAMPLE.get(pc.get("resample"), interp)
        s = pc.get("size") or {}
        crop = pc.get("crop_size") or {}
        if pc.get("do_center_crop") and crop:
            size = (crop.get("height", size[0]), crop.get("width", size[1]))
            edge = s.get("shortest_edge") if isinstance(s, dict) else None
            crop_pct = min(1.0, min(size) / edge) if edge else 1.0
        elif isinstance(s, dict) and "height" in s:
            size = (s["height"], s["width"])
        elif isinstance(s, dict) and "shortest_edge" in s:
            size = (s["shortest_edge"], s["shortest_edge"])
    return Preprocess(size=size, mean=mean, std=std, crop_pct=crop_pct, interpolation=interp)


def hf_labels(config) -> list[str]:
    """Class names from a config's id2label (keys may be ints or strings)."""
    id2label = getattr(config, "id2label", None) or {}
    return [str(id2label.get(i, id2label.get(str(i), i))) for i in range(config.num_labels)]


def use_eager_attention(module: nn.Module) -> Callable[[], None]:
    """Set every config inside ``module`` to eager attention (sdpa returns no weights); return the undo function."""
    configs = {id(m.config): m.config for m in module.modules() if hasattr(m, "config")}
    saved = [(c, c._attn_implementation) for c in configs.values()]
    for c, _ in saved:
        c._attn_implementation = "eager"

    def undo() -> None:
        for c, impl in saved:
            c._attn_implementation = impl

    return undo


class HFVitModel(VitModel):
    """A transformers ViT/DeiT/DINOv2/BEiT model, classifier or bare backbone."""

    family = "hf"

    def __init__(self, module: nn.Module, preprocess: Preprocess | None = None) -> None:
        cfg = module.config
        if cfg.model_type not in HF_FAMILIES:
            raise VitlensError(
                f"transformers model type {cfg.model_type!r} is not supported; supported: {', '.join(HF_FAMILIES)}"
            )
        self.config = cfg
        self._attn_cls = attention_class(module)
        name = type(module).__name__
        has_head = name.endswith("ForImageClassification") or name.endswith("ForImageClassificationWithTeacher")
        super().__init__(
            module,
            preprocess or hf_preprocess(cfg),
            num_classes=cfg.num_labels if has_head else None,
            labels=hf_labels(cfg) if has_head else None,
            multi_label=getattr(cfg, "problem_type", None) == "multi_label_classification",
            patch_size=pair(cfg.patch_size),
        )
        self.family = f"hf-{cfg.model_type}"
        self._readout = self._find_readout(name)
        self._accepts_interp = "interpolate_pos_encoding" in inspect.signature(module.forward).parameters

    def _find_readout(self, name: str) -> str:
        t = self.config.model_type
        if t == "deit" and name.endswith("WithTeacher"):
            return "cls+dist"
        if t.startswith("dinov2") and self.has_head:
            return "cls+mean"
        mean_pool = getattr(self.config, "use_mean_pooling", False)
        if t == "beit" and mean_pool and (self.has_head or _has_pooler(self.module)):
            return "mean"
        return "cls"

    def _num_prefix(self) -> int:
        t = self.config.model_type
        if t == "deit":
            return 2
        if t == "dinov2_with_registers":
            return 1 + int(self.config.num_register_tokens)
        return 1

    def _attention_sites(self) -> list[AttentionSite]:
        if self._attn_cls is None:
            return []
        return [(m, _second) for m in self.module.modules() if isinstance(m, self._attn_cls)]

    def _use_explicit_attention(self) -> Callable[[], None]:
        return use_eager_attention(self.module)

    def _run(self, x: torch.Tensor) -> torch.Tensor:
        kwargs = {}
        if self._accepts_interp and tuple(x.shape[-2:]) != pair(self.config.image_size):
            kwargs["interpolate_pos_encoding"] = True
        out = self.module(pixel_values=x, **kwargs)
        if self.has_head:
            return out.logits
        pooled = getattr(out, "pooler_output", None)
        return pooled if pooled is not None else out.last_hidden_state[:, 0]

    def layout(self, image_size: tuple[int, int]) -> TokenLayout:
        """Prefix tokens, patch grid for this input size, and the model's pooling."""
        ph, pw = self.patch_size
        return TokenLayout(self._num_prefix(), (image_size[0] // ph, image_size[1] // pw), self._readout)


def _second(module, args, kwargs, output) -> torch.Tensor | None:
    return output[1] if isinstance(output, tuple) and len(output) > 1 else None


def _has_pooler(module: nn.Module) -> bool:
    base = getattr(module, getattr(module, "base_model_prefix", ""), module)
    return getattr(base, "pooler", None) is not None


def import_transformers():
    """Import transformers with one clear line when it is missing or cannot load (e.g. a mismatched torchvision)."""
    try:
        import transformers

        transformers.AutoConfig  # noqa: B018 - the lazy module imports its torch parts here
        transformers.PreTrainedModel  # noqa: B018
    except ImportError as e:
        if getattr(e, "name", None) == "transformers":
            raise VitlensError("loading Hugging Face models needs transformers: pip install 'vitlens[hf]'") from None
        raise VitlensError(_broken_import_message(e)) from None
    except RuntimeError as e:
        raise VitlensError(_broken_import_message(e)) from None
    return transformers


def _broken_import_message(e: Exception) -> str:
    cause = e.__cause__ or e
    first = (str(cause).strip().splitlines() or [type(cause).__name__])[0][:120]
    hint = "; the installed torchvision does not match torch: uninstall it or install the matching build"
    return f"transformers failed to import ({first}){hint if 'torchvision' in str(cause) else ''}"


@contextmanager
def _quiet_progress(transformers) -> Iterator[None]:
    """transformers draws a weight-loading progress bar on stderr; vitlens keeps stderr for its own lines."""
    logging = transformers.utils.logging
    was_enabled = logging.is_progress_bar_enabled()
    logging.disable_progress_bar()
    try:
        yield
    finally:
        if was_enabled:
            logging.enable_progress_bar()


def _hub_folder(transformers, name: str) -> Path | None:
    """Folder of a hub model's cached preprocessor_config.json, if it has one."""
    try:
        found = transformers.utils.cached_file(
            name, "preprocessor_config.json", _raise_exceptions_for_missing_entries=False
        )
    except (OSError, ValueError):
        return None
    return Path(found).parent if found else None


def load_hf(name_or_path: str, image_size: int | None = None) -> VitModel:
    """Load a transformers image model from a local folder or the hub (classifier if the config names one)."""
    transformers = import_transformers()
    local = Path(name_or_path)
    try:
        config = transformers.AutoConfig.from_pretrained(name_or_path)
        archs = getattr(config, "architectures", None) or []
        if any("ForImageClassification" in a for a in archs):
            cls = transformers.AutoModelForImageClassification
            if any(a.endswith("WithTeacher") for a in archs):
                cls = getattr(transformers, archs[0])
        else:
            cls = transformers.AutoModel
        with _quiet_progress(transformers):
            module = cls.from_pretrained(name_or_path, attn_implementation="eager")
    except (OSError, ValueError, KeyError) as e:
        where = "folder" if local.exists() else "hub model"
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise VitlensError(
            f"could not load Hugging Face {where} {name_or_path!r}: {first[:200]} "
            "(offline? pass a local folder written by save_pretrained)"
        ) from None
    pre = hf_preprocess(config, local if local.is_dir() else _hub_folder(transformers, name_or_path))
    if image_size:
        pre = pre.with_size(image_size)
    from vitlens.models.loading import wrap

    model = wrap(module.eval())
    model.preprocess = pre
    return model


register_adapter(
    "hf-vit",
    is_hf_vit,
    HFVitModel,
    "transformers ViT, DeiT (CLS + distillation), DINOv2 (with or without registers), BEiT; head or backbone",
)
