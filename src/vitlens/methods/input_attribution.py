"""Input attributions through captum: Integrated Gradients, Input x Gradient and Saliency, pooled to patches."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any, ClassVar

import torch
import torch.nn.functional as F

from vitlens.errors import VitlensError
from vitlens.explanation import Explanation, max_normalize
from vitlens.methods.base import GradientMethod, Images, Option, Target, register

POOL = Option("pool", str, "patch", "Map on the patch grid (mean of each patch's pixels) or per pixel.",
              choices=("patch", "pixel"))
CHANNELS = Option("channels", str, "abs", "Per pixel: sum over RGB of |attribution| (abs) or of the signed values.",
                  choices=("abs", "signed"))
IG_METHODS = ("gausslegendre", "riemann_right", "riemann_left", "riemann_middle", "riemann_trapezoid")


def import_captum() -> Any:
    """The captum.attr module, or one clear line naming the extra to install."""
    try:
        import captum.attr  # type: ignore[import-untyped]
    except ImportError:
        raise VitlensError("this method needs captum: pip install 'vitlens[captum]'") from None
    return captum.attr


def pool_pixels(pixels: torch.Tensor, patch_size: tuple[int, int]) -> torch.Tensor:
    """[B, H, W] -> [B, H/ph, W/pw]: the mean over each patch's pixels."""
    return F.avg_pool2d(pixels[:, None], patch_size)[:, 0]


@contextmanager
def _eval_with_grad(module: torch.nn.Module) -> Iterator[None]:
    """Eval mode and grad mode while open; every module's train/eval flag restored on exit."""
    modes = [(m, m.training) for m in module.modules()]
    module.eval()
    try:
        with torch.enable_grad():
            yield
    finally:
        for m, mode in modes:
            m.training = mode


class InputAttribution(GradientMethod):
    """Shared plumbing: captum attributions [B, 3, H, W] of the target score with respect to the (normalised)
    input; per pixel the sum over RGB of their absolute values (``channels='abs'``, default: magnitudes, which a
    max-normalised map shows faithfully) or of the signed values (``'signed'``: may be negative; then the map is
    divided by its largest absolute value). ``pool='patch'`` (default): the map is the mean over each first-stage
    patch's pixels, on the layout's grid; the pixel map is always ``extras['pixels']`` (raw, not normalised)."""

    families = ("vit", "swin")
    pool: str
    channels: str

    def _common(self, pool: str, channels: str) -> None:
        import_captum()
        self.set_options(pool=pool, channels=channels)

    def _forward(self, target: Target) -> tuple[Any, Any]:
        """(forward function for captum, captum target): the model and the class per image, or, for a callable
        ``target``, a function giving one score per image (captum then gets no target)."""
        if callable(target) and not isinstance(target, torch.Tensor):
            return (lambda inp: self.score(self.model(inp), target)[0]), None
        return self.model, target

    def _scoring(self, target: Target, seen: dict) -> Any:
        """A forward function for captum that returns each image's score (resolving a None target to the top-1
        class of this very forward) and keeps the logits and resolved classes in ``seen``: one forward in all."""
        def fn(inp: torch.Tensor) -> torch.Tensor:
            out = self.model(inp)
            s, seen["t"] = self.score(out, target)
            seen["logits"] = out.detach()
            return s
        return fn

    def attributions(self, x: torch.Tensor, target: Target) -> tuple[torch.Tensor, dict, torch.Tensor, Any]:
        """(captum's attributions [B, 3, H, W], extras, logits at x, the class per image or None for a callable)."""
        raise NotImplementedError

    def _one_pass(self, kind: str, x: torch.Tensor, target: Target, **kw: Any) -> tuple[torch.Tensor, dict,
                                                                                          torch.Tensor, Any]:
        """A one-forward captum method (Saliency, InputXGradient) scoring through `_scoring`."""
        seen: dict = {}
        attr = getattr(import_captum(), kind)(self._scoring(target, seen)).attribute(x, **kw)
        return attr, {}, seen["logits"], seen["t"]

    def explain(self, x: Images, target: Target = None) -> Explanation:
        """Attribution maps for a batch; ``target`` as in `GradientMethod.score` (top-1 by default)."""
        x = self.batch(x).detach().requires_grad_(True)  # captum differentiates with respect to it
        with _eval_with_grad(self.model.module):
            attr, extras, logits, t = self.attributions(x, target)
        attr = attr.detach().float()
        pixels = (attr.abs() if self.channels == "abs" else attr).sum(1)
        raw = pixels if self.pool == "pixel" else pool_pixels(pixels, self.model.patch_size)
        maps = max_normalize(raw) if self.channels == "abs" else raw / raw.flatten(1).abs().amax(1).clamp_min(
            torch.finfo(raw.dtype).tiny).view(-1, 1, 1)
        return Explanation(maps=maps, method=self.name, params=self.params, target=t, logits=logits,
                           probs=self.probs_or_none(logits), extras={"pixels": pixels, "raw": raw, **extras})


@register
class IntegratedGradients(InputAttribution):
    """Integrated Gradients (Sundararajan et al. 2017) through captum: (x - x0) * the mean gradient along the straight
    path from the baseline x0 to x, with ``n_steps`` points by ``quadrature`` (captum's ``method``: Gauss-Legendre
    by default; not named ``method``, the CLI's method flag) and ``internal_batch_size`` path points per forward (the
    cost knob: n_steps forwards and backwards per image; 16 by default: on the CPU a path point costs 1.03x a plain
    forward + backward at 16 points per forward, 1.13-1.17x at 32-64, whose activations leave the cache; never fewer
    than the batch's images, as captum requires).
    ``baseline``: 'zero' (an all-zero normalised input: the preprocessing's mean colour) or 'black'. The per-image
    completeness gap sum(attributions) - (f(x) - f(x0)) is ``extras['delta']``."""

    name = "ig"
    description = "Integrated Gradients (captum): (x - baseline) * mean gradient on the path, pooled to patches"
    options = (
        Option("n_steps", int, 50, "Points on the path from the baseline to the image.", lo=1, hi=10000),
        Option("internal_batch_size", int, 16, "Path points per forward pass (memory/speed knob).", lo=1, hi=100000),
        Option("quadrature", str, "gausslegendre", "Points and weights along the path (captum's method names).",
               choices=IG_METHODS),
        Option("baseline", str, "zero", "Start of the path: all-zero normalised input, or a black image.",
               choices=("zero", "black")),
        POOL, CHANNELS,
    )
    n_steps: int
    internal_batch_size: int
    quadrature: str
    baseline: str

    def __init__(self, model, n_steps: int = 50, internal_batch_size: int = 16, quadrature: str = "gausslegendre",
                 baseline: str = "zero", pool: str = "patch", channels: str = "abs") -> None:
        super().__init__(model)
        self.set_options(n_steps=n_steps, internal_batch_size=internal_batch_size, quadrature=quadrature,
                         baseline=baseline)
        self._common(pool, channels)

    def baseline_of(self, x: torch.Tensor) -> torch.Tensor:
        """The path's start for a batch (same shape as ``x``)."""
        if self.baseline == "zero":
            return torch.zeros_like(x)
        pre = self.model.preprocess
        mean = torch.tensor(pre.mean, device=x.device, dtype=x.dtype).view(1, 3, 1, 1)
        std = torch.tensor(pre.std, device=x.device, dtype=x.dtype).view(1, 3, 1, 1)
        return ((0.0 - mean) / std).expand_as(x).contiguous()

    def attributions(self, x: torch.Tensor, target: Target) -> tuple[torch.Tensor, dict, torch.Tensor, Any]:
        """captum IntegratedGradients with the declared steps, batch size and quadrature (the class is resolved on
        a forward of the image itself first: the path's points may predict other classes)."""
        with torch.no_grad():
            logits = self.model(x)
        _, t = self.score(logits, target)
        fn, captum_target = self._forward(target if t is None else t)
        ig = import_captum().IntegratedGradients(fn)
        attr, delta = ig.attribute(x, baselines=self.baseline_of(x), target=captum_target, n_steps=self.n_steps,
                                   method=self.quadrature, internal_batch_size=max(self.internal_batch_size, len(x)),
                                   return_convergence_delta=True)
        return attr, {"delta": delta.detach().float()}, logits, t


class OnePassAttribution(InputAttribution):
    """A captum method that needs one forward and one backward: ``captum_class`` called with ``captum_kwargs``."""

    captum_class: ClassVar[str]
    captum_kwargs: ClassVar[dict[str, Any]] = {}
    options = (POOL, CHANNELS)

    def __init__(self, model, pool: str = "patch", channels: str = "abs") -> None:
        super().__init__(model)
        self._common(pool, channels)

    def attributions(self, x: torch.Tensor, target: Target) -> tuple[torch.Tensor, dict, torch.Tensor, Any]:
        """captum ``captum_class`` scoring through `_scoring` (one forward in all)."""
        return self._one_pass(self.captum_class, x, target, **self.captum_kwargs)


@register
class InputXGradient(OnePassAttribution):
    """Input x Gradient through captum: the normalised input times d score / d input."""

    name = "ixg"
    description = "input times gradient (captum), summed over channels, pooled to patches"
    captum_class = "InputXGradient"


@register
class Saliency(OnePassAttribution):
    """Saliency (Simonyan et al. 2014) through captum: d score / d input (signed; ``channels='abs'`` sums |.|)."""

    name = "saliency"
    description = "gradient of the score with respect to the pixels (captum), summed over channels, pooled to patches"
    captum_class = "Saliency"
    captum_kwargs = {"abs": False}  # the channel reduction takes the absolute value when asked
