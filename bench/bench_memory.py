"""Peak memory of streaming rollout against storing every block's attention first, on the CPU.

Usage: ``python bench/bench_memory.py [--batches 1 2]``

Model: a DINOv2-Small configuration at 518 px (37 x 37 patches + CLS = 1370 tokens, 12 blocks, 6 heads) built by
transformers from its config with random weights (no hub access). Each mode runs in a fresh subprocess of this
script, so that no mode inherits another's allocator state. Two measurements per mode:

- tensor peak: every CPU tensor allocation and free during the mode is recorded by torch.profiler
  (``profile_memory=True``); the peak of the running sum is the most tensor memory the mode held at once on top of
  what was already alive (weights, input). This is exact for tensors and ignores allocator/Python overhead.
- RSS peak: ``ru_maxrss`` after the mode minus the resident set size just before it (first run of the mode in that
  process, before the profiled run). This is what the OS saw, allocator slack included; it is only meaningful when
  the mode's peak exceeds the process's earlier peak (flagged otherwise).
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import resource
import subprocess
import sys
import time
from collections.abc import Callable

import torch

import _env  # noqa: F401  (before transformers, imported lazily in build(): makes it importable, pins threads)
import vitlens
from vitlens.explanation import max_normalize
from vitlens.methods.rollout import fuse_heads

IMAGE = 518
CONFIG = dict(image_size=IMAGE, patch_size=14, hidden_size=384, intermediate_size=4 * 384, num_hidden_layers=12,
              num_attention_heads=6)
MODES = {
    "forward": "plain forward, model as is (SDPA attention), no_grad",
    "forward_eager": "plain forward with explicit (eager) attention, no_grad",
    "stream": "vitlens.Rollout(model).explain(x): streaming, one block at a time",
    "store": "with model.record() as rec: model(x); then roll out from rec.probs (all L*H*N^2 kept)",
}
MiB = 2**20


def build() -> vitlens.VitModel:
    """DINOv2-Small at 518 px with random weights, wrapped by vitlens."""
    from transformers import Dinov2Config, Dinov2Model

    torch.manual_seed(0)
    return vitlens.wrap(Dinov2Model(Dinov2Config(**CONFIG)).eval())


def mode_fn(model: vitlens.VitModel, x: torch.Tensor, mode: str) -> Callable[[], torch.Tensor]:
    """The callable measured for ``mode``; it returns the map (or the forward output)."""

    def forward() -> torch.Tensor:
        with torch.no_grad():
            return model(x)

    def forward_eager() -> torch.Tensor:
        undo = model._use_explicit_attention()
        try:
            with torch.no_grad():
                return model(x)
        finally:
            undo()

    def stream() -> torch.Tensor:
        return vitlens.Rollout(model).explain(x).maps

    def store() -> torch.Tensor:
        with torch.no_grad():
            with model.record() as rec:
                model(x)
            acc = vitlens.Rollout(model).accumulator(model.stage_plan(tuple(x.shape[-2:])))
            for i in rec.captured():
                acc.add(i, fuse_heads(rec.probs[i], "mean"))
            return max_normalize(acc.map())

    return {"forward": forward, "forward_eager": forward_eager, "stream": stream, "store": store}[mode]


def rss_bytes() -> int:
    """Current resident set size of this process."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def max_rss_bytes() -> int:
    """Peak resident set size of this process so far (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def tensor_peak(fn: Callable[[], object]) -> int:
    """Peak of (bytes allocated - bytes freed) by tensors while ``fn`` runs, from torch.profiler's memory events."""
    from torch._C._profiler import _EventType
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    events, stack = [], list(prof.profiler.kineto_results.experimental_event_tree())
    while stack:
        e = stack.pop()
        stack.extend(e.children)
        if e.tag == _EventType.Allocation and str(e.extra_fields.device) == "cpu":
            events.append((e.start_time_ns, e.extra_fields.alloc_size))
    cur = peak = 0
    for _, size in sorted(events):
        cur += size
        peak = max(peak, cur)
    return peak


def child(mode: str, batch: int) -> None:
    """Measure one mode in this (fresh) process and print one JSON line."""
    model = build()
    x = torch.randn(batch, 3, IMAGE, IMAGE)
    gc.collect()
    rss0, max0 = rss_bytes(), max_rss_bytes()
    fn = mode_fn(model, x, mode)
    t = time.perf_counter()
    out = fn()
    seconds = time.perf_counter() - t
    max1 = max_rss_bytes()
    out = out.clone()  # keep only a copy of the (small) result
    gc.collect()
    peak = tensor_peak(fn)
    res = dict(mode=mode, batch=batch, seconds=seconds, rss_before=rss0, rss_extra=max1 - rss0,
               rss_new_peak=max1 > max0, tensor_extra=peak)
    if mode == "store":  # sanity: the stored and the streamed rollout give the same map
        res["max_abs_diff_vs_stream"] = float((out - mode_fn(model, x, "stream")()).abs().max())
    print(json.dumps(res))


def run_child(mode: str, batch: int) -> dict:
    """Run ``child`` in a fresh interpreter and return its result."""
    cmd = [sys.executable, os.path.abspath(__file__), "--child", mode, "--batch", str(batch)]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
    if proc.returncode or not lines:
        sys.exit(f"child {mode} batch {batch} failed (rc {proc.returncode}):\n{proc.stdout}\n{proc.stderr[-3000:]}")
    return json.loads(lines[-1])


def theory(batch: int, n: int, layers: int, heads: int) -> None:
    """Print the sizes that the two approaches must hold, float32."""
    all_attn = batch * layers * heads * n * n * 4
    one = batch * n * n * 4
    print(f"  theory: all attentions B*L*H*N^2*4 = {batch}*{layers}*{heads}*{n}^2*4 = {all_attn / MiB:.1f} MiB; "
          f"one rollout matrix B*N^2*4 = {one / MiB:.1f} MiB;\n"
          f"          one block's probabilities B*H*N^2*4 = {one * heads / MiB:.1f} MiB")


def main() -> None:
    """Run every mode per batch size in fresh subprocesses and print the table."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--child", choices=list(MODES), help=argparse.SUPPRESS)
    ap.add_argument("--batch", type=int, default=1, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        child(args.child, args.batch)
        return
    n = (IMAGE // CONFIG["patch_size"]) ** 2 + 1
    print("bench_memory:", _env.describe())
    print(f"DINOv2-Small config at {IMAGE} px: N = {n} tokens, L = {CONFIG['num_hidden_layers']} blocks, "
          f"H = {CONFIG['num_attention_heads']} heads, random weights (transformers Dinov2Model)")
    print("Each mode runs in a fresh subprocess. 'tensor' = peak tensor bytes held on top of weights and input")
    print("(torch.profiler allocation events); 'RSS' = ru_maxrss after the mode - RSS before it (OS view).")
    for name, what in MODES.items():
        print(f"  {name:14s} {what}")
    for b in args.batches:
        res = {m: run_child(m, b) for m in MODES}
        print(f"\nbatch {b}")
        print(f"  {'mode':14s} {'tensor MiB':>11s} {'RSS MiB':>9s} {'time s':>7s}   note")
        for m, r in res.items():
            note = "" if r["rss_new_peak"] else "RSS peak not above the process's earlier peak: RSS figure is a bound"
            if "max_abs_diff_vs_stream" in r:
                note = f"max |map - streamed map| = {r['max_abs_diff_vs_stream']:.1e} {note}"
            print(f"  {m:14s} {r['tensor_extra'] / MiB:11.1f} {r['rss_extra'] / MiB:9.1f} {r['seconds']:7.2f}   {note}")
        s, st, fe = res["stream"], res["store"], res["forward_eager"]
        print(f"  store / stream peak: tensor {st['tensor_extra'] / s['tensor_extra']:.2f}x, "
              f"RSS {st['rss_extra'] / s['rss_extra']:.2f}x")
        print(f"  stream - forward_eager (rollout's own extra): tensor "
              f"{(s['tensor_extra'] - fe['tensor_extra']) / MiB:.1f} MiB; store - forward_eager: "
              f"{(st['tensor_extra'] - fe['tensor_extra']) / MiB:.1f} MiB")
        theory(b, n, CONFIG["num_hidden_layers"], CONFIG["num_attention_heads"])


if __name__ == "__main__":
    main()
