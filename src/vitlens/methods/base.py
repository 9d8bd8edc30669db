"""The uniform verb, ``Method(model, **options).explain(x, target=None) -> Explanation``, and how methods declare
themselves.

Every method class declares its ``name``, a one-line ``description``, whether it is ``class_specific``, the model
``families`` it applies to and its ``options`` (name, type, default, range or choices, help). `register` puts it in
`METHODS`; the command line builds its flags, help, validation and "does not apply" notes from those declarations,
so a new method is one file and its registration.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar, TypeVar

import torch
from PIL import Image

from vitlens.capture import AttentionRecord
from vitlens.errors import VitlensError
from vitlens.layout import StagePlan
from vitlens.models.base import VitModel

Target = int | Sequence[int] | torch.Tensor | Callable[[torch.Tensor], torch.Tensor] | None
Images = torch.Tensor | Image.Image | Sequence[Image.Image]

ANY_FAMILY = "any"  # model-agnostic: any image classifier


@dataclass(frozen=True)
class Option:
    """One declared option of a method: its type, default, allowed values and help.

    ``lo``/``hi`` bound numbers (``hi_open`` makes the upper bound exclusive); ``choices`` bound strings;
    ``parse`` turns command-line text into the value (e.g. a query 'ROW,COL'); ``cli`` False keeps it off the CLI.
    """

    name: str
    type: type
    default: Any
    help: str
    choices: tuple[str, ...] | None = None
    lo: float | None = None
    hi: float | None = None
    lo_open: bool = False
    hi_open: bool = False
    parse: Callable[[str], Any] | None = None
    cli: bool = True

    @property
    def flag(self) -> str:
        """The CLI flag: ``--name`` (``--no-name`` for a boolean that defaults to True)."""
        dashed = self.name.replace("_", "-")
        return f"--no-{dashed}" if self.type is bool and self.default is True else f"--{dashed}"

    def check(self, value: Any) -> Any:
        """``value`` converted to the option's type and checked against its range or choices (one-line errors)."""
        if isinstance(value, str) and self.parse is not None:
            return self.parse(value)
        if self.type is bool:
            if not isinstance(value, bool):
                raise VitlensError(f"{self.name} must be True or False; got {value!r}")
            return value
        if self.type in (int, float):
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                try:
                    value = self.type(value)
                except (TypeError, ValueError):
                    raise VitlensError(f"{self.name} must be a number; got {value!r}") from None
            if self.type is int and value != int(value):
                raise VitlensError(f"{self.name} must be a whole number; got {value!r}")
            value = self.type(value)
            if not math.isfinite(value):
                raise VitlensError(f"{self.name} must be a finite number; got {value}")
            if (self.lo is not None and (value <= self.lo if self.lo_open else value < self.lo)) or (
                    self.hi is not None and (
                    value >= self.hi if self.hi_open else value > self.hi)):
                raise VitlensError(f"{self.name} must be in {self.range_text()}; got {value}")
            return value
        if self.choices is not None and value not in self.choices:
            raise VitlensError(f"{self.name} must be one of {', '.join(self.choices)}; got {value!r}")
        return value

    def range_text(self) -> str:
        """'[lo, hi)' style text of the allowed range ('' when unbounded)."""
        if self.choices is not None:
            return "{" + ", ".join(self.choices) + "}"
        lo = "-inf" if self.lo is None else _number(self.lo)
        hi = "inf" if self.hi is None else _number(self.hi)
        left = "(" if self.lo_open or self.lo is None else "["
        return f"{left}{lo}, {hi}{')' if self.hi_open or self.hi is None else ']'}"


def _number(v: float) -> str:
    return str(int(v)) if float(v).is_integer() else f"{v:g}"


class Method:
    """Base class: holds the model, turns images into a batch on the model's device, and declares the method."""

    name: ClassVar[str] = "method"
    description: ClassVar[str] = ""
    class_specific: ClassVar[bool] = False
    families: ClassVar[tuple[str, ...]] = ("vit", "swin")
    options: ClassVar[tuple[Option, ...]] = ()

    def __init__(self, model: Any) -> None:
        if not isinstance(model, VitModel):
            from vitlens.models.loading import load_model

            model = load_model(model)
        self.model: Any = model

    @classmethod
    def option(cls, name: str) -> Option:
        """The declared option ``name``."""
        for o in cls.options:
            if o.name == name:
                return o
        raise KeyError(name)

    @classmethod
    def applies_to(cls, model: Any) -> bool:
        """Whether the method works on ``model``: its declared families hold the model's kind ('vit' or 'swin'),
        or 'any' for model-agnostic methods."""
        return ANY_FAMILY in cls.families or model_kind(model) in cls.families

    def set_options(self, **values: Any) -> None:
        """Check each value against its declaration and store it as an attribute of the same name."""
        for name, value in values.items():
            setattr(self, name, type(self).option(name).check(value))

    def check_start_layer(self) -> None:
        """The ``start_layer`` option (declared with lo=0) must also name a block of this model."""
        n = self.model.num_blocks
        start = int(getattr(self, "start_layer", 0))
        if start >= n:
            raise VitlensError(f"start_layer must be in [0, {n - 1}] for a model with {n} blocks; got {start}")

    @property
    def params(self) -> dict:
        """The declared options' current values, for the Explanation."""
        return {o.name: getattr(self, o.name) for o in self.options if hasattr(self, o.name)}

    @classmethod
    def title(cls, params: dict, target_text: str | None = None) -> str:
        """A one-line description of a map for figure titles (``target_text``: the explained class, when any)."""
        return cls.name.replace("_", " ") + (f" for {target_text}" if target_text else "")

    def batch(self, x: Images) -> torch.Tensor:
        """A [B, 3, H, W] batch on the model's device; PIL images go through the model's preprocessing."""
        if isinstance(x, Image.Image) or (isinstance(x, (list, tuple)) and x and isinstance(x[0], Image.Image)):
            x, _ = self.model.preprocess(x)
        if not isinstance(x, torch.Tensor):
            raise VitlensError(f"expected an image tensor [B, 3, H, W] or PIL images, got {type(x).__name__}")
        if x.ndim == 3:
            x = x[None]
        return x.to(self.model.device, torch.float32)

    def probs_or_none(self, logits: torch.Tensor) -> torch.Tensor | None:
        """Class probabilities when the model has a head."""
        return self.model.probabilities(logits) if self.model.has_head else None

    def explain(self, x: Images, target: Target = None) -> Any:
        """Explain a batch; class-agnostic methods ignore ``target``."""
        raise NotImplementedError


@dataclass
class AttentionGradients:
    """What `GradientMethod.attention_gradients` returns: the stage plan, the record (``rec.probs[i]``,
    ``rec.captured()``), d score / d attention per block, the logits and the explained class per image."""

    plan: StagePlan
    rec: AttentionRecord
    grads: list[torch.Tensor | None]
    logits: torch.Tensor
    target: torch.Tensor | None

    def blocks(self) -> Iterator[tuple[int, torch.Tensor, torch.Tensor]]:
        """(block index, attention [B, H, N, N], its gradient) for every recorded block, in forward order."""
        for i in self.rec.captured():
            probs, grad = self.rec.probs[i], self.grads[i]
            if probs is not None and grad is not None:
                yield i, probs, grad


class GradientMethod(Method):
    """Base of the gradient methods: the score whose gradient is taken comes from ``target``, which is a class
    index, one index per image, None (each image's top-1 class) or a callable mapping the model output ([B, C]
    logits, or [B, D] pooled features of a backbone) to one score per image [B], so that backbones and multi-label
    heads work too. A class index on a backbone fails with a clear error when `explain` is called."""

    class_specific = True

    def attention_gradients(self, x: torch.Tensor, target: Target, start_layer: int = 0) -> AttentionGradients:
        """One forward recording the attention of every block from ``start_layer`` on, and d score / d attention."""
        plan = self.model.stage_plan((x.shape[-2], x.shape[-1]))
        with self.model.record(grads=True, blocks=range(start_layer, self.model.num_blocks)) as rec:
            logits = self.model(x)
            score, t = self.score(logits, target)
            grads = rec.grads(score)
        return AttentionGradients(plan, rec, grads, logits.detach(), t)

    def score(self, output: torch.Tensor, target: Target) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(scores [B], the class per image or None for a callable target) for the model ``output``."""
        if callable(target) and not isinstance(target, torch.Tensor):
            s = target(output)
            if not isinstance(s, torch.Tensor) or s.shape != (output.shape[0],):
                raise VitlensError(f"a callable target must return one score per image, shape [{output.shape[0]}]")
            return s, None
        t = self.model.check_target(target, output)
        return output.gather(1, t[:, None])[:, 0], t


class PerturbationMethod(Method):
    """Base of the model-agnostic methods: the model may be any image classifier (a `VitModel`, a module vitlens
    can wrap, or any callable mapping [B, 3, H, W] to logits); they perturb the input and batch the forwards."""

    families = (ANY_FAMILY,)
    class_specific = True
    output: str
    batch_size: int

    def __init__(self, model, output: str = "probs", batch_size: int = 64, progress: bool = False) -> None:
        from vitlens.models.classifier import as_classifier

        self.model = as_classifier(model)
        if not getattr(self.model, "has_head", True):
            self.model.check_target(None, torch.zeros(1, 1))  # raises the backbone error
        self.set_options(output=output, batch_size=batch_size)
        self.progress = bool(progress)

    def scores(self, logits: torch.Tensor) -> torch.Tensor:
        """What is explained: probabilities (default) or logits."""
        return self.model.probabilities(logits) if self.output == "probs" else logits

    @property
    def build_step(self) -> int:
        """Perturbed images built at once: ``batch_size`` rounded up to a multiple of `FORWARD_CHUNK`, so that the
        forward chunks always start at the same sample whatever the batch size."""
        return -(-self.batch_size // FORWARD_CHUNK) * FORWARD_CHUNK

    def chunked_scores(self, x: torch.Tensor, forward: Callable[[torch.Tensor], torch.Tensor] | None = None
                       ) -> torch.Tensor:
        """Scores of perturbed inputs [N, ...] (run through ``forward``, the model by default) computed in forwards of
        `FORWARD_CHUNK` rows (the last may be shorter). A float32 forward is not bitwise the same for every batch
        shape, so a fixed chunk makes each sample's score independent of ``batch_size``: the same seed gives
        bit-identical results whatever the batch size. Callers pass slices that start at multiples of the chunk."""
        run = forward or self.model
        return torch.cat([self.scores(run(x[s : s + FORWARD_CHUNK])) for s in range(0, x.shape[0], FORWARD_CHUNK)])

    def to_rgb01(self, x: torch.Tensor) -> torch.Tensor:
        """Undo the model's normalisation: [..., 3, H, W] in [0, 1]."""
        pre = self.model.preprocess
        mean = torch.tensor(pre.mean, device=x.device, dtype=x.dtype).view(3, 1, 1)
        std = torch.tensor(pre.std, device=x.device, dtype=x.dtype).view(3, 1, 1)
        return (x * std + mean).clamp(0, 1)

    def colour(self, rgb: Sequence[float], like: torch.Tensor) -> torch.Tensor:
        """An RGB colour in [0, 1] in the model's input space, as [3, 1, 1]."""
        pre = self.model.preprocess
        c = torch.as_tensor([float(v) for v in rgb], device=like.device, dtype=like.dtype)
        mean = torch.tensor(pre.mean, device=like.device, dtype=like.dtype)
        std = torch.tensor(pre.std, device=like.device, dtype=like.dtype)
        return ((c - mean) / std).view(3, 1, 1)


OUTPUT = Option("output", str, "probs", "What is explained: class probabilities or logits.",
                choices=("probs", "logits"), cli=False)
# Forwards of perturbed images always have this many rows, whatever batch_size says (see chunked_scores).
FORWARD_CHUNK = 32
BATCH = Option("batch_size", int, 64, f"Perturbed images built at once (rounded up to a multiple of {FORWARD_CHUNK}); "
               f"the model always runs them {FORWARD_CHUNK} at a time, so the result never depends on it.", lo=1,
               hi=4096)


def model_kind(model: Any) -> str:
    """'swin' for hierarchical window-attention models, 'vit' for other ViT-family models, 'callable' otherwise."""
    family = str(getattr(model, "family", "callable"))
    if "swin" in family:
        return "swin"
    return "vit" if isinstance(model, VitModel) else "callable"


M = TypeVar("M", bound=type[Method])
METHODS: dict[str, type[Method]] = {}


def register(cls: M) -> M:
    """Class decorator: add a method to `METHODS` under its ``name`` (each name once)."""
    if cls.name in METHODS and METHODS[cls.name] is not cls:
        raise ValueError(f"a method named {cls.name!r} is already registered ({METHODS[cls.name].__name__})")
    METHODS[cls.name] = cls
    return cls


def check_choice(name: str, value: str, choices: Sequence[str]) -> str:
    """Raise a clear error unless value is one of choices."""
    if value not in choices:
        raise VitlensError(f"{name} must be one of {', '.join(choices)}; got {value!r}")
    return value


def check_range(name: str, value: float, lo: float, hi: float, hi_open: bool = False) -> float:
    """Raise a clear error unless lo <= value <= hi (or < hi when hi_open)."""
    ok = lo <= value < hi if hi_open else lo <= value <= hi
    if not ok:
        raise VitlensError(f"{name} must be in [{lo}, {hi}{')' if hi_open else ']'}; got {value}")
    return float(value)
