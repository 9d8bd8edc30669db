"""The embedded scenes models: listed, small, load with no network, beat their floors on held-out scenes, and their
grad rollout lands on the objects of the shipped two-object scenes."""

import json
import socket

import numpy as np
import pytest
import torch
from PIL import Image

import vitlens
from vitlens.data import SceneDataset, load_demo_scenes, load_fixture_items
from vitlens.eval.localisation import grad_rollout_in_mask
from vitlens.models import zoo
from vitlens.train.embedded import RECIPES, _model_from_config, build_embedded, localisation_scenes
from vitlens.train.metrics import per_class_ap

NAMES = ["scenes-deit", "scenes-swin", "scenes-vit"]
# Floors on 200 held-out scenes drawn from the committed Fashion-MNIST *test* items (never seen in training), set a
# margin below what the shipped models measure (see each MODEL_CARD.md); chance (class prevalence) is about 0.2.
MAP_FLOOR = {"scenes-vit": 0.40, "scenes-deit": 0.45, "scenes-swin": 0.50}
# Fraction of items whose grad rollout maximum lies in the item's mask: on the shipped two-object demo scenes ("most")
# and on held-out two-object scenes.
IN_MASK_FLOOR = {"scenes-vit": 0.75, "scenes-deit": 0.75, "scenes-swin": 0.6}
# Held out: the first HELD_OUT_SCENES of `localisation_scenes()` (the same scenes as the first 40 of the card's 100:
# scenes depend on their index only), 76 items. Measured there (batch 64): vit 52/76 = 0.684, deit 53/76 = 0.697,
# swin 36/76 = 0.474 (on all 193 items, as the cards say: 0.663, 0.715, 0.456); the same architectures with random
# weights reach 0.316, 0.368 and 0.237. Each floor sits 4-5 items below the measured rate (room for argmax near-ties
# on another BLAS) and well above the random-weight rate. 40 scenes instead of 100 cut the three tests from 36-83 s
# each to a few seconds.
HELD_OUT_SCENES = 40
HELD_OUT_IN_MASK_FLOOR = {"scenes-vit": 0.62, "scenes-deit": 0.63, "scenes-swin": 0.42}
LOCALISATION_BATCH = 64  # items per grad-rollout batch: 2-3x faster than the default 16 on CPU, same flags


@pytest.fixture(scope="module")
def held_out():
    ds = SceneDataset(200, seed=11, split="test", items=load_fixture_items())
    scenes = [ds[i] for i in range(len(ds))]
    return [Image.fromarray(s.image) for s in scenes], np.stack([s.labels for s in scenes])


@pytest.fixture(scope="session")
def embedded_models():
    """Each embedded model loaded once for the whole session (on first use)."""
    cache: dict[str, vitlens.VitModel] = {}

    def get(name: str):
        if name not in cache:
            cache[name] = vitlens.load_model(f"vitlens:{name}")
        return cache[name]

    return get


@pytest.fixture(scope="session")
def demo_scenes():
    scenes = load_demo_scenes()
    return [s.image for s in scenes], [s.masks for s in scenes], [s.classes for s in scenes]


@pytest.fixture(scope="session")
def held_out_two_objects():
    images, masks, classes, _ = localisation_scenes(HELD_OUT_SCENES)
    return images, masks, classes


@pytest.fixture()
def offline(monkeypatch):
    """No network: the hub is told to stay offline and any socket connection fails."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")

    def refuse(*args, **kwargs):
        raise OSError("network disabled in this test")

    monkeypatch.setattr(socket.socket, "connect", refuse)


def test_three_embedded_models_ship_within_30_mb():
    found = {n: f for n, f in zoo.zoo_models().items() if n in RECIPES}  # the models trained from scratch
    assert sorted(found) == NAMES == sorted(RECIPES)
    size = sum(f.stat().st_size for folder in found.values() for f in folder.rglob("*") if f.is_file())
    assert size <= 30 * 2**20
    for name, folder in found.items():
        card = zoo.model_card(name)
        assert card is not None and card.startswith(f"# vitlens:{name}")
        info = json.loads((folder / "metrics.json").read_text())
        for cls in info["test"]["per_class"]:  # per-class figures in the card
            assert f"| {cls} |" in card
        assert "grad rollout for each item's class" in card


@pytest.mark.parametrize("name", NAMES)
def test_embedded_model_loads_offline_and_clears_its_floor(name, held_out, offline):
    model = vitlens.load_model(f"vitlens:{name}")
    assert model.multi_label and model.num_classes == 10 and model.labels[7] == "Sneaker"
    images, labels = held_out
    x, _ = model.preprocess(images)
    with torch.no_grad():
        probs = model.probabilities(model(x)).numpy()
    trained = float(np.nanmean(per_class_ap(probs, labels)))
    # the floor means something: the same architecture with random weights stays below it
    torch.manual_seed(0)
    random = vitlens.wrap(_model_from_config(build_embedded(name)))
    with torch.no_grad():
        chance = float(np.nanmean(per_class_ap(random.probabilities(random(x)).numpy(), labels)))
    assert trained >= MAP_FLOOR[name] > chance


@pytest.mark.parametrize("name", NAMES)
def test_grad_rollout_max_lands_inside_the_item_mask(name, embedded_models, demo_scenes):
    """On the shipped demo scenes: above the floor, and item by item what the model card says."""
    images, masks, classes = demo_scenes
    loc = grad_rollout_in_mask(embedded_models(name), images, masks, classes, batch_size=LOCALISATION_BATCH)
    assert loc.total == 2 * len(images)
    assert loc.rate >= IN_MASK_FLOOR[name]
    info = json.loads((zoo.zoo_models()[name] / "metrics.json").read_text())
    card = info["grad_rollout_in_mask"]
    # the card states what the model does (near ties may move an argmax on another BLAS)
    assert card["total"] == loc.total and abs(card["hits"] - loc.hits) <= 1
    assert sum(a != b for a, b in zip(card["per_item"], loc.per_item)) <= 1


@pytest.mark.parametrize("name", NAMES)
def test_grad_rollout_max_lands_inside_the_item_mask_held_out(name, embedded_models, held_out_two_objects):
    images, masks, classes = held_out_two_objects
    held = grad_rollout_in_mask(embedded_models(name), images, masks, classes, batch_size=LOCALISATION_BATCH)
    assert held.total == sum(len(c) for c in classes) == 76
    assert held.rate >= HELD_OUT_IN_MASK_FLOOR[name]
    info = json.loads((zoo.zoo_models()[name] / "metrics.json").read_text())
    card = info["grad_rollout_in_mask_held_out"]  # the card's 193 items include these 76: hits cannot exceed
    assert held.hits <= card["hits"] + 3 and card["total"] - card["hits"] >= held.total - held.hits - 3


def test_demo_runs_the_embedded_vit_on_every_shipped_scene(tmp_path, capsys, offline):
    from vitlens.cli import main

    assert main(["demo", "--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "vitlens:scenes-vit" in out and "randomly initialised" not in out
    names = [s.name for s in load_demo_scenes()]
    kinds = ("heads", "rollout_mean", "rollout_max", "layers", "grad_rollout")
    photos = sorted(p.name for p in tmp_path.glob("photo_*.png"))  # vitlens:dinov2-small's, when the extra is in
    scenes = sorted(p.name for p in tmp_path.glob("*.png") if p.name not in photos)
    assert scenes == sorted(f"{n}_{k}.png" for n in names for k in kinds)
    page = (tmp_path / "index.html").read_text()
    assert page.count("<img") == len(names) * len(kinds) + len(photos) and "each object&#x27;s class" in page
