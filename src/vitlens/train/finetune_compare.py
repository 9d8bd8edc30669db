"""The fine-tuning grid: models x methods x seeds on one task, its results table (markdown and CSV) and the plot of
held-out score against trainable parameters.

Every finished run is appended to a JSON-lines log; a rerun with the same settings skips the runs already there, so
an interrupted grid resumes where it stopped.
"""

from __future__ import annotations

import csv
import io
import json
import os
import platform
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from vitlens.errors import VitlensError
from vitlens.models.base import VitModel
from vitlens.train.finetune import Settings, parse_method, run_finetune
from vitlens.train.finetune_data import TaskData

DEFAULT_METHODS = ("head", "adapter:attn", "adapter:mlp", "adapter:both", "adapter:parallel", "lora", "full")
MARKERS = {"head": "o", "full": "s", "lora": "D", "adapter:attn": "^", "adapter:mlp": "v", "adapter:both": "P",
           "adapter:parallel": "X"}
CSV_FIELDS = ("model", "method", "seeds", "metric", "mean", "std", "min", "max", "trainable_params", "total_params",
              "epoch_seconds", "run_seconds", "per_seed")


def split_list(text: str, what: str) -> list[str]:
    """'a,b, c' -> ['a', 'b', 'c']; one clear error for an empty list or a repeated item."""
    items = [t.strip() for t in str(text).split(",") if t.strip()]
    if not items:
        raise VitlensError(f"{what} is empty; give a comma-separated list")
    if len(set(items)) != len(items):
        raise VitlensError(f"{what} names an item twice: {text!r}")
    return items


def check_methods(methods: Sequence[str]) -> list[str]:
    """Normalise method labels ('adapter' -> 'adapter:both'); one clear error for an unknown one."""
    out = []
    for m in methods:
        method, place = parse_method(m)
        out.append(f"adapter:{place}" if method == "adapter" else method)
    return out


def machine() -> str:
    """Where a run ran: CPU, cores, torch threads, torch version."""
    return (f"{platform.machine()} CPU, {os.cpu_count()} cores, {torch.get_num_threads()} torch thread(s), "
            f"torch {torch.__version__}")


@dataclass(frozen=True)
class GridSpec:
    """What the grid runs: the shared settings (method and seed vary) and the data sizes."""

    data: str
    epochs: int
    lr: float
    weight_decay: float
    batch_size: int
    n_train: int
    n_eval: int
    adapter_dim: int = 64
    lora_rank: int = 8
    lora_alpha: float = 16.0

    def settings(self, method: str, seed: int) -> Settings:
        """The run's Settings."""
        return Settings(method=method, seed=seed, epochs=self.epochs, lr=self.lr, weight_decay=self.weight_decay,
                        batch_size=self.batch_size, adapter_dim=self.adapter_dim, lora_rank=self.lora_rank,
                        lora_alpha=self.lora_alpha)


def _key(row: dict) -> tuple:
    return (row["model"], row["method"], row["seed"], row["image_size"], json.dumps(row["grid"], sort_keys=True))


def read_log(path: Path) -> list[dict]:
    """The runs already in a grid log (lines that do not parse, e.g. one cut by a crash, are skipped)."""
    if not path.is_file():
        return []
    rows = []
    for line in path.read_text().splitlines():
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return rows


def run_grid(models: Sequence[tuple[str, VitModel, TaskData]], methods: Sequence[str], seeds: Sequence[int],
             spec: GridSpec, log: Path, progress: bool = False,
             say: Callable[[str], None] = print) -> list[dict]:
    """Run every (model, method, seed) not yet in ``log`` and append each result to it; returns the grid's rows."""
    done = {_key(r): r for r in read_log(log)}
    rows = []
    total = len(models) * len(methods) * len(seeds)
    k = 0
    for name, model, task in models:
        size = int(task.train_images.shape[1])
        for method in methods:
            for seed in seeds:
                k += 1
                row_id = {"model": name, "method": method, "seed": seed, "image_size": size, "grid": asdict(spec)}
                if _key(row_id) in done:
                    rows.append(done[_key(row_id)])
                    continue
                t0 = time.perf_counter()
                _, result = run_finetune(model, task, spec.settings(method, seed), progress=progress)
                r = result.as_dict()
                r.pop("loss")
                row = {**row_id, "metric": result.metric, "score": result.final, "trainable_params":
                       result.trainable_params, "total_params": result.total_params,
                       "epoch_seconds": round(result.epoch_seconds, 2),
                       "run_seconds": round(time.perf_counter() - t0, 1), "machine": machine(), "result": r}
                with log.open("a") as fh:
                    fh.write(json.dumps(row) + "\n")
                rows.append(row)
                say(f"[{k}/{total}] {name} {method} seed {seed}: {result.metric} {result.final:.4f}, "
                    f"{result.trainable_params:,} trainable, {row['run_seconds']:.0f} s")
    return rows


def summarise(rows: Sequence[dict]) -> list[dict]:
    """One row per (model, method), in first-seen order: mean, sample std, min, max of the held-out score over
    seeds, trainable parameters, mean seconds per epoch and per run."""
    groups: dict[tuple[str, str], list[dict]] = {}
    for r in rows:
        groups.setdefault((r["model"], r["method"]), []).append(r)
    out = []
    for (model, method), rs in groups.items():
        scores = [float(r["score"]) for r in sorted(rs, key=lambda r: r["seed"])]
        out.append({
            "model": model, "method": method, "seeds": len(rs), "metric": rs[0]["metric"],
            "mean": statistics.fmean(scores), "std": statistics.stdev(scores) if len(scores) > 1 else 0.0,
            "min": min(scores), "max": max(scores), "trainable_params": rs[0]["trainable_params"],
            "total_params": rs[0]["total_params"],
            "epoch_seconds": statistics.fmean(float(r["epoch_seconds"]) for r in rs),
            "run_seconds": statistics.fmean(float(r["run_seconds"]) for r in rs),
            "per_seed": " ".join(f"{s:.4f}" for s in scores),
        })
    return out


def _params(n: int) -> str:
    return f"{n / 1e6:.2f} M" if n >= 1e6 else f"{n / 1e3:.1f} k"


def _seconds(t: float) -> str:
    return f"{t:.2f}" if t < 1 else f"{t:.1f}"


def markdown_table(summary: Sequence[dict], note: str = "") -> str:
    """The results table in markdown: score mean ± std over seeds (min-max), trainable parameters, time."""
    metric = summary[0]["metric"] if summary else "score"
    lines = [f"| model | method | {metric} (mean ± std over seeds) | min-max | trainable params | "
             "% of model | s / epoch | s / run |", "|---|---|---|---|---|---|---|---|"]
    for s in summary:
        share = 100 * s["trainable_params"] / max(1, s["total_params"])
        lines.append(f"| {s['model']} | {s['method']} | {s['mean']:.4f} ± {s['std']:.4f} (n={s['seeds']}) | "
                     f"{s['min']:.4f}-{s['max']:.4f} | {_params(s['trainable_params'])} | {share:.2f}% | "
                     f"{_seconds(s['epoch_seconds'])} | {s['run_seconds']:.0f} |")
    return "\n".join(lines) + "\n" + (f"\n{note}\n" if note else "")


def csv_table(summary: Sequence[dict]) -> str:
    """The results table as CSV (full precision)."""
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=list(CSV_FIELDS), lineterminator="\n")
    w.writeheader()
    for s in summary:
        w.writerow({k: s[k] for k in CSV_FIELDS})
    return buf.getvalue()


def _tick(v: float, _pos: object = None) -> str:
    return f"{v / 1e6:g} M" if v >= 1e6 else f"{v / 1e3:g} k" if v >= 1e3 else f"{v:g}"


def plot_summary(summary: Sequence[dict]) -> Any:
    """Held-out score (mean, with min-max bars) against trainable parameters (log scale): a colour per model, a
    marker per method; methods with equal counts (adapter placements) are dodged sideways a little."""
    from matplotlib.lines import Line2D
    from matplotlib.ticker import FuncFormatter

    from vitlens.viz.figures import new_figure

    fig = new_figure(8.5, 4.6)
    ax = fig.add_subplot(1, 1, 1)
    methods = list(dict.fromkeys(s["method"] for s in summary))
    models = list(dict.fromkeys(s["model"] for s in summary))
    marker = {m: MARKERS.get(m, "*") for m in methods}
    for s in summary:
        colour = f"C{models.index(s['model'])}"
        k = methods.index(s["method"])
        x = max(1, s["trainable_params"]) * 1.07 ** (k - (len(methods) - 1) / 2)
        ax.errorbar([x], [s["mean"]], yerr=[[s["mean"] - s["min"]], [s["max"] - s["mean"]]], color=colour,
                    marker=marker[s["method"]], markersize=7, capsize=3, linestyle="none")
    ax.set_xscale("log")
    ax.xaxis.set_major_formatter(FuncFormatter(_tick))
    ax.xaxis.set_minor_formatter(FuncFormatter(lambda v, _: ""))
    ax.set_xlabel("trainable parameters (log scale)")
    ax.set_ylabel(f"held-out {summary[0]['metric'] if summary else 'score'} (mean, min-max over seeds)")
    ax.grid(True, alpha=0.3)
    first = ax.legend(handles=[Line2D([], [], color=f"C{i}", marker="o", linestyle="none", label=m)
                               for i, m in enumerate(models)], fontsize=8, loc="upper left", title="model",
                      title_fontsize=8)
    ax.add_artist(first)
    ax.legend(handles=[Line2D([], [], color="0.3", marker=marker[m], linestyle="none", label=m) for m in methods],
              fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0), title="method", title_fontsize=8)
    ax.set_title("Fine-tuning: held-out score against trainable parameters", fontsize=10)
    return fig
