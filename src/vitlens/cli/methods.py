"""Command-line flags, help and option checks derived from the methods' declarations (`vitlens.methods.METHODS`)."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import click
import torch

from vitlens.errors import VitlensError
from vitlens.methods import METHODS
from vitlens.methods.base import ANY_FAMILY, Method, Option
from vitlens.models.labels import resolve_target

# vit-explain's spellings, accepted as well
ALIASES = {"head_fusion": ("--head_fusion",), "discard_ratio": ("--discard_ratio",)}


def map_methods() -> dict[str, type[Method]]:
    """The registered methods that explain a ViT-family model through its attention or gradients (`explain`)."""
    return {n: m for n, m in METHODS.items() if ANY_FAMILY not in m.families}


def declared_options(names: Iterable[str]) -> dict[str, tuple[Option, list[str]]]:
    """Each command-line option of the methods ``names``, with the methods that take it."""
    found: dict[str, tuple[Option, list[str]]] = {}
    for n in names:
        for o in METHODS[n].options:
            if o.cli:
                found.setdefault(o.name, (o, []))[1].append(n)
    return found


def method_options(names: Iterable[str] | None = None, defaults: dict[str, Any] | None = None) -> Callable:
    """Decorator adding one click option per declared option of the methods ``names`` (default: `map_methods`).

    Values left out arrive as None (the method's default applies); booleans are flags that set the non-default value.
    ``defaults`` overrides the value shown and used for some options (e.g. compare's discard ratio 0.9).
    """
    names = list(names if names is not None else map_methods())
    defaults = defaults or {}

    def decorate(f: Callable) -> Callable:
        opts = declared_options(names)
        for o, users in reversed(list(opts.values())):
            only = "" if len(users) == len(names) else f" ({', '.join(users)})"
            default = defaults.get(o.name, o.default)
            if o.type is bool:
                f = click.option(o.flag, o.name, is_flag=True, default=False,
                                 callback=lambda _c, _p, v, o=o: (not o.default) if v else None,
                                 help=f"{'Switch off: ' if o.default else ''}{o.help}{only}")(f)
                continue
            kind: Any = click.Choice(o.choices) if o.choices else {int: int, float: float}.get(o.type, str)
            rng = "" if o.choices or (o.lo is None and o.hi is None) else f" In {o.range_text()}."
            f = click.option(o.flag, *ALIASES.get(o.name, ()), o.name, type=kind,
                             default=defaults.get(o.name), help=f"{o.help}{rng}{only} [default: {default}]")(f)
        return f

    return decorate


def pop_options(kwargs: dict[str, Any], names: Iterable[str] | None = None) -> dict[str, Any]:
    """Remove the declared options of ``names`` from a command's ``kwargs``; returns those that were given."""
    names = list(names if names is not None else map_methods())
    return {k: v for k in declared_options(names) if (v := kwargs.pop(k, None)) is not None}


def build_method(model: Any, name: str, given: dict[str, Any], **fixed: Any) -> tuple[Method, list[str]]:
    """The method ``name`` built with the ``given`` options that it declares, plus notes naming the given options
    that do not apply to it. Fails (one line) for an unknown method, a model family it does not apply to, a
    class-specific method on a backbone, or an option out of range. ``fixed`` go to the constructor as they are."""
    if name not in METHODS:
        raise VitlensError(f"unknown method {name!r}; use one of {', '.join(map_methods())}")
    cls = METHODS[name]
    if not cls.applies_to(model):
        raise VitlensError(f"{name} does not apply to {type(getattr(model, 'module', model)).__name__}: it works on "
                           f"{', '.join(cls.families)} models")
    if cls.class_specific and not model.has_head:
        model.check_target(None, torch.zeros(1, 1))  # the backbone error, before any work
    own = {o.name for o in cls.options}
    every = declared_options(METHODS)
    notes = [f"note: {every[k][0].flag if k in every else k} does not apply to {name}; ignored"
             for k in given if k not in own]
    kw = {k: v for k, v in given.items() if k in own}
    return cls(model, **kw, **fixed), notes


def every_option(name: str) -> Option:
    """The declaration of option ``name`` in whichever registered method declares it."""
    return declared_options(METHODS)[name][0]


def build_methods(model: Any, names: list[str], given: dict[str, Any]) -> tuple[list[Method], list[str]]:
    """Several methods at once for a side-by-side figure: each takes the ``given`` options it declares; the notes
    name the options none of them takes. A class-specific method on a backbone is left out with a note."""
    if not names:
        raise VitlensError("--methods needs at least one method name, e.g. rollout,gae")
    built, notes = [], []
    for name in names:
        if name in METHODS and METHODS[name].class_specific and not model.has_head:
            notes.append(f"note: the model has no classification head, so {name} is left out")
            continue
        own = {o.name for o in METHODS[name].options} if name in METHODS else set()
        method, _ = build_method(model, name, {k: v for k, v in given.items() if k in own})
        built.append(method)
    used = {o.name for m in built for o in m.options}
    notes += [f"note: {every_option(k).flag} does not apply to {', '.join(names)}; ignored" for k in given
              if k not in used]
    if not built:
        raise VitlensError("none of --methods applies to this model; add a class-agnostic method such as rollout")
    return built, notes


def resolve_method_target(model: Any, method: type[Method] | Method, target: str | int | None
                          ) -> tuple[int | None, list[str]]:
    """The target class index for ``method`` (checked against the head whatever the method), plus a note when the
    method is class-agnostic and ignores it."""
    if target is None:
        return None, []
    if method.class_specific:
        return resolve_target(model, target), []
    if model.has_head:
        resolve_target(model, target)  # out of range is an error whatever the method
    return None, [f"note: {method.name} is class-agnostic; the target class is ignored"]
