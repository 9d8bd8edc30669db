"""vitlens `Lime` against the `lime` package's LimeImageExplainer and captum's Lime, on the CPU.

Usage: ``python bench/bench_lime.py [--samples 1000] [--batch 50] [--model deit_tiny_patch16_224] [--skip-real]``

All three explain the same image (the bundled cat photo at 224 px) with the same SLIC superpixels (computed once by
vitlens and handed to each), the same number of samples and the same batch size, hiding superpixels with their mean
colour. Scores are softmax probabilities. Needs ``pip install -c constraints.txt lime captum``.

(a) With the real model (timm deit_tiny_patch16_224, random weights, no download): each method's total time divided
    by the time of ``samples`` bare forward passes at the same batch size (target: vitlens within 1.1x).
(b) With a trivial model (mean pool + linear layer), the time spent outside the model: each method's total time
    minus the time inside the model's forward calls (timed by a wrapper); target: vitlens at least 10x below lime's
    and captum's.
(c) hide="drop" (tokens of hidden patches removed) against hide="mean" with a 7x7 patch-aligned grid.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

import _env  # noqa: F401  (first: makes timm importable, pins threads)
from vitlens.images import Preprocess, load_image
from vitlens.methods.lime import ImageClassifier, Lime
from vitlens.methods.segmentation import image_segments

CAT = Path(__file__).resolve().parents[1] / "src" / "vitlens" / "assets" / "demo_cat.png"


def timed(fn: Callable[[], object], repeats: int = 1) -> float:
    """Median wall time of ``fn`` over ``repeats`` runs."""
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


class Timed(torch.nn.Module):
    """Wraps a module and adds the wall time of its forward calls to ``seconds``."""

    def __init__(self, inner: torch.nn.Module) -> None:
        super().__init__()
        self.inner = inner
        self.seconds = 0.0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        t0 = time.perf_counter()
        out = self.inner(x)
        self.seconds += time.perf_counter() - t0
        return out


class Trivial(torch.nn.Module):
    """A model that costs almost nothing: 8x8 average pool + a linear layer to 1000 classes."""

    def __init__(self) -> None:
        super().__init__()
        self.pool = torch.nn.AdaptiveAvgPool2d(8)
        self.fc = torch.nn.Linear(3 * 64, 1000)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.pool(x).flatten(1))


def runners(module: torch.nn.Module, pre: Preprocess, x: torch.Tensor, rgb: np.ndarray, seg: np.ndarray,
            samples: int, batch: int) -> dict[str, Callable[[], object]]:
    """name -> a function running that LIME implementation once."""
    from captum.attr import Lime as CaptumLime
    from lime.lime_image import LimeImageExplainer

    mean = torch.tensor(pre.mean).view(1, 3, 1, 1)
    std = torch.tensor(pre.std).view(1, 3, 1, 1)
    model = ImageClassifier(module, pre)
    with torch.no_grad():
        target = int(module(x).argmax())

    def vitlens_lime():
        return Lime(model, num_samples=samples, batch_size=batch, hide="mean", seed=0).explain(x, segments=seg)

    def classifier_fn(images: np.ndarray) -> np.ndarray:  # lime hands [n, H, W, 3] numpy images in [0, 1]
        t = (torch.from_numpy(images).float().permute(0, 3, 1, 2) - mean) / std
        with torch.no_grad():
            return module(t).softmax(-1).numpy()

    def lime_package():
        explainer = LimeImageExplainer(random_state=0)
        return explainer.explain_instance(rgb, classifier_fn, labels=(target,), top_labels=None, hide_color=None,
                                          num_samples=samples, batch_size=batch, segmentation_fn=lambda _: seg,
                                          random_seed=0)

    seg_t = torch.from_numpy(seg)
    hidden = Lime(model, hide="mean").hidden_image(x[0], seg_t, int(seg.max()) + 1)[None]

    def forward(t: torch.Tensor) -> torch.Tensor:
        return module(t).softmax(-1)

    def captum_lime():
        with torch.no_grad():
            return CaptumLime(forward).attribute(x, target=target, baselines=hidden, feature_mask=seg_t[None, None],
                                                 n_samples=samples, perturbations_per_eval=batch)

    return {"vitlens Lime": vitlens_lime, "lime LimeImageExplainer": lime_package, "captum Lime": captum_lime}


def bare(module: torch.nn.Module, x: torch.Tensor, samples: int, batch: int) -> float:
    """Time of ``samples`` forward passes of x repeated, in batches of ``batch``."""
    xb = x.expand(batch, -1, -1, -1).contiguous()

    def run():
        with torch.no_grad():
            for s in range(0, samples, batch):
                module(xb[: min(batch, samples - s)]).softmax(-1)

    return timed(run)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--samples", type=int, default=1000)
    ap.add_argument("--batch", type=int, default=50)
    ap.add_argument("--model", default="deit_tiny_patch16_224")
    ap.add_argument("--repeats", type=int, default=3, help="runs per method with the trivial model (median)")
    ap.add_argument("--skip-real", action="store_true", help="only the trivial-model part (b)")
    args = ap.parse_args()
    import timm

    print(_env.describe())
    pre = Preprocess((224, 224))
    x, views = pre(load_image(CAT))
    rgb = np.asarray(views[0], dtype=np.float64) / 255.0
    seg = image_segments(rgb, "slic", 50)
    print(f"image {CAT.name} 224x224, {int(seg.max()) + 1} SLIC superpixels, {args.samples} samples, "
          f"batch {args.batch}")

    print("\n(b) time outside the model (trivial model: 8x8 mean pool + linear to 1000 classes)")
    torch.manual_seed(0)
    trivial = Trivial().eval()
    timed_model = Timed(trivial)
    fns = runners(timed_model, pre, x, rgb, seg, args.samples, args.batch)
    for fn in fns.values():
        fn()  # warm-up
    base = bare(trivial, x, args.samples, args.batch)
    outside = {}
    for name, fn in fns.items():
        totals = []
        for _ in range(args.repeats):
            timed_model.seconds = 0.0
            t0 = time.perf_counter()
            fn()
            totals.append((time.perf_counter() - t0, timed_model.seconds))
        total, inside = sorted(totals)[len(totals) // 2]
        outside[name] = (total - inside, total)
    ours = outside["vitlens Lime"][0]
    print(f"  {'':26s} {'outside model':>14s} {'total':>10s}")
    for name, (out_t, total) in outside.items():
        ratio = "" if name == "vitlens Lime" else f"  ({out_t / ours:.1f}x vitlens)"
        print(f"  {name:26s} {out_t * 1000:11.1f} ms {total * 1000:7.1f} ms{ratio}")
    print(f"  (bare forwards of the trivial model: {base * 1000:.1f} ms)")
    if args.skip_real:
        return

    print(f"\n(a) total time with timm {args.model} (random weights) / {args.samples} bare forward passes")
    torch.manual_seed(0)
    module = timm.create_model(args.model, pretrained=False).eval()
    fns = runners(module, pre, x, rgb, seg, args.samples, args.batch)
    with torch.no_grad():
        module(x.expand(args.batch, -1, -1, -1))  # warm-up
    t_bare = bare(module, x, args.samples, args.batch)
    print(f"  {'bare forward passes':26s} {t_bare:8.2f} s")
    for name, fn in fns.items():
        t = timed(fn)
        print(f"  {name:26s} {t:8.2f} s  = {t / t_bare:.3f}x bare")

    print("\n(c) hide='drop' (hidden patches' tokens removed) vs hide='mean', 7x7 grid of 2x2-patch cells")
    from vitlens.models.loading import load_model

    vm = load_model(module)
    times = {}
    for hide in ("mean", "drop"):
        m = Lime(vm, segmentation="grid", n_segments=49, num_samples=args.samples, batch_size=args.batch,
                 hide=hide, seed=0)
        times[hide] = timed(lambda m=m: m.explain(x))
        print(f"  hide={hide:5s} {times[hide]:8.2f} s  = {times[hide] / t_bare:.3f}x bare forwards")
    print(f"  drop speed-up: {times['mean'] / times['drop']:.2f}x")


if __name__ == "__main__":
    main()
