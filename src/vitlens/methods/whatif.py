"""What-if edits: move, resize or split a region of an image and see how the model's top classes change.

Edits are written ``move:X0,Y0,X1,Y1:TO_X,TO_Y``, ``scale:X0,Y0,X1,Y1:FACTOR`` and ``split:X0,Y0,X1,Y1[:GAP]``
in pixels of the original image: the box is x in [X0, X1), y in [Y0, Y1) (X1, Y1 exclusive).

- move: the region is cut out and pasted with its top-left corner at (TO_X, TO_Y) (the whole box must fit).
- scale: the region is cut out and pasted resized by FACTOR (> 0, bilinear) about the box's centre; what falls
  outside the image is cropped.
- split: the region is cut into its left half (columns X0 .. X0 + w//2) and right half; the left half moves left by
  GAP//2 and the right half right by GAP - GAP//2 (GAP defaults to w//2), opening a gap in the middle; what falls
  outside the image is cropped.

The hole left by the cut is filled first (then the region is pasted on top): ``blur`` (normalised Gaussian
convolution of the pixels around the hole, sigma = half the box's longer side), ``mean`` (the mean colour of the
pixels outside the hole) or ``inpaint`` (biharmonic inpainting, needs scikit-image).
"""

from __future__ import annotations

import csv
import io
import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import cast

import numpy as np
import torch
from PIL import Image

from vitlens.errors import VitlensError
from vitlens.models.base import label_of, top_labels

KINDS = ("move", "scale", "split")
FILLS = ("blur", "mean", "inpaint")
MAX_SCALE = 100.0  # a scale factor is in (0, MAX_SCALE]; the scaled region must also stay under the pixel limit
MAX_EDITS_BYTES = 1_000_000  # an edits file is a short list; anything bigger is refused before parsing
SYNTAX = "move:X0,Y0,X1,Y1:TO_X,TO_Y, scale:X0,Y0,X1,Y1:FACTOR or split:X0,Y0,X1,Y1[:GAP]"


@dataclass(frozen=True)
class Edit:
    """One edit: ``kind`` (move, scale, split), ``box`` (x0, y0, x1, y1), and ``to`` / ``factor`` / ``gap``."""

    kind: str
    box: tuple[int, int, int, int]
    to: tuple[int, int] | None = None
    factor: float | None = None
    gap: int | None = None

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise VitlensError(f"unknown edit kind {self.kind!r}; use {SYNTAX}")
        x0, y0, x1, y1 = self.box
        if x1 <= x0 or y1 <= y0:
            raise VitlensError(f"edit box {self.box} is empty: need X0 < X1 and Y0 < Y1")
        if self.kind == "move" and (self.to is None or len(self.to) != 2):
            raise VitlensError("a move edit needs a destination TO_X,TO_Y")
        if self.kind == "scale" and (self.factor is None or not np.isfinite(self.factor) or self.factor <= 0
                                     or self.factor > MAX_SCALE):
            raise VitlensError(f"scale factor must be a positive number up to {MAX_SCALE:g}, got {self.factor}")
        if self.kind == "split" and self.gap is not None and self.gap < 0:
            raise VitlensError(f"split gap must be a non-negative number of pixels, got {self.gap}")

    def __str__(self) -> str:
        box = ",".join(str(v) for v in self.box)
        if self.kind == "move":
            assert self.to is not None  # __post_init__ requires a destination for a move
            return f"move:{box}:{self.to[0]},{self.to[1]}"
        if self.kind == "scale":
            return f"scale:{box}:{self.factor:g}"
        return f"split:{box}" + (f":{self.gap}" if self.gap is not None else "")

    @property
    def size(self) -> tuple[int, int]:
        """(width, height) of the box."""
        return self.box[2] - self.box[0], self.box[3] - self.box[1]


def _ints(text: str, n: int, what: str, edit: str) -> tuple[int, ...]:
    parts = [p.strip() for p in text.split(",")]
    if len(parts) != n:
        raise VitlensError(f"edit {edit!r}: {what} needs {n} comma-separated integers, got {text!r}")
    try:
        return tuple(int(p) for p in parts)
    except ValueError:
        raise VitlensError(f"edit {edit!r}: {what} must be integers, got {text!r}") from None


def parse_edit(text: str) -> Edit:
    """An `Edit` from ``move:X0,Y0,X1,Y1:TO_X,TO_Y``, ``scale:X0,Y0,X1,Y1:FACTOR`` or ``split:X0,Y0,X1,Y1[:GAP]``."""
    parts = str(text).strip().split(":")
    kind = parts[0].strip().lower()
    if kind not in KINDS:
        raise VitlensError(f"unknown edit kind {parts[0]!r} in {text!r}; use {SYNTAX}")
    expected = {"move": (3,), "scale": (3,), "split": (2, 3)}[kind]
    if len(parts) not in expected:
        raise VitlensError(f"malformed edit {text!r}; use {SYNTAX}")
    # _ints checked the lengths: 4 for the box, 2 for a destination
    box = cast("tuple[int, int, int, int]", _ints(parts[1], 4, "the box X0,Y0,X1,Y1", text))
    if kind == "move":
        return Edit(kind, box, to=cast("tuple[int, int]", _ints(parts[2], 2, "the destination TO_X,TO_Y", text)))
    if kind == "scale":
        try:
            factor = float(parts[2])
        except ValueError:
            raise VitlensError(f"edit {text!r}: the scale factor must be a number, got {parts[2]!r}") from None
        return Edit(kind, box, factor=factor)
    gap = _ints(parts[2], 1, "the gap", text)[0] if len(parts) == 3 else None
    return Edit(kind, box, gap=gap)


def edit_from_json(obj) -> Edit:
    """An `Edit` from a string (as `parse_edit`) or an object {"kind", "box": [4], "to": [2], "factor", "gap"}."""
    if isinstance(obj, str):
        return parse_edit(obj)
    if not isinstance(obj, dict) or "kind" not in obj or "box" not in obj:
        raise VitlensError(f"each edit must be a string ({SYNTAX}) or an object with kind and box; got {_short(obj)}")
    try:
        box = tuple(int(v) for v in obj["box"])
        to = tuple(int(v) for v in obj["to"]) if obj.get("to") is not None else None
        factor = float(obj["factor"]) if obj.get("factor") is not None else None
        gap = int(obj["gap"]) if obj.get("gap") is not None else None
    except (TypeError, ValueError, OverflowError):
        raise VitlensError(f"malformed numbers in edit {_short(obj)}: box, to and gap are whole numbers of pixels, "
                           "factor a number") from None
    if len(box) != 4:
        raise VitlensError(f"edit box must be [X0, Y0, X1, Y1], got {_short(obj['box'])}")
    return Edit(str(obj["kind"]).lower(), box, to=to, factor=factor, gap=gap)  # type: ignore[arg-type]


def load_edits(path: str | Path) -> list[Edit]:
    """Edits from a JSON file: a list of edits (strings or objects), or {"edits": [...]}."""
    from vitlens.images import check_regular_file

    p = check_regular_file(path, "edits file")
    if p.stat().st_size > MAX_EDITS_BYTES:
        raise VitlensError(f"edits file {p} is larger than {MAX_EDITS_BYTES} bytes; an edits file is a short list")
    try:
        data = json.loads(p.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise VitlensError(f"edits file {p} is not valid JSON ({_one_line(str(e))})") from None
    except RecursionError:
        raise VitlensError(f"edits file {p} is nested too deeply; give a flat list of edits") from None
    if isinstance(data, dict):
        data = data.get("edits")
    if not isinstance(data, list) or not data:
        raise VitlensError(f"edits file {p} must hold a non-empty list of edits (or {{\"edits\": [...]}})")
    return [edit_from_json(e) for e in data]


def _short(obj, limit: int = 80) -> str:
    text = _one_line(repr(obj))
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _one_line(text: str) -> str:
    return " ".join(str(text).split())


def check_edit(edit: Edit, size: tuple[int, int]) -> Edit:
    """Raise a clear error unless the box (and a move's destination) lies inside an image of (width, height) and a
    scaled region stays under the pixel limit (`vitlens.images.max_pixels`)."""
    from vitlens.images import MAX_PIXELS_ENV, max_pixels

    w, h = size
    x0, y0, x1, y1 = edit.box
    if x0 < 0 or y0 < 0 or x1 > w or y1 > h:
        raise VitlensError(_short(f"edit {edit}", 120) + f": box ({_short(x0, 24)},{_short(y0, 24)})-"
                           f"({_short(x1, 24)},{_short(y1, 24)}) is outside the {w}x{h} image")
    if edit.kind == "scale":
        assert edit.factor is not None  # Edit.__post_init__ requires a factor for a scale
        bw, bh = edit.size
        if round(bw * edit.factor) * round(bh * edit.factor) > max_pixels():
            raise VitlensError(f"edit {edit}: the scaled region would exceed {max_pixels()} pixels ({MAX_PIXELS_ENV});"
                               " use a smaller factor or box")
    if edit.kind == "move":
        bw, bh = edit.size
        assert edit.to is not None  # Edit.__post_init__ requires a destination for a move
        tx, ty = edit.to
        if tx < 0 or ty < 0 or tx + bw > w or ty + bh > h:
            raise VitlensError(_short(f"edit {edit}", 120) + f": the moved region falls outside the {w}x{h} image")
    return edit


# ---- applying edits -------------------------------------------------------------------------------------------------
def fill_hole(arr: np.ndarray, hole: np.ndarray, fill: str = "blur", sigma: float = 8.0) -> np.ndarray:
    """``arr`` [H, W, 3] float with the pixels where ``hole`` is True replaced by ``fill``."""
    if fill not in FILLS:
        raise VitlensError(f"fill must be one of {', '.join(FILLS)}; got {fill!r}")
    out = arr.copy()
    if not hole.any():
        return out
    valid = ~hole
    mean = arr[valid].mean(0) if valid.any() else arr.reshape(-1, 3).mean(0)
    if fill == "mean":
        out[hole] = mean
        return out
    if fill == "inpaint":
        try:
            from skimage.restoration import inpaint_biharmonic
        except ImportError as e:
            raise VitlensError(f"fill='inpaint' needs scikit-image (pip install 'vitlens[lime]') ({e})") from None
        res = inpaint_biharmonic(arr / 255.0, hole, channel_axis=-1) * 255.0
        out[hole] = res[hole]
        return out
    from vitlens.methods.lime import gaussian_blur

    v = torch.from_numpy(valid.astype(np.float64))
    stack = torch.cat([torch.from_numpy(arr).permute(2, 0, 1) * v, v[None]], 0)
    blurred = gaussian_blur(stack, sigma)
    num, den = blurred[:3].permute(1, 2, 0).numpy(), blurred[3].numpy()
    ok = den > 1e-6
    filled = np.where(ok[..., None], num / np.maximum(den, 1e-12)[..., None], mean)
    out[hole] = filled[hole]
    return out


def _paste(out: np.ndarray, patch: np.ndarray, x: int, y: int) -> None:
    """Paste ``patch`` with its top-left at (x, y), cropped to ``out``."""
    h, w = out.shape[:2]
    ph, pw = patch.shape[:2]
    xa, ya, xb, yb = max(x, 0), max(y, 0), min(x + pw, w), min(y + ph, h)
    if xa < xb and ya < yb:
        out[ya:yb, xa:xb] = patch[ya - y : yb - y, xa - x : xb - x]


def apply_edit(image: Image.Image, edit: Edit, fill: str = "blur") -> Image.Image:
    """The edited RGB image (same size as ``image``); see the module docstring for what each edit does."""
    img = image.convert("RGB")
    check_edit(edit, img.size)
    arr = np.asarray(img, dtype=np.float64)
    x0, y0, x1, y1 = edit.box
    bw, bh = edit.size
    patch = arr[y0:y1, x0:x1].copy()
    hole = np.zeros(arr.shape[:2], dtype=bool)
    hole[y0:y1, x0:x1] = True
    out = fill_hole(arr, hole, fill, sigma=max(bw, bh) / 2.0)
    if edit.kind == "move":
        assert edit.to is not None  # Edit.__post_init__ requires a destination for a move
        _paste(out, patch, edit.to[0], edit.to[1])
    elif edit.kind == "scale":
        assert edit.factor is not None  # Edit.__post_init__ requires a factor for a scale
        nw, nh = max(1, round(bw * edit.factor)), max(1, round(bh * edit.factor))
        region = Image.fromarray(np.round(patch).astype(np.uint8)).resize((nw, nh), Image.Resampling.BILINEAR)
        cx, cy = (x0 + x1) / 2.0, (y0 + y1) / 2.0
        _paste(out, np.asarray(region, dtype=np.float64), round(cx - nw / 2.0), round(cy - nh / 2.0))
    else:
        half = bw // 2
        gap = bw // 2 if edit.gap is None else edit.gap
        _paste(out, patch[:, :half], x0 - gap // 2, y0)
        _paste(out, patch[:, half:], x0 + half + (gap - gap // 2), y0)
    return Image.fromarray(np.clip(np.round(out), 0, 255).astype(np.uint8), "RGB")


def markdown_cell(text: str) -> str:
    """``text`` as one Markdown table cell that renders as the same literal text: HTML escaped (&, <, >),
    the Markdown characters that break a cell or start markup (\\ | ` * _ [ ] ~) backslash-escaped, line breaks
    turned into spaces."""
    import html

    flat = " ".join(str(text).split())
    return "".join("\\" + ch if ch in _MD_SPECIAL else ch for ch in html.escape(flat, quote=False))


_MD_SPECIAL = set("\\`*_[]|~")


# ---- the table ------------------------------------------------------------------------------------------------------
@dataclass
class WhatIfRow:
    """One image of the comparison: its name, the edit (None for the original), the picture and its top-k."""

    name: str
    edit: Edit | None
    image: Image.Image
    top: list[tuple[str, float]]
    probs: torch.Tensor


@dataclass
class WhatIfResult:
    """The original and every edited image with their top-k classes; ``reference`` is the original's top-1."""

    rows: list[WhatIfRow] = field(default_factory=list)
    reference: str = ""
    reference_index: int = 0

    def records(self) -> list[dict]:
        """One dict per image: name, edit, top-k labels and probabilities, probability of the original's top-1."""
        out = []
        for r in self.rows:
            rec: dict[str, str | float] = {"image": r.name, "edit": str(r.edit) if r.edit else ""}
            for k, (lbl, p) in enumerate(r.top, 1):
                rec[f"top{k}"], rec[f"p{k}"] = lbl, round(float(p), 6)
            rec[f"p({self.reference})"] = round(float(r.probs[self.reference_index]), 6)
            out.append(rec)
        return out

    def csv(self) -> str:
        """The table as CSV text."""
        recs = self.records()
        buf = io.StringIO()
        writer = csv.DictWriter(buf, fieldnames=list(recs[0]), lineterminator="\n")
        writer.writeheader()
        writer.writerows(recs)
        return buf.getvalue()

    def markdown(self) -> str:
        """The table as Markdown: top-k 'label (p%)' per image and the probability of the original's top-1."""
        from vitlens.viz.figures import percent

        k = max(len(r.top) for r in self.rows)
        head = ["image", "edit"] + [f"top-{i}" for i in range(1, k + 1)] + [f"p({self.reference})"]
        lines = ["| " + " | ".join(markdown_cell(c) for c in head) + " |", "|" + "---|" * len(head)]
        for r in self.rows:
            cells = [markdown_cell(r.name), f"`{r.edit}`" if r.edit else "-"]  # an Edit prints digits , : only
            cells += [f"{markdown_cell(lbl)} ({percent(p)})" for lbl, p in r.top]
            cells += [""] * (k - len(r.top)) + [percent(float(r.probs[self.reference_index]))]
            lines.append("| " + " | ".join(cells) + " |")
        return "\n".join(lines) + "\n"

    __str__ = markdown


def whatif(model, image: Image.Image, edits: Sequence[Edit | str], top_k: int = 3, fill: str = "blur",
           batch_size: int = 16) -> WhatIfResult:
    """Apply each edit to ``image`` (separately) and run the model on the original and every edited image.

    ``model`` is any image classifier (see `vitlens.methods.lime.as_classifier`); images go through its
    preprocessing. Returns the table (`WhatIfResult.markdown` / `.csv`)."""
    from vitlens.models.classifier import as_classifier

    if fill not in FILLS:
        raise VitlensError(f"fill must be one of {', '.join(FILLS)}; got {fill!r}")
    if top_k < 1:
        raise VitlensError(f"top_k must be at least 1, got {top_k}")
    model = as_classifier(model)
    if not getattr(model, "has_head", True):
        model.check_target(None, torch.zeros(1, 1))
    image = image.convert("RGB")
    parsed = [parse_edit(e) if isinstance(e, str) else e for e in edits]
    for e in parsed:
        check_edit(e, image.size)
    images = [image] + [apply_edit(image, e, fill) for e in parsed]
    probs = []
    with torch.no_grad():
        for s in range(0, len(images), batch_size):
            x, _ = model.preprocess(images[s : s + batch_size])
            probs.append(model.probabilities(model(x.to(model.device))).float().cpu())
    p = torch.cat(probs)
    if not bool(torch.isfinite(p).all()):
        raise VitlensError("the model gave NaN or infinite probabilities; nothing was written: check the model's "
                           "weights and preprocessing (e.g. image_std 0)")
    k = min(top_k, p.shape[1])
    ref = int(p[0].argmax())
    result = WhatIfResult(reference=label_of(model, ref), reference_index=ref)
    for i, (img, edit) in enumerate(zip(images, [None, *parsed])):
        top = top_labels(model, p[i], k)
        result.rows.append(WhatIfRow("original" if edit is None else f"edit {i}", edit, img, top, p[i]))
    return result
