"""Evaluation metrics against hand computations and a model whose output depends only on a known region; the runner
batch vs one by one; resuming after an interruption; the `vitlens evaluate` command and its one-line errors."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from vitlens.cli import main
from vitlens.errors import VitlensError
from vitlens.eval.curves import average_precision, spearman, trapezoid
from vitlens.eval.data import Sample
from vitlens.eval.explainers import baseline_explainer, explainers, gaussian_map, random_maps
from vitlens.eval.metrics import (
    CHEFER_FRACTIONS,
    Batch,
    Deletion,
    Energy,
    Insertion,
    Perturbation,
    PointingGame,
    Sanity,
    Segmentation,
    make_metrics,
)
from vitlens.eval.removal import Remover, fill_image
from vitlens.eval.run import evaluate, header, score_batch
from vitlens.eval.store import ResumableCSV

pytestmark = pytest.mark.usefixtures("one_torch_thread")

SIDE, PATCH = 16, 4  # 4x4 grid of 4-pixel patches
GRID = (SIDE // PATCH, SIDE // PATCH)
REGION = [(0, 0), (0, 1), (1, 0), (1, 1)]  # the patches the region model reads (top-left 2x2)
A, B = 8.0, 3.0  # logit of class 1 = A * (share of the region left intact) - B


class RegionModel(torch.nn.Module):
    """Two classes; class 1's logit is A * mean over the region's pixels - B, class 0's is 0. Images carry 1 on the
    region, so removing (zeroing) a region patch lowers the share s by 1/4; nothing outside the region matters."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s = x[:, :, : 2 * PATCH, : 2 * PATCH].mean((1, 2, 3))
        return torch.stack([torch.zeros_like(s), A * s - B], 1)


def region_images(n: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 3, SIDE, SIDE, generator=g)
    x[:, :, : 2 * PATCH, : 2 * PATCH] = 1.0
    return x


def region_mask(n: int) -> torch.Tensor:
    m = torch.zeros(n, SIDE, SIDE, dtype=torch.bool)
    m[:, : 2 * PATCH, : 2 * PATCH] = True
    return m


def perfect_maps(n: int) -> torch.Tensor:
    m = torch.zeros(n, *GRID)
    for r, c in REGION:
        m[:, r, c] = 1.0
    return m


def region_batch(maps: torch.Tensor, explain=None) -> Batch:
    n = maps.shape[0]
    model = RegionModel()
    x = region_images(n)
    with torch.no_grad():
        clean = model(x)
    return Batch(model, x, torch.ones(n, dtype=torch.long), maps, clean, region_mask(n),
                 torch.ones(n, dtype=torch.bool), explain=explain)


def sig(v: float) -> float:
    return 1 / (1 + math.exp(-v))


def prob_kept(kept: int) -> float:
    """Softmax probability of class 1 with ``kept`` of the 4 region patches intact (the hand formula)."""
    return sig(A * kept / 4 - B)


def hypergeom(k_removed: int, n: int = 16, region: int = 4) -> list[float]:
    """P(j region patches among k removed uniformly at random), j = 0..4."""
    total = math.comb(n, k_removed)
    return [math.comb(region, j) * math.comb(n - region, k_removed - j) / total if k_removed - j >= 0 else 0.0
            for j in range(region + 1)]


def chance_curve(removed: list[int]) -> tuple[list[float], list[float]]:
    """Expected (accuracy, probability) of a uniformly random removal order, per step."""
    acc, prob = [], []
    for k in removed:
        p = hypergeom(k)
        prob.append(sum(pj * prob_kept(4 - j) for j, pj in enumerate(p)))
        acc.append(sum(pj * (A * (4 - j) / 4 - B > 0) for j, pj in enumerate(p)))
    return acc, prob


def trapz(y: list[float], x: list[float]) -> float:
    return sum((x[i + 1] - x[i]) * (y[i + 1] + y[i]) / 2 for i in range(len(x) - 1))


REMOVED = [0, 2, 3, 5, 6, 8, 10, 11, 13, 14]  # round(f * 16) for f = 0, 0.1, ..., 0.9 (by hand)


# ---- hand-computed AUCs --------------------------------------------------------------------------------------------
def test_chefer_perturbation_aucs_of_the_perfect_map_match_a_hand_computation():
    out_pos = Perturbation("positive")(region_batch(perfect_maps(2)))
    out_neg = Perturbation("negative")(region_batch(perfect_maps(2)))
    xs = list(CHEFER_FRACTIONS)
    # positive: the region goes first: 2 removed -> 2 of 4 kept, 3 -> 1, then none
    kept_pos = [4, 2, 1] + [0] * 7
    # negative: the 12 others go first: the region is untouched until 13 removed (3 kept), 14 (2 kept)
    kept_neg = [4] * 8 + [3, 2]
    for out, kept, p in ((out_pos, kept_pos, "pos"), (out_neg, kept_neg, "neg")):
        prob = [prob_kept(k) for k in kept]
        acc = [float(A * k / 4 - B > 0) for k in kept]
        assert out[f"{p}_prob_auc"] == pytest.approx(torch.tensor([100 * trapz(prob, xs)] * 2), abs=1e-4)
        assert out[f"{p}_acc_auc"] == pytest.approx(torch.tensor([100 * trapz(acc, xs)] * 2), abs=1e-4)
        assert out[f"{p}_prob@0"].tolist() == pytest.approx([prob_kept(4)] * 2, abs=1e-6)
    assert out_pos["pos_acc_auc"][0].item() == pytest.approx(15.0)  # 100 * (0.1 * 1 + 0.1 * (1 + 0) / 2)
    # negative: with 2 of 4 region patches left the logit is still 8 * 0.5 - 3 > 0: accuracy 1 over [0, 0.9]
    assert out_neg["neg_acc_auc"][0].item() == pytest.approx(90.0)


def test_deletion_and_insertion_aucs_of_the_perfect_map_match_a_hand_computation():
    d = Deletion(steps=4)(region_batch(perfect_maps(1)))
    i = Insertion(steps=4)(region_batch(perfect_maps(1)))
    xs = [0, 0.25, 0.5, 0.75, 1.0]  # 0, 4, 8, 12, 16 patches
    assert d["del_auc"].item() == pytest.approx(trapz([prob_kept(4)] + [prob_kept(0)] * 4, xs), abs=1e-6)
    assert i["ins_auc"].item() == pytest.approx(trapz([prob_kept(0)] + [prob_kept(4)] * 4, xs), abs=1e-6)


def slow_average_precision(scores: list[float], labels: list[bool]) -> float:
    """The definition: over distinct thresholds t from high to low, (recall(t) - recall(previous t)) * precision(t)."""
    positives = sum(labels)
    ap, prev_recall = 0.0, 0.0
    for t in sorted(set(scores), reverse=True):
        picked = [lb for s, lb in zip(scores, labels) if s >= t]
        recall = sum(picked) / positives
        ap += (recall - prev_recall) * sum(picked) / len(picked)
        prev_recall = recall
    return ap


def test_trapezoid_average_precision_and_spearman_match_slow_references():
    from scipy.stats import spearmanr

    g = torch.Generator().manual_seed(0)
    y = torch.rand(3, 7, generator=g)
    xs = [0, 0.1, 0.3, 0.4, 0.7, 0.9, 1.0]
    assert trapezoid(y, xs).tolist() == pytest.approx([np.trapezoid(r, xs) for r in y.numpy()], abs=1e-6)
    scores = torch.randint(0, 4, (5, 40), generator=g).float()  # many ties
    labels = torch.rand(5, 40, generator=g) > 0.6
    expected = [slow_average_precision(s.tolist(), lb.tolist()) for s, lb in zip(scores, labels)]
    assert average_precision(scores, labels).tolist() == pytest.approx(expected, abs=1e-6)
    a, b = torch.randint(0, 5, (4, 30), generator=g).float(), torch.rand(4, 30, generator=g)
    assert spearman(a, b).tolist() == pytest.approx([spearmanr(u, v).statistic for u, v in zip(a, b)], abs=1e-5)
    assert spearman(torch.ones(1, 5), torch.ones(1, 5)).item() == 1.0  # a map that ignores the model


# ---- the perfect map scores best, a random map at chance -----------------------------------------------------------
def _all_metrics(maps: torch.Tensor) -> dict[str, float]:
    batch = region_batch(maps)
    out: dict[str, torch.Tensor] = {}
    for m in (Perturbation("positive"), Perturbation("negative"), Deletion(), Insertion(), PointingGame(), Energy(),
              Segmentation()):
        out.update(m(batch))
    return {k: float(v.float().mean()) for k, v in out.items()}


def test_perfect_map_scores_best_and_random_map_at_chance_on_every_metric():
    n = 300
    perfect = _all_metrics(perfect_maps(4))
    rand = _all_metrics(random_maps(GRID, torch.arange(n)))
    inverted = _all_metrics(1 - perfect_maps(4))
    centre = _all_metrics(gaussian_map(GRID).expand(4, -1, -1))
    directions = {c.name: c.higher_is_better for m in make_metrics(
        ["positive", "negative", "deletion", "insertion", "pointing", "energy", "segmentation"]) for c in m.columns
        if c.summary}
    for col, higher in directions.items():
        for other in (rand, inverted, centre):
            assert (perfect[col] >= other[col]) if higher else (perfect[col] <= other[col]), col
        if col not in ("pos_acc_auc",):  # the perfect map can tie only where accuracy saturates
            assert perfect[col] != pytest.approx(rand[col], abs=1e-3), col
    # random map: every metric at its chance level (hand-derived; tolerances ~4 standard errors at n=300)
    xs = list(CHEFER_FRACTIONS)
    acc, prob = chance_curve(REMOVED)
    for p in ("pos", "neg"):  # a random order is the same in both directions
        assert rand[f"{p}_prob_auc"] == pytest.approx(100 * trapz(prob, xs), abs=2.0)
        assert rand[f"{p}_acc_auc"] == pytest.approx(100 * trapz(acc, xs), abs=4.0)
    _, dprob = chance_curve([round(16 * k / 10) for k in range(11)])
    chance_rise = trapz(dprob, [k / 10 for k in range(11)])
    assert rand["del_auc"] == pytest.approx(chance_rise, abs=0.02)
    assert rand["ins_auc"] == pytest.approx(chance_rise, abs=0.02)  # inserting k at random = removing 16 - k
    assert rand["pointing"] == pytest.approx(4 / 16, abs=0.1)  # 4 of 16 cells lie in the mask
    assert rand["energy"] == pytest.approx(0.25, abs=0.02)  # the mask's share of the image
    assert rand["pix_acc"] == pytest.approx(0.5, abs=0.03)  # about half the pixels exceed the mean
    # mIoU of a half-covering prediction independent of a quarter mask: fg 0.125/0.625, bg 0.375/0.875
    assert rand["miou"] == pytest.approx((0.125 / 0.625 + 0.375 / 0.875) / 2, abs=0.03)
    assert rand["seg_ap"] == pytest.approx(0.5, abs=0.03)  # pooled fg/bg channels: half the points are positive
    assert perfect["pointing"] == 1.0 and perfect["energy"] > 0.85 and perfect["pix_acc"] > 0.9


def test_random_map_is_batch_independent_and_removal_fills_as_declared():
    assert torch.equal(random_maps(GRID, torch.tensor([3, 7]))[1], random_maps(GRID, torch.tensor([7]))[0])
    x = region_images(2)
    assert torch.equal(fill_image(x, "zero"), torch.zeros_like(x))
    assert torch.allclose(fill_image(x, "mean")[:, :, 5, 9], x.mean((2, 3)))
    keep = torch.ones(2, *GRID, dtype=torch.bool)
    keep[:, 0, 0] = False
    model = RegionModel()
    got = Remover(model, "mean").logits(x, [keep])[0]
    ref = x.clone()
    ref[:, :, :PATCH, :PATCH] = x.mean((2, 3))[:, :, None, None]
    assert torch.allclose(got, model(ref), atol=1e-6)
    with pytest.raises(VitlensError, match="needs a timm VisionTransformer"):
        Remover(model, "drop")


def test_token_dropping_removal_keeps_everything_equals_the_model_and_batch_equals_one_by_one():
    import vitlens
    from factories import hf_vit

    vm = vitlens.wrap(hf_vit())
    x = torch.randn(3, 3, 32, 32)
    keep_all = torch.ones(3, 4, 4, dtype=torch.bool)
    half = torch.zeros(3, 16, dtype=torch.bool)
    for i in range(3):
        half[i, torch.randperm(16)[:8]] = True
    r = Remover(vm, "drop")
    both = r.logits(x, [keep_all, half.view(3, 4, 4)])
    with torch.no_grad():
        assert torch.allclose(both[0], vm(x), atol=1e-5)
    singles = torch.cat([r.logits(x[i : i + 1], [half.view(3, 4, 4)[i : i + 1]])[0] for i in range(3)])
    assert torch.allclose(both[1], singles, atol=1e-5)


# ---- sanity --------------------------------------------------------------------------------------------------------
def test_sanity_separates_model_dependent_maps_from_model_free_ones():
    import vitlens
    from factories import hf_vit

    torch.manual_seed(0)
    vm = vitlens.wrap(hf_vit())
    x = torch.randn(4, 3, 32, 32)
    for name, expect_one in (("random", True), ("gaussian", True), ("cls_attention", False)):
        ex = baseline_explainer(name, vm)
        ids = torch.arange(4)
        maps = ex(vm, x, torch.zeros(4, dtype=torch.long), ids)
        with torch.no_grad():
            clean = vm(x)
        batch = Batch(vm, x, clean.argmax(-1), maps, clean,
                      explain=lambda m, xx, t, rows, ex=ex: ex(m, xx, t, torch.arange(4)[rows]))
        rho = Sanity()(batch)["sanity_rho"]
        assert (rho == 1).all() if expect_one else (rho < 0.9).all(), name


# ---- the runner: batch equals one by one; resuming -----------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny():
    import vitlens
    from factories import hf_vit

    torch.manual_seed(4)
    vm = vitlens.wrap(hf_vit(num_labels=3))
    vm.preprocess = vm.preprocess.with_size(32)
    rng = np.random.default_rng(0)
    samples = []
    for i in range(6):
        img = Image.fromarray((rng.random((32, 32, 3)) * 255).astype(np.uint8))
        m = np.zeros((32, 32), bool)
        m[8 * (i % 3) : 8 * (i % 3) + 12, 4:20] = True
        objects = [(i % 3, m), ((i + 1) % 3, ~m)] if i % 2 else [(i % 3, m)]
        samples.append(Sample(f"img{i}", img, objects))
    return vm, samples


def _setup(vm):
    exps = explainers(vm, ["rollout", "grad_rollout"])
    mets = make_metrics(["positive", "negative", "deletion", "insertion", "pointing", "energy", "segmentation",
                         "sanity"])
    return exps, mets


def test_batch_equals_one_by_one(tiny):
    vm, samples = tiny
    exps, mets = _setup(vm)
    batched = score_batch(vm, samples[:4], [0, 1, 2, 3], exps, mets)
    single = [r for i in range(4) for r in score_batch(vm, samples[i : i + 1], [i], exps, mets)]
    assert [(r["image"], r["method"], r["target"], r["class"]) for r in batched] == \
           [(r["image"], r["method"], r["target"], r["class"]) for r in single]
    for a, b in zip(batched, single):
        for k, v in a.items():
            if isinstance(v, float):
                assert v == pytest.approx(b[k], abs=1e-4, nan_ok=True), (k, a["method"])
    # multi-label rows: one per ground-truth class; a gt row of the predicted class equals the pred row
    assert {r["target"] for r in batched} == {"pred", "gt"}


def test_resume_after_an_interruption_gives_the_same_csv(tiny, tmp_path):
    vm, samples = tiny
    exps, mets = _setup(vm)
    settings = {"run": 1}
    ref = ResumableCSV(tmp_path / "ref" / "scores.csv", header(mets), settings)
    evaluate(vm, samples, exps, mets, ref, batch_size=2, progress=False)
    expected = (tmp_path / "ref" / "scores.csv").read_bytes()

    class Killed(Exception):
        pass

    def die_after_two(k: int) -> None:
        if k == 2:
            raise Killed

    path = tmp_path / "run" / "scores.csv"
    store = ResumableCSV(path, header(mets), settings)
    with pytest.raises(Killed):
        evaluate(vm, samples, exps, mets, store, batch_size=2, progress=False, after_batch=die_after_two)
    # a crash in the middle of the next batch's write: some complete rows of image 4 and half a line
    lines = expected.decode().splitlines(keepends=True)
    image4 = [ln for ln in lines if ln.startswith("4,")]
    with open(path, "a") as f:
        f.write("".join(image4[:3]) + image4[3][:25])
    resumed = ResumableCSV(path, header(mets), settings)
    assert resumed.done == {0, 1, 2, 3} and resumed.dropped == 4
    scored = []
    evaluate(vm, samples, exps, mets, resumed, batch_size=2, progress=False, after_batch=scored.append)
    assert scored == [1]  # only the last batch ran again
    assert path.read_bytes() == expected
    with pytest.raises(VitlensError, match="other settings"):
        ResumableCSV(path, header(mets), {"run": 2})


# ---- the command ---------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("data")
    rng = np.random.default_rng(0)
    for i in range(3):
        Image.fromarray((rng.random((40, 40, 3)) * 255).astype(np.uint8)).save(d / f"im{i}.png")
    m = np.zeros((40, 40), np.uint8)
    m[5:25, 10:30] = 255
    Image.fromarray(m).save(d / "im0.mask.png")
    (d / "im1.json").write_text(json.dumps({"boxes": [[0, 0, 20, 20]], "class": 2}))
    (d / "im2.json").write_text(json.dumps({"boxes": [[10, 10, 40, 30]]}))
    return d


def test_evaluate_command_writes_csv_table_plots_and_resumes(vit3_dir, data_dir, tmp_path, capsys):
    out = tmp_path / "ev"
    argv = ["evaluate", "--model", vit3_dir, "--data", data_dir, "--methods", "rollout,grad_rollout", "--metrics",
            "positive,deletion,pointing,energy", "--n", "3", "--batch-size", "2", "--out", out]
    assert main([str(a) for a in argv]) == 0
    text = capsys.readouterr().out
    for name in ("rollout", "grad_rollout", "random", "gaussian", "cls_attention", "pos_prob_auc ↓", "pointing ↑"):
        assert name in text
    rows = (out / "scores.csv").read_text().splitlines()
    assert len(rows) == 1 + 5 * (3 + 1)  # 5 explainers x (3 pred rows + im1's ground-truth class)
    assert (out / "table.md").read_text().strip() in text
    assert (out / "positive_perturbation_pred.png").is_file() and (out / "deletion_gt.png").is_file()
    before = (out / "scores.csv").read_bytes()
    assert main([str(a) for a in argv]) == 0
    assert "resuming: 3 of 3" in capsys.readouterr().err
    assert (out / "scores.csv").read_bytes() == before


@pytest.mark.parametrize("extra, message", [
    (["--metrics", "pointing,bogus"], "unknown metric 'bogus'"),
    (["--methods", "nope"], "unknown method 'nope'"),
    (["--data", "/nonexistent/folder"], "not a folder"),
    (["--baseline", "drop", "--methods", "rollout", "--metrics", "positive", "--data", "BAD_JSON"], "not valid JSON"),
    (["--targets", "pred,maybe"], "unknown target 'maybe'"),
])
def test_evaluate_bad_input_is_one_line(vit3_dir, data_dir, tmp_path, capsys, extra, message):
    data = str(data_dir)
    if "BAD_JSON" in extra:
        bad = tmp_path / "bad"
        bad.mkdir()
        Image.new("RGB", (8, 8)).save(bad / "a.png")
        (bad / "a.json").write_text("{not json")
        extra = [str(bad) if e == "BAD_JSON" else e for e in extra]
    argv = ["evaluate", "--model", str(vit3_dir), "--data", data, "--out", str(tmp_path / "o"), *extra]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and message in err and "\n" not in err
