"""Capture every block's attention probabilities (and their gradients) with hooks that never leak."""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch

from vitlens.errors import VitlensError

if TYPE_CHECKING:
    from vitlens.models.base import VitModel

StreamFn = Callable[[int, torch.Tensor], None]
ToGlobal = Callable[[torch.Tensor], torch.Tensor]


@dataclass
class AttentionRecord:
    """Attention probabilities [B, H, N, N] per block, in global token coordinates, from the last forward pass.

    ``probs[i]`` is None for blocks that were not selected (or were streamed instead of stored). ``meta[i]`` holds
    what an adapter knows about block i's geometry (e.g. Swin's window of every token), when it says anything.
    """

    num_blocks: int
    probs: list[torch.Tensor | None] = field(default_factory=list)
    meta: list[dict] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.probs = [None] * self.num_blocks
        self.meta = [{} for _ in range(self.num_blocks)]
        # what the model computed (e.g. Swin's [B*nW, H, M^2, M^2] windows) and how it maps to global coordinates
        self._raw: list[torch.Tensor | None] = [None] * self.num_blocks
        self._to_global: list[ToGlobal | None] = [None] * self.num_blocks

    def captured(self) -> list[int]:
        """Indices of the blocks whose attention was stored."""
        return [i for i, p in enumerate(self.probs) if p is not None]

    def grads(self, score: torch.Tensor, retain_graph: bool = False,
              blocks: Sequence[int] | None = None) -> list[torch.Tensor | None]:
        """Gradients of ``score.sum()`` with respect to each stored attention-probability tensor, in block order.

        Samples of a batch do not interact in a ViT in eval mode, so the gradient of the summed per-sample scores
        gives every sample its own gradient. ``blocks`` limits the gradients to those stored blocks (autograd then
        walks only the graph between them and the score); the others are None.
        """
        wanted = None if blocks is None else set(blocks)
        idx = [i for i in self.captured() if wanted is None or i in wanted]
        if not idx:
            raise VitlensError("no attention was recorded: run the model inside record(grads=True) first")
        tensors = [t for i in idx if (t := self._raw[i]) is not None]
        if len(tensors) != len(idx) or not all(t.requires_grad for t in tensors):
            raise VitlensError("attention was recorded without gradients: use record(grads=True)")
        got = torch.autograd.grad(score.sum(), tensors, retain_graph=retain_graph, allow_unused=True)
        out: list[torch.Tensor | None] = [None] * self.num_blocks
        for i, g in zip(idx, got):
            g = torch.zeros_like(self._raw[i]) if g is None else g
            to_global = self._to_global[i]
            out[i] = g if to_global is None else to_global(g)
        return out


def _restore_training(module: torch.nn.Module) -> Callable[[], None]:
    modes = [(m, m.training) for m in module.modules()]

    def undo() -> None:
        for m, mode in modes:
            if m.training != mode:  # nn.Module's __setattr__ is slow: set only what changed
                m.training = mode

    return undo


def _eval(module: torch.nn.Module) -> None:
    """``module.eval()``, skipped when every submodule already is in eval mode (the common case: no writes)."""
    if any(m.training for m in module.modules()):
        module.eval()


def _explicit_eval(model: VitModel) -> Callable[[], None]:
    """Eval mode and explicit attention; returns the undo (explicit attention first, then the train/eval modes)."""
    undo_training = _restore_training(model.module)
    _eval(model.module)
    try:
        undo_attention = model._use_explicit_attention()
    except BaseException:
        undo_training()
        raise

    def undo() -> None:
        try:
            undo_attention()
        finally:
            undo_training()

    return undo


def _grads_from_input(model: VitModel) -> Callable[[], None]:
    """Freeze the parameters and let ``model.forward`` make its input require grad; returns the undo."""
    flags = [(p, p.requires_grad) for p in model.module.parameters()]
    for p, _ in flags:
        p.requires_grad_(False)
    model._grad_input = True

    def undo() -> None:
        model._grad_input = False
        for p, flag in flags:
            p.requires_grad_(flag)

    return undo


def _hold(model: VitModel, key: str, change: Callable[[], Callable[[], None]]) -> Callable[[], None]:
    """Share one model-wide change between the records open on ``model``: the first to open makes it, the last to
    close undoes it, in whatever order they close (a nested record must not undo what the outer one still needs).
    Returns this record's release."""
    holds: dict[str, list] = model.__dict__.setdefault("_record_holds", {})
    if key not in holds:
        holds[key] = [0, change()]
    entry = holds[key]
    entry[0] += 1
    released = False

    def release() -> None:
        nonlocal released
        if released:
            return
        released = True
        entry[0] -= 1
        if entry[0] == 0:
            del holds[key]
            entry[1]()

    return release


@contextmanager
def record(
    model: VitModel,
    grads: bool = False,
    blocks: Sequence[int] | None = None,
    stream: StreamFn | None = None,
) -> Iterator[AttentionRecord]:
    """Context manager: while open, every forward of ``model`` records each block's attention probabilities.

    - ``grads=True`` keeps the autograd graph so that ``record.grads(score)`` returns d score / d probs; the model's
      parameters are frozen meanwhile (gradients flow from the input instead) and grad mode is switched on.
    - ``blocks`` restricts recording to these block indices (negative indices count from the end).
    - ``stream(i, probs)`` is called as soon as block ``i`` has computed its attention; streamed blocks are not
      stored, so a consumer such as rollout needs memory for one block at a time.

    On exit, always (also after an exception), hooks are removed and the model's train/eval modes, attention
    implementation flags and ``requires_grad`` flags are restored. Records may be nested (or closed out of order):
    those model-wide changes are made by the first record to open and undone by the last one to close.
    """
    n = model.num_blocks
    selected = set(range(n)) if blocks is None else {b % n if -n <= b < n else _bad_block(b, n) for b in blocks}
    rec = AttentionRecord(num_blocks=n)
    with ExitStack() as stack:
        stack.callback(_hold(model, "explicit", lambda: _explicit_eval(model)))
        _eval(model.module)  # also when an outer record already holds the model (the user may have called train())
        if grads:
            stack.callback(_hold(model, "grads", lambda: _grads_from_input(model)))
            stack.enter_context(torch.enable_grad())
        for i, (site, extract) in enumerate(model._attention_sites()):
            if i not in selected:
                continue

            def hook(mod, args, kwargs, output, i=i, extract=extract) -> None:
                got = extract(mod, args, kwargs, output)
                if got is None:
                    raise VitlensError(
                        f"block {i} of {type(model.module).__name__} returned no attention weights; "
                        "the model must compute attention explicitly (HF: attn_implementation='eager')"
                    )
                raw, to_global, meta = got if isinstance(got, tuple) else (got, None, {})
                if raw is None:
                    raise VitlensError(f"block {i} of {type(model.module).__name__} returned no attention weights")
                probs = raw if to_global is None else to_global(raw)
                rec.meta[i] = meta
                if stream is not None:
                    stream(i, probs)
                    if not grads:
                        return
                rec.probs[i], rec._raw[i], rec._to_global[i] = probs, raw, to_global

            handle = site.register_forward_hook(hook, with_kwargs=True)
            stack.callback(handle.remove)
        yield rec


def _bad_block(b: int, n: int) -> int:
    raise VitlensError(f"block index {b} is out of range for a model with {n} blocks; use -{n}..{n - 1}")
