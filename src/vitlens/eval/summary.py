"""From per-image rows to what a reader compares: means with 95% bootstrap intervals (markdown tables) and the mean
curves of every method (figures)."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from vitlens.eval.metrics import Metric

BOOTSTRAP = 1000
KIND_TEXT = {"pred": "predicted class", "gt": "ground-truth class"}


def bootstrap_mean(values: Sequence[float], resamples: int = BOOTSTRAP, seed: int = 0) -> tuple[float, float, float]:
    """(mean, 2.5th, 97.5th percentile of the bootstrap means) of the finite values; NaNs when there are none."""
    v = np.asarray([x for x in values if np.isfinite(x)], dtype=np.float64)
    if v.size == 0:
        return float("nan"), float("nan"), float("nan")
    rng = np.random.default_rng(seed)
    means = v[rng.integers(0, v.size, size=(resamples, v.size))].mean(1)
    return float(v.mean()), float(np.percentile(means, 2.5)), float(np.percentile(means, 97.5))


def _num(v: str) -> float:
    try:
        return float(v)
    except ValueError:
        return float("nan")


def summary(rows: Sequence[dict], metrics: Sequence[Metric], methods: Sequence[str]) -> dict:
    """{kind: {method: {column: (mean, lo, hi, n)}}} over the summary columns of ``metrics``."""
    cols = [c.name for m in metrics for c in m.columns if c.summary]
    out: dict[str, dict[str, dict[str, tuple[float, float, float, int]]]] = {}
    for kind in KIND_TEXT:
        for method in methods:
            sel = [r for r in rows if r["target"] == kind and r["method"] == method]
            if not sel:
                continue
            res = {}
            for c in cols:
                vals = [_num(r.get(c, "")) for r in sel]
                mean, lo, hi = bootstrap_mean(vals)
                res[c] = (mean, lo, hi, int(np.isfinite(vals).sum()))
            out.setdefault(kind, {})[method] = res
    return out


def _cell(mean: float, lo: float, hi: float, scale: float) -> str:
    if not np.isfinite(mean):
        return "-"
    digits = 1 if scale >= 10 else 3
    return f"{mean:.{digits}f} [{lo:.{digits}f}, {hi:.{digits}f}]"


def markdown(stats: dict, metrics: Sequence[Metric], title: str, notes: Sequence[str] = ()) -> str:
    """Markdown tables (one per target kind) of means with 95% bootstrap intervals; arrows give each column's
    direction, the best mean of each column is bold."""
    columns = [c for m in metrics for c in m.columns if c.summary]
    parts = [f"## {title}", ""]
    parts += [f"- {n}" for n in notes]
    for kind, by_method in stats.items():
        n_images = max((v[3] for res in by_method.values() for v in res.values()), default=0)
        parts += ["", f"### target: {KIND_TEXT[kind]} ({n_images} rows per method)", ""]
        shown = [c for c in columns if any(np.isfinite(res[c.name][0]) for res in by_method.values())]
        parts.append("| method | " + " | ".join(f"{c.name} {'↑' if c.higher_is_better else '↓'}" for c in shown) + " |")
        parts.append("| --- |" + " --- |" * len(shown))
        best = {}
        for c in shown:
            vals = [res[c.name][0] for res in by_method.values() if np.isfinite(res[c.name][0])]
            best[c.name] = (max if c.higher_is_better else min)(vals) if vals else None
        for method, res in by_method.items():
            cells = []
            for c in shown:
                mean, lo, hi, _ = res[c.name]
                scale = 100 if c.name.endswith(("acc_auc", "prob_auc")) else 1
                text = _cell(mean, lo, hi, scale)
                cells.append(f"**{text}**" if best[c.name] is not None and mean == best[c.name] else text)
            parts.append(f"| {method} | " + " | ".join(cells) + " |")
    return "\n".join(parts) + "\n"


def curve_figures(rows: Sequence[dict], metrics: Sequence[Metric], methods: Sequence[str]) -> dict[str, object]:
    """{file stem: Figure}: per curve and target kind, the mean curve of every method (one line each)."""
    from vitlens.viz.figures import new_figure

    figs: dict[str, object] = {}
    for m in metrics:
        for title, xs, cols in m.curves():
            for kind in KIND_TEXT:
                sel = [r for r in rows if r["target"] == kind]
                if not sel:
                    continue
                fig = new_figure(6.0, 4.0)
                ax = fig.subplots()
                for method in methods:
                    rs = [r for r in sel if r["method"] == method]
                    if not rs:
                        continue
                    ys = [np.nanmean([_num(r[c]) for r in rs]) for c in cols]
                    ax.plot(xs, ys, marker="o", markersize=3, label=method,
                            linestyle="--" if method in ("random", "gaussian", "cls_attention") else "-")
                ax.set_xlabel("patches removed (%)" if "insertion" not in title else "patches inserted (%)")
                ax.set_ylabel("accuracy" if "accuracy" in title else "probability of the target")
                ax.set_title(f"{title} ({KIND_TEXT[kind]})", fontsize=10)
                ax.grid(alpha=0.3)
                ax.legend(fontsize=7, ncol=2)
                stem = title.split(":")[0].replace(" ", "_") + ("_acc" if "accuracy" in title else "") + f"_{kind}"
                figs[stem] = fig
    return figs
