"""Time of `TransformerAttribution` and `AttnLRP` as a ratio to a plain forward + backward of the same model (CPU).

Usage: ``python bench/bench_lrp.py [--quick] [--models a,b] [--batches 1,8] [--repeats 5] [--warmup 1]
[--min-seconds 6]``

The baseline is the timm model as is (fused attention, parameters requiring grad) computing its logits and
``logits[:, target].sum().backward()``, measured in the same process. Variants run in interleaved rounds whose order
rotates (bench_rollout.py's scheme); each ratio is the median over rounds of variant time / baseline time in the same
round. Target: both methods within 2x of the baseline (issue 12).

``--flops`` also counts the floating-point operations of one call of each variant (torch's FlopCounterMode: matrix
products and convolutions), a load-independent companion to the wall-clock ratios on a shared machine.
"""

from __future__ import annotations

import argparse
import statistics
from collections.abc import Callable

import torch
from torch.utils._python_dispatch import TorchDispatchMode

import _env  # noqa: F401  (before any timm import: makes timm importable, pins threads)
import vitlens
from bench_rollout import build, interleaved, paired_ratios
from vitlens.methods.attnlrp import AttnLRP
from vitlens.methods.grad_rollout import GradRollout
from vitlens.methods.transformer_attribution import TransformerAttribution

TARGET = 2.0
MODELS = ("deit_tiny_patch16_224", "vit_base_patch16_224")
BASE = "forward + backward (baseline)"


def variants(module: torch.nn.Module, model: vitlens.VitModel, x: torch.Tensor) -> dict[str, Callable[[], object]]:
    """The timed callables; the first one is the baseline."""

    def plain() -> None:
        module.zero_grad(set_to_none=True)
        logits = module(x)
        logits[:, 0].sum().backward()

    ta, lrp, grad = TransformerAttribution(model), AttnLRP(model), GradRollout(model)
    return {
        BASE: plain,
        "TransformerAttribution": lambda: ta.explain(x, target=0),
        "AttnLRP": lambda: lrp.explain(x, target=0),
        "GradRollout [info]": lambda: grad.explain(x, target=0),
    }


def bench_case(name: str, batch: int, warmup: int, repeats: int, min_seconds: float) -> dict[str, float]:
    """Print one model/batch table; return the median paired ratio of each variant."""
    module, model = build(name)
    x = torch.randn(batch, 3, 224, 224)
    fns = variants(module, model, x)
    times = interleaved(fns, warmup, repeats, min_seconds)
    ratios = paired_ratios(times, BASE)
    rounds = len(times[BASE])
    print(f"\n{name}  batch {batch}  (224 px, {warmup} warm-up + {rounds} timed rounds)")
    print(f"  {'variant':32s} {'median ms':>10s} {'min ms':>8s} {'ratio':>6s} {'(min..max)':>12s} {'min/min':>8s}")
    out = {}
    for n in fns:
        med = statistics.median(ratios[n])
        out[n] = med
        spread = f"({min(ratios[n]):.2f}..{max(ratios[n]):.2f})"
        print(f"  {n:32s} {1e3 * statistics.median(times[n]):10.1f} {1e3 * min(times[n]):8.1f} {med:6.3f} "
              f"{spread:>12s} {min(times[n]) / min(times[BASE]):8.3f}")
    return out


class _Flops(TorchDispatchMode):
    """Counts the FLOPs of matrix products and convolutions with torch's formulas (FlopCounterMode's registry, without
    its module tracker, whose hooks refuse torch.autograd.grad on a leaf)."""

    def __init__(self) -> None:
        super().__init__()
        from torch.utils.flop_counter import flop_registry

        self.registry, self.total = flop_registry, 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        formula = self.registry.get(func._overloadpacket)
        if formula is not None:
            self.total += formula(*args, **kwargs, out_val=out)
        return out


def flop_ratios(name: str, batch: int) -> dict[str, float]:
    """GFLOP of one call of each variant and its ratio to the baseline's, printed as a table."""
    module, model = build(name)
    x = torch.randn(batch, 3, 224, 224)
    counts = {}
    for n, fn in variants(module, model, x).items():
        fn()  # warm caches (|W| splits) as in the timed runs
        with _Flops() as counter:
            fn()
        counts[n] = counter.total
    print(f"\n{name}  batch {batch}: GFLOP per call (matrix products, convolutions) and ratio to the baseline")
    for n, c in counts.items():
        print(f"  {n:32s} {c / 1e9:10.2f} {c / counts[BASE]:6.3f}")
    return {n: c / counts[BASE] for n, c in counts.items()}


def main() -> None:
    """Run the benchmark and print the tables and verdicts."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="smoke run: deit-tiny, batch 1, one round")
    ap.add_argument("--repeats", type=int, default=5, help="timed rounds (default 5)")
    ap.add_argument("--warmup", type=int, default=1, help="discarded warm-up rounds (default 1)")
    ap.add_argument("--min-seconds", type=float, default=6.0, help="keep adding rounds (up to 25) until this much time")
    ap.add_argument("--flops", action="store_true", help="count FLOPs instead of timing (load-independent)")
    ap.add_argument("--models", default=",".join(MODELS), help="comma-separated timm model names (default: both)")
    ap.add_argument("--batches", default="1,8", help="comma-separated batch sizes (default 1,8)")
    args = ap.parse_args()
    chosen = tuple(args.models.split(","))
    sizes = tuple(int(b) for b in args.batches.split(","))
    models, batches = (chosen[:1], (1,)) if args.quick else (chosen, sizes)
    warmup, repeats, min_s = (1, 1, 0.0) if args.quick else (args.warmup, args.repeats, args.min_seconds)
    print("bench_lrp:", _env.describe())
    if args.flops:
        for m in models:
            for b in batches:
                flop_ratios(m, b)
        return
    results = {(m, b): bench_case(m, b, warmup, repeats, min_s) for m in models for b in batches}
    print(f"\nTarget: ratio <= {TARGET} (median paired ratio to a plain forward + backward)")
    for (m, b), r in results.items():
        for key in ("TransformerAttribution", "AttnLRP"):
            print(f"  {m:22s} b{b}  {key:24s} {r[key]:.3f}  {'met' if r[key] <= TARGET else 'NOT met'}")


if __name__ == "__main__":
    main()
