"""`GenericAdapter` / `wrap_by_names`: any ViT-like model whose attention modules you can name.

For an architecture vitlens has no adapter for, give the attention modules by a name pattern over
``module.named_modules()`` and say how they compute attention:

- ``kind="timm"``: timm-style attention. With ``fused_flag`` (default ``"fused_attn"``) set to False the module
  computes ``softmax(q k^T / sqrt(d))`` explicitly and passes it through its child ``probs_at`` (default
  ``"attn_drop"``, an identity in eval mode) before multiplying with the values; vitlens captures that child's
  output, which is exactly the tensor multiplied with the values.
- ``kind="hf"``: transformers-style attention returning ``(output, weights)``; every config inside the model is
  switched to ``attn_implementation="eager"`` while recording (sdpa returns no weights).

Patterns: ``*`` matches within one dotted component, ``**`` across components, ``?`` one character;
``"blocks.*.attn"`` matches ``blocks.0.attn`` but not ``blocks.0.attn.attn_drop``. Blocks are taken in the order
``named_modules()`` lists them, which for a ``ModuleList`` of blocks is the order of the forward pass.
"""

from __future__ import annotations

import inspect
import re
from collections.abc import Callable, Sequence
from typing import Any, Final, Literal

import torch
from torch import nn

from vitlens._utils import pair
from vitlens.errors import VitlensError
from vitlens.images import Preprocess
from vitlens.layout import READOUTS, TokenLayout
from vitlens.models.base import AttentionSite, VitModel

KINDS = ("timm", "hf")
AUTO: Final = "auto"
RunFn = Callable[[nn.Module, torch.Tensor], Any]


def name_pattern(pattern: str) -> re.Pattern[str]:
    """Regex for a dotted-name pattern: ``*`` within one component, ``**`` across components, ``?`` one char."""
    out = []
    i = 0
    while i < len(pattern):
        if pattern.startswith("**", i):
            out.append(".*")
            i += 2
        elif pattern[i] == "*":
            out.append(r"[^.]*")
            i += 1
        elif pattern[i] == "?":
            out.append(r"[^.]")
            i += 1
        else:
            out.append(re.escape(pattern[i]))
            i += 1
    return re.compile("".join(out))


def find_modules(module: nn.Module, attention: str | Sequence[str | nn.Module]) -> list[tuple[str, nn.Module]]:
    """(name, module) of every submodule matching the pattern(s) or given directly, in ``named_modules`` order."""
    items = [attention] if isinstance(attention, str) else list(attention)
    if not items:
        raise VitlensError("attention must name at least one module (a pattern such as 'blocks.*.attn')")
    bad = [p for p in items if not isinstance(p, (str, nn.Module))]
    if bad:
        raise VitlensError(f"attention takes name patterns or modules, got {type(bad[0]).__name__}")
    named = list(module.named_modules())
    patterns = {p: name_pattern(p) for p in items if isinstance(p, str)}
    given = {id(m): m for m in items if isinstance(m, nn.Module)}
    missing = [p for p, rx in patterns.items() if not any(rx.fullmatch(n) for n, _ in named)]
    if missing:
        names = [n for n, _ in named if n][:6]
        raise VitlensError(
            f"no submodule of {type(module).__name__} matches attention={missing[0]!r} (names look like "
            f"{', '.join(names)}, ...); see module.named_modules()"
        )
    if set(given) - {id(m) for _, m in named}:
        raise VitlensError(f"an attention module given is not a submodule of {type(module).__name__}")
    return [(n, m) for n, m in named if id(m) in given or any(rx.fullmatch(n) for rx in patterns.values())]


class GenericAdapter(VitModel):
    """A ViT-family model described by the names of its attention modules (see the module docstring).

    Arguments (everything after ``kind`` is keyword-only; ``"auto"`` reads the value from the model when it can):

    - ``attention``: name pattern(s) of the attention modules, one per block, or the modules themselves.
    - ``kind``: ``"timm"`` or ``"hf"``, how those modules compute attention.
    - ``fused_flag``: (timm) the attribute switching fused attention on; set to False while recording, restored
      after. None when the modules always compute attention explicitly.
    - ``probs_at``: (timm) the child whose output is the attention probabilities; ``""`` for the module itself.
    - ``num_prefix_tokens``: CLS/distillation/register tokens before the patches (auto: ``module.num_prefix_tokens``,
      else 1).
    - ``readout``: how the output pools the tokens, one of ``vitlens.layout.READOUTS`` (auto: ``"cls"`` with a
      prefix token, else ``"mean"``).
    - ``patch_size``: int or (h, w) (auto: ``module.patch_embed.patch_size`` or the config's ``patch_size``).
    - ``num_classes``: classes of the output, None for a backbone (auto: timm ``num_classes``, or the config's
      ``num_labels`` for a transformers ``*ForImageClassification``).
    - ``run``: ``run(module, x)`` returning logits [B, C] or features [B, D]; default: timm ``module(x)``,
      transformers ``module(pixel_values=x)`` (with ``interpolate_pos_encoding`` for other input sizes), then the
      output's ``logits``, ``image_embeds`` or ``pooler_output``, else its ``last_hidden_state`` pooled by ``readout``.
    - ``preprocess``, ``labels``, ``multi_label``: as in `VitModel` (auto from timm's pretrained_cfg or the
      transformers config).
    """

    family = "generic"

    def __init__(
        self,
        module: nn.Module,
        attention: str | Sequence[str | nn.Module] = "blocks.*.attn",
        kind: Literal["timm", "hf"] = "timm",
        *,
        fused_flag: str | None = "fused_attn",
        probs_at: str = "attn_drop",
        num_prefix_tokens: int | Literal["auto"] = AUTO,
        readout: str = AUTO,
        patch_size: int | tuple[int, int] | Literal["auto"] = AUTO,
        num_classes: int | None | Literal["auto"] = AUTO,
        run: RunFn | None = None,
        preprocess: Preprocess | None = None,
        labels: Sequence[str] | None | Literal["auto"] = AUTO,
        multi_label: bool | Literal["auto"] = AUTO,
    ) -> None:
        if kind not in KINDS:
            raise VitlensError(f"kind must be one of {KINDS} (how the attention modules work), got {kind!r}")
        if not isinstance(module, nn.Module):
            raise VitlensError(f"expected a torch nn.Module, got {type(module).__name__}")
        self.kind = kind
        self._attn = find_modules(module, attention)
        self._fused_flag = fused_flag if kind == "timm" else None
        self._probs_at = probs_at
        self._check_timm_sites()
        self._user_run = run
        self._config: Any = getattr(module, "config", None)
        self._num_prefix = self._auto_prefix(module, num_prefix_tokens)
        self._readout = self._auto_readout(readout)
        try:
            TokenLayout(self._num_prefix, (1, 1), self._readout)  # checks the readout against the prefix tokens
        except ValueError as e:
            raise VitlensError(f"{e}; pass num_prefix_tokens= and readout= that fit the model") from None
        n_cls = self._auto_classes(module, num_classes)
        super().__init__(
            module,
            preprocess or self._auto_preprocess(module),
            num_classes=n_cls,
            labels=self._auto_labels(module, labels, n_cls),
            multi_label=self._auto_multi_label(multi_label),
            patch_size=self._auto_patch(module, patch_size),
        )
        self._accepts_interp = kind == "hf" and "interpolate_pos_encoding" in _parameters(module.forward)

    # ---- construction ---------------------------------------------------------------------------------------------
    def _check_timm_sites(self) -> None:
        if self.kind != "timm":
            return
        for name, m in self._attn:
            if self._probs_at and not isinstance(getattr(m, self._probs_at, None), nn.Module):
                raise VitlensError(
                    f"{name} has no child module {self._probs_at!r}; pass probs_at= the child whose output is the "
                    "attention probabilities (or '' if the named module outputs them)"
                )
            if self._fused_flag and not hasattr(m, self._fused_flag):
                raise VitlensError(
                    f"{name} has no attribute {self._fused_flag!r}; pass fused_flag= its fused-attention switch, or "
                    "None if it always computes attention explicitly"
                )

    def _auto_prefix(self, module: nn.Module, value) -> int:
        if value == AUTO:
            return int(getattr(module, "num_prefix_tokens", 1))
        if not isinstance(value, int) or value < 0:
            raise VitlensError(f"num_prefix_tokens must be a non-negative int, got {value!r}")
        return value

    def _auto_readout(self, value: str) -> str:
        if value == AUTO:
            return "cls" if self._num_prefix else "mean"
        if value not in READOUTS:
            raise VitlensError(f"readout must be one of {READOUTS}, got {value!r}")
        return value

    def _vision_config(self):
        return getattr(self._config, "vision_config", None) or self._config

    def _auto_patch(self, module: nn.Module, value) -> tuple[int, int]:
        if value != AUTO:
            return pair(value, "patch_size")
        pe = getattr(module, "patch_embed", None)
        found = getattr(pe, "patch_size", None) or getattr(self._vision_config(), "patch_size", None)
        if found is None:
            raise VitlensError(f"cannot tell the patch size of {type(module).__name__}; pass patch_size=")
        return pair(found, "patch_size")

    def _is_hf_classifier(self, module: nn.Module) -> bool:
        return self._config is not None and type(module).__name__.endswith("ForImageClassification")

    def _auto_classes(self, module: nn.Module, value) -> int | None:
        if value != AUTO:
            return None if value is None else int(value)
        if self.kind == "timm":
            return int(getattr(module, "num_classes", 0) or 0) or None
        return int(self._config.num_labels) if self._is_hf_classifier(module) else None

    def _auto_labels(self, module: nn.Module, value, num_classes: int | None) -> list[str] | None:
        if value != AUTO:
            return None if value is None else list(value)
        if num_classes is None:
            return None
        if self._config is not None and hasattr(self._config, "id2label") and self._is_hf_classifier(module):
            from vitlens.models.hf import hf_labels

            return hf_labels(self._config)
        if self.kind == "timm":
            from vitlens.models.timm_adapter import timm_labels

            return timm_labels(module)
        return None

    def _auto_multi_label(self, value) -> bool:
        if value != AUTO:
            return bool(value)
        return getattr(self._config, "problem_type", None) == "multi_label_classification"

    def _auto_preprocess(self, module: nn.Module) -> Preprocess:
        if self.kind == "timm" and getattr(module, "patch_embed", None) is not None:
            from vitlens.models.timm_adapter import timm_preprocess

            return timm_preprocess(module)
        if self._config is not None:
            from vitlens.models.hf import hf_preprocess

            return hf_preprocess(self._config)
        return Preprocess()

    # ---- adapter interface ---------------------------------------------------------------------------------------
    def _attention_sites(self) -> list[AttentionSite]:
        if self.kind == "hf":
            return [(m, _second) for _, m in self._attn]
        return [(getattr(m, self._probs_at) if self._probs_at else m, _output) for _, m in self._attn]

    def _use_explicit_attention(self) -> Callable[[], None]:
        if self.kind == "hf":
            from vitlens.models.hf import use_eager_attention

            return use_eager_attention(self.module)
        flag = self._fused_flag
        if not flag:
            return lambda: None
        saved = [(m, getattr(m, flag)) for _, m in self._attn]
        for m, _ in saved:
            setattr(m, flag, False)

        def undo() -> None:
            for m, value in saved:
                setattr(m, flag, value)

        return undo

    def _run(self, x: torch.Tensor) -> torch.Tensor:
        if self._user_run is not None:
            out = self._user_run(self.module, x)
        elif self.kind == "timm":
            if getattr(self.module, "patch_embed", None) is not None:
                from vitlens.models.timm_adapter import check_input_size

                check_input_size(self.module, x)
            out = self.module(x)
        else:
            kwargs = {}
            size = getattr(self._vision_config(), "image_size", None)
            if self._accepts_interp and size is not None and tuple(x.shape[-2:]) != pair(size):
                kwargs["interpolate_pos_encoding"] = True
            out = self.module(pixel_values=x, **kwargs)
        return self._pick_output(out, (x.shape[-2], x.shape[-1]))

    def _pick_output(self, out, image_size: tuple[int, int]) -> torch.Tensor:
        if isinstance(out, torch.Tensor):
            return out
        for key in ("logits", "image_embeds", "pooler_output"):
            value = getattr(out, key, None)
            if isinstance(value, torch.Tensor):
                return value
        last = getattr(out, "last_hidden_state", None)
        if isinstance(last, torch.Tensor):
            w = self.layout(image_size).readout_weights(last.device, last.dtype)
            return torch.einsum("n,bnd->bd", w, last)
        raise VitlensError(f"cannot find logits or features in the output of {type(self.module).__name__}; pass run=")

    def layout(self, image_size: tuple[int, int]) -> TokenLayout:
        """Prefix tokens, the patch grid for this input size, and the readout."""
        ph, pw = self.patch_size
        return TokenLayout(self._num_prefix, (image_size[0] // ph, image_size[1] // pw), self._readout)

    @property
    def attention_names(self) -> list[str]:
        """Names of the attention modules, one per block, in order."""
        return [n for n, _ in self._attn]


def wrap_by_names(
    module: nn.Module,
    attention: str | Sequence[str | nn.Module] = "blocks.*.attn",
    kind: Literal["timm", "hf"] = "timm",
    **options: Any,
) -> GenericAdapter:
    """Wrap ``module`` (put in eval mode) as a `GenericAdapter`; ``options`` are its keyword arguments.

    Example: ``wrap_by_names(my_vit, "encoder.layers.*.self_attn", kind="hf", num_prefix_tokens=1)``.
    """
    return GenericAdapter(module.eval(), attention, kind, **options)


def _parameters(fn: Callable) -> set[str]:
    try:
        return set(inspect.signature(fn).parameters)
    except (TypeError, ValueError):
        return set()


def _output(module, args, kwargs, output) -> torch.Tensor:
    return output


def _second(module, args, kwargs, output) -> torch.Tensor | None:
    return output[1] if isinstance(output, tuple) and len(output) > 1 else None
