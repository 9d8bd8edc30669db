"""`vitlens run` and its store: maps and metadata against the methods run image by image (the oracle), batch vs one
by one, unreadable images skipped and reported, resume after a SIGKILL in the middle of a commit, the listing, and
`vitlens evaluate --maps` reading the store instead of computing the maps."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import vitlens
from vitlens.cli import main
from vitlens.errors import VitlensError
from vitlens.scale.job import Job
from vitlens.scale.listing import list_items, load_item, scene_key
from vitlens.scale.local import run_local
from vitlens.scale.store import StoreWriter, open_store

pytestmark = pytest.mark.usefixtures("one_torch_thread")

REPO = Path(__file__).resolve().parents[1]
METHODS = ("rollout", "grad_rollout")
VOLATILE = ["seconds"]  # wall-clock time is the only column that may differ between two runs


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> Path:
    """11 readable 40x40 images (two in a sub-folder), one garbage file, one truncated PNG, a hidden file and a
    NAME.mask.png that the listing leaves out."""
    d = tmp_path_factory.mktemp("scale_images")
    rng = np.random.default_rng(0)
    (d / "sub").mkdir()
    for i in range(11):
        where = d / "sub" if i >= 9 else d
        Image.fromarray((rng.random((40, 40, 3)) * 255).astype(np.uint8)).save(where / f"im{i:02d}.png")
    (d / "garbage.png").write_bytes(b"this is not an image")
    whole = (d / "im00.png").read_bytes()
    (d / "truncated.png").write_bytes(whole[: len(whole) // 2])
    Image.new("RGB", (8, 8)).save(d / ".hidden.png")
    Image.new("L", (40, 40)).save(d / "im00.mask.png")
    return d


def _run(model_dir: Path, data: Path, out: Path, *extra: str) -> int:
    argv = ["run", "--model", str(model_dir), "--data", str(data), "--methods", ",".join(METHODS), "--out", str(out),
            "--workers", "0", "--batch-size", "4", *extra]
    return main(argv)


def _stable(table):
    return table.drop_columns(VOLATILE)


def test_listing_ids_are_relative_paths_sorted_and_skip_hidden_and_masks(images, tmp_path):
    items = list_items(images)
    keys = [it.key for it in items]
    assert keys == sorted(keys) and len(keys) == 13
    assert "sub/im09.png" in keys and "garbage.png" in keys
    assert not any(k.startswith(".") or k.endswith(".mask.png") for k in keys)
    assert [it.index for it in items] == list(range(13))
    lst = tmp_path / "list.txt"
    lst.write_text(f"# a comment\n\nim01.png\n{images / 'sub' / 'im10.png'}\nmissing.png\nim01.png\n")
    (tmp_path / "im01.png").write_bytes((images / "im01.png").read_bytes())
    listed = list_items(lst, n=2)
    assert [it.key for it in listed] == ["im01.png", str(images / "sub" / "im10.png")]
    assert listed[0].source == str(tmp_path / "im01.png")
    assert [it.key for it in list_items(lst)][-1] == "missing.png"  # listed; reading it becomes an error row


def test_scenes_items_are_the_held_out_scenes_that_evaluate_uses():
    from vitlens.train.embedded import localisation_scenes

    items = list_items("scenes", n=3)
    scenes, _, _, _ = localisation_scenes(3)
    assert [it.key for it in items] == [scene_key(i) for i in range(3)] == ["scene0000", "scene0001", "scene0002"]
    for it, ref in zip(items, scenes):
        assert np.array_equal(np.asarray(load_item(it.source)), ref)


def test_store_holds_each_methods_maps_and_metadata_as_computed_image_by_image(vit3_dir, images, tmp_path):
    out = tmp_path / "store"
    assert _run(vit3_dir, images, out, "--top-k", "2") == 0
    store = vitlens.open_store(out)
    df = store.table().to_pandas()
    ok = df[df.status == "ok"]
    assert len(ok) == 11 * len(METHODS) and ok.groupby(["image_id", "method"]).size().max() == 1
    model = vitlens.load_model(str(vit3_dir))
    rollout, grad = vitlens.Rollout(model), vitlens.GradRollout(model)
    for it in list_items(images):
        if it.key in ("garbage.png", "truncated.png"):
            continue
        x, _ = model.preprocess(load_item(it.source))  # one image at a time: the oracle for the batched run
        with torch.no_grad():
            probs = model.probabilities(model(x))[0]
        top = probs.argsort(descending=True)[:2].tolist()
        ref = {"rollout": rollout.explain(x).maps[0], "grad_rollout": grad.explain(x, target=top[0]).maps[0]}
        rows = ok[ok.image_id == it.key].set_index("method")
        for m in METHODS:
            stored = store.map(it.key, m)
            assert stored.dtype == np.float16 and stored.shape == (4, 4)
            np.testing.assert_allclose(stored.astype(np.float32), ref[m].numpy(), rtol=2e-3, atol=2e-3)
            assert list(rows.loc[m, "topk_classes"]) == top
            np.testing.assert_allclose(rows.loc[m, "topk_probs"], probs[top].numpy(), rtol=1e-5)
            assert rows.loc[m, "source"] == it.source and rows.loc[m, "index"] == it.index
        assert rows.loc["grad_rollout", "target"] == top[0] and np.isnan(rows.loc["rollout", "target"])
        assert json.loads(rows.loc["rollout", "options"]) == rollout.params
    with pytest.raises(VitlensError, match="no method 'gae'"):
        store.map("im01.png", "gae")
    with pytest.raises(VitlensError, match="no rollout map for image 'garbage.png'"):
        store.map("garbage.png", "rollout")
    # the parts folder reads as one table with pandas too, temporary files left aside
    import pandas as pd

    (out / "parts" / ".tmp-part-000099.parquet").write_bytes(b"half a file")
    assert len(pd.read_parquet(out / "parts")) == len(df)


def test_batch_of_four_equals_one_image_at_a_time(vit3_dir, images, tmp_path):
    assert _run(vit3_dir, images, tmp_path / "b4") == 0
    assert _run(vit3_dir, images, tmp_path / "b1", "--batch-size", "1") == 0
    a, b = open_store(tmp_path / "b4"), open_store(tmp_path / "b1")
    cols = ["index", "image_id", "method", "target", "topk_classes", "status"]
    assert a.table(cols).equals(b.table(cols))
    assert len(a.part_names()) == 4 and len(b.part_names()) == 13
    for key in a.table(["image_id"]).column("image_id").to_pylist():
        for m in METHODS:
            if a.has(key, m):
                np.testing.assert_allclose(a.map(key, m).astype(np.float32), b.map(key, m).astype(np.float32),
                                           rtol=2e-3, atol=2e-3)


def test_unreadable_images_are_skipped_reported_and_counted(vit3_dir, images, tmp_path, capsys):
    lst = tmp_path / "list.txt"
    lst.write_text(f"{images / 'im01.png'}\n{images / 'garbage.png'}\n{tmp_path / 'gone.png'}\n"
                   f"{images / 'truncated.png'}\n{images / 'im02.png'}\n")
    assert _run(vit3_dir, lst, tmp_path / "s") == 0
    out = capsys.readouterr().out
    assert "explained 2 images" in out and "3 of 5 images could not be read and were skipped" in out
    errors = open_store(tmp_path / "s").errors().to_pandas()
    assert sorted(errors.source) == sorted([str(images / "garbage.png"), str(tmp_path / "gone.png"),
                                            str(images / "truncated.png")])
    for source, message in zip(errors.source, errors.error):
        assert source in message and "\n" not in message
    assert "not found" in errors.set_index("source").loc[str(tmp_path / "gone.png"), "error"]
    assert set(open_store(tmp_path / "s").done()) == {str(images / n) for n in ("im01.png", "garbage.png",
                                                                                 "truncated.png", "im02.png")} | \
        {str(tmp_path / "gone.png")}


KILLER = """
import os, signal, sys
sys.path.insert(0, {repo!r})
import tests.conftest  # noqa: F401  (torchvision op schemas, as in the test process)
import torch
torch.set_num_threads(1)
real = os.replace
commits = [0]


def replace(src, dst):
    if str(dst).endswith(".parquet"):
        commits[0] += 1
        if commits[0] == {kill_at}:  # part {kill_at_0}'s maps and its whole temporary table are on disk: die now
            os.kill(os.getpid(), signal.SIGKILL)
    return real(src, dst)


os.replace = replace
from vitlens.cli import main
sys.exit(main({argv!r}))
"""


def test_resume_after_sigkill_mid_commit_gives_the_uninterrupted_store(vit3_dir, images, tmp_path, capsys):
    ref, out = tmp_path / "ref", tmp_path / "killed"
    assert _run(vit3_dir, images, ref) == 0
    argv = ["run", "--model", str(vit3_dir), "--data", str(images), "--methods", ",".join(METHODS), "--out", str(out),
            "--workers", "1", "--batch-size", "4"]
    script = tmp_path / "killer.py"
    script.write_text(textwrap.dedent(KILLER).format(repo=str(REPO), kill_at=3, kill_at_0=2, argv=argv))
    proc = subprocess.run([sys.executable, str(script)], capture_output=True, timeout=120,
                          env={**os.environ, "TQDM_DISABLE": "1"})
    assert proc.returncode == -signal.SIGKILL, proc.stderr.decode()[-2000:]
    # what the kill left: two committed parts, part 2's maps renamed into place and its temporary table
    assert sorted(os.listdir(out / "parts")) == [".tmp-part-000002.parquet", "part-000000.parquet",
                                                 "part-000001.parquet"]
    assert "part-000002.zarr" in os.listdir(out / "maps")
    assert len(open_store(out).done()) == 8
    # and what a kill while the maps were still being written leaves: a half-written temporary Zarr array
    (out / "maps" / ".tmp-part-000003.zarr" / "c").mkdir(parents=True)
    (out / "maps" / ".tmp-part-000003.zarr" / "zarr.json").write_text('{"zarr_format": 3, "sha')
    commits: list[int] = []
    job = Job(str(vit3_dir), METHODS)
    explainer, _ = job.build()
    store = StoreWriter(out, job.settings(str(images), explainer))  # resuming cleans up what was not committed
    assert sorted(os.listdir(out / "parts")) == ["part-000000.parquet", "part-000001.parquet"]
    assert sorted(os.listdir(out / "maps")) == ["part-000000.zarr", "part-000001.zarr"]
    summary = run_local(explainer, list_items(images), store, batch_size=4, workers=0, progress=False,
                        after_commit=commits.append)
    assert summary.skipped == 8 and summary.explained + summary.errors == 5 and commits == [1, 2]
    with pytest.raises(VitlensError, match="being written by another vitlens run"):
        StoreWriter(out, job.settings(str(images), explainer))  # one writer at a time
    store.close()
    a, b = open_store(ref), open_store(out)
    assert _stable(a.table()).equals(_stable(b.table()))  # same rows, once each, same parts and rows of the maps
    assert sorted(os.listdir(ref / "maps")) == sorted(os.listdir(out / "maps"))
    for key in a.table(["image_id"]).column("image_id").to_pylist():
        for m in METHODS:
            assert a.has(key, m) == b.has(key, m)
            if a.has(key, m):
                assert np.array_equal(a.map(key, m), b.map(key, m))
    # a finished store run again does nothing; other settings are refused
    assert _run(vit3_dir, images, out) == 0
    assert "resuming" in capsys.readouterr().err and _stable(open_store(out).table()).equals(_stable(a.table()))
    assert _run(vit3_dir, images, out, "--discard-ratio", "0.5") == 2
    assert "other settings (methods)" in capsys.readouterr().err


# ---- vitlens evaluate --maps ----------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def eval_data(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("eval_data")
    rng = np.random.default_rng(1)
    for i in range(4):
        Image.fromarray((rng.random((40, 40, 3)) * 255).astype(np.uint8)).save(d / f"im{i}.png")
        (d / f"im{i}.json").write_text(json.dumps({"boxes": [[4 * i, 0, 4 * i + 20, 24]], "class": i % 3}))
    return d


def test_evaluate_from_the_store_equals_evaluate_on_the_same_float16_maps(vit3_dir, eval_data, tmp_path):
    from vitlens.eval.data import load_samples
    from vitlens.eval.explainers import Explainer, explainers
    from vitlens.eval.metrics import make_metrics
    from vitlens.eval.run import score_batch

    assert _run(vit3_dir, eval_data, tmp_path / "st") == 0
    model = vitlens.load_model(str(vit3_dir))
    samples = load_samples(model, str(eval_data), 4)
    store = open_store(tmp_path / "st")
    from_store = explainers(model, list(METHODS), 0, store, [s.key for s in samples])
    computed = explainers(model, list(METHODS), 0)

    def as_stored(ex: Explainer) -> Explainer:  # the computed maps rounded as the store keeps them
        def fn(m, x, t, ids):
            maps = ex.fn(m, x, t, ids)
            return maps.half().float() if m is model else maps
        return Explainer(ex.name, fn, ex.class_specific)

    x = torch.stack([model.preprocess.tensor(s.view) for s in samples])
    with torch.no_grad():
        top1 = model(x).argmax(-1)
    for ex in from_store:  # the method maps are the store's, exactly
        if ex.name in METHODS:
            stored = torch.from_numpy(store.maps([s.key for s in samples], ex.name).astype(np.float32))
            assert torch.equal(ex(model, x, top1, torch.arange(4)), stored)
    mets = make_metrics(["positive", "deletion", "pointing", "energy", "sanity"])
    a = score_batch(model, samples, [0, 1, 2, 3], from_store, mets, kinds=("pred",))
    rounded = [as_stored(e) if e.name in METHODS else e for e in computed]
    b = score_batch(model, samples, [0, 1, 2, 3], rounded, mets, kinds=("pred",))
    assert len(a) == len(b) == 4 * 5
    for ra, rb in zip(a, b):
        assert ra.keys() == rb.keys()
        for k in ra:
            assert ra[k] == pytest.approx(rb[k], abs=1e-6, nan_ok=True), (k, ra["method"])
    # ground-truth rows of another class than the stored top-1 cannot come from the store
    with pytest.raises(VitlensError, match="use --targets pred"):
        score_batch(model, samples, [0, 1, 2, 3], from_store, mets, kinds=("gt",))


def test_evaluate_command_reads_maps_from_the_store(vit3_dir, eval_data, tmp_path, capsys):
    assert _run(vit3_dir, eval_data, tmp_path / "st") == 0
    base = ["evaluate", "--model", str(vit3_dir), "--data", str(eval_data), "--metrics", "pointing,energy", "--n", "4",
            "--targets", "pred"]
    assert main([*base, "--maps", str(tmp_path / "st"), "--out", str(tmp_path / "ev")]) == 0
    text = capsys.readouterr().out
    assert "rollout maps read from" in text and "grad_rollout" in text
    rows = (tmp_path / "ev" / "scores.csv").read_text().splitlines()
    assert len(rows) == 1 + 5 * 4
    other = tmp_path / "other"
    other.mkdir()
    (other / "a.png").write_bytes((eval_data / "im0.png").read_bytes())
    (other / "a.json").write_text(json.dumps({"boxes": [[0, 0, 10, 10]]}))
    assert main([*base[:4], str(other), *base[5:], "--maps", str(tmp_path / "st"), "--out", str(tmp_path / "e2")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: --maps") and "data" in err and "\n" not in err
    assert main([*base, "--maps", str(tmp_path / "nostore"), "--out", str(tmp_path / "e3")]) == 2
    assert "not a vitlens run store" in capsys.readouterr().err
