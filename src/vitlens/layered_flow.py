"""Exact maximum flows through layered graphs (attention flow), batched over graphs and sinks.

The graph of one problem: a source node sigma; levels K, K-1, ..., 1 of n_K, ..., n_1 nodes; one sink t taken from
level 0. Edges: sigma -> (K, i) with capacity ``source[i]``; (k, i) -> (k-1, j) with capacity ``mats[k-1][i, j]``
for k = K..2; (1, i) -> t with capacity ``mats[0][i, t]``. The other level-0 nodes have no way out, so they and
their edges are left out: they cannot carry flow to t.

Algorithm (exact up to float64 rounding, with a certificate). The flow is built in rounds. Each round scales the
current residual capacities by a power of two K, rounds them DOWN to integers and solves that integer problem
exactly with an integer max-flow engine (scipy's Dinic, in C; many problems at once as one disjoint union). Since
the integers are at most K times the true residuals, the integer flow divided by K is feasible for the real
capacities: the flow value so far is a LOWER bound. The nodes still reachable from the source in the integer
residual graph form a cut; its real residual capacity, computed in float64, is an UPPER bound on what can still be
added (max-flow/min-cut). Rounding lost less than one unit per cut edge, so the gap shrinks by a factor of about
(cut edges) / 2^31 each round; the next round scales by 2^31 / gap. A problem stops when gap <= rtol * flow + atol;
the result is the feasible flow's value and ``gaps`` the certified distance to the exact maximum.

scipy is imported lazily (``pip install 'vitlens[flow]'``).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from vitlens.errors import VitlensError

INT_MAX = 2**31 - 1  # scipy's max-flow works on int32 capacities and flows
MAX_EDGES = 3_000_000  # edges of one disjoint union solved in one call (memory: ~60 bytes an edge)


def _scipy():
    try:
        import scipy.sparse as sparse
        from scipy.sparse.csgraph import breadth_first_order, maximum_flow
    except ImportError:
        raise VitlensError("attention flow needs scipy: pip install 'vitlens[flow]'") from None
    return sparse, maximum_flow, breadth_first_order


class _Template:
    """Edges of one problem (without the sink column): tails, heads, and where each level's nodes start."""

    def __init__(self, sizes: Sequence[int]) -> None:
        # node 0 = sigma, then level K first ... level 1, then the sink t as the last node
        self.sizes = list(sizes)  # n_0 .. n_K
        k_top = len(sizes) - 1
        start, offset = {}, 1
        for k in range(k_top, 0, -1):
            start[k] = offset
            offset += sizes[k]
        self.start, self.sink, self.num_nodes = start, offset, offset + 1
        tails = [np.zeros(sizes[k_top], np.int64)]
        heads = [start[k_top] + np.arange(sizes[k_top])]
        for k in range(k_top, 1, -1):
            i, j = np.meshgrid(np.arange(sizes[k]), np.arange(sizes[k - 1]), indexing="ij")
            tails.append(start[k] + i.ravel())
            heads.append(start[k - 1] + j.ravel())
        tails.append(start[1] + np.arange(sizes[1]))
        heads.append(np.full(sizes[1], self.sink))
        self.tails, self.heads = np.concatenate(tails), np.concatenate(heads)
        self.num_edges = e = len(self.tails)
        # one problem's arcs: u -> v (forward residual), v -> u (flow that can go back), sigma -> super-source,
        # sink -> super-sink; the super nodes get local numbers -2, -1 so that they sort first in every row
        rows = np.concatenate([self.tails, self.heads, [0, self.sink]])
        cols = np.concatenate([self.heads, self.tails, [-2, -1]])
        self.order = np.lexsort((cols, rows))  # local CSR order of the arcs
        position = np.empty_like(self.order)
        position[self.order] = np.arange(len(self.order))
        self.arc_fwd = position[:e]  # where each edge's forward arc sits in the local CSR order
        self.cols = cols[self.order]
        self.row_counts = np.bincount(rows, minlength=self.num_nodes)
        self._unions: dict[int, tuple[np.ndarray, np.ndarray]] = {}

    def union(self, sparse, data: np.ndarray, budget: int):
        """The disjoint union of m problems (``data`` [m, 2E+2]: each problem's arc capacities, in arc order) as one
        CSR graph: node 0 the super-source (an arc of capacity ``budget`` to each problem's source), node 1 the
        super-sink, then each problem's nodes. Every edge appears as two arcs, so scipy adds none and its flow matrix
        shares this structure: super-source row, super-sink row, then problem by problem in local order."""
        m = data.shape[0]
        if m not in self._unions:
            first = 2 + self.num_nodes * np.arange(m)
            cols = self.cols[None] + first[:, None]
            cols[:, self.cols == -2], cols[:, self.cols == -1] = 0, 1
            cols = np.concatenate([first, first + self.sink, cols.ravel()]).astype(np.int32)
            counts = np.concatenate([[m, m], np.tile(self.row_counts, m)])
            indptr = np.zeros(len(counts) + 1, np.int32)
            np.cumsum(counts, out=indptr[1:])
            self._unions = {m: (cols, indptr)}
        cols, indptr = self._unions[m]
        body = data[:, self.order].ravel()
        values = np.concatenate([np.full(m, budget, np.int32), np.zeros(m, np.int32), body])
        n = 2 + self.num_nodes * m
        graph = sparse.csr_matrix((values, cols, indptr), shape=(n, n))
        graph.has_sorted_indices = True
        return graph

    def capacities(self, source: np.ndarray, mats: Sequence[np.ndarray], sink: int) -> np.ndarray:
        """Edge capacities [E] of one problem (one graph, one sink)."""
        middle = [mats[k - 1].ravel() for k in range(len(mats), 1, -1)]
        return np.concatenate([source, *middle, mats[0][:, sink]])


def layered_max_flow(source: np.ndarray, mats: Sequence[np.ndarray], sinks: Sequence[int], rtol: float = 1e-12,
                     max_rounds: int = 12) -> tuple[np.ndarray, np.ndarray]:
    """Maximum flow values [B, S] from the source to each of ``sinks`` (level-0 node indices), and certified gaps.

    ``source``: [B, n_K] capacities from the source to the top level; ``mats[k]``: [B, n_{k+1}, n_k] capacities
    from level k+1 to level k (``mats[0]`` ends at the sinks' level). All capacities must be finite and >= 0.
    Returns (flows, gaps), float64 [B, S]: each flow is feasible and within its gap (<= rtol * flow + 1e-15 * the
    source's total capacity) of the exact maximum.
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
    sinks = [int(t) for t in sinks]
    keep = source.any(0)  # top nodes that no problem feeds carry no flow (e.g. all but CLS): leave them out
    if not keep.all() and keep.any():
        source, mats[-1] = source[:, keep], mats[-1][:, keep]
        sizes[-1] = int(keep.sum())
    tpl = _Template(sizes)
    problems = [(i, s) for i in range(b) for s in range(len(sinks))]
    flows, gaps = np.zeros((b, len(sinks))), np.zeros((b, len(sinks)))
    per_call = max(1, MAX_EDGES // tpl.num_edges)
    for lo in range(0, len(problems), per_call):
        chunk = problems[lo: lo + per_call]
        caps = np.stack([tpl.capacities(source[i], [m[i] for m in mats], sinks[s]) for i, s in chunk])
        f, g = _solve_union(tpl, caps, rtol, max_rounds)
        for (i, s), fv, gv in zip(chunk, f, g):
            flows[i, s], gaps[i, s] = fv, gv
    return flows, gaps


def _solve_union(tpl: _Template, caps: np.ndarray, rtol: float, max_rounds: int) -> tuple[np.ndarray, np.ndarray]:
    """Max flows of C problems with the template's edges and capacities ``caps`` [C, E], solved as one union."""
    sparse, maximum_flow, breadth_first_order = _scipy()
    c, e = caps.shape
    n_top = tpl.sizes[-1]
    flow = np.zeros_like(caps)  # float64 flow on every edge of every problem
    value = np.zeros(c)
    top = caps[:, :n_top].sum(1)
    bottom = caps[:, e - tpl.sizes[1]:].sum(1)
    gap = np.minimum(top, bottom)  # both are cuts: upper bounds on the flow
    atol = 1e-15 * top
    for _ in range(max_rounds):
        open_ = np.flatnonzero(gap > rtol * value + atol)
        if len(open_) == 0:
            break
        m = len(open_)
        budget = INT_MAX // (m + 1)  # the flow of one problem in integers, so that the union's flow fits in int32
        scale = np.exp2(np.floor(np.log2(budget / gap[open_])))[:, None]  # powers of two: exact products, quotients
        f = flow[open_]
        residual = caps[open_] - f
        np.maximum(residual, 0.0, out=residual)
        data = np.empty((m, 2 * e + 2), np.float64)  # the arcs of each problem: forward, backward, sigma/sink links
        np.multiply(residual, scale, out=data[:, :e])
        np.multiply(f, scale, out=data[:, e:2 * e])
        data[:, 2 * e], data[:, 2 * e + 1] = 0, budget  # sigma -> super-source, sink -> super-sink
        np.floor(data, out=data)
        np.minimum(data, budget, out=data)  # an edge above the budget is never in a min cut
        graph = tpl.union(sparse, data.astype(np.int32), budget)
        res = maximum_flow(graph, 0, 1, method="dinic")
        body = res.flow.data[2 * m:].reshape(m, -1)  # each problem's arcs, in its local CSR order
        moved = body[:, tpl.arc_fwd].astype(np.float64) / scale  # net flow along each edge, exact (power of two)
        f += moved
        flow[open_] = f
        value[open_] += moved[:, :n_top].sum(1)
        # the cut: nodes reachable from the super-source in the integer residual graph
        left = graph.copy()
        left.data -= res.flow.data
        left.eliminate_zeros()
        reach = np.zeros(graph.shape[0], bool)
        reach[breadth_first_order(left, 0, directed=True, return_predecessors=False)] = True
        inside = reach[2:].reshape(m, tpl.num_nodes)
        inside[:, 0], inside[:, tpl.sink] = True, False  # a valid source/sink cut of each problem
        t_in, h_in = inside[:, tpl.tails], inside[:, tpl.heads]
        residual = caps[open_] - f
        np.maximum(residual, 0.0, out=residual)
        gap[open_] = (residual * (t_in & ~h_in)).sum(1) + (f * (h_in & ~t_in)).sum(1)
    return value, gap
