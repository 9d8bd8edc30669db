"""Adapter for Hugging Face transformers vision models (ViT, DeiT, DINOv2 with or without registers, BEiT)."""

from __future__ import annotations

import inspect
import json
import os
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from torch import nn

from vitlens._utils import pair
from vitlens.errors import VitlensError
from vitlens.images import IMAGENET_MEAN, IMAGENET_STD, Preprocess, check_regular_file
from vitlens.layout import TokenLayout
from vitlens.models.base import AttentionSite, VitModel
from vitlens.models.registry import register_adapter

VERBOSE_ENV = "VITLENS_VERBOSE"
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
    """Preprocessing from a folder's preprocessor_config.json, else ImageNet mean/std at the config's image size.

    Every value is checked (sizes whole numbers, mean/std three finite numbers with std > 0, crop_pct in (0, 1]);
    a bad one is one error naming the file and the key."""
    size = _config_size(getattr(vision_config(config), "image_size", 224), "config.json image_size")
    mean, std, crop_pct, interp = IMAGENET_MEAN, IMAGENET_STD, 1.0, "bicubic"
    path = Path(folder) / "preprocessor_config.json" if folder is not None else None
    where = str(path) if path is not None else "the model config"
    if path is not None and path.is_file():
        pc = _read_json_object(path)
        mean = pc.get("image_mean", mean) if pc.get("image_mean") is not None else mean
        std = pc.get("image_std", std) if pc.get("image_std") is not None else std
        resample: Any = pc.get("resample")  # any JSON value; a code outside the table keeps the default
        interp = _PIL_RESAMPLE.get(resample, interp)
        s = pc.get("size")
        crop = pc.get("crop_size")
        if s is not None and not isinstance(s, (dict, int)) or isinstance(s, bool):
            raise VitlensError(f"{path}: size must be a number or an object like {{\"height\": 224, \"width\": 224}}, "
                               f"got {s!r}; fix the file")
        if crop is not None and not isinstance(crop, (dict, int)) or isinstance(crop, bool):
            raise VitlensError(f"{path}: crop_size must be a number or an object with height and width, got {crop!r}")
        s = {"height": s, "width": s} if isinstance(s, int) else (s or {})
        crop = {"height": crop, "width": crop} if isinstance(crop, int) else (crop or {})
        if pc.get("do_center_crop") and crop:
            size = _config_size((crop.get("height", size[0]), crop.get("width", size[1])), f"{path} crop_size")
            edge = s.get("shortest_edge")
            if edge is not None:
                edge = _config_size(edge, f"{path} size.shortest_edge")[0]
                crop_pct = min(1.0, min(size) / edge)
        elif "height" in s or "width" in s:
            size = _config_size((s.get("height"), s.get("width")), f"{path} size")
        elif "shortest_edge" in s:
            size = _config_size(s["shortest_edge"], f"{path} size.shortest_edge")
        if pc.get("crop_pct") is not None:
            crop_pct = pc["crop_pct"]
    try:
        return Preprocess(size=size, mean=mean, std=std, crop_pct=crop_pct, interpolation=interp)
    except VitlensError as e:
        raise VitlensError(f"{where}: {e}; fix the preprocessing values") from None


def _config_size(value, what: str) -> tuple[int, int]:
    """(h, w) from an int or a pair of ints in a config; one clear error otherwise."""
    pair = (value, value) if isinstance(value, int) and not isinstance(value, bool) else value
    ok = isinstance(pair, (list, tuple)) and len(pair) == 2 and all(
        isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in pair)
    if not ok:
        raise VitlensError(f"{what} must be a positive whole number of pixels (or height and width), got {value!r}")
    return int(pair[0]), int(pair[1])


def _read_json_object(path: Path) -> dict:
    """A JSON object from ``path``, with one clear error for an unreadable, invalid or non-object file."""
    check_regular_file(path, "file")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise VitlensError(f"{path} is not valid JSON ({e.msg}, line {e.lineno}); fix or re-save it") from None
    except (UnicodeDecodeError, RecursionError, OSError) as e:
        raise VitlensError(f"cannot read {path} ({type(e).__name__}); fix or re-save it") from None
    if not isinstance(data, dict):
        raise VitlensError(f"{path} must hold a JSON object, got {type(data).__name__}; fix or re-save it")
    return data


def check_hf_folder(folder: str | Path) -> None:
    """Check a save_pretrained folder before transformers reads it: config.json a JSON object whose id2label (if
    any) maps 0..n-1 and agrees with num_labels, preprocessor_config.json valid JSON, and every .safetensors file a
    complete safetensors file. One clear error naming the file and the fix."""
    folder = Path(folder)
    cfg = _read_json_object(folder / "config.json")
    id2label = cfg.get("id2label")
    if id2label is not None:
        if not isinstance(id2label, dict):
            raise VitlensError(f"{folder / 'config.json'}: id2label must be an object of index -> name")
        try:
            keys = sorted(int(k) for k in id2label)
        except (TypeError, ValueError):
            raise VitlensError(f"{folder / 'config.json'}: id2label keys must be class indices 0..n-1") from None
        if keys != list(range(len(keys))):
            raise VitlensError(f"{folder / 'config.json'}: id2label keys must be 0..{len(keys) - 1} without gaps")
        n = cfg.get("num_labels")
        if n is not None and n != len(keys):
            raise VitlensError(f"{folder / 'config.json'}: num_labels is {n} but id2label names {len(keys)} classes; "
                               "make them agree")
    if (folder / "preprocessor_config.json").exists():
        _read_json_object(folder / "preprocessor_config.json")
    for weights in sorted(folder.glob("*.safetensors")):
        _check_safetensors(weights)


def _check_safetensors(path: Path) -> None:
    from safetensors import safe_open

    check_regular_file(path, "weights file")
    try:
        with safe_open(str(path), framework="pt") as f:
            f.keys()
    except Exception as e:  # noqa: BLE001 - safetensors raises its own Rust error type
        first = (str(e).strip().splitlines() or [type(e).__name__])[0][:120]
        raise VitlensError(f"{path} is not a complete safetensors file ({first}); it is truncated or corrupt: "
                           "re-save the model with save_pretrained") from None


def hf_labels(config) -> list[str]:
    """Class names from a config's id2label (keys may be ints or strings)."""
    id2label = getattr(config, "id2label", None) or {}
    return [str(id2label.get(i, id2label.get(str(i), i))) for i in range(config.num_labels)]


def use_eager_attention(module: nn.Module) -> Callable[[], None]:
    """Set every config inside ``module`` to eager attention (sdpa returns no weights); return the undo function."""
    configs: dict[int, Any] = {id(m.config): m.config for m in module.modules() if hasattr(m, "config")}
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
        cfg: Any = module.config  # a transformers PretrainedConfig (untyped library)
        if cfg.model_type not in HF_FAMILIES:
            raise VitlensError(
                f"transformers model type {cfg.model_type!r} is not supported; supported: {', '.join(HF_FAMILIES)}"
            )
        self.config: Any = cfg
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


def verbose_default() -> bool:
    """Whether library chatter is shown: $VITLENS_VERBOSE set to anything but '' or '0' (the CLI's --verbose)."""
    return os.environ.get(VERBOSE_ENV, "").strip() not in ("", "0")


@contextmanager
def quiet_libraries(transformers=None, verbose: bool | None = None) -> Iterator[None]:
    """Keep transformers' and huggingface_hub's logging (LOAD REPORT, config warnings), progress bars and Python
    warnings off stderr, which vitlens keeps for its own lines; ``verbose`` (default `verbose_default`) lets them
    through. Every setting is restored on exit."""
    if verbose if verbose is not None else verbose_default():
        yield
        return
    saved = []
    for name in ("transformers", "huggingface_hub"):
        try:
            logging = __import__(f"{name}.utils", fromlist=["logging"]).logging
        except ImportError:
            continue
        saved.append((logging, logging.get_verbosity()))
        logging.set_verbosity_error()
    bars = None
    if transformers is not None:
        tl = transformers.utils.logging
        bars = tl.is_progress_bar_enabled()
        tl.disable_progress_bar()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        for logging, level in saved:
            logging.set_verbosity(level)
        if bars:
            transformers.utils.logging.enable_progress_bar()


def _hub_folder(transformers, name: str) -> Path | None:
    """Folder of a hub model's cached preprocessor_config.json, if it has one."""
    try:
        found = transformers.utils.cached_file(
            name, "preprocessor_config.json", _raise_exceptions_for_missing_entries=False
        )
    except (OSError, ValueError):
        return None
    return Path(found).parent if found else None


def load_hf(name_or_path: str, image_size: int | None = None, verbose: bool | None = None) -> VitModel:
    """Load a transformers image model from a local folder or the hub (classifier if the config names one).

    A local folder is checked first (`check_hf_folder`); weights whose shapes do not match the config, or a
    checkpoint missing weights the model needs, are one clear error instead of transformers' LOAD REPORT and
    randomly initialised layers. Library chatter stays off stderr unless ``verbose`` (see `quiet_libraries`)."""
    transformers = import_transformers()
    local = Path(name_or_path)
    if local.exists():
        if not local.is_dir():
            raise VitlensError(f"{local} is a file; a Hugging Face model is a folder written by save_pretrained")
        check_hf_folder(local)
    elif not _in_hub_cache(transformers, name_or_path) and not _hub_reachable():
        raise VitlensError(_load_error(name_or_path, False, OSError("offline")))
    try:
        with quiet_libraries(transformers, verbose):
            config = transformers.AutoConfig.from_pretrained(name_or_path)
            archs = getattr(config, "architectures", None) or []
            if any("ForImageClassification" in a for a in archs):
                cls = transformers.AutoModelForImageClassification
                if any(a.endswith("WithTeacher") for a in archs):
                    cls = getattr(transformers, archs[0])
            else:
                cls = transformers.AutoModel
            module, info = cls.from_pretrained(name_or_path, attn_implementation="eager", output_loading_info=True,
                                               ignore_mismatched_sizes=True)
    except (OSError, ValueError, KeyError, RuntimeError, TypeError, AttributeError) as e:
        if isinstance(e, VitlensError):
            raise
        raise VitlensError(_load_error(name_or_path, local.exists(), e)) from None
    _check_loading_info(name_or_path, info)
    adapters = getattr(config, "vitlens_adapters", None)
    if adapters is not None:  # bottleneck adapters saved by `vitlens finetune` beside the base weights
        if not local.is_dir():
            raise VitlensError(f"{name_or_path}: models with vitlens adapters load from a local folder")
        from vitlens.train.adapters import restore_adapters

        restore_adapters(module, local, adapters)
    pre = hf_preprocess(config, local if local.is_dir() else _hub_folder(transformers, name_or_path))
    if image_size:
        pre = pre.with_size(image_size)
    from vitlens.models.loading import wrap

    model = wrap(module.eval())
    model.preprocess = pre
    return model


def _in_hub_cache(transformers, name: str) -> bool:
    """Whether the hub model's config.json is in the local cache (no network used)."""
    try:
        return bool(transformers.utils.cached_file(name, "config.json", local_files_only=True,
                                                   _raise_exceptions_for_missing_entries=False))
    except (OSError, ValueError):
        return False


def _hub_reachable(timeout: float = 3.0) -> bool:
    """Whether the hub's host answers a TCP connection within ``timeout`` seconds (False when HF_HUB_OFFLINE is
    set), so an offline machine gets its one-line error at once instead of after minutes of retries."""
    import socket
    from urllib.parse import urlparse

    try:
        from huggingface_hub import constants
    except ImportError:
        return False
    if getattr(constants, "HF_HUB_OFFLINE", False):
        return False
    url = urlparse(getattr(constants, "ENDPOINT", "https://huggingface.co"))
    try:
        with socket.create_connection((url.hostname or "huggingface.co", url.port or 443), timeout=timeout):
            return True
    except OSError:
        return False


def _load_error(name: str, local: bool, e: Exception) -> str:
    """One line for a failed from_pretrained: offline hub names get the cache/network fix."""
    text = str(e).strip()
    first = text.splitlines()[0][:200] if text else type(e).__name__
    if local:
        return f"could not load Hugging Face folder {name!r}: {first} (pass a folder written by save_pretrained)"
    offline = any(k in text.lower() for k in ("couldn't connect", "offline", "connection", "resolve", "network",
                                               "cached files", "local_files_only"))
    if offline:
        return (f"could not load Hugging Face hub model {name!r}: it is not in the local cache and no network is "
                "reachable; download it once where there is network (it is then cached), or pass a local folder "
                "written by save_pretrained")
    return f"could not load Hugging Face hub model {name!r}: {first} (check the name, or pass a local folder)"


def _check_loading_info(name: str, info: dict) -> None:
    """Refuse weights of the wrong shape and weights the model needs but the checkpoint lacks (a pooler is the one
    part a backbone may add: it is unused by vitlens's readouts of the CLS token)."""
    mismatched = sorted(info.get("mismatched_keys") or [], key=str)
    if mismatched:
        first = mismatched[0]
        key, shapes = (first[0], f" (checkpoint {tuple(first[1])}, config {tuple(first[2])})") \
            if isinstance(first, tuple) and len(first) == 3 else (first, "")
        raise VitlensError(f"the weights of {name!r} do not match its config.json: {key}{shapes} and "
                           f"{len(mismatched) - 1} more; the config and weights come from different models")
    missing = sorted(k for k in (info.get("missing_keys") or []) if str(k).split(".")[0] != "pooler")
    if missing:
        raise VitlensError(f"the weights of {name!r} lack {len(missing)} parameters the model needs (e.g. "
                           f"{missing[0]}); the checkpoint is incomplete or of another architecture")


register_adapter(
    "hf-vit",
    is_hf_vit,
    HFVitModel,
    "transformers ViT, DeiT (CLS + distillation), DINOv2 (with or without registers), BEiT; head or backbone",
)
