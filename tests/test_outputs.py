"""One command's outputs are committed together or not at all, and never replace an input."""

from __future__ import annotations

import errno
from pathlib import Path

import pytest

from vitlens.cli.outputs import Outputs, write_all
from vitlens.errors import VitlensError


def _text(content: str):
    return lambda p: Path(p).write_text(content)


def _fail(p: Path) -> None:
    Path(p).write_text("partial")
    raise OSError(errno.ENOSPC, "No space left on device")


def _snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_all_outputs_appear_together(tmp_path):
    paths = write_all([(tmp_path / "a.txt", _text("A")), (tmp_path / "sub" / "b.txt", _text("B"))])
    assert [p.read_text() for p in paths] == ["A", "B"]
    assert _snapshot(tmp_path) == {"a.txt": b"A", "sub/b.txt": b"B"}  # no temporary files left


def test_a_later_failure_leaves_nothing_and_keeps_what_was_there(tmp_path):
    (tmp_path / "a.txt").write_text("old")
    before = _snapshot(tmp_path)
    with pytest.raises(VitlensError, match="cannot write .*c.txt: No space left on device"):
        write_all([(tmp_path / "a.txt", _text("new")), (tmp_path / "new" / "deep" / "b.txt", _text("B")),
                   (tmp_path / "c.txt", _fail)])
    assert _snapshot(tmp_path) == before
    assert not (tmp_path / "new").exists()  # folders created for the outputs are removed again


def test_a_failed_move_restores_the_replaced_files(tmp_path, monkeypatch):
    import os

    (tmp_path / "a.txt").write_text("old a")
    (tmp_path / "b.txt").write_text("old b")
    real = os.replace
    calls = {"n": 0}

    def flaky(src, dst):
        calls["n"] += 1
        if str(dst).endswith("b.txt") and not str(src).endswith(".bak"):
            raise OSError(errno.EIO, "I/O error")
        return real(src, dst)

    monkeypatch.setattr(os, "replace", flaky)
    with pytest.raises(VitlensError, match="nothing was written"):
        write_all([(tmp_path / "a.txt", _text("new a")), (tmp_path / "b.txt", _text("new b"))])
    monkeypatch.setattr(os, "replace", real)
    assert _snapshot(tmp_path) == {"a.txt": b"old a", "b.txt": b"old b"}


def test_an_output_never_replaces_an_input(tmp_path):
    image = tmp_path / "cat.png"
    image.write_bytes(b"png")
    with pytest.raises(VitlensError, match="is one of the input images"):
        write_all([(tmp_path / "." / "cat.png", _text("x"))], inputs=[image])
    assert image.read_bytes() == b"png"


def test_names_too_long_and_duplicates_are_refused(tmp_path):
    with pytest.raises(VitlensError, match="longer than 255 bytes"):
        write_all([(tmp_path / ("x" * 300 + ".png"), _text("x"))])
    with pytest.raises(VitlensError, match="both named"):
        write_all([(tmp_path / "a.txt", _text("1")), (tmp_path / "a.txt", _text("2"))])
    assert _snapshot(tmp_path) == {}


def test_leaving_without_commit_discards(tmp_path):
    with Outputs() as tx:
        tx.add(tmp_path / "a.txt", _text("A"))
    assert _snapshot(tmp_path) == {}


def test_cli_mask_failure_leaves_no_figure_and_keeps_the_old_one(tmp_path, capsys, monkeypatch):
    """`explain --save-mask` failing on a full disk: the figure staged first is not left behind, and the existing
    figure of the same name is untouched."""
    import shutil
    from importlib import resources

    from vitlens.cli import main
    from vitlens.explanation import Explanation

    scene = Path(str(resources.files("vitlens"))) / "assets" / "scenes" / "coat_trouser.png"
    shutil.copy(scene, tmp_path / "img.png")
    (tmp_path / "fig.png").write_bytes(b"old figure")
    before = _snapshot(tmp_path)

    def full_disk(self, path, index=0):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(Explanation, "save", full_disk)
    code = main(["explain", str(tmp_path / "img.png"), "--model", "vitlens:scenes-vit",
                 "--out", str(tmp_path / "fig.png"), "--save-mask", str(tmp_path / "out" / "mask.npy")])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and "No space left on device" in err, err
    assert _snapshot(tmp_path) == before
    assert not (tmp_path / "out").exists()
