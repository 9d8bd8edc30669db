"""Architectures and training recipes of the embedded `vitlens:` models, and the command that rebuilds them.

    python -m vitlens.train.embedded --all --out src/vitlens/models/zoo
    python -m vitlens.train.embedded scenes-vit --out src/vitlens/models/zoo

Each model is a transformers image classifier with a multi-label (sigmoid) head over the 10 Fashion-MNIST
classes, trained from scratch on SceneDataset scenes resized to `image_size` (PIL bicubic, as vitlens does
at inference), on CPU with one thread unless told otherwise.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from PIL import Image
from torch import nn

from vitlens.data.fashion_mnist import FASHION_MNIST_CLASSES
from vitlens.data.scenes import SceneConfig, SceneDataset
from vitlens.train.loop import History, logits_of, train
from vitlens.train.metrics import per_class_ap, per_item_recall

if TYPE_CHECKING:
    from transformers import PreTrainedModel

NUM_CLASSES = len(FASHION_MNIST_CLASSES)
TEST_SCENES = 2000
TEST_SEED = 0
MAX_ITEMS = 3
PATCH_COVER = 0.15
TARGET_MAP, TARGET_RECALL = 0.90, 0.85
FAMILY_NAMES = {"vit": "ViT", "deit": "DeiT", "swin": "Swin"}
LOCALISATION_SCENES, LOCALISATION_SEED = 100, 5
TWO_OBJECTS = SceneConfig(min_items=2, max_items=2)


@dataclass(frozen=True)
class Recipe:
    """Architecture and training recipe of one embedded model."""

    name: str
    family: str  # "vit", "deit" or "swin"
    image_size: int = 64
    patch_size: int = 8
    hidden_size: int = 128
    num_layers: int = 4
    num_heads: int = 4
    mlp_ratio: int = 4
    depths: tuple[int, ...] = ()  # swin: blocks per stage (hidden_size is the first stage's width)
    window_size: int = 4  # swin
    n_train: int = 40000
    batch_size: int = 32
    steps: int = 6000
    lr: float = 5e-4
    weight_decay: float = 0.05
    warmup: float = 0.05
    flip: bool = True
    mean: tuple[float, float, float] = (0.5, 0.5, 0.5)
    std: tuple[float, float, float] = (0.25, 0.25, 0.25)
    patch_loss: float = 1.0  # weight of the token-labelling term (0: CLS loss only)
    distillation: str = ""  # deit: how the distillation token is trained
    extra: dict = field(default_factory=dict)


RECIPES: dict[str, Recipe] = {
    "scenes-vit": Recipe(name="scenes-vit", family="vit"),
    "scenes-deit": Recipe(
        name="scenes-deit",
        family="deit",
        distillation="hard: BCE on the ground-truth multi-hot labels for both the CLS and the distillation head",
    ),
    "scenes-swin": Recipe(
        name="scenes-swin", family="swin", patch_size=4, hidden_size=48, num_heads=2, depths=(2, 2, 2), window_size=4
    ),
}


def build_embedded(name: str, **overrides):
    """The transformers config of embedded model `name` (recipe fields may be overridden, e.g. for pilots)."""
    r = recipe_of(name, **overrides)
    common: dict[str, Any] = dict(
        image_size=r.image_size,
        patch_size=r.patch_size,
        num_channels=3,
        hidden_size=r.hidden_size,
        num_hidden_layers=r.num_layers,
        num_attention_heads=r.num_heads,
        intermediate_size=r.mlp_ratio * r.hidden_size,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
        num_labels=NUM_CLASSES,
        id2label=dict(enumerate(FASHION_MNIST_CLASSES)),
        label2id={c: i for i, c in enumerate(FASHION_MNIST_CLASSES)},
        problem_type="multi_label_classification",
    )
    if r.family == "vit":
        from transformers import ViTConfig

        return ViTConfig(**common, architectures=["ViTForImageClassification"])
    if r.family == "deit":
        from transformers import DeiTConfig

        return DeiTConfig(**common, architectures=["DeiTForImageClassificationWithTeacher"])
    if r.family == "swin":
        from transformers import SwinConfig

        for k in ("hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size",
                  "hidden_dropout_prob"):
            common.pop(k)
        return SwinConfig(
            **common,
            embed_dim=r.hidden_size,
            depths=list(r.depths),
            num_heads=[r.num_heads * 2**i for i in range(len(r.depths))],
            window_size=r.window_size,
            mlp_ratio=float(r.mlp_ratio),
            drop_path_rate=0.0,
            architectures=["SwinForImageClassification"],
        )
    raise ValueError(f"unknown family {r.family!r}")


def token_grid(r: Recipe) -> int:
    """Side of the final token grid: patches for ViT / DeiT, the last stage's grid for Swin."""
    side = r.image_size // r.patch_size
    return side // 2 ** (len(r.depths) - 1) if r.family == "swin" else side


def recipe_of(name: str, **overrides) -> Recipe:
    """The recipe of embedded model `name`, with fields replaced by `overrides`."""
    if name not in RECIPES:
        raise ValueError(f"unknown embedded model {name!r}; known: {sorted(RECIPES)}")
    return Recipe(**{**asdict(RECIPES[name]), **overrides})


def _model_from_config(config) -> PreTrainedModel:
    if config.model_type == "vit":
        from transformers import ViTForImageClassification

        return ViTForImageClassification(config)
    if config.model_type == "swin":
        from transformers import SwinForImageClassification

        return SwinForImageClassification(config)
    from transformers import DeiTForImageClassificationWithTeacher

    return DeiTForImageClassificationWithTeacher(config)


# ---------------------------------------------------------------- data


def scene_arrays(
    n: int,
    seed: int,
    split: str,
    size: int,
    grid: int = 8,
    cache_dir: Path | None = None,
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Scenes resized to `size` px as arrays: images, labels, items, patch labels.

    images uint8 [N, size, size, 3] (PIL bicubic), labels float32 [N, 10] multi-hot, items int [N, 3] (class of
    each item, -1 pad), patch labels uint8 [N, grid * grid, 10]: class k is on for a patch when items of class k
    cover at least PATCH_COVER of it.
    """
    cache = None
    if cache_dir is not None:
        cache = Path(cache_dir) / f"scenes-{split}-s{seed}-n{n}-{size}px-g{grid}.npz"
        if cache.is_file():
            with np.load(cache) as z:
                return z["images"], z["labels"], z["items"], z["patches"]
    ds = SceneDataset(n, seed=seed, split=split)
    images = np.empty((n, size, size, 3), np.uint8)
    labels = np.empty((n, NUM_CLASSES), np.float32)
    items = np.full((n, MAX_ITEMS), -1, np.int64)
    patches = np.zeros((n, grid * grid, NUM_CLASSES), np.uint8)
    for i in range(n):
        s = ds[i]
        img = Image.fromarray(s.image)
        if img.size != (size, size):
            img = img.resize((size, size), Image.Resampling.BICUBIC)
        images[i] = np.asarray(img)
        labels[i] = s.labels
        items[i, : len(s.classes)] = s.classes[:MAX_ITEMS]
        h, w = s.masks.shape[1:]
        cover = s.masks.reshape(len(s.classes), grid, h // grid, grid, w // grid).mean(axis=(2, 4))
        for k, c in enumerate(s.classes):
            patches[i, :, c] |= (cover[k] >= PATCH_COVER).ravel()
    if cache is not None:
        cache.parent.mkdir(parents=True, exist_ok=True)
        np.savez(cache, images=images, labels=labels, items=items, patches=patches)
    return images, labels, items, patches


def _normalise(images: torch.Tensor, mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    return (images.permute(0, 3, 1, 2).float() / 255.0 - mean) / std


def batches(images: np.ndarray, labels: np.ndarray, patches: np.ndarray, r: Recipe, seed: int):
    """A function epoch -> shuffled, normalised, randomly flipped batches (x, (labels, patch labels))."""
    imgs, labs, pats = torch.from_numpy(images), torch.from_numpy(labels), torch.from_numpy(patches)
    g_side = token_grid(r)
    mean, std = torch.tensor(r.mean).view(1, 3, 1, 1), torch.tensor(r.std).view(1, 3, 1, 1)

    def epoch_batches(epoch: int):
        g = torch.Generator().manual_seed(seed * 1000 + epoch)
        order = torch.randperm(len(imgs), generator=g)
        for k in range(0, len(order) - r.batch_size + 1, r.batch_size):
            idx = order[k : k + r.batch_size]
            x = _normalise(imgs[idx], mean, std)
            p = pats[idx].float()
            if r.flip:
                flip = torch.rand(len(idx), generator=g) < 0.5
                x[flip] = x[flip].flip(-1)
                p[flip] = (
                    p[flip].view(-1, g_side, g_side, NUM_CLASSES).flip(2).reshape(-1, g_side * g_side, NUM_CLASSES)
                )
            yield x, (labs[idx], p)

    return epoch_batches


def predict(model: nn.Module, images: np.ndarray, r: Recipe, batch_size: int = 250) -> np.ndarray:
    """Sigmoid probabilities [N, 10] of the model on uint8 images (already at the model's size)."""
    mean, std = torch.tensor(r.mean).view(1, 3, 1, 1), torch.tensor(r.std).view(1, 3, 1, 1)
    model.eval()
    out = []
    with torch.no_grad():
        for k in range(0, len(images), batch_size):
            x = _normalise(torch.from_numpy(images[k : k + batch_size]), mean, std)
            out.append(torch.sigmoid(logits_of(model(pixel_values=x))).numpy())
    return np.concatenate(out)


def evaluate(probs: np.ndarray, labels: np.ndarray, items: np.ndarray, threshold: float = 0.5) -> dict:
    """mAP, per-item recall and micro precision at `threshold`, and per-class AP and recall."""
    ap = per_class_ap(probs, labels)
    rec, rec_c = per_item_recall(probs, [[int(c) for c in row if c >= 0] for row in items], threshold, NUM_CLASSES)
    pred = probs >= threshold
    precision = float((pred & (labels > 0)).sum() / max(1, pred.sum()))
    exact = float(np.mean(np.all(pred == (labels > 0), axis=1)))
    return {
        "mAP": float(np.nanmean(ap)),
        "per_item_recall": rec,
        "precision_at_threshold": precision,
        "exact_match": exact,
        "threshold": threshold,
        "per_class": {
            c: {"AP": float(ap[i]), "recall": float(rec_c[i]), "items": int((items == i).sum())}
            for i, c in enumerate(FASHION_MNIST_CLASSES)
        },
    }


# ---------------------------------------------------------------- training


def _loss_fn(r: Recipe):
    """BCE on the readout token(s) plus `patch_loss` x BCE of the same classifier applied to every patch token.

    The patch term (token labelling) only shapes training; the saved model is the plain transformers classifier.
    """
    bce = nn.functional.binary_cross_entropy_with_logits

    def loss(model: Any, x: torch.Tensor, target) -> torch.Tensor:  # a transformers classifier of r.family
        y, py = target if isinstance(target, (tuple, list)) else (target, None)
        if r.family == "swin":
            out = model.swin(pixel_values=x)
            main = bce(model.classifier(out.pooler_output), y)
            head, tokens = model.classifier, out.last_hidden_state
        elif r.family == "deit":
            seq = model.deit(pixel_values=x).last_hidden_state
            main = 0.5 * (bce(model.cls_classifier(seq[:, 0]), y) + bce(model.distillation_classifier(seq[:, 1]), y))
            head, tokens = model.cls_classifier, seq[:, 2:]
        else:
            seq = model.vit(pixel_values=x).last_hidden_state
            main = bce(model.classifier(seq[:, 0]), y)
            head, tokens = model.classifier, seq[:, 1:]
        if py is None or not r.patch_loss:
            return main
        return main + r.patch_loss * bce(head(tokens), py)

    return loss


def train_embedded(
    name: str,
    out_dir: str | Path,
    seed: int = 0,
    minutes_budget: float = 30,
    cache_dir: str | Path | None = None,
    progress: bool = True,
    **overrides,
) -> dict:
    """Train embedded model `name` from `seed` and write its save_pretrained folder, MODEL_CARD.md, metrics.json.

    The whole run (data generation included) is held to `minutes_budget` by compressing the lr schedule when the
    steps would not fit. Returns the metrics dict.
    """
    t0 = time.perf_counter()
    r = recipe_of(name, **overrides)
    torch.manual_seed(seed)
    config = build_embedded(name, **overrides)
    model = _model_from_config(config)
    n_params = sum(p.numel() for p in model.parameters())
    cache = Path(cache_dir) if cache_dir else None
    grid = token_grid(r)
    tr_img, tr_lab, _, tr_pat = scene_arrays(r.n_train, seed, "train", r.image_size, grid, cache)
    te_img, te_lab, te_items, _ = scene_arrays(TEST_SCENES, TEST_SEED, "test", r.image_size, grid, cache)
    data_s = time.perf_counter() - t0
    val = slice(0, 500)

    def eval_fn(m: nn.Module) -> dict:
        e = evaluate(predict(m, te_img[val], r), te_lab[val], te_items[val])
        print(f"  eval@500: mAP {e['mAP']:.4f} recall {e['per_item_recall']:.4f}", flush=True)
        return {k: e[k] for k in ("mAP", "per_item_recall")}

    budget = minutes_budget * 60 - (time.perf_counter() - t0) - 60  # keep a minute for the final evaluation
    hist: History = train(
        model,
        batches(tr_img, tr_lab, tr_pat, r, seed),
        steps=r.steps,
        lr=r.lr,
        weight_decay=r.weight_decay,
        warmup=r.warmup,
        loss_fn=_loss_fn(r),
        seed=seed,
        time_budget_s=budget,
        eval_fn=eval_fn,
        eval_every=max(1, r.steps // 12),
        progress=progress,
    )
    metrics = evaluate(predict(model, te_img, r), te_lab, te_items)
    total_s = time.perf_counter() - t0
    info = {
        "model": name,
        "seed": seed,
        "recipe": asdict(r),
        "parameters": n_params,
        "threads": torch.get_num_threads(),
        "cpu_cores": os.cpu_count(),
        "device": f"CPU ({platform.processor() or platform.machine()}), torch {torch.__version__}",
        "steps_done": hist.steps,
        "steps_planned": r.steps,
        "stopped": hist.stopped,
        "train_seconds": round(hist.seconds, 1),
        "data_seconds": round(data_s, 1),
        "total_seconds": round(total_s, 1),
        "final_train_loss": float(np.mean(hist.loss[-100:])),
        "test": {"scenes": TEST_SCENES, "seed": TEST_SEED, "split": "test", **metrics},
        "evals": hist.evals,
    }
    write_folder(model, r, Path(out_dir) / name, info)
    return describe_folder(Path(out_dir) / name)


def localisation_dataset() -> SceneDataset:
    """The held-out two-object scenes as a dataset (scene ``i`` depends only on ``i``): seeded test scenes of the
    committed Fashion-MNIST test items, never seen in training."""
    from vitlens.data.fashion_mnist import load_fixture_items

    return SceneDataset(2**31 - 1, seed=LOCALISATION_SEED, split="test", cfg=TWO_OBJECTS, items=load_fixture_items())


def localisation_scenes(n: int = LOCALISATION_SCENES) -> tuple[list, list, list, str]:
    """Two-object scenes with ground truth for localisation rates: (images, masks, classes, description).

    Seeded test scenes from the committed Fashion-MNIST test items (never seen in training), so that tests can
    measure the same rate without the Debian package."""
    ds = localisation_dataset()
    scenes = [ds[i] for i in range(n)]
    about = f"{n} two-object SceneDataset(split='test', seed={LOCALISATION_SEED}) scenes from the fixture test items"
    return [s.image for s in scenes], [s.masks for s in scenes], [s.classes for s in scenes], about


def describe_folder(folder: Path) -> dict:
    """Measure a trained folder's localisation (grad rollout for each item's class, maximum inside the item's mask) on
    the shipped two-object demo scenes and on held-out two-object scenes, add both to metrics.json and rewrite
    MODEL_CARD.md. Returns the metrics."""
    from vitlens.data.scenes import load_demo_scenes
    from vitlens.eval.localisation import DEFAULT_MIN_COVER, grad_rollout_in_mask
    from vitlens.models.loading import load_model

    info = json.loads((folder / "metrics.json").read_text())
    r = Recipe(**{**info["recipe"], "depths": tuple(info["recipe"].get("depths", ()))})
    model = load_model(str(folder))
    demo = load_demo_scenes()
    loc = grad_rollout_in_mask(model, [s.image for s in demo], [s.masks for s in demo], [s.classes for s in demo])
    info["grad_rollout_in_mask"] = {
        **loc.as_dict(),
        "per_item": loc.per_item,
        "scenes": [s.name for s in demo],
        "min_cover": DEFAULT_MIN_COVER,
    }
    images, masks, classes, about = localisation_scenes()
    held = grad_rollout_in_mask(model, images, masks, classes)
    info["grad_rollout_in_mask_held_out"] = {**held.as_dict(), "scenes": about, "min_cover": DEFAULT_MIN_COVER}
    (folder / "metrics.json").write_text(json.dumps(info, indent=2) + "\n")
    (folder / "MODEL_CARD.md").write_text(model_card(r, info))
    return info


def write_folder(model: PreTrainedModel, r: Recipe, folder: Path, info: dict) -> None:
    """save_pretrained + preprocessor_config.json + metrics.json + MODEL_CARD.md."""
    folder.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(folder, safe_serialization=True)
    pre = {
        "image_processor_type": "ViTImageProcessor",
        "do_resize": True,
        "size": {"height": r.image_size, "width": r.image_size},
        "resample": 3,
        "do_rescale": True,
        "rescale_factor": 1 / 255,
        "do_normalize": True,
        "image_mean": list(r.mean),
        "image_std": list(r.std),
    }
    (folder / "preprocessor_config.json").write_text(json.dumps(pre, indent=2) + "\n")
    (folder / "metrics.json").write_text(json.dumps(info, indent=2) + "\n")
    (folder / "MODEL_CARD.md").write_text(model_card(r, info))


def model_card(r: Recipe, info: dict) -> str:
    """The MODEL_CARD.md text of a trained embedded model."""
    t = info["test"]
    rows = "\n".join(f"| {c} | {v['AP']:.4f} | {v['recall']:.4f} | {v['items']} |" for c, v in t["per_class"].items())
    arch, head, head_short, shape = _card_architecture(r)
    met = "met" if t["mAP"] >= TARGET_MAP and t["per_item_recall"] >= TARGET_RECALL else "NOT met"
    shortfall = (
        "\n- It falls short of the project's quality targets: trained from scratch for under 30 minutes on one CPU "
        "thread, it is\n  far from converged (a transformer without convolutional priors learns these tinted, "
        "freely placed items slowly).\n  Low recall at 0.5 means under-confident probabilities: rank by probability "
        "rather than thresholding."
        if met == "NOT met"
        else ""
    )
    distil = f"\n- Distillation token: {r.distillation}." if r.distillation else ""
    rollout, held = info.get("grad_rollout_in_mask"), info.get("grad_rollout_in_mask_held_out")
    rate = (
        f"\n- grad rollout for each item's class puts its maximum inside that item's mask for {rollout['hits']} of "
        f"{rollout['total']} items of the shipped two-object demo scenes ({rollout['rate']:.0%}), and for "
        f"{held['hits']} of {held['total']} items ({held['rate']:.0%}) of {held['scenes']} (a hit: the map's top "
        f"token cell is at least {rollout['min_cover']:.0%} covered by the item's mask)."
        if rollout and held
        else ""
    )
    return f"""# vitlens:{r.name}

A small {FAMILY_NAMES[r.family]} trained from scratch by `vitlens.train.embedded` to tell which
Fashion-MNIST classes appear in a vitlens scene
(multi-label, sigmoid head, `problem_type="multi_label_classification"`).

## Data
- Training: {r.n_train} `SceneDataset(split="train", seed={info["seed"]})` scenes (Fashion-MNIST train items,
  1-3 tinted items on plain / noise / photo backgrounds, 128 px), resized to {r.image_size} px with PIL bicubic,
  random horizontal flips.
- Test: {t["scenes"]} `SceneDataset(split="test", seed={t["seed"]})` scenes (Fashion-MNIST test items), never
  seen in training.

## Architecture
- transformers `{arch}`, {r.image_size} px input, patch {r.patch_size}, {shape};
  {info["parameters"]:,} parameters (float32).
- Readout: {head}; 10 outputs, one sigmoid per class.{distil}
- Preprocessing (preprocessor_config.json): resize to {r.image_size}x{r.image_size} (bicubic), scale to [0, 1],
  normalise with mean {list(r.mean)}, std {list(r.std)}.

## Training recipe
- Loss: binary cross-entropy with logits on the readout, plus {r.patch_loss} x the same BCE of the same classifier
  applied to every final token ({"the last stage's tokens" if r.family == "swin" else "patch tokens"}) against the
  classes of its image cell (token labelling: class k is on where items of class k cover >= {PATCH_COVER:.0%} of the
  cell, from the scene masks). The patch term only speeds up and localises
  training; the saved model is the plain transformers classifier and reads out {head_short}.
- Optimiser: AdamW (lr {r.lr}, weight decay {r.weight_decay} on matrices), linear
  warmup over {r.warmup:.0%} of the schedule then cosine to 0; batch {r.batch_size}; {r.steps} planned steps,
  {info["steps_done"]} done (stopped by: {info["stopped"]}); gradient clipping at norm 1; seed {info["seed"]}.
- Time: {info["train_seconds"] / 60:.1f} min of training ({info["total_seconds"] / 60:.1f} min in all, data
  generation {info["data_seconds"]:.0f} s) on {info["device"]}, {info["threads"]} thread(s)
  of a {info.get("cpu_cores", 2)}-core machine.
- Rebuild: `python -m vitlens.train.embedded {r.name} --seed {info["seed"]} --out src/vitlens/models/zoo`
  (bit-identical only if the run again finishes by steps, not by the time budget).

## Metrics ({t["scenes"]} test scenes, threshold {t["threshold"]})
- project targets (mAP >= {TARGET_MAP}, per-item recall >= {TARGET_RECALL}): **{met}**
- mean average precision (macro over classes): **{t["mAP"]:.4f}**
- per-item recall (fraction of items whose class gets probability >= {t["threshold"]}): **{t["per_item_recall"]:.4f}**
- precision of the predicted labels at {t["threshold"]}: {t["precision_at_threshold"]:.4f}; exact-match scenes:
  {t["exact_match"]:.4f}{rate}

| class | AP | recall | items |
|---|---|---|---|
{rows}

## Limitations
- Trained only on synthetic vitlens scenes: 28 px Fashion-MNIST items, scaled 1.5-3.5x, tinted, on three background
  kinds. It is a toy for explanation demos, not a clothing recogniser for photos.
- Shirt / T-shirt / pullover / coat are the hardest classes (as in Fashion-MNIST itself); small items lose detail at
  {r.image_size} px.
- Probabilities are not calibrated beyond what BCE training gives.{shortfall}
"""


def _card_architecture(r: Recipe) -> tuple[str, str, str, str]:
    """(class name, readout, readout in short, shape sentence) of a recipe, for its model card."""
    side = r.image_size // r.patch_size
    if r.family == "swin":
        grids = " -> ".join(f"{side >> i}x{side >> i}" for i in range(len(r.depths)))
        heads = [r.num_heads * 2**i for i in range(len(r.depths))]
        shape = (
            f"embedding width {r.hidden_size} (doubling per stage), depths {list(r.depths)}, heads {heads}, window "
            f"{r.window_size} (token grids {grids}; shifted windows in every second block where the grid is larger "
            f"than the window), MLP ratio {r.mlp_ratio}"
        )
        mean = "mean of the final tokens (no CLS token)"
        return "SwinForImageClassification", mean, "the mean of the final tokens", shape
    shape = (
        f"{side * side} patch tokens, hidden {r.hidden_size}, {r.num_layers} layers, {r.num_heads} heads, "
        f"MLP {r.mlp_ratio * r.hidden_size}"
    )
    if r.family == "vit":
        return "ViTForImageClassification", "CLS token", "the CLS token only", shape
    both = "CLS + distillation token (logits = mean of the two heads)"
    return "DeiTForImageClassificationWithTeacher", both, "the CLS and distillation tokens only", shape


def main(argv: list[str] | None = None) -> None:
    """Command line: rebuild one or all embedded models."""
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("names", nargs="*", help=f"models to build: {sorted(RECIPES)}")
    ap.add_argument("--all", action="store_true", help="build every embedded model")
    ap.add_argument("--out", default="src/vitlens/models/zoo", help="folder to write <name>/ into")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--minutes", type=float, default=30.0, help="budget per model, data generation included")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--cache", default=None, help="folder to cache generated scene arrays in")
    ap.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE", help="override a recipe field")
    ap.add_argument("--cards-only", action="store_true", help="no training: re-measure and rewrite the model cards")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    names = sorted(RECIPES) if args.all else args.names
    if not names:
        ap.error("name a model or pass --all")
    if args.cards_only:
        for name in names:
            rate = describe_folder(Path(args.out) / name)["grad_rollout_in_mask"]
            print(f"{name}: grad rollout max in the item's mask {rate['hits']}/{rate['total']}", flush=True)
        return
    overrides = {}
    for kv in args.set:
        k, v = kv.split("=", 1)
        kind = type(getattr(Recipe("x", "vit"), k))
        overrides[k] = json.loads(v) if v[:1] in "[{" or kind is bool else kind(v)
    for name in names:
        info = train_embedded(
            name, args.out, seed=args.seed, minutes_budget=args.minutes, cache_dir=args.cache, **overrides
        )
        t = info["test"]
        print(
            f"{name}: mAP {t['mAP']:.4f}, per-item recall {t['per_item_recall']:.4f}, "
            f"{info['steps_done']} steps in {info['train_seconds']:.0f} s",
            flush=True,
        )


if __name__ == "__main__":
    main()
