"""Exact maximum flows through layered graphs (attention flow), batched over graphs and sinks.

The graph of one problem: a source node sigma; levels K, K-1, ..., 1 of n_K, ..., n_1 nodes; one sink t taken from
level 0. Edges: sigma -> (K, i) with capacity ``source[i]``; (k, i) -> (k-1, j) with capacity ``mats[k-1][i, j]``
for k = K..2; (1, i) -> t with capacity ``mats[0][i, t]``. The other level-0 nodes have no way out, so they and
their edges are left out: they cannot carry flow to t.

Algorithm: Dinic's blocking flows on float64 residual capacities, compiled with numba (one compiled loop solves
every problem of the batch; the graph's arcs are laid out once, in CSR order, and only the capacities change from
problem to problem). An augmenting path lowers each of its arcs by its smallest residual, so the bottleneck arc
becomes exactly 0 and no residual goes negative: the flow is feasible up to float64 rounding of the sums. When no
path is left, the nodes reachable from sigma form a cut; its capacity (summed from the original capacities) is an
upper bound on the max flow, so ``gaps`` = cut capacity - flow value certifies how far each value can be from the
exact maximum (float64 rounding only: about 1e-15 relative).

numba is imported lazily (``pip install 'vitlens[flow]'``); the first call compiles the loop (a few seconds, cached
on disk by numba afterwards).
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import cache, lru_cache

import numpy as np

from vitlens.errors import VitlensError


@cache
def _engine():
    """The compiled solver (numba), built on first use."""
    try:
        from numba import njit
    except ImportError:
        raise VitlensError("attention flow needs numba: pip install 'vitlens[flow]'") from None
    return njit(cache=True, nogil=True)(_dinic_all)


def _dinic_all(indptr, to, rev, arc_of_edge, tails, heads, common, last, sigma, sink):  # pragma: no cover
    """Max flow values and certified gaps [B, S] on one CSR graph (numba kernel). Problem (b, s) has the edge
    capacities ``common[b]`` followed by ``last[b, s]`` (the edges into the sink)."""
    num_nodes = indptr.shape[0] - 1
    num_arcs = to.shape[0]
    images, num_common = common.shape
    sinks = last.shape[1]
    num_edges = num_common + last.shape[2]
    values = np.zeros((images, sinks))
    gaps = np.zeros((images, sinks))
    caps = np.empty(num_edges)
    tail_of = np.empty(num_arcs, np.int64)
    for u in range(num_nodes):
        for a in range(indptr[u], indptr[u + 1]):
            tail_of[a] = u
    r = np.empty(num_arcs)
    level = np.empty(num_nodes, np.int64)
    it = np.empty(num_nodes, np.int64)
    queue = np.empty(num_nodes, np.int64)
    path = np.empty(num_nodes, np.int64)
    for p in range(images * sinks):
        b, s = p // sinks, p % sinks
        caps[:num_common] = common[b]
        caps[num_common:] = last[b, s]
        r[:] = 0.0
        for e in range(num_edges):
            r[arc_of_edge[e]] = caps[e]
        total = 0.0
        while True:
            level[:] = -1
            level[sigma] = 0
            queue[0] = sigma
            q_head, q_tail = 0, 1
            while q_head < q_tail:
                u = queue[q_head]
                q_head += 1
                for a in range(indptr[u], indptr[u + 1]):
                    v = to[a]
                    if r[a] > 0.0 and level[v] < 0:
                        level[v] = level[u] + 1
                        queue[q_tail] = v
                        q_tail += 1
            if level[sink] < 0:
                break
            for u in range(num_nodes):
                it[u] = indptr[u]
            depth, u = 0, sigma
            while True:
                if u == sink:
                    push = r[path[0]]
                    for k in range(1, depth):
                        push = min(push, r[path[k]])
                    for k in range(depth):
                        a = path[k]
                        r[a] -= push
                        r[rev[a]] += push
                    total += push
                    depth, u = 0, sigma  # the arcs' pointers keep their places: the next path starts afresh
                    continue
                advanced = False
                while it[u] < indptr[u + 1]:
                    a = it[u]
                    v = to[a]
                    if r[a] > 0.0 and level[v] == level[u] + 1:
                        path[depth] = a
                        depth += 1
                        u = v
                        advanced = True
                        break
                    it[u] += 1
                if not advanced:
                    if depth == 0:
                        break
                    level[u] = -1  # a dead end in this phase
                    depth -= 1
                    u = tail_of[path[depth]]
                    it[u] += 1
        cut = 0.0
        for e in range(num_edges):
            if level[tails[e]] >= 0 and level[heads[e]] < 0:
                cut += caps[e]
        values[b, s] = total
        gaps[b, s] = max(cut - total, 0.0)
    return values, gaps


class _Graph:
    """One problem's nodes and edges in CSR order: sigma = 0, level K ... level 1, then the sink t."""

    def __init__(self, sizes: Sequence[int]) -> None:
        k_top = len(sizes) - 1
        start, offset = {}, 1
        for k in range(k_top, 0, -1):
            start[k] = offset
            offset += sizes[k]
        self.sink, num_nodes = offset, offset + 1
        tails = [np.zeros(sizes[k_top], np.int64)]
        heads = [start[k_top] + np.arange(sizes[k_top])]
        for k in range(k_top, 1, -1):
            i, j = np.meshgrid(np.arange(sizes[k]), np.arange(sizes[k - 1]), indexing="ij")
            tails.append(start[k] + i.ravel())
            heads.append(start[k - 1] + j.ravel())
        tails.append(start[1] + np.arange(sizes[1]))
        heads.append(np.full(sizes[1], self.sink))
        self.tails, self.heads = np.concatenate(tails), np.concatenate(heads)
        e = len(self.tails)
        # arcs: e forward (u -> v) then e backward (v -> u, the flow that can go back), grouped by their tail
        arc_tail = np.concatenate([self.tails, self.heads])
        order = np.argsort(arc_tail, kind="stable")
        position = np.empty_like(order)
        position[order] = np.arange(2 * e)
        self.to = np.concatenate([self.heads, self.tails])[order]
        self.rev = position[(order + e) % (2 * e)]
        self.arc_of_edge = position[:e]
        self.indptr = np.zeros(num_nodes + 1, np.int64)
        np.cumsum(np.bincount(arc_tail, minlength=num_nodes), out=self.indptr[1:])

    def solve(self, common: np.ndarray, last: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Max flow values and certified gaps [B, S]: capacities ``common`` [B, E - n_1] (every edge but those into
        the sink, in edge order) and ``last`` [B, S, n_1] (the edges into each problem's sink)."""
        return _engine()(self.indptr, self.to, self.rev, self.arc_of_edge, self.tails, self.heads,
                         np.ascontiguousarray(common), np.ascontiguousarray(last), 0, self.sink)


@lru_cache(maxsize=8)
def _graph(sizes: tuple[int, ...]) -> _Graph:
    """The CSR layout for these level sizes (built once: an image's flows and the next image's share it)."""
    return _Graph(sizes)


def layered_max_flow(source: np.ndarray, mats: Sequence[np.ndarray],
                     sinks: Sequence[int]) -> tuple[np.ndarray, np.ndarray]:
    """Maximum flow values [B, S] from the source to each of ``sinks`` (level-0 node indices), and certified gaps.

    ``source``: [B, n_K] capacities from the source to the top level; ``mats[k]``: [B, n_{k+1}, n_k] capacities
    from level k+1 to level k (``mats[0]`` ends at the sinks' level). All capacities must be finite and >= 0.
    Returns (flows, gaps), float64 [B, S]: each flow is feasible (up to float64 rounding) and within its gap of the
    exact maximum (a cut's capacity minus the flow).
    """
    source = np.asarray(source, np.float64)
    mats = [np.asarray(m, np.float64) for m in mats]
    b = source.shape[0]
    sizes = [mats[0].shape[-1]] + [m.shape[-2] for m in mats]
    if source.shape != (b, sizes[-1]) or any(
            m.shape != (b, sizes[k + 1], sizes[k]) for k, m in enumerate(mats)):
        raise VitlensError("layered_max_flow: mats[k] must be [B, n_(k+1), n_k] and source [B, n_K]")
    if not all(np.isfinite(a).all() and (a >= 0).all() for a in (source, *mats)):
        raise VitlensError("layered_max_flow: capacities must be finite and non-negative")
    columns = np.asarray([int(t) for t in sinks], np.int64)
    keep = source.any(0)  # top nodes that no problem feeds carry no flow (e.g. all but CLS): leave them out
    if not keep.all() and keep.any():
        source, mats[-1] = source[:, keep], mats[-1][:, keep]
        sizes[-1] = int(keep.sum())
    graph = _graph(tuple(sizes))
    common = np.concatenate([source] + [mats[k - 1].reshape(b, -1) for k in range(len(mats), 1, -1)], axis=1)
    return graph.solve(common, mats[0][:, :, columns].transpose(0, 2, 1))
