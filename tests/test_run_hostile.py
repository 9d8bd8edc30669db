"""Hostile input to `vitlens run`: each case exits with status 2 and exactly one `error:` line, and writes nothing
(no store is created; an existing store or folder is left exactly as it was)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from vitlens.cli import main

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _snapshot(folder: Path) -> dict[str, tuple[int, int]]:
    return {str(p.relative_to(folder)): (p.stat().st_mtime_ns, p.stat().st_size) for p in sorted(folder.rglob("*"))}


@pytest.fixture(scope="module")
def place(tmp_path_factory, vit3_dir) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("run_hostile")
    data = root / "data"
    data.mkdir()
    for i in range(3):
        Image.fromarray(np.full((32, 32, 3), 40 * i, np.uint8)).save(data / f"a{i}.png")
    (root / "empty").mkdir()
    (root / "notes.txt").write_text("")
    (root / "file").write_text("a file")
    (root / "busy").mkdir()
    (root / "busy" / "mine.txt").write_text("not a store")
    store = root / "store"
    argv = ["run", "--model", str(vit3_dir), "--data", str(data), "--out", str(store), "--workers", "0"]
    assert main(argv) == 0
    return {"root": root, "data": data, "store": store}


CASES = [
    (["--data", "{root}/nowhere"], "not found"),
    (["--data", "{root}/empty"], "holds no images"),
    (["--data", "{root}/notes.txt"], "names no image"),
    (["--data", "{root}/file"], "not a folder or a list file"),
    (["--methods", "rollout,bogus"], "unknown method 'bogus'"),
    (["--methods", " , "], "--methods is empty"),
    (["--engine", "spark"], "'spark' is not one of 'local', 'ray'"),
    (["--engine", "ray", "--workers", "0"], "needs --workers 1 or more"),
    (["--ray-address", "auto"], "--ray-address is for --engine ray"),
    (["--out", "{root}/file/store"], "is a file, not a folder"),
    (["--out", "{root}/busy"], "holds other files"),
    (["--out", "{root}/store", "--methods", "rollout,grad_rollout"], "other settings (methods)"),
    (["--out", "{root}/store", "--top-k", "1"], "other settings (top_k)"),
    (["--n", "0"], "0 is not in the range x>=1"),
    (["--target", "99", "--methods", "grad_rollout"], "99"),
    (["--discard-ratio", "1.5"], "discard_ratio"),
    (["--methods", "saliency", "--pool", "pixel"], "drop --pool pixel"),
]


@pytest.mark.parametrize("extra, message", CASES)
def test_bad_input_to_run_is_one_line_and_writes_nothing(vit3_dir, place, capsys, extra, message):
    root = place["root"]
    extra = [e.format(root=root) for e in extra]
    args = {"--data": str(place["data"]), "--out": str(root / "new_store")}
    for flag in list(args):
        if flag in extra:
            i = extra.index(flag)
            args[flag] = extra.pop(i + 1)
            extra.pop(i)
    before = _snapshot(root)
    capsys.readouterr()
    code = main(["run", "--model", str(vit3_dir), "--data", args["--data"], "--out", args["--out"], "--workers", "0",
                 *extra])
    err = capsys.readouterr().err.strip()
    assert code == 2, err
    assert err.startswith("error: ") and "\n" not in err and "Traceback" not in err, err
    assert message in err, err
    assert _snapshot(root) == before


def test_a_store_being_written_is_refused(vit3_dir, place, capsys):
    import json

    from vitlens.scale.store import StoreWriter, open_store

    settings = {k: v for k, v in open_store(place["store"]).settings.items() if k != "format"}
    before = _snapshot(place["root"])
    with StoreWriter(place["store"], json.loads(json.dumps(settings))):
        code = main(["run", "--model", str(vit3_dir), "--data", str(place["data"]), "--out", str(place["store"]),
                     "--workers", "0"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and err.startswith("error: ") and "being written by another vitlens run" in err, err
    assert _snapshot(place["root"]) == before
