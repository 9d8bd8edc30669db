"""Our perturbation test (`vitlens.eval.metrics.Deletion`, the machinery of every perturbation curve) against
Quantus's `PixelFlipping` on the same model, inputs, maps and steps, in the same process.

Usage: ``python bench/bench_eval.py [--images 64] [--steps 8] [--repeats 3] [--forward-batch 64]``

Model: the embedded `vitlens:scenes-vit` (64 px, 8x8 patches). Inputs: the first held-out scenes; maps: grad rollout
for the predicted class (computed once, outside the timings); target: the predicted class. Both remove patches in
order of relevance with 0 (after normalisation) as the fill, ``steps`` equal steps of 64/steps patches up to all of
them. Quantus checks ``features_in_step`` against H * W but flips over the C * H * W features (maps repeated over
channels, each patch's pixels share one value), so it runs 3 * steps steps of 64 * (64 / steps) features, and after
every third one the same patches as vitlens's step are gone; vitlens removes 64 / steps patches per step. Both return
the target's logit per step (Quantus with ``softmax=False``), which are compared; times are best of ``repeats``.
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch

import _env  # noqa: F401  (makes transformers importable here, pins threads)
import vitlens
from vitlens.eval.data import scene_samples
from vitlens.eval.metrics import Batch, Deletion
from vitlens.eval.removal import FORWARD_BATCH
from vitlens.methods import GradRollout


class Logits(torch.nn.Module):
    """The HF classifier as a module returning a logits tensor (what Quantus calls)."""

    def __init__(self, module: torch.nn.Module) -> None:
        super().__init__()
        self.module = module

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.module(pixel_values=x).logits


def best_of(fn, repeats: int) -> tuple[float, object]:
    best, out = float("inf"), None
    for _ in range(repeats):
        t = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - t)
    return best, out


def main() -> None:
    """Time both and print the ratio."""
    import quantus

    ap = argparse.ArgumentParser()
    ap.add_argument("--images", type=int, default=64)
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--forward-batch", type=int, default=FORWARD_BATCH,
                    help="images per forward in vitlens (default: the library's; Quantus: --images)")
    args = ap.parse_args()
    model = vitlens.load_model("vitlens:scenes-vit")
    samples = scene_samples(model, args.images)
    x = torch.stack([model.preprocess.tensor(s.view) for s in samples])
    with torch.no_grad():
        clean = model(x)
    target = clean.argmax(-1)
    maps = GradRollout(model).explain(x, target=target).maps.detach()
    grid = tuple(maps.shape[1:])
    n = grid[0] * grid[1]
    if n % args.steps:
        raise SystemExit(f"--steps must divide the {n} patches")
    patch_px = (x.shape[-2] // grid[0]) * (x.shape[-1] // grid[1])
    a_pix = torch.nn.functional.interpolate(maps[:, None], size=x.shape[-2:], mode="nearest")
    a_pix = a_pix.expand(-1, 3, -1, -1).numpy()

    def ours() -> torch.Tensor:
        batch = Batch(model, x, target, maps, clean)
        metric = Deletion(steps=args.steps, baseline="zero", forward_batch=args.forward_batch)
        metric(batch)
        logits = batch.removal_logits(metric.specs(n), "zero")  # cached: the forwards ran inside metric(batch)
        return logits[1:].gather(-1, target[None, :, None].expand(args.steps, -1, 1))[..., 0].T

    # Quantus checks features_in_step against H * W but flips over C * H * W features: 3 of its steps make one of ours
    metric_q = quantus.PixelFlipping(features_in_step=patch_px * n // args.steps, perturb_baseline=0.0,
                                     normalise=False, disable_warnings=True, display_progressbar=False)
    q_model = Logits(model.module).eval()

    def theirs() -> np.ndarray:
        return np.asarray(metric_q(model=q_model, x_batch=x.numpy(), y_batch=target.numpy(), a_batch=a_pix,
                                   device="cpu", softmax=False, batch_size=args.images))

    with torch.no_grad():
        t_ours, v_ours = best_of(ours, args.repeats)
    t_q, v_q = best_of(theirs, args.repeats)
    v_q = np.asarray(v_q)[:, 2::3]  # after every third Quantus step the same patches (all channels) are removed
    diff = float(np.abs(np.asarray(v_ours) - v_q).max())
    print(f"vitlens:scenes-vit, {args.images} held-out scenes, grad rollout maps, {args.steps} steps of "
          f"{n // args.steps} patches, fill 0 after normalisation, {torch.get_num_threads()} threads")
    print(f"  quantus {quantus.__version__} PixelFlipping: {t_q:8.3f} s")
    print(f"  vitlens Deletion:               {t_ours:8.3f} s")
    print(f"  ratio: {t_q / t_ours:.1f}x as run ({3 * args.steps} Quantus steps), {t_q / 3 / t_ours:.1f}x per equal "
          f"step count;  max |logit difference| at the shared steps: {diff:.2e}")


if __name__ == "__main__":
    main()
