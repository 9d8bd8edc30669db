"""The `vitlens` command line, end to end on tiny models built here (HF folders and a timm state dict)."""

from __future__ import annotations

import functools
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from vitlens import GradRollout, Rollout, load_image, load_model
from vitlens.cli import demo as demo_cli
from vitlens.cli import main

pytestmark = pytest.mark.usefixtures("one_torch_thread")

LABELS = ["Sneaker", "Bag", "Coat", "Dress", "Shirt"]
TIMM_KW = {"img_size": 32, "patch_size": 8, "depth": 2, "num_classes": 5}


# ---- fixtures -------------------------------------------------------------------------------------------------------
def _vit_config():
    from transformers import ViTConfig

    return ViTConfig(image_size=32, patch_size=8, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                     intermediate_size=64, num_labels=5, id2label=dict(enumerate(LABELS)),
                     label2id={n: i for i, n in enumerate(LABELS)})


@pytest.fixture(scope="session")
def hf_dir(tmp_path_factory) -> Path:
    """A tiny HF ViT classifier (32 px, patch 8 -> 4x4 grid, 2 blocks, 2 heads, 5 named classes)."""
    from transformers import ViTForImageClassification

    torch.manual_seed(1)
    path = tmp_path_factory.mktemp("models") / "hf_vit"
    ViTForImageClassification(_vit_config()).save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def backbone_dir(tmp_path_factory) -> Path:
    """The same architecture without a classification head."""
    from transformers import ViTModel

    torch.manual_seed(2)
    path = tmp_path_factory.mktemp("models") / "hf_backbone"
    ViTModel(_vit_config()).save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def timm_weights(tmp_path_factory) -> Path:
    """A tiny timm ViT's state dict as safetensors."""
    import timm
    from safetensors.torch import save_file

    torch.manual_seed(3)
    module = timm.create_model("vit_tiny_patch16_224", pretrained=False, **TIMM_KW)
    path = tmp_path_factory.mktemp("models") / "timm_tiny.safetensors"
    save_file({k: v.contiguous() for k, v in module.state_dict().items()}, str(path))
    return path


def _photo(path: Path, seed: int, size=(48, 40)) -> Path:
    rng = np.random.default_rng(seed)
    arr = (rng.random((size[1], size[0], 3)) * 255).astype(np.uint8)
    arr[: size[1] // 2, : size[0] // 2] = (230, 40, 30)  # a block, so maps are not all noise
    Image.fromarray(arr).save(path)
    return path


@pytest.fixture(scope="session")
def image(tmp_path_factory) -> Path:
    return _photo(tmp_path_factory.mktemp("img") / "photo.png", 0)


@pytest.fixture(scope="session")
def mode_folder(tmp_path_factory) -> Path:
    """One image per awkward mode: L, LA, RGBA, P (with transparency), I;16, CMYK, EXIF-rotated JPEG."""
    d = tmp_path_factory.mktemp("modes")
    rgb = Image.open(_photo(d / "rgb.png", 5))
    rgb.convert("L").save(d / "gray.png")
    rgb.convert("LA").save(d / "gray_alpha.png")
    rgba = rgb.convert("RGBA")
    rgba.putalpha(128)
    rgba.save(d / "rgba.png")
    pal = rgb.convert("P", palette=Image.Palette.ADAPTIVE, colors=16)
    pal.info["transparency"] = 0
    pal.save(d / "palette.png", transparency=0)
    deep = Image.fromarray(np.asarray(rgb.convert("L"), dtype=np.uint16) * 257)
    assert deep.mode == "I;16"
    deep.save(d / "deep.png")
    rgb.convert("CMYK").save(d / "cmyk.tif")
    exif = Image.Exif()
    exif[0x0112] = 6
    rgb.save(d / "rotated.jpg", exif=exif.tobytes(), quality=90)
    (d / "rgb.png").unlink()
    return d


def run(argv: list[str], capsys) -> tuple[int, str, str]:
    """Run the CLI in-process; returns (exit status, stdout, stderr)."""
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def _check_png(path: Path, min_w: int = 300, min_h: int = 150) -> None:
    assert path.is_file(), path
    with Image.open(path) as im:
        assert im.format == "PNG"
        assert im.width >= min_w and im.height >= min_h, im.size


@functools.lru_cache(maxsize=4)
def _library_model(spec: str):
    return load_model(spec)


def _library_map(model_spec, path: Path, method, **kw) -> np.ndarray:
    """The map computed by the library directly (the independent check of what the CLI saved)."""
    model = _library_model(str(model_spec))
    target = kw.pop("target", None)
    x, _ = model.preprocess([load_image(path)])
    return method(model, **kw).explain(x, target=target).numpy()[0]


def _check_mask(mask_path: Path, expected: np.ndarray) -> None:
    mask = np.load(mask_path)
    assert mask.dtype == np.float32
    assert mask.shape == expected.shape
    assert mask.max() == pytest.approx(1.0)
    np.testing.assert_allclose(mask, expected, rtol=1e-5, atol=1e-6)


def _no_outputs(folder: Path) -> None:
    left = sorted(p.name for p in folder.rglob("*")) if folder.exists() else []
    assert left == [], left


# ---- explain --------------------------------------------------------------------------------------------------------
def test_explain_rollout_writes_figure_and_mask(hf_dir, image, tmp_path, capsys):
    out, mask = tmp_path / "fig.png", tmp_path / "mask.npy"
    code, stdout, err = run(["explain", image, "--model", hf_dir, "--discard-ratio", "0.5", "--start-layer", "1",
                             "--out", out, "--save-mask", mask], capsys)
    assert code == 0, err
    assert f"wrote {out}" in stdout and "top prediction:" in stdout
    _check_png(out)
    _check_mask(mask, _library_map(hf_dir, image, Rollout, discard_ratio=0.5, start_layer=1))
    assert np.load(mask).shape == (4, 4)


def test_explain_grad_rollout_target_by_name_equals_index(hf_dir, image, tmp_path, capsys):
    expected = _library_map(hf_dir, image, GradRollout, target=2)
    code, stdout, err = run(["explain", image, "--model", hf_dir, "--method", "grad_rollout", "--target", "cOaT",
                             "--out", tmp_path / "a.png", "--save-mask", tmp_path / "a.npy"], capsys)
    assert code == 0, err
    assert "explained class 'Coat' (index 2)" in stdout
    _check_mask(tmp_path / "a.npy", expected)
    code, _, err = run(["explain", image, "--model", hf_dir, "--method", "grad_rollout", "--target", "2",
                        "--out", tmp_path / "b.png", "--save-mask", tmp_path / "b.npy"], capsys)
    assert code == 0, err
    np.testing.assert_array_equal(np.load(tmp_path / "a.npy"), np.load(tmp_path / "b.npy"))


def test_explain_folder_of_every_mode_batched(hf_dir, mode_folder, tmp_path, capsys):
    out, masks = tmp_path / "figs", tmp_path / "masks"
    code, stdout, err = run(["explain", mode_folder, "--model", hf_dir, "--batch-size", "3", "--out", out,
                             "--save-mask", masks], capsys)
    assert code == 0, err
    images = sorted(mode_folder.iterdir())
    assert len(images) == 7
    assert sorted(p.name for p in out.iterdir()) == sorted(f"{p.stem}_rollout.png" for p in images)
    assert sorted(p.name for p in masks.iterdir()) == sorted(f"{p.stem}.npy" for p in images)
    assert "wrote 7 figures" in stdout
    for p in images:
        _check_png(out / f"{p.stem}_rollout.png")
        _check_mask(masks / f"{p.stem}.npy", _library_map(hf_dir, p, Rollout))


def test_vit_explain_aliases(hf_dir, image, tmp_path, capsys):
    code, _, err = run(["explain", "--image_path", image, "--model", hf_dir, "--head_fusion", "max", "--discard_ratio",
                        "0.5", "--out", tmp_path / "r.png", "--save-mask", tmp_path / "r.npy"], capsys)
    assert code == 0, err
    _check_mask(tmp_path / "r.npy", _library_map(hf_dir, image, Rollout, head_fusion="max", discard_ratio=0.5))
    # --category_index without --method means gradient rollout for that class (vit-explain's behaviour)
    code, stdout, err = run(["explain", "--image_path", image, "--model", hf_dir, "--category_index", "3",
                             "--discard_ratio", "0.5", "--out", tmp_path / "g.png", "--save-mask", tmp_path / "g.npy"],
                            capsys)
    assert code == 0, err
    assert "index 3" in stdout
    _check_png(tmp_path / "g.png")
    _check_mask(tmp_path / "g.npy", _library_map(hf_dir, image, GradRollout, discard_ratio=0.5, target=3))


def test_explain_attention_method_and_ignored_options(hf_dir, image, tmp_path, capsys):
    code, _, err = run(["explain", image, "--model", hf_dir, "--method", "attention", "--query", "1,2",
                        "--head-fusion", "max", "--out", tmp_path / "a.png"], capsys)
    assert code == 0, err
    assert "--head-fusion does not apply to attention" in err
    _check_png(tmp_path / "a.png")


def test_timm_model_with_weights_and_kwargs(timm_weights, image, tmp_path, capsys):
    import timm
    from safetensors.torch import load_file

    from vitlens import wrap

    code, _, err = run(["explain", image, "--model", "timm:vit_tiny_patch16_224", "--weights", timm_weights,
                        "--timm-kwargs", json.dumps(TIMM_KW), "--out", tmp_path / "t.png",
                        "--save-mask", tmp_path / "t.npy"], capsys)
    assert code == 0, err
    _check_png(tmp_path / "t.png")
    module = timm.create_model("vit_tiny_patch16_224", pretrained=False, **TIMM_KW)
    module.load_state_dict(load_file(str(timm_weights)))
    model = wrap(module)
    assert model.preprocess.size == (32, 32)  # the built model's size, not the hub config's 224
    x, _ = model.preprocess([load_image(image)])
    _check_mask(tmp_path / "t.npy", Rollout(model).explain(x).numpy()[0])


# ---- other commands -------------------------------------------------------------------------------------------------
def _recorder(monkeypatch, name: str) -> list:
    """Record the arguments of the figure builder ``name`` as `vitlens.viz.plots` calls it (then draw as usual)."""
    from vitlens.viz import plots

    calls: list = []
    original = getattr(plots, name)

    def spy(*args, **kwargs):
        calls.append(args)
        return original(*args, **kwargs)

    monkeypatch.setattr(plots, name, spy)
    return calls


def _not_blank(path: Path) -> None:
    _check_png(path)
    with Image.open(path) as im:
        assert np.asarray(im.convert("L"), dtype=np.float32).std() > 5  # something was drawn


def test_heads_layers_compare_draw_the_library_maps(hf_dir, image, tmp_path, capsys, monkeypatch):
    from vitlens import AttentionMaps

    model = _library_model(str(hf_dir))
    x, _ = model.preprocess([load_image(image)])
    heads, layers, compare = (_recorder(monkeypatch, n) for n in ("heads_figure", "layers_figure", "compare_figure"))

    code, stdout, err = run(["heads", image, "--model", hf_dir, "--query", "1,2", "--out", tmp_path / "h.png"], capsys)
    assert code == 0, err
    expected = AttentionMaps(model, query=(1, 2)).explain(x).extras["per_head"][0]
    torch.testing.assert_close(torch.as_tensor(heads[0][1]), expected)
    assert heads[0][3] == (1, 2)

    code, _, err = run(["layers", image, "--model", hf_dir, "--head-fusion", "min", "--out", tmp_path / "l.png"],
                       capsys)
    assert code == 0, err
    expected = Rollout(model, head_fusion="min", per_layer=True).explain(x).extras["per_layer"][0]
    torch.testing.assert_close(torch.as_tensor(layers[0][1]), expected)
    assert list(layers[0][2]) == [0, 1]

    code, _, err = run(["compare", image, "--model", hf_dir, "--discard-ratio", "0.5", "--target", "bag",
                        "--out", tmp_path / "c.png"], capsys)
    assert code == 0, err
    panels = compare[0][1]
    wanted = [Rollout(model, head_fusion=f, discard_ratio=0.5).explain(x).numpy()[0] for f in ("mean", "max", "min")]
    wanted.append(GradRollout(model, discard_ratio=0.5).explain(x, target=1).numpy()[0])
    assert len(panels) == 4 and "'Bag' (class 1" in panels[3][0]
    for (_, got), want in zip(panels, wanted):
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
    for name in ("h.png", "l.png", "c.png"):
        _not_blank(tmp_path / name)


def test_compare_on_backbone_leaves_out_grad_rollout(backbone_dir, image, tmp_path, capsys):
    code, _, err = run(["compare", image, "--model", backbone_dir, "--out", tmp_path / "c.png"], capsys)
    assert code == 0, err
    assert "grad rollout panel is left out" in err
    _check_png(tmp_path / "c.png")


def test_models_lists_families(capsys):
    from vitlens.models import zoo

    code, stdout, _ = run(["models"], capsys)
    assert code == 0
    assert "hf:" in stdout and "timm:" in stdout
    if not zoo.zoo_models():
        assert "none installed yet" in stdout
    for name in zoo.zoo_models():
        line = next(ln for ln in stdout.splitlines() if f"vitlens:{name} " in ln)
        assert "test mAP" in line and "MODEL_CARD.md" in line


def test_demo_with_random_model(tmp_path, capsys, monkeypatch, hf_dir):
    from vitlens.models import zoo

    # the demo's own random ViT is 224 px / 6 blocks; a tiny one keeps this test quick (random_vit is tested below)
    monkeypatch.setattr(zoo, "zoo_models", lambda: {})
    monkeypatch.setattr(demo_cli, "random_vit", lambda: load_model(str(hf_dir)))
    code, stdout, err = run(["demo", "--out", tmp_path / "demo"], capsys)
    assert code == 0, err
    assert "randomly initialised ViT" in stdout
    pngs = sorted((tmp_path / "demo").glob("*.png"))
    assert [p.name for p in pngs] == [f"demo_cat_{s}.png" for s in
                                      ("grad_rollout", "heads", "layers", "rollout_max", "rollout_mean")]
    for p in pngs:
        _check_png(p)
    page = (tmp_path / "demo" / "index.html").read_text()
    assert all(p.name in page for p in pngs)
    assert "index.html" in stdout


def test_random_vit_and_bundled_image(monkeypatch):
    from vitlens.models import zoo

    model = demo_cli.random_vit()
    cfg = model.module.config
    assert (cfg.image_size, cfg.patch_size, cfg.hidden_size, cfg.num_hidden_layers, cfg.num_attention_heads,
            cfg.num_labels) == (224, 16, 192, 6, 3, 10)
    again = demo_cli.random_vit()
    assert torch.equal(model.module.classifier.weight, again.module.classifier.weight)  # seeded
    monkeypatch.setattr(zoo, "zoo_models", lambda: {})  # the fallback the demo uses without embedded models
    _, images, note = demo_cli.demo_inputs()
    with Image.open(images[0]) as im:
        assert im.mode == "RGB" and min(im.size) >= 224
    assert images[0].stat().st_size < 150_000
    assert "randomly initialised" in note


# ---- failures: one line, exit 2, no traceback, nothing written ------------------------------------------------------
@pytest.fixture(scope="session")
def bad_inputs(tmp_path_factory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("bad")
    (d / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\nthis is not really a png" * 4)
    (d / "empty").mkdir()
    (d / "noconfig").mkdir()
    (d / "noconfig" / "weights.bin").write_bytes(b"0")
    mixed = d / "mixed"
    mixed.mkdir()
    _photo(mixed / "a_good.png", 1)
    (mixed / "b_bad.png").write_bytes(b"garbage")
    _photo(mixed / "c_good.png", 2)
    return {"dir": d, "corrupt": d / "corrupt.png", "empty": d / "empty", "noconfig": d / "noconfig", "mixed": mixed}


CASES = {
    "missing image": (["explain", "{dir}/nope.png", "--model", "{hf}"], "image not found"),
    "corrupt image": (["explain", "{corrupt}", "--model", "{hf}"], "cannot read image"),
    "corrupt image in a folder": (["explain", "{mixed}", "--model", "{hf}"], "b_bad.png"),
    "folder without images": (["explain", "{empty}", "--model", "{hf}"], "holds no images"),
    "unknown model spec": (["explain", "{img}", "--model", "no-such-model"], "cannot load model"),
    "folder without config.json": (["explain", "{img}", "--model", "{noconfig}"], "config.json"),
    "discard ratio 1.0": (["explain", "{img}", "--model", "{hf}", "--discard-ratio", "1.0"], "discard_ratio"),
    "discard ratio -0.1": (["explain", "{img}", "--model", "{hf}", "--discard_ratio", "-0.1"], "discard_ratio"),
    "head fusion median": (["explain", "{img}", "--model", "{hf}", "--head-fusion", "median"], "median"),
    "start layer out of range": (["explain", "{img}", "--model", "{hf}", "--start-layer", "2"], "start_layer"),
    "target out of range": (["explain", "{img}", "--model", "{hf}", "--category_index", "99"], "out of range"),
    "unknown label": (["explain", "{img}", "--model", "{hf}", "--method", "grad_rollout", "--target", "zebra"],
                      "unknown class name 'zebra'"),
    "grad rollout on a backbone": (["explain", "{img}", "--model", "{backbone}", "--method", "grad_rollout"],
                                   "classification head"),
    "cuda on a CPU machine": (["explain", "{img}", "--model", "{hf}", "--device", "cuda"], "CUDA"),
    "query outside the grid": (["heads", "{img}", "--model", "{hf}", "--query", "9,9"], "outside the 4x4"),
    "bad query text": (["heads", "{img}", "--model", "{hf}", "--query", "left"], "query must be"),
    "batch size 0": (["explain", "{img}", "--model", "{hf}", "--batch-size", "0"], "batch-size"),
    "missing --model": (["layers", "{img}"], "--model"),
    "timm weights without kwargs": (["explain", "{img}", "--model", "timm:vit_tiny_patch16_224", "--weights",
                                     "{timm}"], "do not fit"),
    "bad timm kwargs": (["explain", "{img}", "--model", "timm:vit_tiny_patch16_224", "--timm-kwargs", "{{oops"],
                        "not valid JSON"),
    "wrong --out suffix": (["explain", "{img}", "--model", "{hf}", "--out-suffix", ".jpg"], "should end in .png"),
}


@pytest.mark.parametrize("case", list(CASES), ids=list(CASES))
def test_bad_input_is_one_clean_line(case, bad_inputs, hf_dir, backbone_dir, timm_weights, image, tmp_path, capsys):
    argv, expected = CASES[case]
    names = {k: str(v) for k, v in bad_inputs.items()} | {"hf": hf_dir, "backbone": backbone_dir, "img": image,
                                                          "timm": timm_weights}
    argv = [a.format(**names) for a in argv]
    out_dir = tmp_path / "out"
    suffix = ".png"
    if "--out-suffix" in argv:
        i = argv.index("--out-suffix")
        suffix = argv[i + 1]
        del argv[i : i + 2]
    single = argv[0] != "explain" or Path(argv[1]).is_file() or not Path(argv[1]).exists()
    out = out_dir / f"fig{suffix}" if single else out_dir / "figs"
    extra = ["--save-mask", out_dir / ("m.npy" if single else "masks")] if argv[0] == "explain" else []
    code, stdout, err = run([*argv, "--out", out, *extra], capsys)
    assert code == 2, (stdout, err)
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("error: ")
    assert expected in lines[0], lines[0]
    assert "Traceback" not in err
    _no_outputs(out_dir)


def test_console_entry_point_error_is_one_line(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "vitlens.cli", "explain", str(tmp_path / "missing.png"), "--model",
                           "whatever", "--out", str(tmp_path / "x.png")], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [f"error: image not found: {tmp_path / 'missing.png'}; check the path"]
    assert not (tmp_path / "x.png").exists()


def test_demo_prefers_the_embedded_scenes_model(tmp_path, monkeypatch, hf_dir):
    from vitlens.models import zoo

    scenes = tmp_path / "assets" / "scenes"
    scenes.mkdir(parents=True)
    names = [f"scene{i}.png" for i in range(4)]
    for i, n in enumerate(names):
        _photo(scenes / n, 10 + i)
    _photo(scenes / "scene0_mask0.png", 20)
    (scenes / "scenes.json").write_text(json.dumps({"scenes": [{"name": n[:-4], "image": n} for n in names]}))
    monkeypatch.setattr(zoo, "zoo_models", lambda: {"scenes-vit": hf_dir})
    model, images, note = demo_cli.demo_inputs(assets=tmp_path / "assets")
    assert model is not None and model.labels == LABELS
    assert images == [scenes / n for n in names]
    assert note == ""
    monkeypatch.setattr(zoo, "zoo_models", lambda: {})
    model, images, note = demo_cli.demo_inputs(assets=tmp_path / "assets")
    assert model is None and images == [tmp_path / "assets" / "demo_cat.png"] and "randomly initialised" in note


def test_compare_methods_side_by_side_draws_each_library_map(hf_dir, image, tmp_path, capsys, monkeypatch):
    from vitlens import GenericAttention

    model = _library_model(str(hf_dir))
    x, _ = model.preprocess([load_image(image)])
    calls = _recorder(monkeypatch, "compare_figure")
    code, _, err = run(["compare", image, "--model", hf_dir, "--methods", "rollout,gae", "--target", "2",
                        "--head-fusion", "max", "--start-layer", "1", "--query", "1,1", "--out", tmp_path / "m.png"],
                       capsys)
    assert code == 0, err
    assert "--query does not apply to rollout, gae" in err and "--head-fusion" not in err
    (t0, rollout_map), (t1, gae_map) = calls[0][1]
    np.testing.assert_allclose(rollout_map, Rollout(model, head_fusion="max", start_layer=1).explain(x).numpy()[0],
                               rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(gae_map, GenericAttention(model, start_layer=1).explain(x, target=2).numpy()[0],
                               rtol=1e-5, atol=1e-6)
    assert "'Coat' (class 2" in t1
    _not_blank(tmp_path / "m.png")
    code, _, err = run(["compare", image, "--model", hf_dir, "--methods", "rollout,nope", "--out", tmp_path / "n.png"],
                       capsys)
    assert code == 2 and "unknown method 'nope'" in err and not (tmp_path / "n.png").exists()
