"""The demo's real-photo figures and its choice of model: vitlens:scenes-dinov2 first, falling back with one line."""

import json

import pytest
import torch
from PIL import Image
from tests.factories import hf_dinov2, hf_vit

import vitlens
from vitlens.cli import demo as demo_cli
from vitlens.models import zoo
from vitlens.viz.photos import real_photos


def test_real_photos_ship_with_skimage_and_matplotlib():
    photos = real_photos()
    assert list(photos) == ["chelsea", "coffee", "astronaut", "grace_hopper"]
    assert all(isinstance(p, Image.Image) and p.mode == "RGB" and min(p.size) >= 256 for p in photos.values())


def test_demo_draws_every_photo_with_the_photo_model(tmp_path):
    torch.manual_seed(0)
    model = vitlens.load_model(hf_vit())
    photos = vitlens.load_model(hf_dinov2(head=False))
    cat = tmp_path / "cat.png"
    Image.new("RGB", (40, 40), (200, 120, 40)).save(cat)
    result = demo_cli.run_demo(tmp_path / "out", model=model, images=[cat], photos=photos)
    names = sorted(p.name for p in (tmp_path / "out").glob("photo_*.png"))
    assert names == sorted(f"photo_{n}_{k}.png" for n in real_photos() for k in ("artifacts", "heads"))
    page = (tmp_path / "out" / "index.html").read_text()
    assert all(n in page for n in names)
    assert sum("(photo)" in caption for caption, _ in result.figures) == len(names)


def test_scenes_dinov2_is_preferred_and_a_failure_falls_back_in_one_line(tmp_path, monkeypatch):
    vit_dir = tmp_path / "scenes-vit"
    hf_vit().save_pretrained(vit_dir)
    broken = tmp_path / "scenes-dinov2"
    broken.mkdir()
    (broken / "source.json").write_text(json.dumps({"kind": "assembled", "backbone": "dinov2-small",
                                                    "weights": "finetuned.safetensors"}))
    monkeypatch.setattr(zoo, "ZOO_DIR", tmp_path)  # scenes-dinov2's backbone (dinov2-small) is not in this zoo
    name, model, note = demo_cli.pick_demo_model()
    assert name == "scenes-vit" and model is not None and model.num_blocks == 3
    assert note.startswith("note: vitlens:scenes-dinov2 is not available (") and "\n" not in note
    assert "falling back" in note
    monkeypatch.setattr(zoo, "ZOO_DIR", tmp_path / "nothing")
    assert demo_cli.pick_demo_model() == ("", None, "")


@pytest.mark.parametrize("installed", [False, True])
def test_photo_model_needs_dinov2_small(monkeypatch, installed):
    if installed:
        monkeypatch.setattr(zoo, "zoo_models", lambda: {"dinov2-small": zoo.ZOO_DIR / "dinov2-small"})
        monkeypatch.setattr(zoo, "model_folder", lambda name: (_ for _ in ()).throw(
            vitlens.VitlensError("needs the onnx package: pip install 'vitlens[dinov2]'")))
        model, note = demo_cli.photo_model()
        assert model is None and note == "note: no real-photo figures: needs the onnx package: pip install " \
                                          "'vitlens[dinov2]'"
    else:
        monkeypatch.setattr(zoo, "zoo_models", lambda: {})
        assert demo_cli.photo_model() == (None, "")
