"""Metrics of vitlens.train against sklearn / by hand, and a few steps of the training loop."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from vitlens.train.loop import lr_at, train
from vitlens.train.metrics import average_precision, mean_average_precision, per_class_ap, per_item_recall


@pytest.mark.parametrize("ties", [False, True])
def test_map_matches_sklearn(ties: bool) -> None:
    metrics = pytest.importorskip("sklearn.metrics")
    rng = np.random.default_rng(0)
    targets = (rng.random((300, 6)) < 0.3).astype(np.float32)
    scores = rng.random((300, 6)) + 0.8 * targets
    if ties:
        scores = np.round(scores, 1)
    ours = per_class_ap(scores, targets)
    ref = [metrics.average_precision_score(targets[:, c], scores[:, c]) for c in range(6)]
    np.testing.assert_allclose(ours, ref, rtol=1e-12, atol=1e-12)
    assert mean_average_precision(scores, targets) == pytest.approx(np.mean(ref), abs=1e-12)


def test_average_precision_small_cases() -> None:
    assert average_precision(np.array([0.9, 0.8, 0.1]), np.array([1, 1, 0])) == 1.0
    # ranks: pos, neg, pos -> (1/2)*1 + (1/2)*(2/3)
    assert average_precision(np.array([0.9, 0.8, 0.7]), np.array([1, 0, 1])) == pytest.approx(0.5 + 1 / 3)
    assert np.isnan(average_precision(np.array([0.3, 0.2]), np.array([0, 0])))
    scores, targets = np.array([[0.9, 0.1], [0.2, 0.3]]), np.array([[1, 0], [0, 0]])
    assert mean_average_precision(scores, targets) == 1.0  # class 1 has no positives: left out


def test_per_item_recall_by_hand() -> None:
    probs = np.array([[0.9, 0.2, 0.5], [0.1, 0.7, 0.4], [0.6, 0.6, 0.49]])
    items = [[0, 2], [1, 1], [2]]  # scene 1 holds two items of class 1
    overall, per_class = per_item_recall(probs, items, threshold=0.5)
    # hits: (0: yes, 2: yes at exactly 0.5), (1, 1: yes twice), (2: 0.49 no) -> 4 of 5
    assert overall == pytest.approx(4 / 5)
    np.testing.assert_allclose(per_class, [1.0, 1.0, 0.5])
    _, with_empty = per_item_recall(probs, items, num_classes=4)
    assert np.isnan(with_empty[3])


def test_lr_schedule_warmup_and_cosine() -> None:
    assert lr_at(0.0, 1.0, 0.1) == 0.0
    assert lr_at(0.05, 1.0, 0.1) == pytest.approx(0.5)
    assert lr_at(0.1, 1.0, 0.1) == pytest.approx(1.0)
    assert lr_at(0.55, 1.0, 0.1) == pytest.approx(0.5)
    assert lr_at(1.0, 1.0, 0.1) == pytest.approx(0.0, abs=1e-12)


def test_a_few_steps_reduce_the_loss() -> None:
    torch.manual_seed(0)
    x = torch.randn(16, 3, 8, 8)
    y = (torch.rand(16, 10) < 0.3).float()
    model = nn.Sequential(nn.Flatten(), nn.Linear(3 * 64, 32), nn.GELU(), nn.Linear(32, 10))
    hist = train(model, [(x, y)], steps=40, lr=1e-2, warmup=0.1, seed=0, progress=False)
    assert hist.steps == 40 and len(hist.loss) == 40
    assert hist.loss[-1] < 0.5 * hist.loss[0]


def test_parameter_filter_freezes_the_rest() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 2))
    frozen = model[0].weight.detach().clone()
    x, y = torch.randn(8, 4), (torch.rand(8, 2) < 0.5).float()
    hist = train(model, lambda epoch: [(x, y)], steps=5, trainable=lambda n, p: n.startswith("1."), progress=False)
    assert torch.equal(model[0].weight, frozen)
    assert hist.trainable_params == 4 * 2 + 2


def test_embedded_configs_are_small_multilabel_classifiers() -> None:
    pytest.importorskip("transformers")
    from vitlens.data.fashion_mnist import FASHION_MNIST_CLASSES
    from vitlens.train.embedded import RECIPES, build_embedded, recipe_of

    for name in RECIPES:
        cfg, r = build_embedded(name), recipe_of(name)
        assert cfg.problem_type == "multi_label_classification"
        assert [cfg.id2label[i] for i in range(10)] == list(FASHION_MNIST_CLASSES)
        assert cfg.image_size == r.image_size and r.image_size % r.patch_size == 0
        d, layers = r.hidden_size, r.num_layers
        params = layers * (4 * d * d + 2 * r.mlp_ratio * d * d) + 3 * r.patch_size**2 * d
        assert params * 4 < 10e6  # float32 weights stay under 10 MB
    assert recipe_of("scenes-vit", lr=1e-4).lr == 1e-4


FASHION_MNIST = Path("/usr/share/datasets/fashion-mnist")


def _idx(array: np.ndarray) -> bytes:
    """IDX bytes of a uint8 array: magic (0, 0, 0x08 = uint8, ndim), big-endian int32 dims, the data."""
    head = bytes([0, 0, 0x08, array.ndim]) + b"".join(int(d).to_bytes(4, "big") for d in array.shape)
    return head + np.ascontiguousarray(array, np.uint8).tobytes()


def _check_scene_arrays_and_batches() -> None:
    from vitlens.train.embedded import batches, recipe_of, scene_arrays

    images, labels, items, patches = scene_arrays(4, 0, "test", 64, 8)
    assert images.shape == (4, 64, 64, 3) and images.dtype == np.uint8
    for lab, its, pat in zip(labels, items, patches, strict=True):
        assert set(np.flatnonzero(lab)) == {int(c) for c in its if c >= 0}
        assert set(np.flatnonzero(pat.any(0))) <= set(np.flatnonzero(lab))
    r = recipe_of("scenes-vit", batch_size=4)
    x, (y, p) = next(iter(batches(images, labels, patches, r, seed=0)(0)))
    assert x.shape == (4, 3, 64, 64) and y.shape == (4, 10) and p.shape == (4, 64, 10)
    assert sorted(y.sum(1).tolist()) == sorted(labels.sum(1).tolist())


@pytest.mark.skipif(not FASHION_MNIST.is_dir(), reason="system dataset absent: apt-get install dataset-fashion-mnist")
def test_scene_arrays_and_batches_agree_on_the_system_dataset() -> None:
    _check_scene_arrays_and_batches()


def test_scene_arrays_and_batches_agree_on_the_committed_items(tmp_path: Path, monkeypatch) -> None:
    """The same checks everywhere: the committed test items written as IDX files stand in for the system dataset."""
    from vitlens.data import fashion_mnist

    images, labels = fashion_mnist.load_fixture_items()
    (tmp_path / "t10k-images-idx3-ubyte").write_bytes(_idx(images))
    (tmp_path / "t10k-labels-idx1-ubyte").write_bytes(_idx(labels.astype(np.uint8)))
    monkeypatch.setattr(fashion_mnist, "DEFAULT_ROOT", tmp_path)
    _check_scene_arrays_and_batches()
