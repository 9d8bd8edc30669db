"""The per-image CSV of an evaluation, appended one batch at a time so that an interrupted run resumes.

Each batch's rows go out in one write followed by flush and fsync. Every row names its image and how many rows that
image has; on restart the file is read back, a partially written last line is dropped, and so are the rows of any
image whose rows are not all there; the file is rewritten without them (atomically) and the run continues with the
images not done. A JSON beside the CSV records the run's settings; resuming with other settings is refused.
"""

from __future__ import annotations

import csv
import io
import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from vitlens.errors import VitlensError
from vitlens.io import atomic_write

KEY_COLUMNS = ("image", "name", "rows", "method", "target", "class", "predicted")


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return "nan" if v != v else repr(v)
    return str(v)


class ResumableCSV:
    """Rows of per-image scores in ``path`` with ``header``; ``done`` holds the image ids fully written."""

    def __init__(self, path: str | Path, header: Sequence[str], settings: dict) -> None:
        self.path = Path(path)
        self.header = list(header)
        self.settings_path = self.path.with_suffix(".json")
        self.done: set[int] = set()
        self.dropped = 0
        if self.path.exists() or self.settings_path.exists():
            self._resume(settings)
        else:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            with atomic_write(self.settings_path) as tmp:
                Path(tmp).write_text(json.dumps(settings, indent=2, sort_keys=True) + "\n")
            self._write_all([])

    def _resume(self, settings: dict) -> None:
        try:
            old = json.loads(self.settings_path.read_text())
        except (OSError, ValueError):
            old = None
        if old != json.loads(json.dumps(settings)):
            raise VitlensError(f"{self.path.parent} holds a run with other settings (or a damaged "
                               f"{self.settings_path.name}); give another --out or the same options to resume")
        if not self.path.is_file():
            self._write_all([])
            return
        raw = self.path.read_bytes()
        cut = raw.rfind(b"\n") + 1
        text = raw[:cut].decode("utf-8", errors="replace")
        lines = list(csv.reader(io.StringIO(text)))
        if not lines or lines[0] != self.header:
            raise VitlensError(f"{self.path} has another header than this run writes; give another --out")
        rows = [r for r in lines[1:] if len(r) == len(self.header)]
        per_image: dict[str, int] = {}
        expected: dict[str, int] = {}
        for r in rows:
            per_image[r[0]] = per_image.get(r[0], 0) + 1
            expected[r[0]] = int(r[2]) if r[2].isdigit() else -1
        complete = {k for k, c in per_image.items() if c == expected[k]}
        keep = [r for r in rows if r[0] in complete]
        self.dropped = len(lines) - 1 - len(keep) + (1 if cut < len(raw) else 0)
        if self.dropped:
            self._write_all(keep)
        self.done = {int(k) for k in complete}

    def _write_all(self, rows: list[list[str]]) -> None:
        with atomic_write(self.path) as tmp, open(tmp, "w", newline="") as f:
            w = csv.writer(f, lineterminator="\n")
            w.writerow(self.header)
            w.writerows(rows)
            f.flush()
            os.fsync(f.fileno())

    def append(self, rows: Sequence[dict]) -> None:
        """Append rows (dicts keyed by the header) in one write, flushed and fsynced; marks their images done."""
        buf = io.StringIO()
        w = csv.writer(buf, lineterminator="\n")
        for r in rows:
            w.writerow([_fmt(r.get(c, "")) for c in self.header])
        with open(self.path, "a", newline="") as f:
            f.write(buf.getvalue())
            f.flush()
            os.fsync(f.fileno())
        self.done.update(int(r["image"]) for r in rows)

    def read(self) -> list[dict[str, str]]:
        """All rows written so far, as dicts."""
        with open(self.path, newline="") as f:
            return list(csv.DictReader(f))
