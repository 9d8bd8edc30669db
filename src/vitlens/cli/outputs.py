"""Where a command writes, and writing all of one command's outputs together or not at all."""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from vitlens.errors import VitlensError

Writer = Callable[[Path], Any]
NAME_MAX = 255  # bytes in one file name on the usual file systems


class Outputs:
    """A transaction over a command's output files.

    ``add(path, writer)`` writes into a temporary file beside ``path`` at once (so drawing and encoding errors surface
    before anything is committed); ``commit()`` moves every staged file into place, restoring any file it replaced if
    a later move fails. Leaving the ``with`` block with an error, or without committing, deletes the temporary files
    and any folder the transaction created. An output may never be one of ``inputs``.
    """

    def __init__(self, inputs: Sequence[str | Path] = ()) -> None:
        self.inputs = {_key(Path(p)) for p in inputs}
        self.staged: list[tuple[Path, Path]] = []
        self.created: list[Path] = []
        self.done = False

    def __enter__(self) -> Outputs:
        return self

    def __exit__(self, *exc: object) -> None:
        if not self.done:
            self.discard()

    def check(self, path: str | Path) -> Path:
        """Refuse an output that is an input, names a folder, or has a name too long for the file system."""
        path = Path(path)
        if len(os.fsencode(path.name)) > NAME_MAX:
            raise VitlensError(f"output name {path.name[:40]}... is longer than {NAME_MAX} bytes; "
                               "choose a shorter name")
        if _key(path) in self.inputs:
            raise VitlensError(f"output {path} is one of the input images; choose another output name")
        if path.is_dir():
            raise VitlensError(f"output {path} is a folder; give a file name")
        if any(_key(path) == _key(target) for _, target in self.staged):
            raise VitlensError(f"two outputs of this command are both named {path}; give them different names")
        return path

    def add(self, path: str | Path, writer: Writer) -> Path:
        """Stage ``writer(tmp)`` for ``path``; file-system errors become one clear line."""
        path = self.check(path)
        try:
            self._make_parent(path.parent)
            fd, tmp = tempfile.mkstemp(prefix=f".{path.stem[:50]}.", suffix=path.suffix, dir=path.parent)
            os.close(fd)
        except OSError as e:
            raise VitlensError(f"cannot write {path}: {e.strerror or e}") from None
        self.staged.append((Path(tmp), path))
        try:
            writer(Path(tmp))
        except OSError as e:
            raise VitlensError(f"cannot write {path}: {e.strerror or e}") from None
        return path

    def commit(self) -> list[Path]:
        """Move every staged file into place (all or none); returns the output paths."""
        umask = os.umask(0)
        os.umask(umask)
        backups: list[tuple[Path, Path]] = []
        moved: list[Path] = []
        try:
            for tmp, path in self.staged:
                os.chmod(tmp, 0o666 & ~umask)  # mkstemp creates 0600; give the file the permissions open() would
                if path.exists():
                    fd, name = tempfile.mkstemp(prefix=f".{path.stem[:50]}.", suffix=".bak", dir=path.parent)
                    os.close(fd)
                    backup = Path(name)
                    os.replace(path, backup)
                    backups.append((backup, path))
                os.replace(tmp, path)
                moved.append(path)
        except OSError as e:
            for path in moved:
                path.unlink(missing_ok=True)
            for backup, path in backups:
                os.replace(backup, path)
            raise VitlensError(f"cannot write {path}: {e.strerror or e}; nothing was written") from None
        for backup, _ in backups:
            backup.unlink(missing_ok=True)
        self.done = True
        return [path for _, path in self.staged]

    def discard(self) -> None:
        """Delete the temporary files and the folders this transaction created."""
        for tmp, _ in self.staged:
            tmp.unlink(missing_ok=True)
        for folder in reversed(self.created):
            with contextlib.suppress(OSError):
                folder.rmdir()
        self.staged.clear()

    def _make_parent(self, folder: Path) -> None:
        missing = []
        while not folder.exists():
            missing.append(folder)
            folder = folder.parent
        for f in reversed(missing):
            f.mkdir()
            self.created.append(f)


def write_all(outputs: Sequence[tuple[str | Path, Writer]], inputs: Sequence[str | Path] = ()) -> list[Path]:
    """Write ``(path, writer)`` pairs as one transaction: all files appear, or none and nothing is replaced."""
    with Outputs(inputs) as tx:
        for path, writer in outputs:
            tx.add(path, writer)
        return tx.commit()


def _key(path: Path) -> str:
    try:
        return str(path.resolve())
    except OSError:
        return str(path.absolute())


@dataclass
class OutputPlan:
    """Where `explain` writes: one figure (and optionally one mask) per input image."""

    figures: list[Path]
    masks: list[Path] | None = None
    folder: bool = False


def plan_outputs(inputs: Sequence[str | Path], paths: Sequence[Path], out: str | Path, method: str,
                 save_mask: str | Path | None = None) -> OutputPlan:
    """Output paths for ``paths``. One image file -> ``out`` is a .png file (or an existing folder); several images
    or a folder -> ``out`` is a folder receiving ``<stem>_<method>.png`` (and ``save_mask`` ``<stem>.npy``)."""
    out = Path(out)
    folder = len(paths) > 1 or any(Path(i).is_dir() for i in inputs)
    stems = [p.stem for p in paths]
    if folder:
        dupes = sorted({s for s in stems if stems.count(s) > 1})
        if dupes:
            raise VitlensError(f"several input images are named {dupes[0]!r}; their outputs would overwrite each "
                               "other: rename them or run them separately")
    figures = _targets(out, [f"{s}_{method}.png" for s in stems], folder, ".png", "--out")
    masks = None
    if save_mask is not None:
        masks = _targets(Path(save_mask), [f"{s}.npy" for s in stems], folder, ".npy", "--save-mask")
        if set(masks) & set(figures):
            raise VitlensError("--save-mask and --out name the same file")
    return OutputPlan(figures, masks, folder)


def _targets(out: Path, names: list[str], folder: bool, suffix: str, flag: str) -> list[Path]:
    for parent in [out, *out.parents]:
        if parent.exists() and not parent.is_dir() and (folder or parent != out):
            raise VitlensError(f"{flag} {out}: {parent} is a file, not a folder")
    if folder or out.is_dir():
        return [out / n for n in names]
    if out.suffix.lower() != suffix:
        raise VitlensError(f"{flag} {out} should end in {suffix} (or name a folder that exists)")
    return [out]
