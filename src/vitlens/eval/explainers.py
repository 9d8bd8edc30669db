"""What the evaluation compares: registered methods taken by name from `vitlens.methods.METHODS`, and the three
baseline maps every table carries (a random map, a centred Gaussian, the plain last-block CLS attention)."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from vitlens.errors import VitlensError

RANDOM, GAUSSIAN, CLS_ATTENTION = "random", "gaussian", "cls_attention"
BASELINE_MAPS = (RANDOM, GAUSSIAN, CLS_ATTENTION)
GAUSSIAN_SIGMA = 0.25  # of the grid side

MapFn = Callable[[Any, torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]  # (model, x, target, ids) -> maps


@dataclass
class Explainer:
    """A named way to make maps [R, gh, gw] for rows (x [R, 3, H, W], target [R], image ids [R])."""

    name: str
    fn: MapFn
    class_specific: bool
    note: str = ""

    def __call__(self, model: Any, x: torch.Tensor, target: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        """Maps on the model's patch grid (pooled to it when the method draws finer maps, e.g. occlusion)."""
        with torch.enable_grad():
            maps = self.fn(model, x, target, ids)
        maps = torch.as_tensor(maps).detach().float()
        grid = model_grid(model, x)
        if grid is not None and tuple(maps.shape[-2:]) != grid:
            maps = F.adaptive_avg_pool2d(maps[:, None], grid)[:, 0]
        return torch.nan_to_num(maps, nan=0.0).to(x.device)


def model_grid(model: Any, x: torch.Tensor) -> tuple[int, int] | None:
    """The first stage's patch grid of a ViT-family model at this input size, None for other classifiers."""
    layout = getattr(model, "layout", None)
    if not callable(layout):
        return None
    return tuple(int(v) for v in layout(tuple(x.shape[-2:])).grid)  # type: ignore[return-value]


def random_maps(grid: tuple[int, int], ids: torch.Tensor, seed: int = 0) -> torch.Tensor:
    """Uniform random maps [R, gh, gw], each drawn from a generator seeded by (seed, image id), so the same image
    gets the same map whatever the batch."""
    out = []
    for i in ids.tolist():
        g = torch.Generator().manual_seed(seed * 1_000_003 + int(i))
        out.append(torch.rand(grid, generator=g))
    return torch.stack(out)


def gaussian_map(grid: tuple[int, int], sigma: float = GAUSSIAN_SIGMA) -> torch.Tensor:
    """A centred isotropic Gaussian [gh, gw] (sigma as a fraction of each side), maximum 1 at the centre."""
    ys = (torch.arange(grid[0]) + 0.5) / grid[0] - 0.5
    xs = (torch.arange(grid[1]) + 0.5) / grid[1] - 0.5
    return torch.exp(-(ys[:, None] ** 2 + xs[None] ** 2) / (2 * sigma**2))


def _grid_or_fail(model: Any, x: torch.Tensor) -> tuple[int, int]:
    grid = model_grid(model, x)
    if grid is None:
        raise VitlensError("baseline maps need a ViT-family model (a patch grid); wrap the model with vitlens")
    return grid


def baseline_explainer(name: str, model: Any, seed: int = 0) -> Explainer:
    """One of `BASELINE_MAPS`; the CLS-attention baseline uses the mean over tokens for models without a CLS token
    (and says so in its note)."""
    if name == RANDOM:
        return Explainer(RANDOM, lambda m, x, t, ids: random_maps(_grid_or_fail(m, x), ids, seed), False)
    if name == GAUSSIAN:
        return Explainer(GAUSSIAN, lambda m, x, t, ids: gaussian_map(_grid_or_fail(m, x)).expand(len(x), -1, -1),
                         False)
    if name == CLS_ATTENTION:
        from vitlens.methods.attention import AttentionMaps

        size = tuple(model.preprocess.size)
        has_cls = model.layout(size).has_cls
        query = "cls" if has_cls else "mean"
        note = "" if has_cls else "this model has no CLS token: cls_attention is the mean attention over all tokens"
        return Explainer(CLS_ATTENTION, lambda m, x, t, ids: AttentionMaps(m, query=query).explain(x).maps, False,
                         note)
    raise VitlensError(f"unknown baseline map {name!r}; use one of {', '.join(BASELINE_MAPS)}")


def method_explainer(name: str, model: Any, options: dict[str, Any] | None = None) -> Explainer:
    """The registered method ``name`` with its default options, or ``options`` (class-specific ones explain each
    row's target)."""
    from vitlens.methods import METHODS

    if name not in METHODS:
        raise VitlensError(f"unknown method {name!r}; use one of {', '.join(METHODS)}")
    cls = METHODS[name]
    if not cls.applies_to(model):
        raise VitlensError(f"{name} does not apply to this model: it works on {', '.join(cls.families)} models")
    built: dict[int, Any] = {}

    def fn(m: Any, x: torch.Tensor, t: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        if id(m) not in built:
            built[id(m)] = (m, cls(m, **(options or {})))
        method = built[id(m)][1]
        return method.explain(x, target=t).maps if cls.class_specific else method.explain(x).maps

    return Explainer(name, fn, bool(cls.class_specific))


def stored_explainer(name: str, model: Any, store: Any, keys: Sequence[str]) -> Explainer:
    """The maps of method ``name`` read from a `vitlens run` store (`vitlens.scale.open_store`) instead of computed:
    image ``i`` of the evaluation is ``keys[i]`` in the store. On any other model (the sanity metric's randomised
    copy) the method runs with the store's options."""
    options = next((m["options"] for m in store.settings["methods"] if m["name"] == name), None)
    if options is None:
        raise VitlensError(f"the store {store.path} has no {name} maps (it holds {', '.join(store.methods)}); drop "
                           f"{name} from --methods or add it to the `vitlens run`")
    computed = method_explainer(name, model, options)

    def fn(m: Any, x: torch.Tensor, t: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        if m is not model:
            return computed.fn(m, x, t, ids)
        maps = []
        for i, cls in zip(ids.tolist(), t.tolist()):
            key = keys[int(i)]
            stored = store.target(key, name)
            if computed.class_specific and stored != int(cls):
                raise VitlensError(f"the store's {name} map of {key} explains class {stored}, but this row needs "
                                   f"class {int(cls)}: with --maps use --targets pred (the store holds each image's "
                                   "top-1 class), or a store run with that --target")
            maps.append(torch.from_numpy(store.map(key, name).astype("float32")))
        return torch.stack(maps)

    return Explainer(name, fn, computed.class_specific, f"{name} maps read from {store.path}")


def explainers(model: Any, methods: Sequence[str], seed: int = 0, store: Any = None,
               keys: Sequence[str] = ()) -> list[Explainer]:
    """The methods by name (their maps read from ``store`` when given, image ``i`` being ``keys[i]``), then the three
    baselines (always, each once)."""
    if store is not None:
        out = [stored_explainer(n, model, store, keys) for n in methods if n not in BASELINE_MAPS]
    else:
        out = [method_explainer(n, model) for n in methods if n not in BASELINE_MAPS]
    return out + [baseline_explainer(n, model, seed) for n in BASELINE_MAPS]
