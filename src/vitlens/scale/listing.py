"""What `vitlens run` explains: a folder (searched recursively), the held-out scenes, or a list file of paths.

Every item has a stable id: its path relative to the folder (or as written in the list file), or ``sceneNNNN`` for
the scenes (the names `vitlens evaluate` gives the same scenes). Items are sorted, so a resumed run sees the same
order. Listing never decodes an image: unreadable files are found by the loaders and reported per item.
"""

from __future__ import annotations

import functools
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from PIL import Image

from vitlens.errors import VitlensError
from vitlens.eval.data import MASK_SUFFIX, scene_key  # NAME.mask.png is ground truth, not an image to explain
from vitlens.images import IMAGE_SUFFIXES, load_image

SCENES = "scenes"
SCENES_DEFAULT_N = 500  # as `vitlens evaluate --n`
SCENE_PREFIX = "scenes:"
LIST_SUFFIXES = {".txt", ".lst", ".list"}


@dataclass(frozen=True)
class Item:
    """One image to explain: its position in the listing, its stable id and where to read it from."""

    index: int
    key: str
    source: str  # a file path, or 'scenes:I'


def describe_data(data: str | Path) -> str:
    """The data argument as recorded in a store's settings: 'scenes', or the absolute folder or list path."""
    return SCENES if str(data) == SCENES else str(Path(data).expanduser().resolve())


def list_items(data: str | Path, n: int | None = None, exclude: str | Path | None = None) -> list[Item]:
    """The items of ``data`` ('scenes', a folder, or a .txt list with one image path a line), at most ``n``.

    A folder is searched recursively (hidden files and folders, NAME.mask.png ground truth and anything under
    ``exclude``, e.g. the run's own output folder, are left out). In a list, blank lines and lines starting with '#'
    are skipped and relative paths are relative to the list's folder; paths that do not exist stay in the listing and
    become errors of the run, as unreadable images do.
    """
    if n is not None and (isinstance(n, bool) or not isinstance(n, int) or n < 1):
        raise VitlensError(f"--n must be a positive whole number, got {n!r}")
    if str(data) == SCENES:
        count = SCENES_DEFAULT_N if n is None else n
        return [Item(i, scene_key(i), f"{SCENE_PREFIX}{i}") for i in range(count)]
    path = Path(data).expanduser()
    if not path.exists():
        raise VitlensError(f"--data {data}: not found; give a folder of images, 'scenes' or a .txt list of paths")
    if path.is_dir():
        pairs = _folder(path, exclude)
        if not pairs:
            raise VitlensError(f"--data {data}: the folder holds no images ({', '.join(sorted(IMAGE_SUFFIXES))})")
    elif path.is_file() and path.suffix.lower() in LIST_SUFFIXES:
        pairs = _list_file(path)
        if not pairs:
            raise VitlensError(f"--data {data}: the list names no image; give one image path a line")
    else:
        raise VitlensError(f"--data {data}: not a folder or a list file ({', '.join(sorted(LIST_SUFFIXES))}); "
                           "give a folder of images, 'scenes' or a list of paths")
    pairs = pairs[:n] if n is not None else pairs
    return [Item(i, key, source) for i, (key, source) in enumerate(pairs)]


def _folder(root: Path, exclude: str | Path | None) -> list[tuple[str, str]]:
    skip = Path(exclude).resolve() if exclude is not None else None
    out: list[tuple[str, str]] = []
    for folder, dirs, files in os.walk(root):  # never follows symbolic links to folders (no cycles)
        here = Path(folder)
        dirs[:] = sorted(d for d in dirs if not d.startswith(".") and (skip is None or (here / d).resolve() != skip))
        for name in files:
            p = here / name
            if name.startswith(".") or p.suffix.lower() not in IMAGE_SUFFIXES or p.stem.endswith(MASK_SUFFIX):
                continue
            out.append((p.relative_to(root).as_posix(), str(p)))
    return sorted(out)


def _list_file(path: Path) -> list[tuple[str, str]]:
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise VitlensError(f"--data {path}: cannot read the list ({getattr(e, 'strerror', None) or e})") from None
    seen: set[str] = set()
    out: list[tuple[str, str]] = []
    for line in text.splitlines():
        entry = line.strip()
        if not entry or entry.startswith("#") or entry in seen:
            continue
        seen.add(entry)
        p = Path(entry).expanduser()
        out.append((entry, str(p if p.is_absolute() else path.parent / p)))
    return out


@functools.lru_cache(maxsize=1)
def _scenes() -> Any:
    from vitlens.train.embedded import localisation_dataset

    return localisation_dataset()  # the held-out scenes of `vitlens evaluate --data scenes`


def load_item(source: str) -> Image.Image:
    """The RGB image of an item's ``source`` (one-line `VitlensError` when it cannot be read)."""
    if source.startswith(SCENE_PREFIX):
        return Image.fromarray(_scenes()[int(source[len(SCENE_PREFIX):])].image)
    return load_image(source)
