"""Attention flow: vitlens's exact layered max flow against the authors' networkx approach, in the same run.

Usage: ``python bench/bench_flow.py [--cap 20] [--skip-model]``

Small configurations (L layers x N tokens, attention-like matrices: softmax rows of random scores, A + I with rows
normalised, as Abnar and Zuidema build them): the networkx baseline builds the layered DiGraph once and calls
``nx.maximum_flow_value(G, output CLS, input token, flow_func=edmonds_karp)`` for every patch token, as the
authors' code does. Its time is capped: after ``--cap`` seconds the remaining flows are extrapolated from the mean
time per flow (marked '~'). vitlens solves all flows with `layered_max_flow`; the best of 3 runs is reported. Both
give the same values (the largest relative difference is printed). Then one 12-layer, 197-token image: the
solver alone on random attention, and `AttentionFlow(model).explain(x)` end to end on a random-weight timm
vit_tiny_patch16_224 (forward included).
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch

import _env  # noqa: F401  (before any timm import: makes timm importable, pins threads)
from vitlens.layered_flow import layered_max_flow

SMALL = ((3, 5), (4, 17), (4, 50), (6, 50))


def attention_like(layers: int, tokens: int, rng: np.random.Generator) -> list[np.ndarray]:
    """``layers`` row-stochastic [1, N, N] matrices: softmax of N(0, 3^2) scores, plus I, rows normalised."""
    out = []
    for _ in range(layers):
        a = np.exp(3.0 * rng.normal(size=(tokens, tokens)))
        a = a / a.sum(1, keepdims=True) + np.eye(tokens)
        out.append((a / a.sum(1, keepdims=True))[None])
    return out


def networkx_flows(mats: list[np.ndarray], cap: float) -> tuple[np.ndarray, float, int]:
    """The authors' way: one DiGraph (edges from layer l+1 down to layer l), Edmonds-Karp from the output CLS node
    to each input patch token. Returns (flows computed, total seconds extrapolated to all tokens, flows computed)."""
    import networkx as nx
    from networkx.algorithms.flow import edmonds_karp

    n = mats[0].shape[-1]
    t0 = time.perf_counter()
    g = nx.DiGraph()
    for layer, a in enumerate(mats):
        for i in range(n):
            for j in range(n):
                g.add_edge((layer + 1) * n + i, layer * n + j, capacity=float(a[0, i, j]))
    build = time.perf_counter() - t0
    flows, spent = [], 0.0
    for t in range(1, n):
        t1 = time.perf_counter()
        flows.append(nx.maximum_flow_value(g, len(mats) * n, t, flow_func=edmonds_karp))
        spent += time.perf_counter() - t1
        if spent > cap:
            break
    total = build + spent / len(flows) * (n - 1)
    return np.array(flows), total, len(flows)


def ours(mats: list[np.ndarray], repeats: int = 3) -> tuple[np.ndarray, float, float]:
    """vitlens's flows to every patch token; (flows, best seconds, largest certified gap)."""
    n = mats[0].shape[-1]
    source = np.eye(n)[:1]
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        flows, gaps = layered_max_flow(source, mats, range(1, n))
        best = min(best, time.perf_counter() - t)
    return flows[0], best, float(gaps.max())


def main() -> None:
    """Run the benchmark and print the tables."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cap", type=float, default=20.0, help="seconds of networkx max flows per configuration")
    ap.add_argument("--skip-model", action="store_true", help="skip the end-to-end timm model run")
    args = ap.parse_args()
    print("bench_flow:", _env.describe())
    rng = np.random.default_rng(0)
    print(f"\n  {'L x N':>8s} {'networkx s':>12s} {'(flows run)':>11s} {'vitlens s':>10s} {'ratio':>9s} "
          f"{'max rel diff':>13s} {'max gap':>9s}")
    for layers, tokens in SMALL:
        mats = attention_like(layers, tokens, rng)
        ref, t_nx, done = networkx_flows(mats, args.cap)
        got, t_us, gap = ours(mats)
        diff = float(np.max(np.abs(got[:done] - ref) / np.maximum(ref, 1e-300)))
        mark = "" if done == tokens - 1 else "~"
        print(f"  {f'{layers} x {tokens}':>8s} {mark + f'{t_nx:.3f}':>12s} {f'({done}/{tokens - 1})':>11s} "
              f"{t_us:10.4f} {t_nx / t_us:8.0f}x {diff:13.1e} {gap:9.1e}")
    mats = attention_like(12, 197, rng)
    _, t_big, gap = ours(mats, repeats=1)
    print(f"\n12 layers x 197 tokens, all 196 patch flows, solver only: {t_big:.1f} s (max certified gap {gap:.1e})")
    if not args.skip_model:
        import timm

        import vitlens
        from vitlens.methods.flow import AttentionFlow

        torch.manual_seed(0)
        model = vitlens.wrap(timm.create_model("vit_tiny_patch16_224", pretrained=False).eval())
        x = torch.randn(1, 3, 224, 224)
        t = time.perf_counter()
        exp = AttentionFlow(model).explain(x)
        print(f"AttentionFlow(vit_tiny_patch16_224).explain(one 224 px image), end to end: "
              f"{time.perf_counter() - t:.1f} s (max certified gap {exp.extras['gap']:.1e})")


if __name__ == "__main__":
    main()
