"""Time of the class-specific gradient methods as a ratio to a plain forward + backward of the same model, on the CPU.

Usage: ``python bench/bench_gradient_methods.py [--quick] [--models a,b] [--batches 1,8] [--repeats 3] [--warmup 1]``

Baseline: the timm model as is (fused attention on), a forward pass, then the gradient of the target logits with
respect to the input (``torch.autograd.grad``), measured in the same process. Variants run in interleaved rounds (the
order rotates each round); each ratio is the median over rounds of (variant time / baseline time in the same round).
Peers when installed: pytorch-grad-cam's GradCAM (target layer ``blocks[-1].norm1``, CLS removed by a reshape
transform). Integrated Gradients costs n_steps forwards and backwards by design; it is shown per path point.
Random weights (no hub access): speed does not depend on the weights.
"""

from __future__ import annotations

import argparse
import statistics
from collections.abc import Callable

import torch

import _env  # noqa: F401  (before any timm import: makes timm importable, pins threads)
import vitlens
from bench_rollout import interleaved, paired_ratios

MODELS = ("deit_tiny_patch16_224", "vit_base_patch16_224")
IG_STEPS = 8
TARGET = 1.1


def build(name: str) -> tuple[torch.nn.Module, vitlens.VitModel]:
    """A timm model with random weights and its vitlens wrapper."""
    import timm

    torch.manual_seed(0)
    module = timm.create_model(name, pretrained=False).eval()
    return module, vitlens.wrap(module)


def peer_gradcam(module: torch.nn.Module, target: list[int]) -> Callable[[torch.Tensor], object] | None:
    """pytorch-grad-cam's GradCAM on the last block's norm1, or None when it is not installed."""
    try:
        from pytorch_grad_cam import GradCAM
        from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget
    except ImportError:
        return None

    def reshape(t: torch.Tensor) -> torch.Tensor:
        side = int((t.shape[1] - 1) ** 0.5)
        return t[:, 1:].reshape(t.shape[0], side, side, t.shape[-1]).permute(0, 3, 1, 2)

    cam = GradCAM(model=module, target_layers=[module.blocks[-1].norm1], reshape_transform=reshape)
    targets = [ClassifierOutputTarget(t) for t in target]
    return lambda x: cam(input_tensor=x, targets=targets)


def variants(module: torch.nn.Module, model: vitlens.VitModel, x: torch.Tensor,
             with_ig: bool) -> dict[str, Callable[[], object]]:
    """The timed callables; the first one is the baseline."""
    target = torch.arange(x.shape[0]) % 1000

    def forward_backward() -> object:
        xi = x.detach().requires_grad_(True)
        with torch.enable_grad():
            out = module(xi)
            return torch.autograd.grad(out.gather(1, target[:, None]).sum(), xi)

    m = vitlens.METHODS
    fns: dict[str, Callable[[], object]] = {"forward+backward (baseline)": forward_backward}
    for label, method in [("GradRollout", m["grad_rollout"](model)), ("GAE", m["gae"](model)),
                          ("LeGrad", m["legrad"](model)), ("TokenGradCAM", m["gradcam"](model)),
                          ("Saliency (captum)", m["saliency"](model)), ("InputXGradient (captum)", m["ixg"](model))]:
        fns[label] = lambda method=method: method.explain(x, target)
    peer = peer_gradcam(module, target.tolist())
    if peer is not None:
        fns["pytorch-grad-cam GradCAM [peer]"] = lambda: peer(x)
    if with_ig:
        ig = m["ig"](model, n_steps=IG_STEPS)  # the default internal batch size (path points per forward)
        fns[f"IG, {IG_STEPS} steps [per step]"] = lambda: ig.explain(x, target)
    return fns


def bench_case(name: str, batch: int, warmup: int, repeats: int) -> dict[str, float]:
    """Print one model/batch table; return the median paired ratio of each variant."""
    module, model = build(name)
    x = torch.randn(batch, 3, 224, 224)
    fns = variants(module, model, x, with_ig=name == MODELS[0])
    base = next(iter(fns))
    times = interleaved(fns, warmup, repeats)
    ratios = paired_ratios(times, base)
    print(f"\n{name}  batch {batch}  (224 px, {model.num_blocks} blocks, {warmup} warm-up + {repeats} timed rounds)")
    print(f"  {'variant':37s} {'median ms':>10s} {'ratio':>6s} {'(min..max)':>12s}")
    out = {}
    for n in fns:
        per = IG_STEPS + 1 if n.startswith("IG") else 1  # IG: n_steps path points + the forward that picks the class
        med = statistics.median(ratios[n]) / per
        out[n] = med
        spread = f"({min(ratios[n]) / per:.2f}..{max(ratios[n]) / per:.2f})"
        print(f"  {n:37s} {1e3 * statistics.median(times[n]):10.1f} {med:6.3f} {spread:>12s}")
    return out


def main() -> None:
    """Run the benchmark and print the tables and the summary against the targets."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="smoke run: deit-tiny, batch 1, one round")
    ap.add_argument("--repeats", type=int, default=3, help="timed rounds (default 3; 2 for ViT-B batch 8)")
    ap.add_argument("--warmup", type=int, default=1, help="discarded warm-up rounds (default 1)")
    ap.add_argument("--models", default=",".join(MODELS), help="comma-separated timm model names (default: both)")
    ap.add_argument("--batches", default="1,8", help="comma-separated batch sizes (default 1,8)")
    args = ap.parse_args()
    batches = [int(b) for b in args.batches.split(",")]
    cases = [(MODELS[0], 1)] if args.quick else [(n, b) for n in args.models.split(",") for b in batches]
    print("bench_gradient_methods:", _env.describe())
    print("CPU only; the machine is shared, so times are noisy. 'ratio' = median over rounds of variant / baseline")
    print("(forward + input gradient of the plain timm model, fused attention) in the same round.")
    results = {}
    for name, b in cases:
        heavy = name == MODELS[1] and b == 8
        repeats = 1 if args.quick else (min(args.repeats, 2) if heavy and args.repeats == 3 else args.repeats)
        results[(name, b)] = bench_case(name, b, 0 if args.quick else args.warmup, repeats)
    print(f"\nSummary (targets: every method <= {TARGET}x forward+backward; LeGrad and GAE <= {TARGET}x GradRollout)")
    for (name, b), r in results.items():
        rel = {k: r[k] / r["GradRollout"] for k in ("GAE", "LeGrad")}
        print(f"  {name:24s} b={b}: " + ", ".join(f"{k.split(' ')[0]} {v:.2f}" for k, v in r.items()
                                                       if not k.startswith("forward"))
              + f" | vs GradRollout: GAE {rel['GAE']:.2f}, LeGrad {rel['LeGrad']:.2f}")


if __name__ == "__main__":
    main()
