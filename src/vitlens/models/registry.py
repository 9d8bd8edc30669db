"""The adapter registry: each adapter module registers how to recognise its models and how to wrap them.

`wrap` walks the registry in registration order and uses the first spec whose ``matches`` accepts the module.
Adding an adapter is one file that calls `register_adapter` plus its name in ``BUILTIN_ADAPTERS``.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING

from torch import nn

if TYPE_CHECKING:
    from vitlens.models.base import VitModel

# imported (in this order) the first time the registry is read; each module registers its adapters
BUILTIN_ADAPTERS = (
    "vitlens.models.timm_adapter",
    "vitlens.models.swin",
    "vitlens.models.eva",
    "vitlens.models.hf",
    "vitlens.models.clip",
    "vitlens.models.siglip",
)


@dataclass(frozen=True)
class AdapterSpec:
    """How to recognise one model family (``matches``) and wrap it (``build``); ``description`` is what
    `vitlens models` lists for it."""

    name: str
    matches: Callable[[nn.Module], bool]
    build: Callable[[nn.Module], VitModel]
    description: str


_SPECS: dict[str, AdapterSpec] = {}
_builtins_loaded = False


def register_adapter(
    name: str, matches: Callable[[nn.Module], bool], build: Callable[[nn.Module], VitModel], description: str
) -> AdapterSpec:
    """Register (or replace, by ``name``) an adapter; returns its spec."""
    if not name or not callable(matches) or not callable(build):
        raise TypeError("register_adapter needs a name, a matches(module) -> bool and a build(module) -> VitModel")
    spec = AdapterSpec(name, matches, build, description)
    _SPECS[name] = spec
    return spec


def adapters() -> tuple[AdapterSpec, ...]:
    """Every registered adapter, built-in ones first, in registration order."""
    global _builtins_loaded
    if not _builtins_loaded:
        _builtins_loaded = True
        for module_name in BUILTIN_ADAPTERS:
            importlib.import_module(module_name)
    return tuple(_SPECS.values())


def find_adapter(module: nn.Module) -> AdapterSpec | None:
    """The first registered adapter that accepts ``module``, or None."""
    return next((s for s in adapters() if s.matches(module)), None)


class FamiliesView(Mapping[str, str]):
    """Live read-only view {adapter name: description} of the registry (what `vitlens models` lists)."""

    def __getitem__(self, key: str) -> str:
        for s in adapters():
            if s.name == key:
                return s.description
        raise KeyError(key)

    def __iter__(self) -> Iterator[str]:
        return iter([s.name for s in adapters()])

    def __len__(self) -> int:
        return len(adapters())
