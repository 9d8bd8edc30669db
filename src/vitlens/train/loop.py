"""A small, reusable training loop: AdamW + linear warmup + cosine decay over the trainable parameters.

It serves full training of the embedded models and, through `trainable`, head-only or adapter fine-tuning.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

import torch
from torch import nn

Batch = tuple[torch.Tensor, torch.Tensor]
LossFn = Callable[[nn.Module, torch.Tensor, torch.Tensor], torch.Tensor]
ParamFilter = Callable[[str, nn.Parameter], bool]


@dataclass
class History:
    """What happened during training: loss per step, lr per step, evaluations, wall time, stop reason."""

    loss: list[float] = field(default_factory=list)
    lr: list[float] = field(default_factory=list)
    evals: list[dict] = field(default_factory=list)
    steps: int = 0
    seconds: float = 0.0
    stopped: str = "steps"
    trainable_params: int = 0


def logits_of(output) -> torch.Tensor:
    """The logits of a model output: a tensor, or an object/dict with a `logits` entry."""
    if isinstance(output, torch.Tensor):
        return output
    if isinstance(output, dict):
        return output["logits"]
    return output.logits


def bce_loss(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Multi-label loss: binary cross-entropy with logits on the model's logits."""
    return nn.functional.binary_cross_entropy_with_logits(logits_of(model(x)), y)


def lr_at(progress: float, base_lr: float, warmup: float, min_lr_ratio: float = 0.0) -> float:
    """Learning rate at `progress` in [0, 1]: linear warmup over the first `warmup` fraction, then cosine to min."""
    if warmup > 0 and progress < warmup:
        return base_lr * progress / warmup
    p = (progress - warmup) / max(1e-12, 1.0 - warmup)
    cos = 0.5 * (1.0 + math.cos(math.pi * min(1.0, p)))
    return base_lr * (min_lr_ratio + (1.0 - min_lr_ratio) * cos)


def _decays(name: str, p: nn.Parameter) -> bool:
    """Weight decay on matrices only: no decay for biases, norms, embeddings' tokens."""
    return p.ndim >= 2 and not any(k in name for k in ("cls_token", "distillation_token", "position_embeddings"))


def train(
    model: nn.Module,
    data: Callable[[int], Iterable[Batch]] | Iterable[Batch],
    *,
    steps: int,
    lr: float = 1e-3,
    weight_decay: float = 0.05,
    warmup: float = 0.05,
    min_lr_ratio: float = 0.0,
    trainable: ParamFilter | None = None,
    loss_fn: LossFn = bce_loss,
    seed: int = 0,
    device: str | torch.device = "cpu",
    grad_clip: float | None = 1.0,
    time_budget_s: float | None = None,
    eval_fn: Callable[[nn.Module], dict] | None = None,
    eval_every: int = 0,
    progress: bool = True,
) -> History:
    """Train `model` in place for `steps` optimizer steps and return its History.

    data: an iterable of (images [B, 3, H, W], multi-hot [B, C]) batches, or a function epoch -> such an iterable
    (called again whenever one runs out, so it can regenerate or augment per epoch). The target may also be a
    tuple of tensors (e.g. extra per-token targets) that `loss_fn` understands.
    trainable: which parameters train (name, param) -> bool; the others get requires_grad=False. Default: all.
    time_budget_s: if given, the schedule runs on max(step / steps, elapsed / budget), so the cosine reaches its end
    and training stops when either the steps or the time run out (then `History.stopped` is "time").
    eval_fn: called on the model (in eval mode) every `eval_every` steps and at the end; results go to History.evals.
    """
    from tqdm.auto import tqdm

    torch.manual_seed(seed)
    device = torch.device(device)
    model.to(device)
    params = []
    for name, p in model.named_parameters():
        keep = trainable(name, p) if trainable is not None else True
        p.requires_grad_(keep)
        if keep:
            params.append((name, p))
    if not params:
        raise ValueError("train: the parameter filter selected no parameters.")
    groups = [
        {"params": [p for n, p in params if _decays(n, p)], "weight_decay": weight_decay},
        {"params": [p for n, p in params if not _decays(n, p)], "weight_decay": 0.0},
    ]
    opt = torch.optim.AdamW([g for g in groups if g["params"]], lr=lr)
    hist = History(trainable_params=sum(p.numel() for _, p in params))
    source = data if callable(data) else (lambda epoch: data)
    epoch, it = 0, iter(source(0))
    start = time.perf_counter()
    bar = tqdm(total=steps, disable=not progress, desc="train", mininterval=5.0)
    model.train()
    step = 0
    while step < steps:
        elapsed = time.perf_counter() - start
        prog = step / steps
        if time_budget_s:
            prog = max(prog, elapsed / time_budget_s)
            if prog >= 1.0:
                hist.stopped = "time"
                break
        try:
            x, y = next(it)
        except StopIteration:
            epoch += 1
            it = iter(source(epoch))
            x, y = next(it)
        x, y = x.to(device), _to(y, device)
        cur = lr_at(prog, lr, warmup, min_lr_ratio)
        for g in opt.param_groups:
            g["lr"] = cur
        loss = loss_fn(model, x, y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if grad_clip:
            torch.nn.utils.clip_grad_norm_([p for _, p in params], grad_clip)
        opt.step()
        step += 1
        hist.loss.append(float(loss.detach()))
        hist.lr.append(cur)
        bar.update(1)
        if step % 50 == 0:
            bar.set_postfix(loss=f"{sum(hist.loss[-50:]) / 50:.4f}", lr=f"{cur:.2e}", epoch=epoch)
        if eval_fn is not None and eval_every and step % eval_every == 0 and step < steps:
            hist.evals.append({"step": step, **_evaluate(model, eval_fn)})
    bar.close()
    hist.steps = step
    hist.seconds = time.perf_counter() - start
    if eval_fn is not None:
        hist.evals.append({"step": step, **_evaluate(model, eval_fn)})
    model.eval()
    return hist


def _to(obj, device: torch.device):
    """Move a tensor, or a tuple/list of tensors (extra targets), to `device`."""
    if isinstance(obj, (tuple, list)):
        return type(obj)(_to(o, device) for o in obj)
    return obj.to(device)


def _evaluate(model: nn.Module, eval_fn: Callable[[nn.Module], dict]) -> dict:
    model.eval()
    with torch.no_grad():
        out = eval_fn(model)
    model.train()
    return out
