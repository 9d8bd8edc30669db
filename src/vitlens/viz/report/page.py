"""One self-contained HTML page from the report's data: the template, the stylesheet and the script (package data)
inlined, the data as JSON with every '<', '>' and '&' escaped, binary arrays packed into one deflated base64 blob."""

from __future__ import annotations

import base64
import html
import json
import re
import zlib
from functools import cache
from importlib import resources

import numpy as np

DTYPES = {np.dtype(np.uint8): "u8", np.dtype(np.uint16): "u16", np.dtype(np.int32): "i32",
          np.dtype(np.float32): "f32"}
MARKER = re.compile(r"@@(TITLE|CSS|DATA|JS)@@")


@cache
def asset(name: str) -> str:
    """The text of a page asset shipped with the package (template.html, report.js, report.css)."""
    return (resources.files("vitlens.viz.report") / name).read_text(encoding="utf-8")


def pack(segments: list[tuple[str, np.ndarray]], level: int = 6) -> tuple[list[dict], str]:
    """Arrays into one little-endian buffer (each at an 8-byte aligned offset), deflated (zlib format, which the
    page's DecompressionStream('deflate') reads) and base64-encoded; returns (segment table, text)."""
    table, parts, offset = [], [], 0
    for name, arr in segments:
        arr = np.ascontiguousarray(arr)
        code = DTYPES[arr.dtype]
        data = arr.astype(arr.dtype.newbyteorder("<"), copy=False).tobytes()
        pad = (-offset) % 8
        parts.append(b"\0" * pad)
        offset += pad
        table.append({"name": name, "dtype": code, "offset": offset, "length": int(arr.size)})
        parts.append(data)
        offset += len(data)
    blob = zlib.compress(b"".join(parts), level)
    return table, base64.b64encode(blob).decode("ascii")


def safe_json(data: object) -> str:
    """JSON that can sit inside a <script> element: '<', '>' and '&' (hence '</script>' and '<!--') become \\u
    escapes, which JSON.parse reads back as the same characters."""
    text = json.dumps(data, ensure_ascii=False, allow_nan=False, separators=(",", ":"))
    return text.replace("<", "\\u003c").replace(">", "\\u003e").replace("&", "\\u0026")


def render(title: str, data: dict) -> str:
    """The page: ``title`` HTML-escaped, the assets inlined, ``data`` embedded with `safe_json` (one pass, so no
    inserted text is ever read as a marker)."""
    css, js = asset("report.css"), asset("report.js")
    for name, text in (("report.css", css), ("report.js", js)):
        if "</" in text:  # an asset must not be able to close its own element
            raise AssertionError(f"{name} contains '</'")
    parts = {"TITLE": html.escape(title), "CSS": css, "JS": js, "DATA": safe_json(data)}
    return MARKER.sub(lambda m: parts[m.group(1)], asset("template.html"))
