"""The store of a `vitlens run`: one Parquet table of metadata and the maps in Zarr, committed batch by batch.

Layout of a store folder::

    settings.json               what the run computes (model, data, methods and options, target, grid); a run with
                                other settings refuses the folder
    parts/part-000000.parquet   one file per committed batch: a row per (image, method), or one 'error' row for an
                                image that could not be read
    maps/part-000000.zarr       that batch's maps, float16 [rows, gh, gw]; a table row names its part and row

A batch commits in this order: its maps are written to ``maps/.tmp-part-N.zarr`` and renamed into place, then its
table is written to ``parts/.tmp-part-N.parquet`` (flushed to disk) and renamed into place. The rename of the table
is the commit: a batch is done exactly when its Parquet part exists. Opening a store for writing deletes temporary
files and any maps without a committed table (left by a kill), so a resumed run recomputes only the images of no
committed part and no row is ever written twice. Readers see committed parts only (pyarrow and pandas skip names
starting with '.', so ``pandas.read_parquet("OUT/parts")`` works too).
"""

from __future__ import annotations

import json
import os
import re
import shutil
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from vitlens.errors import VitlensError

FORMAT = 1
SETTINGS = "settings.json"
LOCK = ".lock"  # locked (a POSIX record lock) by the one writer; the kernel releases it when the writer dies
_HELD: set[str] = set()  # stores written by this process (POSIX locks do not conflict within one process)
PARTS, MAPS = "parts", "maps"
TMP = ".tmp-"
OK, ERROR = "ok", "error"
_PART = re.compile(r"^part-(\d{6,})\.parquet$")


def _arrow() -> Any:
    try:
        import pyarrow as pa  # type: ignore[import-untyped]
        import pyarrow.parquet as pq  # type: ignore[import-untyped]
    except ImportError as e:
        raise VitlensError(f"the store needs pyarrow ({e}); install vitlens[scale]") from None
    return pa, pq


def _zarr() -> Any:
    try:
        import zarr
    except ImportError as e:
        raise VitlensError(f"the store needs zarr ({e}); install vitlens[scale]") from None
    return zarr


def schema() -> Any:
    """The Arrow schema of the metadata table."""
    pa, _ = _arrow()
    return pa.schema([
        ("index", pa.int64()),            # position in the listing
        ("image_id", pa.string()),        # path relative to the data folder / as listed, or sceneNNNN
        ("source", pa.string()),          # the path read (or scenes:I)
        ("method", pa.string()),          # null on error rows
        ("options", pa.string()),         # the method's options as JSON
        ("target", pa.int32()),           # the explained class (null for class-agnostic methods)
        ("topk_classes", pa.list_(pa.int32())),
        ("topk_probs", pa.list_(pa.float32())),
        ("seconds", pa.float32()),        # the method's time per image in its batch
        ("status", pa.string()),          # ok | error
        ("error", pa.string()),           # one line, on error rows
        ("part", pa.string()),            # the Zarr array holding the map
        ("row", pa.int32()),              # the map's row in it
    ])


@dataclass
class BatchResult:
    """What one batch produced: per read image its listing index, id, source, top-k and, per method, its map
    (float16 [B, gh, gw]), target (or None) and seconds per image; plus the items that could not be read."""

    index: list[int]
    keys: list[str]
    sources: list[str]
    topk_classes: list[list[int]]
    topk_probs: list[list[float]]
    methods: list[str]
    options: list[str]
    maps: list[np.ndarray]  # one [B, gh, gw] float16 array per method
    targets: list[list[int] | None]  # per method: one class per image, or None (class-agnostic)
    seconds: list[float]  # per method, per image
    errors: list[tuple[int, str, str, str]] = field(default_factory=list)  # (index, key, source, message)

    @property
    def images(self) -> int:
        """Images handled (read or not)."""
        return len(self.keys) + len(self.errors)


class Store:
    """A run's store at ``path``, read side: `table`, `errors`, `map` (and `maps`) by image id."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        settings = self.path / SETTINGS
        if not settings.is_file():
            raise VitlensError(f"{self.path} is not a vitlens run store (no {SETTINGS}); give the --out of a "
                               "`vitlens run`")
        try:
            self.settings: dict[str, Any] = json.loads(settings.read_text())
        except (OSError, ValueError, UnicodeDecodeError):
            raise VitlensError(f"{settings} is damaged; run `vitlens run` again into a new --out") from None
        if not isinstance(self.settings, dict) or self.settings.get("format") != FORMAT:
            raise VitlensError(f"{settings} is not a vitlens run store of format {FORMAT}")
        self._index: dict[tuple[str, str], tuple[str, int, int | None]] | None = None
        self._arrays: dict[str, Any] = {}

    # ---- reading ------------------------------------------------------------------------------------------------
    def part_names(self) -> list[str]:
        """The committed parts, in order ('part-000000', ...)."""
        folder = self.path / PARTS
        if not folder.is_dir():
            return []
        found = [m.group(0)[: -len(".parquet")] for n in os.listdir(folder) if (m := _PART.match(n))]
        return sorted(found, key=lambda s: int(s[5:]))

    def table(self, columns: Sequence[str] | None = None) -> Any:
        """Every committed row as a pyarrow Table, sorted by listing index then method (``.to_pandas()`` for a
        DataFrame)."""
        pa, pq = _arrow()
        parts = [pq.read_table(self.path / PARTS / f"{p}.parquet", schema=schema()) for p in self.part_names()]
        table = pa.concat_tables(parts) if parts else schema().empty_table()
        order = [m for m in self.methods if m]
        rank = {m: i for i, m in enumerate(order)}
        method_rank = pa.array([rank.get(m, -1) if m is not None else -1 for m in table.column("method").to_pylist()],
                               pa.int32())
        table = table.append_column("_m", method_rank).sort_by([("index", "ascending"), ("_m", "ascending")])
        table = table.drop_columns(["_m"])
        return table.select(list(columns)) if columns is not None else table

    def errors(self) -> Any:
        """The images that could not be read: index, image_id, source (the path) and the one-line error."""
        import pyarrow.compute as pc  # type: ignore[import-untyped]

        t = self.table()
        return t.filter(pc.equal(t.column("status"), ERROR)).select(["index", "image_id", "source", "error"])

    @property
    def methods(self) -> list[str]:
        """The methods of the run, in order."""
        return [m["name"] for m in self.settings.get("methods", [])]

    @property
    def grid(self) -> tuple[int, int]:
        """The maps' (gh, gw)."""
        gh, gw = self.settings["grid"]
        return int(gh), int(gw)

    def done(self) -> set[str]:
        """Ids of the images of every committed part (explained, or reported as unreadable)."""
        _, pq = _arrow()
        out: set[str] = set()
        for p in self.part_names():
            out.update(pq.read_table(self.path / PARTS / f"{p}.parquet", columns=["image_id"])
                       .column("image_id").to_pylist())
        return out

    def _lookup(self) -> dict[tuple[str, str], tuple[str, int, int | None]]:
        if self._index is None:
            t = self.table(["image_id", "method", "part", "row", "target", "status"]).to_pydict()
            self._index = {(k, m): (p, r, tg) for k, m, p, r, tg, s in zip(t["image_id"], t["method"], t["part"],
                                                                          t["row"], t["target"], t["status"])
                           if s == OK}
        return self._index

    def has(self, image_id: str, method: str) -> bool:
        """Whether the store holds a map of ``method`` for ``image_id``."""
        return (image_id, method) in self._lookup()

    def target(self, image_id: str, method: str) -> int | None:
        """The class the map of ``method`` for ``image_id`` explains (None for a class-agnostic method)."""
        return self._where(image_id, method)[2]

    def _where(self, image_id: str, method: str) -> tuple[str, int, int | None]:
        found = self._lookup().get((image_id, method))
        if found is None:
            if method not in self.methods:
                raise VitlensError(f"the store {self.path} has no method {method!r}; it holds "
                                   f"{', '.join(self.methods)}")
            raise VitlensError(f"the store {self.path} has no {method} map for image {image_id!r} (not explained "
                               "yet, or unreadable); run `vitlens run` on it again to complete it")
        return found

    def map(self, image_id: str, method: str) -> np.ndarray:
        """The map of ``method`` for ``image_id``: float16 [gh, gw]."""
        part, row, _ = self._where(image_id, method)
        return np.asarray(self._array(part)[row])

    def maps(self, image_ids: Sequence[str], method: str) -> np.ndarray:
        """Maps of ``method`` for several ids: float16 [len(ids), gh, gw]."""
        if not image_ids:
            return np.zeros((0, *self.grid), np.float16)
        return np.stack([self.map(k, method) for k in image_ids])

    def _array(self, part: str) -> Any:
        if part not in self._arrays:
            self._arrays[part] = _zarr().open_array(store=str(self.path / MAPS / f"{part}.zarr"), mode="r")
        return self._arrays[part]


def open_store(path: str | Path) -> Store:
    """Open the store written by `vitlens run --out PATH` for reading: ``.table()`` (pyarrow; ``.to_pandas()``),
    ``.errors()``, ``.map(image_id, method)`` (float16 [gh, gw]) and ``.settings``."""
    return Store(path)


class StoreWriter(Store):
    """A store opened to add batches: creates ``path`` (or resumes it when its settings equal ``settings``), removes
    what a killed run left uncommitted, and commits one batch at a time with `commit`. One writer at a time: a second
    one (another process writing the same folder) is refused until `close` or the first writer's exit."""

    def __init__(self, path: str | Path, settings: dict[str, Any]) -> None:
        path = Path(path)
        settings = {"format": FORMAT, **json.loads(json.dumps(settings))}
        if path.exists() and not path.is_dir():
            raise VitlensError(f"--out {path} is a file; give a folder (new, or a store of the same run to resume)")
        check_store_folder(path)
        self._created, self._fresh = not path.exists(), not (path / SETTINGS).is_file()
        self.path = path
        self._lock = _lock(path)
        try:
            self._open(path, settings)
        except BaseException:
            self.abandon()
            self.close()
            raise

    def abandon(self) -> None:
        """Delete the store when this writer started it and nothing was committed (while it holds the lock): the
        folder when the writer created it, else what it added to the empty folder. A resumed store is kept."""
        if not self._fresh or self.part_names():
            return
        if self._created:
            shutil.rmtree(self.path, ignore_errors=True)
            return
        for name in (PARTS, MAPS):
            shutil.rmtree(self.path / name, ignore_errors=True)
        for name in (SETTINGS, LOCK):
            (self.path / name).unlink(missing_ok=True)

    def close(self) -> None:
        """Release the store (its lock)."""
        if self._lock is not None:
            os.close(self._lock)
            self._lock = None
            _HELD.discard(str(self.path.resolve()))

    def __enter__(self) -> StoreWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _open(self, path: Path, settings: dict[str, Any]) -> None:
        if (path / SETTINGS).is_file():
            super().__init__(path)
            if self.settings != settings:
                diff = sorted(k for k in set(settings) | set(self.settings) if settings.get(k) != self.settings.get(k))
                raise VitlensError(f"--out {path} holds a run with other settings ({', '.join(diff)}); give another "
                                   "--out, or the same options to resume it")
            self._clean()
        else:
            try:
                (path / PARTS).mkdir(parents=True, exist_ok=True)
                (path / MAPS).mkdir(exist_ok=True)
                _write_json(path / SETTINGS, settings)
            except OSError as e:
                raise VitlensError(f"cannot write --out {path}: {e.strerror or e}; give a folder you can write to") \
                    from None
            super().__init__(path)
        names = self.part_names()
        self.next = int(names[-1][5:]) + 1 if names else 0

    def _clean(self) -> None:
        """Delete temporary files and the maps of parts that never committed (a kill between the two renames)."""
        committed = set(self.part_names())
        for folder in (self.path / PARTS, self.path / MAPS):
            folder.mkdir(exist_ok=True)
            for name in os.listdir(folder):
                p = folder / name
                stem = name[: -len(".zarr")] if name.endswith(".zarr") else None
                if name.startswith(TMP) or (folder.name == MAPS and stem is not None and stem not in committed):
                    shutil.rmtree(p) if p.is_dir() else p.unlink()

    def commit(self, batch: BatchResult) -> str:
        """Write one batch (maps first, then its table, which commits it); returns the part's name."""
        pa, pq = _arrow()
        name = f"part-{self.next:06d}"
        n_img, n_met = len(batch.keys), len(batch.methods)
        cols: dict[str, list] = {f.name: [] for f in schema()}

        def add(**values: Any) -> None:
            for k in cols:
                cols[k].append(values.get(k))

        if n_img:
            stacked = np.stack(batch.maps, 1).reshape(n_img * n_met, *batch.maps[0].shape[1:]).astype(np.float16)
            self._write_maps(name, stacked)
        for i in range(n_img):
            for j, method in enumerate(batch.methods):
                tg = batch.targets[j]
                add(index=batch.index[i], image_id=batch.keys[i], source=batch.sources[i], method=method,
                    options=batch.options[j], target=None if tg is None else int(tg[i]),
                    topk_classes=batch.topk_classes[i], topk_probs=batch.topk_probs[i], seconds=batch.seconds[j],
                    status=OK, part=name, row=i * n_met + j)
        for index, key, source, message in batch.errors:
            add(index=index, image_id=key, source=source, status=ERROR, error=message, topk_classes=[],
                topk_probs=[])
        table = pa.table(cols, schema=schema())
        final = self.path / PARTS / f"{name}.parquet"
        tmp = final.with_name(TMP + final.name)
        try:
            with open(tmp, "wb") as f:
                pq.write_table(table, f, compression="zstd")
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, final)
            _fsync_dir(final.parent)
        except OSError as e:
            tmp.unlink(missing_ok=True)
            raise VitlensError(f"cannot write {final}: {e.strerror or e}") from None
        self.next += 1
        self._index = None
        return name

    def _write_maps(self, name: str, maps: np.ndarray) -> None:
        final = self.path / MAPS / f"{name}.zarr"
        tmp = final.with_name(TMP + final.name)
        for p in (tmp, final):
            if p.exists():
                shutil.rmtree(p)
        try:
            z = _zarr().open_array(store=str(tmp), mode="w", shape=maps.shape, chunks=maps.shape, dtype="float16")
            z[...] = maps
            for folder, _, files in os.walk(tmp):
                for f in files:
                    with open(Path(folder) / f, "rb+") as fh:
                        os.fsync(fh.fileno())
            os.rename(tmp, final)
        except OSError as e:
            shutil.rmtree(tmp, ignore_errors=True)
            raise VitlensError(f"cannot write {final}: {e.strerror or e}") from None


def check_store_folder(path: Path) -> None:
    """Refuse, in one line, a folder that holds files but no store (a store's own lock file does not count)."""
    if path.is_dir() and not (path / SETTINGS).is_file() and any(p.name != LOCK for p in path.iterdir()):
        raise VitlensError(f"--out {path} is a folder that holds other files, not a vitlens run store; give a new or "
                           "empty folder")


def _lock(path: Path) -> int | None:
    """Create ``path`` if needed and take its writer lock (a file descriptor), or fail in one line.

    A POSIX record lock (``lockf``) belongs to this process only: DataLoader workers forked from it do not hold it,
    so after the writer is killed the next run may start at once, even while orphaned workers are still exiting."""
    import fcntl

    busy = VitlensError(f"--out {path} is being written by another vitlens run; wait for it to finish or give "
                        "another --out")
    try:
        path.mkdir(parents=True, exist_ok=True)
        key = str(path.resolve())
        if key in _HELD:
            raise busy
        fd = os.open(path / LOCK, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
    except OSError as e:
        raise VitlensError(f"cannot write --out {path}: {e.strerror or e}; give a folder you can write to") from None
    try:
        fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        os.close(fd)
        raise busy from None
    _HELD.add(key)
    return fd


def _write_json(path: Path, value: Any) -> None:
    from vitlens.io import atomic_write

    with atomic_write(path) as tmp:
        Path(tmp).write_text(json.dumps(value, indent=2, sort_keys=True) + "\n")


def _fsync_dir(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
