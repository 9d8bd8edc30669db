"""Fine-tune a ViT or Swin classifier (transformers or timm) on a new task: head only, everything, bottleneck adapters
or LoRA; evaluate on the held-out split every epoch; save a folder that `load_model` reads back.

The head is always new (drawn from the run's seed) with one output per class of the task. ``head`` trains it on the
frozen backbone's features, computed once (the backbone is frozen and in eval mode, so this is the same function the
full model computes); ``adapter`` and ``lora`` train the inserted modules and the head; ``full`` trains every
parameter. Optimiser: AdamW with a constant learning rate (``vitlens.train.loop.train`` with no warmup and a flat
schedule), gradient norm clipped at ``grad_clip``.
"""

from __future__ import annotations

import copy
import inspect
import json
import math
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from vitlens.errors import VitlensError
from vitlens.models.base import VitModel
from vitlens.models.hf import is_hf_model
from vitlens.train.adapters import ADAPTERS_FILE, CONFIG_KEY, PLACEMENTS, adapter_state, insert_adapters
from vitlens.train.finetune_data import TaskData
from vitlens.train.loop import History, train
from vitlens.train.lora import insert_lora, merge_lora
from vitlens.train.metrics import mean_average_precision

METHODS = ("head", "full", "adapter", "lora")
MAX_EPOCHS = 1000


def parse_method(text: str, placement: str | None = None) -> tuple[str, str | None]:
    """'head' / 'full' / 'lora' / 'adapter' (with ``placement``) / 'adapter:PLACEMENT' -> (method, placement)."""
    method, _, place = str(text).strip().partition(":")
    if method not in METHODS:
        raise VitlensError(f"unknown fine-tuning method {text!r}; use one of head, full, lora, adapter, "
                           f"adapter:{'|'.join(PLACEMENTS)}")
    if method != "adapter":
        if place:
            raise VitlensError(f"method {method!r} takes no placement; only adapter:{'|'.join(PLACEMENTS)} does")
        return method, None
    place = place or placement or "both"
    if place not in PLACEMENTS:
        raise VitlensError(f"unknown adapter placement {place!r}; use one of {', '.join(PLACEMENTS)}")
    return method, place


def _finite(name: str, value: Any, lo: float, lo_open: bool) -> None:
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if not ok or value < lo or (lo_open and value == lo):
        raise VitlensError(f"{name} must be a finite number {'>' if lo_open else '>='} {lo:g}, got {value!r}")


def _whole(name: str, value: Any, lo: int, hi: int | None = None) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < lo or (hi is not None and value > hi):
        rng = f"between {lo} and {hi}" if hi is not None else f">= {lo}"
        raise VitlensError(f"{name} must be a whole number {rng}, got {value!r}")


@dataclass(frozen=True)
class Settings:
    """A fine-tuning run's method and hyper-parameters (defaults: the seed report's 10 epochs, lr 1e-3, wd 1e-4)."""

    method: str = "head"
    placement: str | None = None  # adapter only: attn | mlp | both | parallel
    adapter_dim: int = 64
    lora_rank: int = 8
    lora_alpha: float = 16.0
    epochs: int = 10
    lr: float = 1e-3
    weight_decay: float = 1e-4
    batch_size: int = 32
    seed: int = 0
    grad_clip: float = 1.0

    def __post_init__(self) -> None:
        method, place = parse_method(self.method, self.placement)
        object.__setattr__(self, "method", method)
        object.__setattr__(self, "placement", place)
        _whole("--adapter-dim", self.adapter_dim, 1, 4096)
        _whole("--lora-rank", self.lora_rank, 1, 1024)
        _finite("--lora-alpha", self.lora_alpha, 0.0, True)
        _whole("--epochs", self.epochs, 1, MAX_EPOCHS)
        _finite("--lr", self.lr, 0.0, True)
        if self.lr > 1.0:
            raise VitlensError(f"--lr must be at most 1, got {self.lr}")
        _finite("--weight-decay", self.weight_decay, 0.0, False)
        _whole("--batch-size", self.batch_size, 1, 4096)
        _whole("--seed", self.seed, 0, 2**31 - 1)
        _finite("grad_clip", self.grad_clip, 0.0, False)

    @property
    def label(self) -> str:
        """'head', 'full', 'lora' or 'adapter:PLACEMENT'."""
        return f"adapter:{self.placement}" if self.method == "adapter" else self.method


# ---------------------------------------------------------------- the model


def head_of(module: Any) -> nn.Module:
    """The classification head: transformers ``classifier``, timm ``get_classifier()``."""
    if is_hf_model(module):
        return module.classifier
    return module.get_classifier()


def build_classifier(model: VitModel, classes: list[str], multi_label: bool, seed: int = 0) -> nn.Module:
    """A classifier with the model's backbone weights and a new head drawn from ``seed`` (one output per class).

    transformers: the model's configuration turned into its ``...ForImageClassification`` (a bare backbone such as
    DINOv2 gets its classifier class); the original module is not modified. timm: a copy with ``reset_classifier``.
    """
    torch.manual_seed(seed)
    module: Any = model.module
    if not is_hf_model(module):
        if not hasattr(module, "reset_classifier"):
            raise VitlensError(f"{type(module).__name__} has no reset_classifier(); fine-tuning supports transformers "
                               "and timm models")
        new = copy.deepcopy(module)
        new.reset_classifier(len(classes))
        return new.train()
    from transformers import AutoModelForImageClassification

    old: Any = module.config
    keep = {k: v for k, v in old.to_dict().items() if k not in (
        "transformers_version", "model_type", "architectures", "id2label", "label2id", "num_labels", "problem_type",
        CONFIG_KEY)}
    cfg = type(old)(**keep, num_labels=len(classes), id2label=dict(enumerate(classes)),
                    label2id={c: i for i, c in enumerate(classes)},
                    problem_type="multi_label_classification" if multi_label else "single_label_classification")
    try:
        new = AutoModelForImageClassification.from_config(cfg, attn_implementation="sdpa")
    except (ValueError, ImportError):
        new = AutoModelForImageClassification.from_config(cfg, attn_implementation="eager")
    new.config.architectures = [type(new).__name__]
    base_new = new.base_model
    base_old = getattr(module, "base_model", module)
    missing, unexpected = base_new.load_state_dict(base_old.state_dict(), strict=False)
    left = [k for k in unexpected if not k.startswith("pooler.")]  # a backbone's pooler is the one part dropped
    if missing or left:
        what = f"{len(missing)} weights missing (e.g. {missing[0]})" if missing else \
            f"{len(left)} weights it has no place for (e.g. {left[0]}; adapters from an earlier fine-tuning?)"
        raise VitlensError(f"cannot carry the backbone of {type(module).__name__} into {type(new).__name__}: {what}; "
                           "fine-tune the original model")
    return new.to(model.device).train()


def prepare(module: nn.Module, settings: Settings) -> list[nn.Parameter]:
    """Insert the adapters or LoRA that ``settings`` asks for and return the parameters that train."""
    head = list(head_of(module).parameters())
    if settings.method == "full":
        return list(module.parameters())
    if settings.method == "head":
        return head
    extra: Sequence[nn.Module]
    if settings.method == "adapter":
        assert settings.placement is not None
        extra = insert_adapters(module, settings.placement, settings.adapter_dim)
    else:
        extra = insert_lora(module, settings.lora_rank, settings.lora_alpha)
    return [p for m in extra for p in m.parameters()] + head


def logits(module: Any, x: torch.Tensor) -> torch.Tensor:
    """Class scores of a transformers or timm classifier (positions interpolated for another input size)."""
    x = x.to(next(module.parameters()).device)
    if is_hf_model(module):
        size = module.config.image_size
        native = tuple(size) if isinstance(size, (list, tuple)) else (size, size)
        kwargs = {}
        interp = "interpolate_pos_encoding" in inspect.signature(module.forward).parameters
        if tuple(x.shape[-2:]) != native and interp:
            kwargs["interpolate_pos_encoding"] = True
        return module(pixel_values=x, **kwargs).logits
    return module(x)


def normalise(images: np.ndarray, mean, std) -> torch.Tensor:
    """uint8 [N, H, W, 3] -> float [N, 3, H, W], scaled to [0, 1] and normalised by mean/std."""
    x = torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2).float() / 255.0
    return (x - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(1, 3, 1, 1)


# ---------------------------------------------------------------- training


@dataclass
class Result:
    """What a fine-tuning run measured."""

    settings: dict
    data: dict
    trainable_params: int
    total_params: int
    epochs: list[dict] = field(default_factory=list)  # per epoch: held-out metric and loss
    metric: str = "accuracy"
    final: float = float("nan")
    train_seconds: float = 0.0  # the epochs (training + held-out evaluation)
    setup_seconds: float = 0.0  # building the model; for head-only, the backbone features computed once
    loss: list[float] = field(default_factory=list)

    @property
    def epoch_seconds(self) -> float:
        """Wall time per epoch, training and held-out evaluation."""
        return self.train_seconds / max(1, len(self.epochs))

    def as_dict(self) -> dict:
        """JSON-ready summary (the loss per step is kept)."""
        return {**asdict(self), "epoch_seconds": round(self.epoch_seconds, 3)}


def _loss(multi_label: bool) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    if multi_label:
        return nn.functional.binary_cross_entropy_with_logits
    return nn.functional.cross_entropy


def held_out_metrics(scores: torch.Tensor, labels: torch.Tensor, multi_label: bool) -> dict:
    """Accuracy (single label) or mAP (multi-label) and the mean loss of logits ``scores`` against ``labels``."""
    loss = float(_loss(multi_label)(scores, labels))
    if multi_label:
        return {"mAP": mean_average_precision(torch.sigmoid(scores).numpy(), labels.numpy()), "loss": loss}
    return {"accuracy": float((scores.argmax(1) == labels).float().mean()), "loss": loss}


def _batched(fn: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, batch: int = 100) -> torch.Tensor:
    return torch.cat([fn(x[k: k + batch]).cpu() for k in range(0, len(x), batch)])


@torch.no_grad()
def head_inputs(module: nn.Module, x: torch.Tensor, batch: int = 100) -> torch.Tensor:
    """What the head receives for images ``x`` (captured by a pre-hook on the head, model in eval mode)."""
    seen: list[torch.Tensor] = []
    handle = head_of(module).register_forward_pre_hook(lambda m, args: seen.append(args[0].detach()))
    module.eval()
    try:
        for k in range(0, len(x), batch):
            logits(module, x[k: k + batch])
    finally:
        handle.remove()
    return torch.cat(seen)


def run_finetune(model: VitModel, task: TaskData, settings: Settings, progress: bool = True,
                 on_ready: Callable[[nn.Module], None] | None = None) -> tuple[nn.Module, Result]:
    """Fine-tune ``model`` on ``task``; returns the trained classifier (adapters/LoRA still separate) and its Result.

    ``on_ready`` is called with the classifier after the adapters are inserted and before any step (where it still
    computes what the original backbone computed), e.g. to draw the explanations before fine-tuning.
    """
    t0 = time.perf_counter()
    module = build_classifier(model, task.classes, task.multi_label, settings.seed)
    trainable = prepare(module, settings)
    if on_ready is not None:
        on_ready(module)
    pre = model.preprocess
    x_tr, x_ev = normalise(task.train_images, pre.mean, pre.std), normalise(task.eval_images, pre.mean, pre.std)
    y_tr, y_ev = torch.from_numpy(task.train_labels), torch.from_numpy(task.eval_labels)
    lossf = _loss(task.multi_label)
    if settings.method == "head":  # frozen backbone: its features once, then the head alone
        head = head_of(module)
        f_tr, f_ev = head_inputs(module, x_tr), head_inputs(module, x_ev)
        net: nn.Module = head

        def on_features(m: nn.Module, x: torch.Tensor) -> torch.Tensor:
            return m(x.to(next(m.parameters()).device))

        forward: Callable[[nn.Module, torch.Tensor], torch.Tensor] = on_features
        inputs_tr, inputs_ev = f_tr, f_ev
    else:
        net, forward, inputs_tr, inputs_ev = module, logits, x_tr, x_ev
    ids = {id(p) for p in trainable}
    setup_s = time.perf_counter() - t0
    bs = settings.batch_size
    per_epoch = math.ceil(len(inputs_tr) / bs)

    def batches(epoch: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        g = torch.Generator().manual_seed(settings.seed * 1000 + epoch)
        order = torch.randperm(len(inputs_tr), generator=g)
        for k in range(0, len(order), bs):
            idx = order[k: k + bs]
            yield inputs_tr[idx], y_tr[idx]

    def evaluate(m: nn.Module) -> dict:
        return held_out_metrics(_batched(lambda x: forward(m, x), inputs_ev), y_ev, task.multi_label)

    t_train = time.perf_counter()
    hist: History = train(
        net, batches, steps=settings.epochs * per_epoch, lr=settings.lr, weight_decay=settings.weight_decay,
        warmup=0.0, min_lr_ratio=1.0, trainable=lambda n, p: id(p) in ids,
        loss_fn=lambda m, x, y: lossf(forward(m, x), y), seed=settings.seed, grad_clip=settings.grad_clip,
        eval_fn=evaluate, eval_every=per_epoch, progress=progress)
    module.eval()
    for p in module.parameters():
        p.requires_grad_(False)
    metric = "mAP" if task.multi_label else "accuracy"
    epochs = [{"epoch": i + 1, **{k: v for k, v in e.items() if k != "step"}} for i, e in enumerate(hist.evals)]
    count = sum(p.numel() for p in {id(p): p for p in trainable}.values())
    result = Result(settings=asdict(settings), data=task.describe(), trainable_params=count,
                    total_params=sum(p.numel() for p in module.parameters()), epochs=epochs,
        metric=metric, final=epochs[-1][metric], train_seconds=time.perf_counter() - t_train, setup_seconds=setup_s,
        loss=hist.loss)
    return module, result


# ---------------------------------------------------------------- saving


def preprocessor_config(size: int, mean, std) -> dict:
    """Resize (bicubic) to size x size, [0, 1], normalise: exactly how the training images were prepared."""
    return {"image_processor_type": "ViTImageProcessor", "do_resize": True, "size": {"height": size, "width": size},
            "resample": 3, "do_center_crop": False, "do_rescale": True, "rescale_factor": 1 / 255,
            "do_normalize": True, "image_mean": list(mean), "image_std": list(std)}


def save_finetuned(module: nn.Module, folder: str | Path, settings: Settings, size: int, mean, std,
                   info: dict) -> list[Path]:
    """Write the fine-tuned classifier into ``folder`` and return the files.

    transformers: a save_pretrained folder (LoRA merged into the weights; bottleneck adapters in adapters.safetensors,
    declared in config.json's ``vitlens_adapters`` so that `load_model` re-inserts them), preprocessor_config.json,
    metrics.json. timm: model.safetensors (a plain state dict, LoRA merged) for ``timm:NAME --weights``, metrics.json.
    """
    from vitlens.models.hf import import_transformers, quiet_libraries

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    with quiet_libraries(import_transformers() if is_hf_model(module) else None):
        _save(module, folder, settings)
    if is_hf_model(module):
        (folder / "preprocessor_config.json").write_text(json.dumps(preprocessor_config(size, mean, std), indent=2)
                                                         + "\n")
    (folder / "metrics.json").write_text(json.dumps(info, indent=2) + "\n")
    return sorted(p for p in folder.iterdir() if p.is_file())


def check_saveable(module: nn.Module, method: str) -> None:
    """Refuse, before any training, a result that could not be saved: bottleneck adapters on a timm model."""
    if method == "adapter" and not is_hf_model(module):
        raise VitlensError("saving bottleneck adapters is supported for transformers models; for a timm model use "
                           "--method head, full or lora")


def _save(module: Any, folder: Path, settings: Settings) -> None:
    from safetensors.torch import save_file

    check_saveable(module, settings.method)
    if settings.method == "lora":
        merge_lora(module)
    if not is_hf_model(module):
        sd = {k: v.detach().contiguous() for k, v in module.state_dict().items()}
        save_file(sd, str(folder / "model.safetensors"), metadata={"format": "pt"})
    elif settings.method == "adapter":
        base, extra = adapter_state(module)
        setattr(module.config, CONFIG_KEY, {"placement": settings.placement, "dim": settings.adapter_dim})
        try:
            module.save_pretrained(folder, state_dict=base, safe_serialization=True)
        finally:
            delattr(module.config, CONFIG_KEY)
        save_file(extra, str(folder / ADAPTERS_FILE), metadata={"format": "pt"})
    else:
        module.save_pretrained(folder, safe_serialization=True)
