"""Layer-wise relevance propagation (LRP) rules, written once over the operations transformer families are built from.

The rules act on the torch operations a model's forward calls (``F.linear``, ``F.conv2d``, ``F.layer_norm``, GELU and
other element-wise activations, softmax, the product of two activations (``q @ k^T``, ``A @ V``, gates) and the sum of
two activations (residual adds)), intercepted by a ``TorchFunctionMode`` while the model runs, so that no model is
rewritten: HF and timm ViT, DeiT, DINOv2, BEiT and Swin run their own code.

Formulation: "gradient x input". The backward pass carries a modified gradient g_t at every tensor t, and the relevance
of t is ``t * g_t``. Linear operations (reshapes, concatenation, token selection, pooling, scaling by constants such
as LayerScale, the attention scale) need no rule: their ordinary gradient keeps ``sum(t * g_t)`` (the z-rule).
Additive constants (biases, position embeddings, the CLS token, relative-position biases) absorb the relevance
``constant * g`` that the z-rule assigns them. Each intercepted operation returns its exact forward value, wrapped in
an autograd function whose backward is either the ordinary gradient or the rule: ``LRPMode.relevance()`` switches a
flag, so one forward serves both a plain gradient pass and a relevance pass (retain the graph between them).

Rule sets (`LRPRules`):

- `CHEFER` (Chefer, Gur, Wolf, CVPR 2021, as in their code): Linear: alpha=1, beta=0 (z+: only positive contributions
  w_kj x_j > 0, bias excluded, denominator + 1e-9); LayerNorm, activations and softmax: identity (R_in = R_out per
  element); products of two activations: z-rule, each operand half; sums of two activations (residual adds): z-rule
  split, then both parts rescaled so that their totals are in proportion |sum R_a| : |sum R_b| and add up to sum R_z
  (their ``Add`` rule; we sum per sample where their code sums over the batch).
- `ATTNLRP` (Achtibat et al., ICML 2024): Linear and patch convolution: epsilon rule (z + eps * sign(z)); LayerNorm:
  identity rule on the normalisation (the standard deviation is a constant, the centring and affine map are linear);
  activations: identity; softmax: the paper's rule R_in = x * (R_out - s * sum R_out), which is exactly its gradient
  x input; products of two activations: uniform rule (half each); residual adds: z-rule (conserving).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
from torch.overrides import TorchFunctionMode

from vitlens.errors import VitlensError

TINY = 1e-9  # Chefer's safe_divide stabiliser


@dataclass(frozen=True)
class LRPRules:
    """Which rule each kind of operation gets (see the module docstring)."""

    name: str
    linear: str  # "epsilon" (z-rule when epsilon = 0) or "alpha1beta0"
    norm: str  # "identity" (R_in = R_out) or "attnlrp" (constant standard deviation)
    softmax: str  # "identity" or "gradient" (AttnLRP's softmax rule)
    add: str  # "gradient" (z-rule) or "chefer" (z-rule, then |.|-proportional rescaling)
    epsilon: float = 0.0


CHEFER = LRPRules("transformer_attribution", linear="alpha1beta0", norm="identity", softmax="identity", add="chefer")


def attnlrp_rules(epsilon: float = 1e-6) -> LRPRules:
    """AttnLRP's rules with stabiliser ``epsilon`` on linear layers."""
    return LRPRules("attnlrp", linear="epsilon", norm="attnlrp", softmax="gradient", add="gradient", epsilon=epsilon)


_ADD = {"add", "__add__", "__radd__"}
_MATMUL = {"matmul", "__matmul__", "__rmatmul__", "bmm", "einsum"}
_MUL = {"mul", "__mul__", "__rmul__"}
_ACTIVATIONS = {"gelu", "relu", "silu", "sigmoid", "tanh", "quick_gelu"}
_SOFTMAX = {"softmax"}
# non-linear operations without a rule here: a model that applies them to activations is refused, not explained wrongly
_UNSUPPORTED = {"scaled_dot_product_attention", "exp", "log", "sqrt", "rsqrt", "pow", "__pow__", "normalize",
                "rms_norm", "group_norm", "amax", "max", "__truediv__", "div", "__rtruediv__", "reciprocal", "erf",
                "abs", "square"}


_RULED = {"linear", "conv2d", "layer_norm"} | _ADD | _MATMUL | _MUL | _ACTIVATIONS | _SOFTMAX | _UNSUPPORTED


def _stab(z: torch.Tensor, eps: float) -> torch.Tensor:
    """z + eps * sign(z), with sign(0) = +1 (so that the result is never 0 when eps > 0)."""
    return torch.where(z >= 0, z + eps, z - eps)


def _identity(g: torch.Tensor, y: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """g * y / x: the gradient at x of the identity rule (R_x = x * g_x = y * g = R_y); 0 where x is exactly 0 (the
    relevance x * g is 0 there anyway). One buffer, computed in place."""
    return (g * y).div_(x).nan_to_num_(0.0, 0.0, 0.0)


class _Switch(torch.autograd.Function):
    """Returns ``y`` (the op's exact output, with its own graph); backward is the ordinary gradient (sent into y's
    graph) or, in a relevance pass, ``rule(g)``, which returns the gradient for y (or None) and for each input."""

    @staticmethod
    def forward(ctx, mode: LRPMode, rule: Callable, y: torch.Tensor, *inputs: torch.Tensor) -> torch.Tensor:
        ctx.mode, ctx.rule, ctx.n = mode, rule, len(inputs)
        return y.view_as(y)

    @staticmethod
    def backward(ctx, g: torch.Tensor) -> tuple:
        if not ctx.mode.lrp:
            return (None, None, g) + (None,) * ctx.n
        gy, gxs = ctx.rule(g)
        return (None, None, gy, *gxs)


def _grad(t: Any) -> bool:
    return isinstance(t, torch.Tensor) and t.requires_grad


class LRPMode(TorchFunctionMode):
    """While active, the operations named in the module docstring get switchable LRP backwards (see `lrp_mode`)."""

    def __init__(self, rules: LRPRules, what: str, cache: dict | None = None) -> None:
        super().__init__()
        self.rules, self.what = rules, what
        self.lrp = False
        self._abs: dict = {} if cache is None else cache

    @contextmanager
    def relevance(self) -> Iterator[None]:
        """Backward passes inside this block propagate relevance instead of gradients."""
        self.lrp = True
        try:
            yield
        finally:
            self.lrp = False

    def _wrap(self, rule: Callable, y: torch.Tensor, *inputs: torch.Tensor) -> torch.Tensor:
        return _Switch.apply(self, rule, y, *inputs)

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        name = getattr(func, "__name__", "")
        if name not in _RULED:  # views, reshapes, dropout, ...: most calls; nothing to do
            return out
        if not isinstance(out, torch.Tensor) or not out.requires_grad or not out.is_floating_point():
            return out
        if name == "linear" or name == "conv2d":
            return self._linear(name, out, *args, **kwargs)
        if name == "layer_norm":
            return self._layer_norm(out, *args, **kwargs)
        tensors = [a for a in args if isinstance(a, torch.Tensor)]
        active = [t for t in tensors if t.requires_grad]
        if name in _ACTIVATIONS or (name in _SOFTMAX and self.rules.softmax == "identity"):
            x = active[0]
            return self._wrap(lambda g: (None, (_identity(g, out, x),)), out, x)
        if name in _SOFTMAX:
            return out  # AttnLRP's softmax rule is gradient x input
        if len(active) == 2 and (name in _MATMUL or name in _MUL):  # q @ k^T, A @ V, gates: half to each operand
            return self._wrap(lambda g: (g * 0.5, ()), out)
        if len(active) == 2 and name in _ADD and self.rules.add == "chefer":
            return self._chefer_add(out, *active)
        if name in _UNSUPPORTED and active and not (name in {"__truediv__", "div"} and not _grad(args[1])):
            raise VitlensError(f"{self.rules.name} has no LRP rule for the operation {name!r} that {self.what} applies "
                               "to activations; use a method without LRP rules (grad_rollout, gae) for this model")
        return out

    # ---- rules ----------------------------------------------------------------------------------------------------
    def _linear(self, name: str, out: torch.Tensor, x, weight=None, bias=None, *rest, **kw) -> torch.Tensor:
        if not _grad(x):
            return out
        if self.rules.linear == "alpha1beta0" and name == "linear":
            w = weight
            tag = (w.data_ptr(), w._version, w.dtype, w.device)
            cached = self._abs.get(id(w))
            if cached is None or cached[0] != tag:  # new or changed weight: (re)compute, dropping the stale copy
                wd = w.detach()
                cached = self._abs[id(w)] = (tag, torch.cat([wd.clamp(min=0), wd.clamp(max=0)], 1),
                                             wd.abs().mul_(0.5), torch.cat([wd, wd.abs()], 1).mul_(0.5))
            def z_plus(g: torch.Tensor) -> tuple:
                live = live_rows(g)
                if live is None:
                    return None, (_z_plus_rows(g, x.detach(), out, bias, cached),)
                n, m = x.shape[-1], out.shape[-1]
                flat = x.new_zeros(x.shape).view(-1, n)
                flat[live] = _z_plus_rows(g.reshape(-1, m)[live], x.detach().reshape(-1, n)[live],
                                          out.reshape(-1, m)[live], bias, cached)
                return None, (flat.view(x.shape),)

            return self._wrap(z_plus, out, x)
        eps = self.rules.epsilon
        if eps == 0:
            return out
        return self._wrap(lambda g: (g * (out / _stab(out, eps)), ()), out)

    def _layer_norm(self, out: torch.Tensor, x, normalized_shape, weight=None, bias=None, eps=1e-5) -> torch.Tensor:
        if not _grad(x):
            return out
        if self.rules.norm == "identity":
            return self._wrap(lambda g: (None, (_identity(g, out, x),)), out, x)
        dims = tuple(range(-len(tuple(normalized_shape)), 0))

        def constant_std(g: torch.Tensor) -> tuple:
            std = (x.var(dims, unbiased=False, keepdim=True) + eps).sqrt()
            gw = g if weight is None else g * weight
            return None, ((gw - gw.mean(dims, keepdim=True)) / std,)

        return self._wrap(constant_std, out, x)

    def _chefer_add(self, out: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        if a.shape != out.shape or b.shape != out.shape:
            return out  # a broadcast sum (e.g. a bias-like term): z-rule

        def rescale(g: torch.Tensor) -> tuple:
            g2 = g.reshape(len(g), -1, 1)
            # [2, B]: the sums of a * g and of b * g per sample (dot products, without a * g); then both factors at once
            r = torch.stack([torch.bmm(t.reshape(len(t), 1, -1), g2) for t in (a, b)]).view(2, -1)
            size = r.abs()
            f = _safe_div(_safe_div(size, size.sum(0)) * r.sum(0), r)
            shape = (-1,) + (1,) * (g.ndim - 1)
            return None, (g * f[0].view(shape), g * f[1].view(shape))

        return self._wrap(rescale, out, a, b)


def _z_plus_rows(g: torch.Tensor, x: torch.Tensor, out: torch.Tensor, bias: torch.Tensor | None,
                 cached: tuple) -> torch.Tensor:
    """The alpha=1/beta=0 rule's gradient at a linear layer's input ``x`` for the output gradient ``g`` (rows of
    tokens; ``cached`` holds [W+ | W-], |W| / 2 and [W | |W|] / 2): s = out * g / Z+, then s W+ where x > 0 and s W-
    where x < 0 (x = 0 carries no relevance) as (s W + sign(x) s |W|) / 2 from one product and a multiply-add (a
    torch.where over the two halves costs up to half the product)."""
    _, w_split, w_abs_half, w_half = cached
    s = (out * g).div_(positive_part(x, out, bias, w_split, w_abs_half, TINY))
    t = s @ w_half
    n = x.shape[-1]
    return torch.addcmul(t[..., :n], x.sign(), t[..., n:])


# a layer's output gradient is pruned to its non-zero rows when at least this share of rows is zero
SPARSE_ROWS = 0.25


def live_rows(g: torch.Tensor) -> torch.Tensor | None:
    """Indices of the rows (tokens, over all images) of ``g`` [..., C] that hold a non-zero value, or None when
    fewer than `SPARSE_ROWS` of them are all zero. Under a ViT's CLS readout, the last block's MLP and projection get a
    gradient on the CLS row alone: their rule then costs one row per image instead of every token. Cheap when rows
    are dense: only rows whose first value is exactly 0 are looked at in full."""
    flat = g.reshape(-1, g.shape[-1])
    candidates = (flat[:, 0] == 0).nonzero().squeeze(1)
    if len(candidates) < SPARSE_ROWS * len(flat):
        return None
    zero = torch.zeros(len(flat), dtype=torch.bool, device=g.device)
    zero[candidates] = (flat[candidates] == 0).all(-1)
    if int(zero.sum()) < SPARSE_ROWS * len(flat):
        return None
    return (~zero).nonzero().squeeze(1)


# Z+ from W x and |W| |x| is exact to rounding where Z+ is at least this fraction of |W| |x| + |b|; rows with an
# output below it are recomputed term by term
CANCELLATION = 1e-2


def positive_part(x: torch.Tensor, out: torch.Tensor, bias: torch.Tensor | None, w_split: torch.Tensor,
                  w_abs_half: torch.Tensor, stabiliser: float = 0.0) -> torch.Tensor:
    """Z+_k = sum_j (w_kj x_j)^+ = W+ x+ + W- x- of a linear layer, from its forward output ``out`` = W x + b; plus
    ``stabiliser``, and +inf where Z+ is exactly 0 when ``stabiliser`` > 0, so that dividing by the result is
    Chefer's safe_divide (a / (Z+ + 1e-9), 0 where Z+ is 0). ``w_abs_half`` is |W| / 2.

    One matrix product instead of two: Z+ = (W x + |W| |x|) / 2 = |W|/2 |x| - b/2 + out/2 (the bias folded into the
    product). That sum cancels where Z+ is small against |W| |x|, so every row (token) with an output at or below
    `CANCELLATION` of |W| |x| + |b| is recomputed exactly as W+ x+ + W- x- (every term >= 0: Z+ is then exactly 0
    when no contribution is positive). Elsewhere Z+ > 0, so only the recomputed rows can hold a zero."""
    xd, wx = x.detach(), out.detach()
    b = bias.detach() if bias is not None else None
    k = (1 - 2 * CANCELLATION) / CANCELLATION
    shift = None  # -b / 2 + stabiliser, added inside the product
    if b is not None:
        shift = b * -0.5 + stabiliser
    elif stabiliser:
        shift = wx.new_full((wx.shape[-1],), stabiliser)
    z = torch.nn.functional.linear(xd.abs(), w_abs_half, shift).add_(wx, alpha=0.5)
    # z <= C (|W| |x| + |b|) with |W| |x| = 2 z - W x = 2 z - out + b: (1 - 2C) / C z + out - (b + |b|) <= 0 (z here
    # without the stabiliser); one minimum over all values first (comparing and reducing per row costs five times as
    # much, and rows rarely need it)
    test = torch.add(wx, z, alpha=k)
    if b is not None:
        test.sub_(b.clamp(min=0).mul_(2.0).add_(k * stabiliser))
    elif stabiliser:
        test.sub_(k * stabiliser)
    rows = (test <= 0).reshape(-1, z.shape[-1]).any(-1) if test.numel() and float(test.amin()) <= 0 else None
    if rows is not None:
        flat_x, flat_z = xd.reshape(-1, xd.shape[-1]), z.view(-1, z.shape[-1])
        few = flat_x[rows]
        exact = torch.nn.functional.linear(torch.cat([few.clamp(min=0), few.clamp(max=0)], -1), w_split)
        flat_z[rows] = exact.add(stabiliser).masked_fill_(exact == 0, torch.inf) if stabiliser else exact
    return z


def _safe_div(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Chefer's safe_divide: a / (b + 1e-9), 0 where b == 0."""
    return a / (b + TINY) * (b != 0)


@contextmanager
def lrp_mode(rules: LRPRules, what: str = "the model", cache: dict | None = None) -> Iterator[LRPMode]:
    """Context manager: forwards run inside it build a graph whose backward is switchable to ``rules``.

    ``with lrp_mode(CHEFER) as mode: y = model(x)``; then ``torch.autograd.grad(...)`` gives ordinary gradients and,
    inside ``with mode.relevance():``, relevance-propagating ones (relevance of t = t * grad of t). ``cache`` (a dict
    kept by the caller) keeps |W| of each linear weight between calls (alpha-beta rule), keyed by the weight's
    identity and version, so that it is computed once per model rather than once per batch.
    """
    mode = LRPMode(rules, what, cache)
    with mode:
        yield mode
