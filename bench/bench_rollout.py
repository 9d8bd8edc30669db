"""Time of `vitlens.Rollout(model).explain(x)` as a ratio to a plain forward pass, on the CPU.

Usage: ``python bench/bench_rollout.py [--quick] [--repeats 5] [--warmup 1] [--min-seconds 6]``

The baseline is the timm model as is (fused attention on) under ``torch.no_grad()``, measured in the same process.
Variants run in interleaved rounds (the order rotates each round) and each ratio is the median over rounds of
(variant time / baseline time in the same round), so that load from other users of the machine cancels out as far
as possible. A breakdown then times each step of rollout's per-block stream callback on stored attentions.
"""

from __future__ import annotations

import argparse
import math
import statistics
import time
from collections.abc import Callable

import torch

import _env  # noqa: F401  (before any timm import, done lazily in build(): makes timm importable, pins threads)
import vitlens
import vitlens.methods.rollout as vr
from vitlens.methods.rollout import add_residual, discard_lowest, fuse_heads, readout

TARGET = 1.3
MODELS = ("vit_tiny_patch16_224", "vit_base_patch16_224")
OLD_DISCARD = "Rollout(max, 0.9), old discard (k smallest)"
OLD_PATH = "Rollout() [mean], pre-issue-12 path"


def add_residual_eye(a: torch.Tensor, residual_weight: float, normalize: bool) -> torch.Tensor:
    """The library's residual before issue 12 (an identity matrix allocated per block), as a same-process baseline."""
    eye = torch.eye(a.shape[-1], device=a.device, dtype=a.dtype)
    a = (1.0 - residual_weight) * a + residual_weight * eye
    if normalize:
        a = a / a.sum(-1, keepdim=True).clamp_min(torch.finfo(a.dtype).tiny)
    return a


def old_rollout_path(method: vitlens.Rollout, x: torch.Tensor) -> object:
    """``method.explain(x)`` as before issue 12: identity-matrix residual, the L x N^3 matrix chain (no row-only
    readout) and record() writing every module's training flag (eval() and its undo) on every call."""
    import vitlens.capture as cap

    def eval_always(module: torch.nn.Module) -> None:  # (the old undo also wrote every flag back: not counted)
        module.eval()

    make, saved_eval, saved_res = method.accumulator, cap._eval, vr.add_residual
    vr.add_residual, cap._eval = add_residual_eye, eval_always
    method.accumulator = lambda plan, batch=0: make(plan)  # default batch: never row-only
    try:
        return method.explain(x)
    finally:
        vr.add_residual, cap._eval = saved_res, saved_eval
        del method.accumulator


def discard_k_smallest(a: torch.Tensor, ratio: float) -> torch.Tensor:
    """The library's first `discard_lowest`, kept as a same-process baseline: topk of the k smallest entries even when
    k > N^2/2. The library now selects the N^2 - k kept entries instead (same set, up to ties at the cut-off)."""
    b, n, _ = a.shape
    k = math.floor(ratio * n * n)
    if k == 0:
        return a
    flat = a.reshape(b, n * n)
    idx = flat.topk(k, dim=-1, largest=False).indices
    out = flat.scatter(1, idx, 0.0)
    return torch.cat([flat[:, :1], out[:, 1:]], dim=1).view(b, n, n)


def build(name: str) -> tuple[torch.nn.Module, vitlens.VitModel]:
    """A timm model with random weights (no hub access) and its vitlens wrapper."""
    import timm

    torch.manual_seed(0)
    module = timm.create_model(name, pretrained=False).eval()
    return module, vitlens.wrap(module)


def variants(module: torch.nn.Module, model: vitlens.VitModel, x: torch.Tensor) -> dict[str, Callable[[], object]]:
    """The timed callables; the first one is the baseline."""

    def forward() -> torch.Tensor:
        with torch.no_grad():
            return module(x)

    def record_noop() -> torch.Tensor:
        with torch.no_grad(), model.record(stream=lambda i, p: None):
            return model(x)

    mean0 = vitlens.Rollout(model)
    mean_old = vitlens.Rollout(model)
    max90 = vitlens.Rollout(model, head_fusion="max", discard_ratio=0.9)
    grad = vitlens.GradRollout(model)

    def max90_old() -> object:  # the library's Rollout with its discard step swapped for the old one
        vr.discard_lowest = discard_k_smallest
        try:
            return max90.explain(x)
        finally:
            vr.discard_lowest = discard_lowest

    return {
        "forward, fused attn (baseline)": forward,
        "record(stream=no-op)": record_noop,
        "Rollout() [mean, discard 0]": lambda: mean0.explain(x),
        OLD_PATH: lambda: old_rollout_path(mean_old, x),
        "Rollout(max, discard 0.9)": lambda: max90.explain(x),
        OLD_DISCARD: max90_old,
        "GradRollout() [info]": lambda: grad.explain(x),
    }


def timed(fn: Callable[[], object]) -> float:
    """Wall time of one call, in seconds."""
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def interleaved(fns: dict[str, Callable[[], object]], warmup: int, repeats: int, min_seconds: float = 0.0,
                max_rounds: int = 25) -> dict[str, list[float]]:
    """Run every callable once per round, rotating the order each round; warm-up rounds are discarded.

    Timed rounds continue past ``repeats`` until ``min_seconds`` have been spent timing (at most ``max_rounds``), so
    that cheap cases get more rounds against the noise of a shared machine.
    """
    names = list(fns)
    times: dict[str, list[float]] = {n: [] for n in names}
    r, spent = 0, 0.0
    while r < warmup + repeats or (spent < min_seconds and r < warmup + max_rounds):
        order = names[r % len(names):] + names[: r % len(names)]
        for n in order:
            t = timed(fns[n])
            if r >= warmup:
                times[n].append(t)
                spent += t
        r += 1
    return times


def paired_ratios(times: dict[str, list[float]], base: str) -> dict[str, list[float]]:
    """Per round: variant time / baseline time of the same round."""
    return {n: [t / b for t, b in zip(ts, times[base])] for n, ts in times.items()}


def bench_case(name: str, batch: int, warmup: int, repeats: int,
               min_seconds: float) -> tuple[dict[str, tuple[float, float]], float]:
    """Print one model/batch table; return (median paired ratio, ratio of minimum times) of each variant and the
    baseline's minimum time."""
    module, model = build(name)
    x = torch.randn(batch, 3, 224, 224)
    fns = variants(module, model, x)
    base = next(iter(fns))
    times = interleaved(fns, warmup, repeats, min_seconds)
    ratios = paired_ratios(times, base)
    rounds = len(times[base])
    print(f"\n{name}  batch {batch}  (224 px, {model.num_blocks} blocks, {warmup} warm-up + {rounds} timed rounds)")
    print(f"  {'variant':37s} {'median ms':>10s} {'min ms':>8s} {'ratio':>6s} {'(min..max)':>12s} {'min/min':>8s}")
    out = {}
    for n in fns:
        med = statistics.median(ratios[n])
        spread = f"({min(ratios[n]):.2f}..{max(ratios[n]):.2f})"
        of_mins = min(times[n]) / min(times[base])
        out[n] = (med, of_mins)
        print(f"  {n:37s} {1e3 * statistics.median(times[n]):10.1f} {1e3 * min(times[n]):8.1f} {med:6.3f} "
              f"{spread:>12s} {of_mins:8.3f}")
    return out, min(times[base])


def min_time(fn: Callable[[], object], warmup: int, repeats: int) -> float:
    """Minimum wall time of ``repeats`` calls after ``warmup`` calls (the least disturbed by other load)."""
    for _ in range(warmup):
        fn()
    return min(timed(fn) for _ in range(repeats))


def breakdown(name: str, batch: int, base: float, repeats: int) -> None:
    """Time each step of the rollout stream callback, summed over the blocks, as a fraction of ``base`` seconds."""
    _, model = build(name)
    x = torch.randn(batch, 3, 224, 224)
    layout = model.stage_plan((224, 224)).layouts[0]  # a plain ViT has one stage
    with torch.no_grad(), model.record() as rec:
        model(x)
    probs = [p for p in rec.probs if p is not None]
    n = probs[0].shape[-1]
    fused_mean = [fuse_heads(p, "mean") for p in probs]
    fused_max = [fuse_heads(p, "max") for p in probs]
    prepared = [add_residual(f, 0.5, True) for f in fused_mean]
    same = all(torch.equal(discard_lowest(f, 0.9), discard_k_smallest(f, 0.9)) for f in fused_max)

    def record_enter_exit() -> None:
        with model.record(stream=lambda i, p: None):
            pass

    def diag_residual() -> None:  # candidate: scale + add to the diagonal in place, no identity matrix
        for f in fused_max:
            a = f.mul(0.5)
            a.diagonal(dim1=-2, dim2=-1).add_(0.5)
            a.div_(a.sum(-1, keepdim=True))

    def chain_matmul() -> None:
        r = prepared[0]
        for a in prepared[1:]:
            r = a @ r

    def reverse_vector() -> None:  # candidate: readout row first, then vector-matrix products back to block 0
        w = layout.readout_weights(x.device, x.dtype).expand(batch, 1, n)
        for a in reversed(prepared):
            w = torch.bmm(w, a)

    steps: dict[str, Callable[[], object]] = {
        "fuse_heads mean": lambda: [fuse_heads(p, "mean") for p in probs],
        "fuse_heads max": lambda: [fuse_heads(p, "max") for p in probs],
        "discard_lowest 0.9 (keep the largest)": lambda: [discard_lowest(f, 0.9) for f in fused_max],
        "old discard 0.9 (topk of k smallest)": lambda: [discard_k_smallest(f, 0.9) for f in fused_max],
        "add_residual + normalize": lambda: [add_residual(f, 0.5, True) for f in fused_max],
        "matmul chain a @ R (L-1 products)": chain_matmul,
        "readout (einsum), once": lambda: readout(prepared[-1], layout, layout),
        "record() enter/exit, no forward": record_enter_exit,
        "candidate: in-place diagonal residual": diag_residual,
        "candidate: reverse vector products": reverse_vector,
    }
    print(f"\nBreakdown, {name} batch {batch} (N={n}, {len(probs)} blocks): minimum time of each step of the stream")
    print(f"  callback, summed over the blocks, as a fraction of the fused forward's min above ({1e3 * base:.1f} ms)")
    print(f"  (old and new discard give the identical tensor on these attentions: {same})")
    for label, fn in steps.items():
        t = min_time(fn, 1, max(5, repeats))
        print(f"  {label:42s} {1e3 * t:9.1f} ms  {t / base:6.3f}")


def main() -> None:
    """Run the benchmark and print the tables."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="smoke run: tiny model, batch 1, one round")
    ap.add_argument("--repeats", type=int, default=5, help="timed rounds (default 5)")
    ap.add_argument("--warmup", type=int, default=1, help="discarded warm-up rounds (default 1)")
    ap.add_argument("--min-seconds", type=float, default=6.0,
                    help="keep adding timed rounds (up to 25) until this much time was spent per case (default 6)")
    ap.add_argument("--no-breakdown", action="store_true", help="skip the per-step breakdown")
    ap.add_argument("--model", help="one timm model instead of the default pair (e.g. deit_tiny_patch16_224)")
    ap.add_argument("--batches", type=int, nargs="+", default=[1], help="batch sizes with --model (default 1)")
    args = ap.parse_args()
    models, batches = (MODELS[:1], (1,)) if args.quick else (MODELS, (1, 8))
    if args.model:
        models, batches = (args.model,), tuple(args.batches)
    warmup, repeats, min_s = (1, 1, 0.0) if args.quick else (args.warmup, args.repeats, args.min_seconds)
    print("bench_rollout:", _env.describe())
    print("CPU only; the machine is shared, so times are noisy. 'ratio' = median over rounds of variant / baseline")
    print("in the same round (min..max over rounds); 'min/min' = ratio of the minimum times (least disturbed runs).")
    results, bases = {}, {}
    for name in models:
        for b in batches:
            results[(name, b)], bases[(name, b)] = bench_case(name, b, warmup, repeats, min_s)
    print(f"\nTarget: ratio <= {TARGET} at batch 8 (verdict on the median paired ratio; min/min alongside)")
    for (name, b), r in results.items():
        for key in ("Rollout() [mean, discard 0]", OLD_PATH, "Rollout(max, discard 0.9)"):
            med, of_mins = r[key]
            verdict = "met" if med <= TARGET else "NOT met"
            note = "" if b == 8 else " (batch 1: information)"
            print(f"  {name:21s} b{b}  {key:37s} {med:.3f}  min/min {of_mins:.3f}  {verdict}{note}")
    if not args.no_breakdown:
        for name in models:
            breakdown(name, max(batches), bases[(name, max(batches))], repeats)


if __name__ == "__main__":
    main()
