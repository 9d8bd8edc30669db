"""Localisation hit rates: hand-worked cover and argmax examples; the batched rate equals an item-by-item loop."""

import numpy as np
import pytest
import torch
from PIL import Image

import vitlens
from factories import hf_vit
from vitlens.eval.localisation import grad_rollout_in_mask, mask_cover, max_in_mask, pointing_hits


def test_mask_cover_by_hand():
    m = np.zeros((1, 4, 4), bool)
    m[0, 0, 0] = m[0, 0, 1] = m[0, 1, 0] = True  # 3 pixels of the top-left 2x2 cell
    m[0, 3, 3] = True  # 1 pixel of the bottom-right cell
    want = torch.tensor([[[0.75, 0.0], [0.0, 0.25]]])
    torch.testing.assert_close(mask_cover(m, (2, 2)), want)


def test_max_in_mask_by_hand():
    maps = torch.tensor([[[0.0, 1.0], [0.5, 0.0]],  # max in the top-right cell
                         [[0.2, 0.2], [0.1, 0.0]]])  # tie: the first maximum (top-left) counts
    masks = np.zeros((2, 4, 4), bool)
    masks[0, 0, 3] = True  # 1/4 of the top-right cell
    masks[1, 0:2, 2:4] = True  # the top-right cell only: the tie's first max misses it
    assert max_in_mask(maps, masks).tolist() == [True, False]
    assert max_in_mask(maps, masks, min_cover=0.3).tolist() == [False, False]
    with pytest.raises(vitlens.VitlensError, match="one mask each"):
        max_in_mask(maps, masks[:1])


def test_pointing_hits_share_ties_by_hand():
    maps = torch.tensor([[[0.0, 1.0], [0.5, 0.0]],  # one maximum, in the masked top-right cell: hit 1
                         [[0.2, 0.2], [0.1, 0.0]],  # two tied maxima, one in the mask: 1/2
                         [[1.0, 1.0], [1.0, 1.0 - 1e-8]]])  # four maxima within the tolerance, one masked: 1/4
    masks = np.zeros((3, 4, 4), bool)
    masks[:, 0:2, 2:4] = True  # the top-right cell
    torch.testing.assert_close(pointing_hits(maps, masks), torch.tensor([1.0, 0.5, 0.25]))
    # no ties: the same as max_in_mask, for random maps and masks
    rng = np.random.default_rng(0)
    maps, masks = torch.rand(50, 4, 4), rng.random((50, 8, 8)) < 0.3
    torch.testing.assert_close(pointing_hits(maps, masks), max_in_mask(maps, masks).float())
    with pytest.raises(vitlens.VitlensError, match="one mask each"):
        pointing_hits(maps, masks[:1])


def test_grad_rollout_in_mask_equals_item_by_item_loop():
    torch.manual_seed(0)
    model = vitlens.load_model(hf_vit())  # 32 px, patch 8: a 4x4 grid
    rng = np.random.default_rng(0)
    images = [rng.integers(0, 256, (32, 32, 3), dtype=np.uint8) for _ in range(3)]
    masks = [rng.random((2, 32, 32)) < 0.3 for _ in range(3)]
    classes = [[0, 3], [1, 4], [2, 2]]
    got = grad_rollout_in_mask(model, images, masks, classes, batch_size=4)
    want = []
    for image, item_masks, cs in zip(images, masks, classes):
        x, _ = model.preprocess([Image.fromarray(image)])
        for mask, c in zip(item_masks, cs):
            m = vitlens.GradRollout(model).explain(x, target=c).maps[0]
            r, col = divmod(int(m.argmax()), 4)
            cell = mask[r * 8 : (r + 1) * 8, col * 8 : (col + 1) * 8]
            want.append(bool(cell.mean() >= 0.15))
    assert got.per_item == want and got.total == 6 and got.hits == sum(want)
    assert got.rate == pytest.approx(sum(want) / 6)
