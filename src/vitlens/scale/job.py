"""What a dataset-scale run computes, independent of the engine: the job (model, methods, options, target), reading
and preprocessing items, and explaining one batch into a `BatchResult` that the store commits.

Both engines (`local`, `ray_engine`) call the same `read_item` and `BatchExplainer`, and the store is written by one
writer in the driver, so they produce the same rows and the same maps.
"""

from __future__ import annotations

import json
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, TypeVar

import numpy as np
import torch

from vitlens.errors import VitlensError
from vitlens.scale.listing import Item, describe_data, load_item
from vitlens.scale.store import BatchResult

DEFAULT_TOP_K = 5
T = TypeVar("T")


@dataclass(frozen=True)
class Job:
    """A run's model and methods, as plain values (an engine's workers rebuild them with `build`)."""

    model: str
    methods: tuple[str, ...]
    options: dict[str, Any] = field(default_factory=dict)  # given method options; each method takes those it declares
    weights: str | None = None
    model_kwargs: dict[str, Any] = field(default_factory=dict)
    image_size: int | None = None
    device: str = "cpu"
    target: str | int | None = None
    top_k: int = DEFAULT_TOP_K

    def build(self, device: str | None = None) -> tuple[BatchExplainer, list[str]]:
        """Load the model and build the methods (on ``device``, default the job's); returns the batch explainer
        and notes (options that apply to none of the methods, class-specific methods left out on a backbone)."""
        from vitlens.cli.methods import build_methods
        from vitlens.models.labels import resolve_target
        from vitlens.models.loading import load_model

        if self.model_kwargs and not str(self.model).startswith("timm:"):
            raise VitlensError(f"--timm-kwargs only applies to timm:NAME models, not {self.model!r}")
        if isinstance(self.top_k, bool) or not isinstance(self.top_k, int) or self.top_k < 0:
            raise VitlensError(f"--top-k must be a whole number >= 0, got {self.top_k!r}")
        model = load_model(self.model, weights=self.weights, image_size=self.image_size,
                           device=device or self.device, model_kwargs=dict(self.model_kwargs))
        methods, notes = build_methods(model, list(self.methods), dict(self.options))
        pixel = [m.name for m in methods if getattr(m, "pool", None) == "pixel"]
        if pixel:
            raise VitlensError(f"the store keeps maps on the patch grid, but --pool pixel makes {pixel[0]} draw pixel "
                               "maps; drop --pool pixel")
        target = None
        if self.target is not None:
            target = resolve_target(model, self.target)
            if not any(m.class_specific for m in methods):
                notes.append("note: every method is class-agnostic; the target class is ignored")
        return BatchExplainer(model, methods, target, self.top_k), notes

    def settings(self, data: str, explainer: BatchExplainer) -> dict[str, Any]:
        """What a store records and compares on resume: everything that decides the rows and the maps."""
        return {"model": str(self.model), "weights": self.weights, "model_kwargs": self.model_kwargs,
                "image_size": self.image_size, "data": describe_data(data),
                "methods": [{"name": m.name, "options": m.params} for m in explainer.methods],
                "target": explainer.target, "top_k": self.top_k, "grid": list(explainer.grid),
                "size": list(explainer.model.preprocess.size), "dtype": "float16"}


@dataclass
class Loaded:
    """A batch read by a loader: the items read (with their tensors [B, 3, H, W]) and those that failed."""

    items: list[Item]
    x: torch.Tensor | None
    errors: list[tuple[Item, str]]


def read_item(item: Item, preprocess: Any) -> torch.Tensor | str:
    """The model input [3, H, W] of ``item``, or the one-line reason it cannot be read (never raises for a bad
    file: an unreadable image among thousands must not stop a run)."""
    try:
        return preprocess.tensor(preprocess.view(load_item(item.source)))
    except VitlensError as e:
        return str(e).replace("\n", " ")
    except Exception as e:  # a decoder failing in an unforeseen way is still one image's problem
        return f"cannot read image {item.source}: {type(e).__name__}: {str(e)[:200]}".replace("\n", " ")


def collate(pairs: Sequence[tuple[Item, torch.Tensor | str]]) -> Loaded:
    """Stack the read items of a batch; the others become errors."""
    ok = [(it, x) for it, x in pairs if isinstance(x, torch.Tensor)]
    errors = [(it, x) for it, x in pairs if isinstance(x, str)]
    return Loaded([it for it, _ in ok], torch.stack([x for _, x in ok]) if ok else None, errors)


class BatchExplainer:
    """Explains batches with several methods on one model: one forward for the top-k (and the top-1 target of
    class-specific methods), then each method; maps come back as float16."""

    def __init__(self, model: Any, methods: Sequence[Any], target: int | None, top_k: int) -> None:
        self.model = model
        self.methods = list(methods)
        self.target = target
        self.top_k = top_k
        self.grid = tuple(int(v) for v in model.layout(tuple(model.preprocess.size)).grid)
        self.options = [json.dumps(m.params, sort_keys=True) for m in self.methods]

    @property
    def preprocess(self) -> Any:
        """The model's preprocessing (what loaders apply)."""
        return self.model.preprocess

    def __call__(self, batch: Loaded) -> BatchResult:
        """The `BatchResult` of one loaded batch."""
        items, errors = batch.items, [(it.index, it.key, it.source, msg) for it, msg in batch.errors]
        if batch.x is None or not items:
            return BatchResult([], [], [], [], [], [m.name for m in self.methods], self.options, [], [], [], errors)
        x = batch.x.to(self.model.device, torch.float32)
        n = len(items)
        classes: list[list[int]] = [[] for _ in items]
        probs: list[list[float]] = [[] for _ in items]
        top1 = None
        if self.model.has_head:
            with torch.no_grad():
                p = self.model.probabilities(self.model(x).float())
            k = min(self.top_k, p.shape[-1])
            if k:
                vals, idx = p.topk(k, dim=-1)
                classes, probs = idx.cpu().tolist(), vals.cpu().tolist()
            top1 = p.argmax(-1)
        maps: list[np.ndarray] = []
        targets: list[list[int] | None] = []
        seconds: list[float] = []
        for m in self.methods:
            start = time.perf_counter()
            if m.class_specific:
                t = torch.full((n,), self.target, device=x.device) if self.target is not None else top1
                exp = m.explain(x, target=t)
                targets.append([int(v) for v in t.tolist()])  # type: ignore[union-attr]
            else:
                exp = m.explain(x)
                targets.append(None)
            if tuple(exp.maps.shape[-2:]) != self.grid:
                raise VitlensError(f"{m.name} made {tuple(exp.maps.shape[-2:])} maps, not the {self.grid} patch grid "
                                   "the store keeps")
            maps.append(exp.maps.detach().float().cpu().numpy().astype(np.float16))
            seconds.append((time.perf_counter() - start) / n)
        return BatchResult([it.index for it in items], [it.key for it in items], [it.source for it in items],
                           classes, probs, [m.name for m in self.methods], self.options, maps, targets, seconds,
                           errors)


def plan_batches(items: Sequence[T], batch_size: int) -> list[list[T]]:
    """The items (or their indices) cut into batches in listing order (the same cut whatever the engine)."""
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise VitlensError(f"--batch-size must be a whole number >= 1, got {batch_size!r}")
    return [list(items[s : s + batch_size]) for s in range(0, len(items), batch_size)]
