"""What-if edits (pixel checks computed by hand), their parsing, the table, and the lime/occlusion/whatif CLI."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from vitlens.errors import VitlensError
from vitlens.images import Preprocess
from vitlens.methods.whatif import Edit, apply_edit, check_edit, load_edits, parse_edit, whatif
from vitlens.models.classifier import CallableClassifier


def _image(w: int = 40, h: int = 30) -> tuple[Image.Image, np.ndarray]:
    rng = np.random.default_rng(0)
    arr = (rng.random((h, w, 3)) * 255).astype(np.uint8)
    return Image.fromarray(arr), arr


# ---- parsing --------------------------------------------------------------------------------------------------------
def test_parse_edits():
    assert parse_edit("move:1,2,5,6:10,12") == Edit("move", (1, 2, 5, 6), to=(10, 12))
    assert parse_edit("scale:0,0,4,4:1.5").factor == 1.5
    assert parse_edit("split:0,0,8,4").gap is None and parse_edit("split:0,0,8,4:2").gap == 2
    assert str(parse_edit("move:1,2,5,6:10,12")) == "move:1,2,5,6:10,12"


@pytest.mark.parametrize("text,match", [
    ("rotate:0,0,4,4:90", "unknown edit kind"),
    ("scale:0,0,4,4:0", "positive"),
    ("scale:0,0,4,4:-2", "positive"),
    ("scale:0,0,4,4:abc", "number"),
    ("move:0,0,4:1,1", "4 comma-separated"),
    ("move:0,0,4,x:1,1", "integers"),
    ("move:0,0,4,4", "malformed"),
    ("split:4,0,4,4", "empty"),
])
def test_parse_errors(text, match):
    with pytest.raises(VitlensError, match=match):
        parse_edit(text)


def test_box_outside_the_image():
    with pytest.raises(VitlensError, match="outside"):
        check_edit(parse_edit("scale:30,0,41,10:2"), (40, 30))
    with pytest.raises(VitlensError, match="outside"):
        check_edit(parse_edit("move:0,0,10,10:35,0"), (40, 30))
    check_edit(parse_edit("move:0,0,10,10:30,20"), (40, 30))


def test_json_edits(tmp_path):
    p = tmp_path / "e.json"
    p.write_text(json.dumps({"edits": ["split:0,0,8,4", {"kind": "scale", "box": [0, 0, 4, 4], "factor": 2}]}))
    assert [e.kind for e in load_edits(p)] == ["split", "scale"]
    p.write_text(json.dumps([{"kind": "move", "box": [0, 0, 4, "a"], "to": [1, 1]}]))
    with pytest.raises(VitlensError, match="malformed"):
        load_edits(p)


# ---- pixels ---------------------------------------------------------------------------------------------------------
def test_move_with_mean_fill():
    img, arr = _image()
    out = np.asarray(apply_edit(img, parse_edit("move:2,3,10,9:25,15"), fill="mean")).astype(int)
    hole = np.zeros((30, 40), bool)
    hole[3:9, 2:10] = True
    mean = np.round(arr[~hole].astype(float).mean(0))
    assert (out[15:21, 25:33] == arr[3:9, 2:10]).all()  # the region, at its destination
    assert (out[3:9, 2:10] == mean).all()  # the hole: the mean colour of the rest
    untouched = ~hole
    untouched[15:21, 25:33] = False
    assert (out[untouched] == arr[untouched]).all()


def test_move_overlapping_its_own_box():
    img, arr = _image()
    out = np.asarray(apply_edit(img, parse_edit("move:0,0,10,10:5,0"), fill="mean")).astype(int)
    assert (out[0:10, 5:15] == arr[0:10, 0:10]).all()
    mean = np.round(np.concatenate([arr[10:].reshape(-1, 3), arr[:10, 10:].reshape(-1, 3)]).astype(float).mean(0))
    assert (out[0:10, 0:5] == mean).all()


def test_scale_doubles_about_the_centre_and_half():
    arr = np.zeros((30, 40, 3), np.uint8)
    arr[10:14, 20:24] = (200, 100, 50)  # a 4x4 block, centre (22, 12)
    img = Image.fromarray(arr)
    out = np.asarray(apply_edit(img, parse_edit("scale:20,10,24,14:2"), fill="mean"))
    assert (out[8:16, 18:26] == (200, 100, 50)).all()  # 8x8, same centre
    assert (out[:8] == 0).all() and (out[16:] == 0).all() and (out[:, :18] == 0).all() and (out[:, 26:] == 0).all()
    out = np.asarray(apply_edit(img, parse_edit("scale:20,10,24,14:0.5"), fill="mean"))
    assert (out[11:13, 21:23] == (200, 100, 50)).all()  # 2x2, same centre
    assert out.reshape(-1, 3).any(1).sum() == 4  # the rest of the hole is the (black) mean colour


def test_split_moves_the_halves_apart():
    img, arr = _image()
    out = np.asarray(apply_edit(img, parse_edit("split:10,5,20,15"), fill="mean")).astype(int)
    # halves 5 px wide, gap 5: left moves 2 px left, right moves 3 px right
    assert (out[5:15, 8:13] == arr[5:15, 10:15]).all()
    assert (out[5:15, 18:23] == arr[5:15, 15:20]).all()
    hole = np.zeros((30, 40), bool)
    hole[5:15, 10:20] = True
    mean = np.round(arr[~hole].astype(float).mean(0))
    assert (out[5:15, 13:18] == mean).all()
    assert (out[:, :8] == arr[:, :8]).all() and (out[:, 23:] == arr[:, 23:]).all()
    out = np.asarray(apply_edit(img, parse_edit("split:0,5,10,15:4"), fill="mean")).astype(int)
    assert (out[5:15, 0:3] == arr[5:15, 2:5]).all()  # the left half is cropped at the border


def test_blur_fill_uses_the_surroundings_and_inpaint_runs():
    arr = np.zeros((30, 40, 3), np.uint8)
    arr[:, :] = (0, 0, 255)
    arr[10:20, 10:20] = (255, 0, 0)  # a red square on blue
    img = Image.fromarray(arr)
    out = np.asarray(apply_edit(img, parse_edit("move:10,10,20,20:28,18"), fill="blur")).astype(int)
    assert (np.abs(out[10:20, 10:20] - (0, 0, 255)) <= 1).all()  # no red leaks into the hole
    pytest.importorskip("skimage")
    out = np.asarray(apply_edit(img, parse_edit("move:10,10,20,20:28,18"), fill="inpaint")).astype(int)
    assert (np.abs(out[10:20, 10:20] - (0, 0, 255)) <= 2).all()


def test_whatif_table():
    def red_detector(x: torch.Tensor) -> torch.Tensor:  # logit 0: redness of the top-left quarter; logit 1: rest
        tl = x[:, 0, :16, :16].mean((1, 2)) - x[:, 2, :16, :16].mean((1, 2))
        return torch.stack([10 * tl, torch.zeros_like(tl)], 1)

    arr = np.zeros((32, 32, 3), np.uint8)
    arr[:, :] = (0, 0, 255)
    arr[0:16, 0:16] = (255, 0, 0)
    model = CallableClassifier(red_detector, Preprocess((32, 32), (0, 0, 0), (1, 1, 1)), labels=["red", "other"])
    res = whatif(model, Image.fromarray(arr), ["move:0,0,16,16:16,16"], top_k=2, fill="mean")
    assert res.rows[0].top[0][0] == "red" and res.rows[1].top[0][0] == "other"
    md = res.markdown()
    assert "| original |" in md and "`move:0,0,16,16:16,16`" in md and "p(red)" in md
    assert res.csv().splitlines()[0] == "image,edit,top1,p1,top2,p2,p(red)"


# ---- CLI ------------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def photo(tmp_path_factory) -> Path:
    img, _ = _image(48, 40)
    p = tmp_path_factory.mktemp("img") / "photo.png"
    img.save(p)
    return p


@pytest.fixture(scope="module")
def main():
    from vitlens.cli import main

    return main


def test_cli_whatif(main, vit3_dir, photo, tmp_path, capsys):
    out = tmp_path / "w.png"
    rc = main(["whatif", str(photo), "--model", str(vit3_dir), "--edit", "move:0,0,10,10:20,20",
               "--edit", "scale:5,5,25,25:0.5", "--edit", "split:0,0,20,20", "--out", str(out)])
    assert rc == 0
    assert out.is_file() and out.with_suffix(".csv").is_file() and out.with_suffix(".md").is_file()
    assert "| original |" in capsys.readouterr().out
    assert len(out.with_suffix(".csv").read_text().splitlines()) == 5


@pytest.mark.parametrize("edit,match", [
    ("move:40,0,50,10:0,0", "outside"),
    ("scale:0,0,10,10:0", "positive"),
    ("twist:0,0,10,10", "unknown edit kind"),
    ("move:0,0,10:0,0", "comma-separated"),
])
def test_cli_whatif_errors(main, vit3_dir, photo, tmp_path, capsys, edit, match):
    out = tmp_path / "w.png"
    rc = main(["whatif", str(photo), "--model", str(vit3_dir), "--edit", edit, "--out", str(out)])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and err.startswith("error:") and match in err and "\n" not in err
    assert list(tmp_path.iterdir()) == []


def test_cli_lime_and_occlusion(main, vit3_dir, photo, tmp_path, capsys):
    out = tmp_path / "l.png"
    rc = main(["lime", str(photo), "--model", str(vit3_dir), "--segmentation", "grid", "--n-segments", "4",
               "--num-samples", "24", "--batch-size", "8", "--out", str(out)])
    assert rc == 0 and out.is_file(), capsys.readouterr().err
    rc = main(["lime", str(photo), "--model", str(vit3_dir), "--hide", "drop", "--segmentation", "grid",
               "--num-samples", "16", "--out", str(tmp_path / "d.png")])
    assert rc == 0, capsys.readouterr().err
    rc = main(["occlusion", str(photo), "--model", str(vit3_dir), "--window", "8", "--stride", "8,4",
               "--out", str(tmp_path / "o.png")])
    assert rc == 0 and (tmp_path / "o.png").is_file()
    rc = main(["lime", str(photo), "--model", str(vit3_dir), "--hide", "drop", "--out", str(tmp_path / "x.png")])
    assert rc == 2 and "grid" in capsys.readouterr().err
    rc = main(["occlusion", str(photo), "--model", str(vit3_dir), "--window", "0", "--out", str(tmp_path / "y.png")])
    assert rc == 2
    assert not (tmp_path / "x.png").exists() and not (tmp_path / "y.png").exists()


def _png_size(path: Path) -> tuple[int, int]:
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n", f"{path} is not a PNG"
    with Image.open(path) as im:
        im.load()
        return im.size


def _direct_probs(vit3_dir: Path, picture: Image.Image) -> torch.Tensor:
    """The transformers model's own softmax on ``picture`` after vitlens' preprocessing of that model."""
    from transformers import ViTForImageClassification

    import vitlens

    x, _ = vitlens.load_model(str(vit3_dir)).preprocess([picture])
    module = ViTForImageClassification.from_pretrained(vit3_dir).eval()
    with torch.no_grad():
        return module(pixel_values=x).logits.softmax(-1)[0]


def test_cli_whatif_table_holds_the_models_probabilities(main, vit3_dir, photo, tmp_path, capsys):
    """Every number of the CSV table is the model's probability computed directly on the edited image."""
    import csv

    from transformers import AutoConfig

    from vitlens.images import load_image

    edits = ["move:0,0,10,10:20,20", "scale:5,5,25,25:0.5", "split:0,0,20,20"]
    out = tmp_path / "w.png"
    args = ["whatif", str(photo), "--model", str(vit3_dir), "--out", str(out)]
    assert main([*args[:4], *[a for e in edits for a in ("--edit", e)], *args[4:]]) == 0, capsys.readouterr().err
    rows = list(csv.DictReader(out.with_suffix(".csv").open()))
    assert [r["edit"] for r in rows] == ["", *edits]
    names = AutoConfig.from_pretrained(vit3_dir).id2label
    original = load_image(photo)
    reference = None
    for row in rows:
        picture = original if not row["edit"] else apply_edit(original, parse_edit(row["edit"]), fill="blur")
        probs = _direct_probs(vit3_dir, picture)
        order = probs.argsort(descending=True).tolist()
        reference = order[0] if reference is None else reference
        for k, cls in enumerate(order, 1):  # 3 classes: the top-3 is every class
            assert row[f"top{k}"] == names[cls]
            assert float(row[f"p{k}"]) == pytest.approx(float(probs[cls]), abs=2e-6)
        assert float(row[f"p({names[reference]})"]) == pytest.approx(float(probs[reference]), abs=2e-6)
    width, height = _png_size(out)
    assert width > height > 100


def test_cli_lime_hide_drop_is_the_librarys_token_drop(main, vit3_dir, photo, tmp_path, capsys):
    """`--hide drop` runs LIME with tokens dropped: the printed probabilities are the model's own on the image, the
    surrogate R^2 is the library's drop run (not the default grey hiding), the figure is the library's figure."""
    from functools import partial

    import vitlens
    from vitlens.images import load_image
    from vitlens.methods.lime import Lime
    from vitlens.models.base import label_of
    from vitlens.viz.figures import percent, save_figure
    from vitlens.viz.lime_figures import lime_figure

    out = tmp_path / "d.png"
    capsys.readouterr()
    rc = main(["lime", str(photo), "--model", str(vit3_dir), "--hide", "drop", "--segmentation", "grid",
               "--num-samples", "16", "--out", str(out)])
    printed = capsys.readouterr().out
    assert rc == 0, printed
    model = vitlens.load_model(str(vit3_dir))
    x, views = model.preprocess([load_image(photo)])  # the tensor and the resized view the CLI draws on
    view = views[0]
    probs = _direct_probs(vit3_dir, load_image(photo))
    top = probs.argsort(descending=True)[:2].tolist()
    for rank, cls in enumerate(top, 1):
        assert f"top-{rank}: {label_of(model, cls)} ({percent(float(probs[cls]))})" in printed
    drop = Lime(model, segmentation="grid", num_samples=16, hide="drop").explain(x)
    grey = Lime(model, segmentation="grid", num_samples=16).explain(x)
    assert f"surrogate R^2 (top-1): {float(drop.extras['score'][0]):.3f}" in printed
    assert not torch.allclose(drop.extras["class_weights"], grey.extras["class_weights"])
    mine = tmp_path / "library.png"
    save_figure(lime_figure(view, drop, partial(label_of, model), top=2, num_features=5), mine)
    assert _png_size(out) == _png_size(mine)
    assert np.array_equal(np.asarray(Image.open(out)), np.asarray(Image.open(mine)))
