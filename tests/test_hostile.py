"""The hostile-input sweep (issue 10): every bad input, to every command, gets exit status 2, exactly one `error:` line
on stderr, no traceback, and leaves the output folder exactly as it was (names, sizes, bytes, mtimes).

The bad inputs are generated here: small images, a tiny transformers ViT written with save_pretrained and broken
copies of it. The CLI runs in-process (`vitlens.cli.app`) under an alarm, so a hang fails instead of blocking;
only Ctrl-C while importing needs a subprocess.
"""

from __future__ import annotations

import csv
import io
import json
import os
import re
import shutil
import signal
import struct
import subprocess
import sys
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from vitlens.cli import main

pytestmark = pytest.mark.usefixtures("one_torch_thread")

LABELS = ["Sneaker", "Bag", "Coat", "Dress", "Shirt"]
HOSTILE_LABELS = ["a|b", "line\nbreak", "<script>alert(1)</script>", 'quo"te,comma', "x_*y*`z`"]
IMAGE_COMMANDS = ("explain", "heads", "layers", "compare", "swin", "lime", "occlusion", "whatif")
ALARM_S = 30


# ---- fixtures -------------------------------------------------------------------------------------------------------
def _save_vit(path: Path, labels: list[str], seed: int = 1, head: bool = True) -> Path:
    from transformers import ViTConfig, ViTForImageClassification, ViTModel

    cfg = ViTConfig(image_size=32, patch_size=8, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                    intermediate_size=64, num_labels=len(labels), id2label=dict(enumerate(labels)),
                    label2id={n: i for i, n in enumerate(labels)})
    torch.manual_seed(seed)
    (ViTForImageClassification(cfg) if head else ViTModel(cfg)).save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("hostile")


@pytest.fixture(scope="module")
def good_model(root) -> Path:
    return _save_vit(root / "good_model", LABELS)


@pytest.fixture(scope="module")
def markup_model(root) -> Path:
    return _save_vit(root / "markup_model", HOSTILE_LABELS, seed=2)


@pytest.fixture(scope="module")
def good_image(root) -> Path:
    rng = np.random.default_rng(0)
    arr = (rng.random((40, 48, 3)) * 255).astype(np.uint8)
    arr[:20, :24] = (230, 40, 30)
    path = root / "photo.png"
    Image.fromarray(arr).save(path)
    return path


# ---- hostile images -------------------------------------------------------------------------------------------------
def _png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)


def _png_claiming(width: int, height: int, rows: int = 1) -> bytes:
    """A PNG whose header says width x height (RGB, 8 bit) but whose data holds only ``rows`` short rows."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    data = zlib.compress(b"\x00" + b"\x00" * 3 * min(width, 16) * rows)
    return b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", ihdr) + _png_chunk(b"IDAT", data) + _png_chunk(b"IEND", b"")


def _make_bad_image(kind: str, folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    if kind == "bomb":  # Pillow's DecompressionBombError territory: 4e10 pixels claimed
        path = folder / "bomb.png"
        path.write_bytes(_png_claiming(200_000, 200_000))
    elif kind == "lying_header":  # under every limit, but the data stops after one row
        path = folder / "liar.png"
        path.write_bytes(_png_claiming(3000, 2000))
    elif kind == "over_pixel_limit":  # a valid image above VITLENS_MAX_PIXELS (lowered for the case)
        path = folder / "big.png"
        Image.new("RGB", (120, 100), (10, 20, 30)).save(path)
    elif kind == "fifo":
        path = folder / "pipe.png"
        os.mkfifo(path)
    elif kind == "device":
        path = Path("/dev/null")
    elif kind == "garbage":
        path = folder / "garbage.png"
        path.write_bytes(b"not a png at all" * 10)
    elif kind == "empty":
        path = folder / "empty.jpg"
        path.write_bytes(b"")
    elif kind == "truncated":
        buf = io.BytesIO()
        Image.new("RGB", (64, 64), (200, 10, 10)).save(buf, "PNG", compress_level=0)
        path = folder / "cut.png"
        path.write_bytes(buf.getvalue()[: len(buf.getvalue()) // 2])
    elif kind == "missing":
        path = folder / "nowhere.png"
    elif kind == "empty_folder":
        path = folder / "no_images"
        path.mkdir()
    else:
        raise AssertionError(kind)
    return path


IMAGE_KINDS = ("bomb", "lying_header", "over_pixel_limit", "fifo", "device", "garbage", "empty", "truncated",
               "missing", "empty_folder")


# ---- hostile model folders ------------------------------------------------------------------------------------------
def _edit_json(path: Path, **changes) -> None:
    data = json.loads(path.read_text())
    data.update(changes)
    path.write_text(json.dumps(data))


def _break_model(kind: str, good: Path, folder: Path) -> str:
    if kind.startswith("hf:"):
        return kind
    path = folder / kind
    shutil.copytree(good, path)
    weights = path / "model.safetensors"
    pre = path / "preprocessor_config.json"
    base_pre = {"image_processor_type": "ViTImageProcessor", "do_resize": True, "size": {"height": 32, "width": 32},
                "do_normalize": True, "image_mean": [0.5, 0.5, 0.5], "image_std": [0.5, 0.5, 0.5]}
    pre.write_text(json.dumps(base_pre))
    if kind == "truncated_weights":
        weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    elif kind == "garbage_weights":
        weights.write_bytes(os.urandom(4096))
    elif kind == "empty_weights":
        weights.write_bytes(b"")
    elif kind == "wrong_shape":
        _edit_json(path / "config.json", intermediate_size=48)
    elif kind == "id2label_vs_num_labels":
        _edit_json(path / "config.json", num_labels=7)
    elif kind == "id2label_gap":
        _edit_json(path / "config.json", id2label={"0": "a", "1": "b", "2": "c", "3": "d", "9": "e"})
    elif kind == "mean_wrong_length":
        _edit_json(pre, image_mean=[0.5, 0.5])
    elif kind == "std_zero":
        _edit_json(pre, image_std=[0.5, 0.0, 0.5])
    elif kind == "std_nan":
        pre.write_text(json.dumps(base_pre).replace("[0.5, 0.5, 0.5]}", "[0.5, NaN, 0.5]}"))
    elif kind == "size_string":
        _edit_json(pre, size="224")
    elif kind == "crop_pct_odd":
        _edit_json(pre, crop_pct=7.5)
    elif kind == "crop_pct_zero":
        _edit_json(pre, crop_pct=0)
    elif kind == "preprocessor_not_json":
        pre.write_text("{ nope")
    elif kind == "config_not_object":
        (path / "config.json").write_text("[1, 2, 3]")
    elif kind == "no_weights":
        weights.unlink()
    else:
        raise AssertionError(kind)
    return str(path)


MODEL_KINDS = ("truncated_weights", "garbage_weights", "empty_weights", "wrong_shape", "id2label_vs_num_labels",
               "id2label_gap", "mean_wrong_length", "std_zero", "std_nan", "size_string", "crop_pct_odd",
               "crop_pct_zero", "preprocessor_not_json", "config_not_object", "no_weights",
               "hf:google/vit-base-patch16-224", "hf:does/not-exist")
MODEL_COMMANDS = ("explain", "heads", "layers", "compare", "lime", "occlusion", "whatif")


# ---- running a case -------------------------------------------------------------------------------------------------
def _snapshot(folder: Path) -> dict[str, tuple[int, int, bytes]]:
    """Every entry under ``folder``: relative name -> (mtime_ns, size, bytes); folders and other files too."""
    snap = {}
    for p in sorted(folder.rglob("*")):
        st = p.lstat()
        data = p.read_bytes() if p.is_file() and not p.is_symlink() else b""
        snap[str(p.relative_to(folder))] = (st.st_mtime_ns, st.st_size, data)
    return snap


class _Hang(Exception):
    pass


def _alarm(signum, frame):
    raise _Hang(f"the command did not finish within {ALARM_S} s")


def run_fails(args: list[str], watch: list[Path], capsys) -> str:
    """Run the CLI in-process; assert exit 2, one `error:` line on stderr, no traceback, ``watch`` folders unchanged.
    Returns the error line."""
    before = [_snapshot(w) for w in watch]
    capsys.readouterr()
    old = signal.signal(signal.SIGALRM, _alarm)
    signal.alarm(ALARM_S)
    try:
        rc = main(args)
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)
    out, err = capsys.readouterr()
    lines = [line for line in err.splitlines() if line.strip()]
    assert "Traceback" not in err + out, err
    assert rc == 2, f"exit {rc}; stderr: {err!r}"
    assert len(lines) == 1 and lines[0].startswith("error: "), f"stderr should be one error line, got {err!r}"
    for w, b in zip(watch, before):
        assert _snapshot(w) == b, f"{w} changed"
    return lines[0]


def _command_args(command: str, image: str, model: str, out: Path) -> list[str]:
    """A valid command line for ``command`` (small, fast options) writing into ``out``."""
    extra = {
        "lime": ["--segmentation", "grid", "--n-segments", "4", "--num-samples", "8"],
        "occlusion": ["--window", "16"],
        "whatif": ["--edit", "scale:0,0,8,8:2"],
    }.get(command, [])
    return [command, image, "--model", model, *extra, "--out", str(out / f"{command}.png")]


@pytest.fixture
def outdir(tmp_path) -> Path:
    """An output folder that already holds a previous result, which a failed command must leave untouched."""
    out = tmp_path / "out"
    out.mkdir()
    (out / "previous.png").write_bytes(b"previous result")
    return out


# ---- the sweep: images ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", IMAGE_KINDS)
@pytest.mark.parametrize("command", IMAGE_COMMANDS)
def test_bad_image(command, kind, good_model, outdir, tmp_path, capsys, monkeypatch):
    image = _make_bad_image(kind, tmp_path / "in")
    if kind == "over_pixel_limit":
        monkeypatch.setenv("VITLENS_MAX_PIXELS", "10000")
    line = run_fails(_command_args(command, str(image), str(good_model), outdir), [outdir], capsys)
    if kind in ("bomb", "over_pixel_limit"):
        assert "too large" in line and "VITLENS_MAX_PIXELS" in line
    if kind in ("fifo", "device"):
        assert "not a regular file" in line


def test_pixel_limit_is_documented_default_and_checked():
    from vitlens.errors import VitlensError
    from vitlens.images import DEFAULT_MAX_PIXELS, max_pixels

    assert max_pixels() == DEFAULT_MAX_PIXELS == 64_000_000
    os.environ["VITLENS_MAX_PIXELS"] = "zero"
    try:
        with pytest.raises(VitlensError, match="VITLENS_MAX_PIXELS"):
            max_pixels()
    finally:
        del os.environ["VITLENS_MAX_PIXELS"]


def test_image_at_the_pixel_limit_loads(tmp_path, monkeypatch):
    """The limit is inclusive: exactly N pixels load, N + 1 do not (oracle: the header's width x height)."""
    from vitlens.errors import VitlensError
    from vitlens.images import load_image

    Image.new("RGB", (100, 100)).save(tmp_path / "a.png")
    monkeypatch.setenv("VITLENS_MAX_PIXELS", "10000")
    assert load_image(tmp_path / "a.png").size == (100, 100)
    monkeypatch.setenv("VITLENS_MAX_PIXELS", "9999")
    with pytest.raises(VitlensError, match="100x100 pixels"):
        load_image(tmp_path / "a.png")


# ---- the sweep: model folders ---------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def broken_models(root, good_model) -> dict[str, str]:
    return {k: _break_model(k, good_model, root / "broken") for k in MODEL_KINDS}


@pytest.mark.parametrize("kind", MODEL_KINDS)
@pytest.mark.parametrize("command", MODEL_COMMANDS)
def test_bad_model(command, kind, broken_models, good_image, outdir, capsys):
    model = broken_models[kind]
    watch = [outdir] if kind.startswith("hf:") else [outdir, Path(model)]
    line = run_fails(_command_args(command, str(good_image), model, outdir), watch, capsys)
    if kind.startswith("hf:"):
        assert "not in the local cache" in line and "no network" in line and "local folder" in line


# ---- the sweep: options ---------------------------------------------------------------------------------------------

OPTION_CASES = [
    *[pytest.param(c, ["--image-size", s], id=f"{c}-image-size-{s}") for c in MODEL_COMMANDS
      for s in ("100000", "1000", "0", "-3")],
    pytest.param("lime", ["--seed", str(2**70)], id="lime-seed-70bit"),
    pytest.param("lime", ["--seed", "-1"], id="lime-seed-negative"),
    pytest.param("lime", ["--kernel-width", "inf"], id="lime-kernel-width-inf"),
    pytest.param("lime", ["--kernel-width", "nan"], id="lime-kernel-width-nan"),
    pytest.param("lime", ["--hide", "nan"], id="lime-hide-nan"),
    pytest.param("occlusion", ["--baseline", "nan"], id="occlusion-baseline-nan"),
    pytest.param("occlusion", ["--baseline", "inf"], id="occlusion-baseline-inf"),
    pytest.param("occlusion", ["--window", "100000"], id="occlusion-window-huge"),
    pytest.param("occlusion", ["--target", "99999"], id="occlusion-target-99999"),
    pytest.param("explain", ["--target", "99999"], id="explain-rollout-target-99999"),
    pytest.param("explain", ["--method", "attention", "--target", "99999"], id="explain-attention-target-99999"),
    pytest.param("explain", ["--method", "grad_rollout", "--target", "99999"], id="explain-grad-target-99999"),
    pytest.param("compare", ["--target", "99999"], id="compare-target-99999"),
    pytest.param("explain", ["--target", "-1"], id="explain-target-negative"),
    pytest.param("explain", ["--discard-ratio", "nan"], id="explain-discard-nan"),
    pytest.param("explain", ["--residual-weight", "inf"], id="explain-residual-inf"),
]


@pytest.mark.parametrize(("command", "extra"), OPTION_CASES)
def test_bad_option(command, extra, good_model, good_image, outdir, capsys):
    args = _command_args(command, str(good_image), str(good_model), outdir)
    run_fails(args[:-2] + extra + args[-2:], [outdir], capsys)


def test_image_size_error_says_the_bound(good_model, good_image, outdir, capsys):
    line = run_fails(_command_args("heads", str(good_image), str(good_model), outdir)[:-2]
                     + ["--image-size", "1000", "--out", str(outdir / "x.png")], [outdir], capsys)
    assert "1600" in line and "patch tokens" in line


# ---- what-if edits --------------------------------------------------------------------------------------------------
def _edits_file(folder: Path, kind: str) -> Path:
    path = folder / f"{kind}.json"
    if kind == "box_far_outside":
        path.write_text(json.dumps([{"kind": "move", "box": [10**30, 0, 10**30 + 5, 5], "to": [0, 0]}]))
    elif kind == "box_infinite":
        path.write_text('[{"kind": "scale", "box": [0, 0, Infinity, 5], "factor": 2}]')
    elif kind == "deeply_nested":
        path.write_text("[" * 100_000 + "]" * 100_000)
    elif kind == "not_a_list":
        path.write_text('{"edits": 5}')
    elif kind == "huge_file":
        path.write_text('["scale:0,0,4,4:2", ' + '"x", ' * 400_000 + '"x"]')
    elif kind == "binary":
        path.write_bytes(os.urandom(256))
    elif kind == "fifo":
        os.mkfifo(path)
    else:
        raise AssertionError(kind)
    return path


@pytest.mark.parametrize("kind", ["box_far_outside", "box_infinite", "deeply_nested", "not_a_list", "huge_file",
                                  "binary", "fifo"])
def test_bad_edits_file(kind, good_model, good_image, outdir, tmp_path, capsys):
    edits = _edits_file(tmp_path, kind)
    run_fails(["whatif", str(good_image), "--model", str(good_model), "--edits", str(edits),
               "--out", str(outdir / "w.png")], [outdir], capsys)


@pytest.mark.parametrize("edit", ["scale:0,0,8,8:1e9", "scale:0,0,8,8:inf", "scale:0,0,8,8:nan", "scale:0,0,8,8:0",
                                  "move:0,0,8,8:100000,0", "split:0,0,99999999999999999999,8", "move:0,0,8,8",
                                  "scale:0,0,48,40:99"])
def test_bad_edit(edit, good_model, good_image, outdir, capsys, monkeypatch):
    monkeypatch.setenv("VITLENS_MAX_PIXELS", "100000")  # 48*99 x 40*99 > 1e5: the scaled region is refused
    run_fails(["whatif", str(good_image), "--model", str(good_model), "--edit", edit, "--out", str(outdir / "w.png")],
              [outdir], capsys)


# ---- outputs --------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("command", IMAGE_COMMANDS)
def test_output_name_too_long(command, good_model, good_image, outdir, capsys):
    args = _command_args(command, str(good_image), str(good_model), outdir)
    args[-1] = str(outdir / ("n" * 300 + ".png"))
    run_fails(args, [outdir], capsys)


def test_demo_out_name_too_long(outdir, capsys):
    run_fails(["demo", "--out", str(outdir / ("d" * 300))], [outdir], capsys)


@pytest.mark.parametrize("command", IMAGE_COMMANDS)
def test_output_never_replaces_the_input(command, good_model, good_image, tmp_path, capsys):
    image = tmp_path / "in" / "photo.png"
    image.parent.mkdir()
    shutil.copy(good_image, image)
    args = _command_args(command, str(image), str(good_model), tmp_path)
    args[-1] = str(image)
    run_fails(args, [image.parent], capsys)


def test_folder_run_leaves_nothing_when_one_output_fails(good_model, good_image, tmp_path, capsys):
    """Three images into a folder; the third mask's name is taken by a folder, so that mask fails: no figure or
    mask of the other images may stay behind."""
    src = tmp_path / "in"
    src.mkdir()
    for name in ("a", "b", "c"):
        shutil.copy(good_image, src / f"{name}.png")
    out, masks = tmp_path / "out", tmp_path / "masks"
    out.mkdir()
    (masks / "c.npy").mkdir(parents=True)
    run_fails(["explain", str(src), "--model", str(good_model), "--out", str(out), "--save-mask", str(masks)],
              [out, masks], capsys)


def test_existing_figure_kept_when_the_mask_fails(good_model, good_image, tmp_path, capsys):
    """--save-mask into a file that cannot be written (its parent is a file): the existing figure stays as it was."""
    out = tmp_path / "out"
    out.mkdir()
    (out / "fig.png").write_bytes(b"the old figure")
    (out / "blocker").write_bytes(b"a file where a folder should be")
    run_fails(["explain", str(good_image), "--model", str(good_model), "--out", str(out / "fig.png"),
               "--save-mask", str(out / "blocker" / "m.npy")], [out], capsys)


# ---- the backbone's load report and other library chatter -----------------------------------------------------------
def test_backbone_with_class_specific_method_prints_one_line(root, good_image, outdir, capsys):
    backbone = _save_vit(root / "backbone_from_classifier", LABELS)
    cfg = json.loads((backbone / "config.json").read_text())
    cfg["architectures"] = ["ViTModel"]  # a backbone reading a classifier checkpoint: transformers' LOAD REPORT
    (backbone / "config.json").write_text(json.dumps(cfg))
    line = run_fails(["explain", str(good_image), "--model", str(backbone), "--method", "grad_rollout",
                      "--out", str(outdir / "x.png")], [outdir], capsys)
    assert "LOAD REPORT" not in line


# ---- Ctrl-C while importing -----------------------------------------------------------------------------------------
@pytest.mark.parametrize("module", ["click", "torch", "matplotlib.figure"])
def test_ctrl_c_while_importing(module):
    # Ctrl-C arrives while the command line is still importing: raised deterministically when `module` is imported
    # (a timer's SIGINT lands wherever the import happens to be, sometimes inside a library's bare `except:`)
    code = ("import sys\n"
            "class Interrupt:\n"
            "    def find_spec(self, name, path=None, target=None):\n"
            f"        if name == {module!r}:\n"
            "            raise KeyboardInterrupt\n"
            "sys.meta_path.insert(0, Interrupt())\n"
            "sys.argv = ['vitlens', 'models']\n"
            "import runpy; runpy.run_module('vitlens', run_name='__main__')\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert proc.returncode == 130 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    assert lines == ["error: interrupted"], proc.stderr[-2000:]


# ---- labels are data, not markup ------------------------------------------------------------------------------------
def test_whatif_tables_escape_class_names(markup_model, good_image, tmp_path, capsys):
    """Oracle: the CSV read back gives the exact class names; each Markdown row has exactly the header's cells and
    no raw '<script>' or line break inside a row."""
    from vitlens.methods.whatif import markdown_cell, whatif
    from vitlens.models import load_model

    model = load_model(str(markup_model))
    picture = Image.open(good_image).convert("RGB")
    res = whatif(model, picture, ["scale:0,0,8,8:2", "move:0,0,8,8:20,20"], top_k=5)
    md = res.markdown()
    rows = md.splitlines()
    assert len(rows) == 2 + 3
    cells = [len(re.split(r"(?<!\\)\|", r)) for r in rows]
    assert len(set(cells)) == 1, md
    assert "<script>" not in md and "&lt;script&gt;" in md
    assert markdown_cell("a|b") == "a\\|b" and markdown_cell("line\nbreak") == "line break"
    recs = list(csv.DictReader(io.StringIO(res.csv())))
    assert {r["top1"] for r in recs} <= set(HOSTILE_LABELS)
    assert sorted(recs[0][f"top{k}"] for k in range(1, 6)) == sorted(HOSTILE_LABELS)


def test_demo_index_url_encodes_file_names_and_escapes_captions(tmp_path):
    from urllib.parse import unquote

    from vitlens.viz.figures import write_index

    names = ["a#1.png", "50%.png", "q?x.png", 'quote".png', "sp ace.png"]
    page = write_index(tmp_path / "index.html", "t <b>", [(f"<i>{n}</i>", n) for n in names], note="x & y")
    text = page.read_text()
    srcs = re.findall(r'src="([^"]*)"', text)
    assert [unquote(s.replace("&amp;", "&")) for s in srcs] == names
    assert srcs == ["a%231.png", "50%25.png", "q%3Fx.png", "quote%22.png", "sp%20ace.png"]  # RFC 3986 by hand
    assert "<i>" not in text and "<b>" not in text and "x &amp; y" in text


def test_nan_in_model_output_is_refused_by_whatif():
    from vitlens.errors import VitlensError
    from vitlens.images import Preprocess
    from vitlens.methods.whatif import whatif
    from vitlens.models.classifier import CallableClassifier

    def nan_model(x: torch.Tensor) -> torch.Tensor:
        return torch.full((x.shape[0], 3), float("nan"))

    model = CallableClassifier(nan_model, Preprocess((16, 16)), labels=["a", "b", "c"])
    with pytest.raises(VitlensError, match="NaN"):
        whatif(model, Image.new("RGB", (16, 16)), ["scale:0,0,4,4:2"])
