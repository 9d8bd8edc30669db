"""`report(image, model)`: one offline HTML page to explore a ViT's attention on an image (see the package doc)."""

from __future__ import annotations

import base64
import html
import io
import zlib
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from vitlens.errors import VitlensError
from vitlens.models.base import VitModel, top_labels
from vitlens.viz.report.attention import (
    ENCODINGS,
    BlockAttention,
    CapturedAttention,
    Quantised,
    capture,
    dequantise,
    max_error,
    quantise,
)
from vitlens.viz.report.maps import MethodMaps, check_method_names, method_maps, quantise_map
from vitlens.viz.report.page import pack, render
from vitlens.viz.report.precision import RolloutCheck

COLORMAPS = ("jet", "viridis", "inferno", "magma", "turbo", "gray")
MAX_BYTES = 5_000_000
ERRORS_RESERVE = 400  # bytes kept free for the measured rollout errors, added to the page once an encoding is chosen
IMAGE_PNG_LIMIT = 400_000  # a larger PNG view is embedded as JPEG instead


@dataclass
class Report:
    """A report page: ``html`` (one self-contained file), ``info`` (model, encoding of the attention, sizes) and
    ``notes``. In Jupyter it shows itself inline (an iframe whose srcdoc is the page)."""

    html: str
    info: dict[str, Any] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    _stored: tuple[list[BlockAttention], Quantised] | None = field(default=None, repr=False)

    def stored_attention(self) -> list[torch.Tensor]:
        """Per block, the attention [H, N, N] (float64) exactly as the page reads it back from its codes: zeros
        outside each token's window. The page's rollout equals the library's on these matrices."""
        if self._stored is None:
            raise VitlensError("this report holds no attention")
        blocks, q = self._stored
        return [torch.from_numpy(b.dense(values)) for b, values in zip(blocks, dequantise(q, blocks))]

    @property
    def nbytes(self) -> int:
        """Size of the page in bytes (UTF-8)."""
        return len(self.html.encode("utf-8"))

    def save(self, path: str | Path) -> Path:
        """Write the page to ``path`` (atomically)."""
        from vitlens.io import atomic_write

        path = Path(path)
        with atomic_write(path) as tmp:
            tmp.write_text(self.html, encoding="utf-8")
        return path

    def _repr_html_(self) -> str:
        return (f'<iframe srcdoc="{html.escape(self.html, quote=True)}" style="width:100%;height:760px;border:0" '
                'sandbox="allow-scripts allow-downloads"></iframe>')


def report(image: str | Path | Image.Image, model: Any, methods: Sequence[str] | None = None, lime: bool = False,
           top_k: int = 5, max_bytes: int | None = MAX_BYTES, title: str | None = None,
           method_options: dict[str, dict[str, Any]] | None = None) -> Report:
    """An interactive page for ``image`` under ``model`` (a `VitModel`, a module vitlens wraps, or a spec).

    The page holds the image, every block's attention for every head (float32, or 16- or 8-bit codes per row), the
    top-``top_k`` classes and, for each of them, the maps of the class-specific ``methods`` (registered names;
    default: grad rollout when the model has a head) and LIME when ``lime``. Rollout (any head fusion and discard
    ratio) and each patch's attention are computed in the page. ``max_bytes`` bounds the page: the attention is
    stored with the finest width that fits (`ENCODINGS`: float32, 16-bit relative or linear, 8-bit square-root or
    linear, then 8-bit linear with a coarser floor on each row's step) and, among the encodings of that width that
    fit, the one whose rollout is closest to the library's; ``info`` records it, each value's largest error
    (``max_error``) and the rollout's (``rollout_error``, per head fusion and discard ratio of `CHECKS`).
    ``method_options`` gives options per method name (e.g. ``{"lime": {"num_samples": 500}}``).
    """
    from vitlens.images import load_image
    from vitlens.models.loading import load_model

    if not isinstance(model, VitModel):
        model = load_model(model)
    if top_k < 1:
        raise VitlensError(f"top_k must be at least 1; got {top_k}")
    if isinstance(image, Image.Image):
        name, picture = title or "image", image
    else:
        name, picture = title or Path(image).name, load_image(image)
    view = model.preprocess.view(picture)
    x = model.preprocess.tensor(view)[None].to(model.device)
    plan = model.stage_plan((int(x.shape[-2]), int(x.shape[-1])))

    got = capture(model, x)
    classes = _classes(model, got, top_k)
    wanted = list(methods) if methods is not None else (["grad_rollout"] if model.has_head else [])
    if lime:
        wanted.append("lime")
    names, notes = check_method_names(wanted, model)
    options = method_options or {}
    computed = [method_maps(model, x, n, [c["index"] for c in classes], options.get(n)) for n in names]

    base = {
        "title": name,
        "model": type(model.module).__name__,
        "family": str(getattr(model, "family", "")),
        "image": _image(view),
        "stages": [{"grid": list(lay.grid), "prefix": lay.num_prefix, "readout": lay.readout} for lay in plan.layouts],
        "blocks": [{"stage": b.stage, "heads": b.heads, "windows": b.window is not None,
                    "window": list(b.window) if b.window else None, "shift": list(b.shift) if b.shift else None}
                   for b in got.blocks],
        "classes": classes,
        "colormaps": list(COLORMAPS),
        "notes": [n.removeprefix("note: ") for n in notes],
    }
    fixed = _fixed_segments(got, computed, classes, base)
    fits: list[tuple[Quantised, float]] = []  # the encodings of the finest width that fits, with their value errors
    q, error, rest = None, 0.0, 0
    for i, enc in enumerate(ENCODINGS):
        if fits and (enc.bits != fits[0][0].bits or enc.floor):
            break
        q = quantise(got.blocks, enc.bits, enc.floor, enc.sqrt, enc.relative)
        last = i == len(ENCODINGS) - 1
        if max_bytes is not None and rest and not last and rest + _estimate(q.codes) > 1.1 * max_bytes:
            continue  # clearly too large: skip rendering it
        error = max_error(q, got.blocks)
        size = len(_page(base, fixed, q, error).encode("utf-8"))
        rest = size - _estimate(q.codes)
        if max_bytes is None:  # no budget: the finest
            fits.append((q, error))
            break
        if size + ERRORS_RESERVE <= max_bytes:
            fits.append((q, error))
    assert q is not None
    # among the encodings of that width, the one whose rollout is closest to the library's (worst over CHECKS)
    check = RolloutCheck(plan, got.blocks)
    scored = [(check.error(dequantise(c, got.blocks)), c, e) for c, e in (fits or [(q, error)])]
    errors, q, error = min(scored, key=lambda s: max(s[0].values()))
    page = _page(base, fixed, q, error, errors)
    size = len(page.encode("utf-8"))
    info: dict[str, Any] = {"model": base["model"], "blocks": len(got.blocks), "heads": [b.heads for b in got.blocks],
            "bits": q.bits, "floor": q.floor, "sqrt": q.sqrt, "relative": q.relative, "encoding": q.encoding.name,
            "max_error": error, "rollout_error": errors, "bytes": size, "methods": names, "classes": classes}
    if max_bytes is not None and size > max_bytes:
        notes.append(f"note: the report is {size / 1e6:.1f} MB, over the {max_bytes / 1e6:.1f} MB asked for, "
                     "even with the coarsest attention encoding")
    return Report(page, info, notes, (got.blocks, q))


def _classes(model: VitModel, got: CapturedAttention, top_k: int) -> list[dict]:
    if not model.has_head or got.logits is None:
        return []
    probs = model.probabilities(got.logits)[0]
    k = min(top_k, probs.numel())
    idx = probs.topk(k).indices.tolist()
    labels = top_labels(model, probs, k)
    return [{"index": int(i), "label": lab, "prob": float(p)} for i, (lab, p) in zip(idx, labels)]


def _image(view: Image.Image) -> dict:
    buf = io.BytesIO()
    view.save(buf, format="PNG", optimize=True)
    kind = "png"
    if buf.tell() > IMAGE_PNG_LIMIT:
        buf = io.BytesIO()
        view.save(buf, format="JPEG", quality=92)
        kind = "jpeg"
    src = f"data:image/{kind};base64," + base64.b64encode(buf.getvalue()).decode("ascii")
    return {"src": src, "width": view.width, "height": view.height}


def _fixed_segments(got: CapturedAttention, computed: list[MethodMaps], classes: list[dict],
                    base: dict) -> list[tuple[str, np.ndarray]]:
    """Window ids of windowed blocks, method maps and colour maps; also fills base['methods']."""
    from vitlens.viz.overlay import colormap

    segments: list[tuple[str, np.ndarray]] = []
    for i, b in enumerate(got.blocks):
        if b.window is not None:
            segments.append((f"groups:{i}", b.groups.astype(np.int32)))
    base["methods"] = []
    for m in computed:
        entry: dict[str, Any] = {"name": m.name, "title": m.title, "classSpecific": m.class_specific, "maps": []}
        for c, arr in m.maps.items():
            lo, step, codes = quantise_map(arr)
            seg = f"map:{m.name}:{'all' if c is None else c}"
            segments.append((seg, codes))
            entry["maps"].append({"class": c, "shape": list(arr.shape), "low": lo, "step": step, "segment": seg})
        base["methods"].append(entry)
    for name in COLORMAPS:
        lut = colormap(name)(np.linspace(0.0, 1.0, 256))[:, :3]
        segments.append((f"cmap:{name}", np.clip(np.rint(lut * 255), 0, 255).astype(np.uint8).reshape(-1)))
    return segments


def _estimate(codes: np.ndarray, chunks: int = 32, chunk: int = 1 << 15) -> int:
    """About how many base64 bytes the deflated codes take, from a sample of ``chunks`` spread-out pieces."""
    data = codes.tobytes()
    if len(data) <= chunks * chunk:
        return len(base64.b64encode(zlib.compress(data, 6)))
    step = len(data) // chunks
    sample = b"".join(data[k * step:k * step + chunk] for k in range(chunks))
    return int(len(zlib.compress(sample, 6)) * len(data) / len(sample) * 4 / 3)


def _page(base: dict, fixed: list[tuple[str, np.ndarray]], q: Quantised, error: float,
          rollout_error: dict[str, float] | None = None) -> str:
    table, blob = pack([("codes", q.codes), ("scales", q.scales), ("wide", q.wide), ("wideScales", q.wide_scales),
                        *fixed])
    data = dict(base, attention={"bits": q.bits, "floor": q.floor, "sqrt": q.sqrt, "relative": q.relative,
                                 "maxError": error, "rolloutError": rollout_error or {}},
                segments=table, blob=blob)
    return render(f"vitlens report: {base['title']}", data)

