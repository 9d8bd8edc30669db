"""Tap the tokens entering or leaving chosen transformer blocks (e.g. for Grad-CAM over tokens)."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import ExitStack, contextmanager
from typing import TYPE_CHECKING, Any

import torch

from vitlens.errors import VitlensError
from vitlens.models.base import block_tokens

if TYPE_CHECKING:
    from vitlens.models.base import VitModel

WHERE = ("input", "output")


@contextmanager
def tap_tokens(model: VitModel, blocks: Sequence[int], where: str = "input") -> Iterator[dict[int, torch.Tensor]]:
    """While open, every forward stores block ``i``'s tokens (its first input, or its output) in ``taps[i]``, as the
    model holds them ([B, N, C], or Swin's [B, H, W, C]: flatten with `vitlens.models.base.flat_tokens`), still in
    the autograd graph, so that gradients can be taken with respect to them inside ``model.record(grads=True)``.
    Hooks are removed on exit, also after an error. Negative block indices count from the end."""
    if where not in WHERE:
        raise VitlensError(f"where must be one of {', '.join(WHERE)}; got {where!r}")
    mods = model.block_modules()
    n = len(mods)
    bad = [b for b in blocks if not -n <= b < n]
    if bad:
        raise VitlensError(f"block index {bad[0]} is out of range for a model with {n} blocks; use -{n}..{n - 1}")
    taps: dict[int, torch.Tensor] = {}
    with ExitStack() as stack:
        for i in sorted({b % n for b in blocks}):
            if where == "input":
                def pre(module: Any, args: Any, kwargs: Any, i: int = i) -> None:
                    taps[i] = block_tokens(args if args else (kwargs.get("hidden_states"),))
                handle = mods[i].register_forward_pre_hook(pre, with_kwargs=True)
            else:
                def post(module: Any, args: Any, output: Any, i: int = i) -> None:
                    taps[i] = block_tokens(output)
                handle = mods[i].register_forward_hook(post)
            stack.callback(handle.remove)
        yield taps


@contextmanager
def gradient_pass(model: VitModel) -> Iterator[None]:
    """While open: the model in eval mode, grad mode on and the model's input made to require grad (parameters
    frozen meanwhile), so that gradients reach the input and any tapped tokens whatever the caller's flags were.
    Unlike ``model.record`` it leaves fused attention kernels on (no attention is captured). Everything is restored
    on exit, also after an error, and it nests with ``model.record``."""
    from vitlens.capture import _grads_from_input, _hold, _restore_training

    with ExitStack() as stack:
        stack.callback(_restore_training(model.module))
        model.module.eval()
        stack.callback(_hold(model, "grads", lambda: _grads_from_input(model)))
        stack.enter_context(torch.enable_grad())
        yield
