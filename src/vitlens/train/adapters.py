"""Bottleneck adapters (Houlsby et al. 2019; parallel: He et al. 2022) for the ViT and Swin blocks of transformers
and timm models, inserted without changing any existing parameter name.

An adapter is down-projection, GELU, up-projection; the up-projection starts at zero, so an adapted model computes
exactly what the original computed until the first optimiser step. Placements:

- ``attn``: after the attention's output projection, before the residual sum: ``h + adapter(h)``;
- ``mlp``: the same after the MLP's second linear layer;
- ``both``: ``attn`` and ``mlp``;
- ``parallel``: beside the whole block: ``block(x) + adapter(x)``.

Each adapter is a child module named ``vitlens_adapter`` of the module it adapts (the projection, or the block for
``parallel``) and acts through a forward hook, so the base model's parameter names, its forward code and vitlens's
attention capture are untouched. `adapter_state` / `restore_adapters` save and re-insert them (the HF folder loader
calls `restore_adapters` when config.json carries ``vitlens_adapters``).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from vitlens.errors import VitlensError

PLACEMENTS = ("attn", "mlp", "both", "parallel")
ADAPTER_NAME = "vitlens_adapter"
ADAPTERS_FILE = "adapters.safetensors"
CONFIG_KEY = "vitlens_adapters"


@dataclass(frozen=True)
class Block:
    """One transformer block and the linear layers that adapters and LoRA attach to."""

    name: str
    module: nn.Module
    attn_out: nn.Linear  # attention output projection (transformers o_proj, timm attn.proj)
    mlp_out: nn.Linear  # the MLP's second linear layer (fc2)
    qkv: tuple[nn.Linear, ...]  # (q_proj, v_proj) for transformers, (qkv,) fused for timm


def _linear(owner: nn.Module | None, *names: str) -> nn.Linear | None:
    for n in names:
        m = getattr(owner, n, None)
        if isinstance(m, nn.Linear):
            return m
    return None


def find_blocks(module: nn.Module) -> list[Block]:
    """The transformer blocks of a transformers (ViT, DeiT, DINOv2, Swin) or timm (ViT, Swin) model, in order.

    A block is a module with an attention child (``attention`` or ``attn``) holding an output projection (``o_proj``
    or ``proj``) and q/v projections (``q_proj``/``v_proj``, or a fused ``qkv``), and an ``mlp`` child with ``fc2``.
    """
    blocks = []
    for name, m in module.named_modules():
        attn = getattr(m, "attention", None) or getattr(m, "attn", None)
        mlp = getattr(m, "mlp", None)
        if not isinstance(attn, nn.Module) or not isinstance(mlp, nn.Module):
            continue
        out, fc2 = _linear(attn, "o_proj", "proj"), _linear(mlp, "fc2")
        q, v, qkv = _linear(attn, "q_proj"), _linear(attn, "v_proj"), _linear(attn, "qkv")
        if out is None or fc2 is None or not ((q is not None and v is not None) or qkv is not None):
            continue
        blocks.append(Block(name, m, out, fc2, (q, v) if q is not None and v is not None else (qkv,)))  # type: ignore[arg-type]
    if not blocks:
        raise VitlensError(f"found no transformer blocks in {type(module).__name__} (an attention with o_proj/proj and "
                           "q/v or qkv projections next to an mlp with fc2); adapters and LoRA support transformers "
                           "and timm ViT and Swin models")
    return blocks


class Bottleneck(nn.Module):
    """down-projection -> GELU -> up-projection (zero at start); returns the adapter's contribution only."""

    def __init__(self, width: int, dim: int) -> None:
        super().__init__()
        self.down = nn.Linear(width, dim)
        self.act = nn.GELU()
        self.up = nn.Linear(dim, width)
        nn.init.zeros_(self.up.weight)
        nn.init.zeros_(self.up.bias)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        """The adapter's output f(h) (the caller adds it to the residual stream)."""
        return self.up(self.act(self.down(h)))


def _first(value):
    return value[0] if isinstance(value, tuple) else value


def _add_to_first(output, extra: torch.Tensor):
    if isinstance(output, tuple):
        return (output[0] + extra, *output[1:])
    return output + extra


def _sequential_hook(module: nn.Module, args, output):
    """h -> h + adapter(h) on a projection's output."""
    return output + getattr(module, ADAPTER_NAME)(output)


def _parallel_hook(module: nn.Module, args, kwargs, output):
    """block(x) -> block(x) + adapter(x), x the block's token input (first positional or ``hidden_states``)."""
    x = args[0] if args else kwargs.get("hidden_states", next(iter(kwargs.values()), None))
    return _add_to_first(output, getattr(module, ADAPTER_NAME)(_first(x)))


def _check(placement: str, dim: int) -> None:
    if placement not in PLACEMENTS:
        raise VitlensError(f"unknown adapter placement {placement!r}; use one of {', '.join(PLACEMENTS)}")
    if isinstance(dim, bool) or not isinstance(dim, int) or dim < 1:
        raise VitlensError(f"adapter dimension must be a whole number >= 1, got {dim!r}")


def insert_adapters(module: nn.Module, placement: str, dim: int = 64) -> list[Bottleneck]:
    """Insert bottleneck adapters of width ``dim`` at ``placement`` into every block of ``module``; return them."""
    _check(placement, dim)
    sites: list[tuple[nn.Module, int, bool]] = []
    for b in find_blocks(module):
        if placement in ("attn", "both"):
            sites.append((b.attn_out, b.attn_out.out_features, False))
        if placement in ("mlp", "both"):
            sites.append((b.mlp_out, b.mlp_out.out_features, False))
        if placement == "parallel":
            sites.append((b.module, b.mlp_out.out_features, True))
    added = []
    for owner, width, parallel in sites:
        if hasattr(owner, ADAPTER_NAME):
            raise VitlensError(f"{type(owner).__name__} already has an adapter; insert adapters once")
        ref = next(owner.parameters())
        adapter = Bottleneck(width, dim).to(device=ref.device, dtype=ref.dtype)
        owner.add_module(ADAPTER_NAME, adapter)
        if parallel:
            owner.register_forward_hook(_parallel_hook, with_kwargs=True)
        else:
            owner.register_forward_hook(_sequential_hook)
        added.append(adapter)
    return added


def adapters_of(module: nn.Module) -> Iterator[nn.Module]:
    """Every bottleneck adapter inside ``module``."""
    return (m for m in module.modules() if isinstance(m, Bottleneck))


def adapter_state(module: nn.Module) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """(base state dict without adapters, adapter tensors), both under the model's parameter names."""
    base: dict[str, torch.Tensor] = {}
    extra: dict[str, torch.Tensor] = {}
    for k, v in module.state_dict().items():
        (extra if f".{ADAPTER_NAME}." in f".{k}" else base)[k] = v.detach().contiguous()
    return base, extra


def restore_adapters(module: nn.Module, folder: str | Path, settings: dict) -> None:
    """Re-insert the adapters that ``settings`` ({"placement", "dim"}) describe and load them from ``folder``'s
    adapters.safetensors; one clear error when the file is missing or does not fit."""
    from safetensors.torch import load_file

    path = Path(folder) / ADAPTERS_FILE
    if not isinstance(settings, dict) or "placement" not in settings or "dim" not in settings:
        raise VitlensError(f"{Path(folder) / 'config.json'}: {CONFIG_KEY} must be an object with placement and dim")
    if not path.is_file():
        raise VitlensError(f"{path} is missing: config.json declares bottleneck adapters; copy the whole folder "
                           "written by vitlens finetune")
    insert_adapters(module, str(settings["placement"]), settings["dim"])
    tensors = load_file(str(path))
    expected = {k for k in module.state_dict() if f".{ADAPTER_NAME}." in f".{k}"}
    if set(tensors) != expected:
        odd = sorted(set(tensors) ^ expected)
        raise VitlensError(f"{path} does not fit the model's adapters (e.g. {odd[0]}); the folder is inconsistent")
    try:
        module.load_state_dict(tensors, strict=False)
    except RuntimeError as e:
        first = str(e).strip().splitlines()[-1][:160]
        raise VitlensError(f"{path} does not fit the model's adapters ({first}); the folder is inconsistent") from None
