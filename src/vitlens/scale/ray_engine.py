"""The Ray Data engine: the same batches as the local engine, explained by a pool of model actors (one per worker, one
GPU each when the job runs on CUDA), with the results committed by the one store writer in the driver.

The dataset is the listing cut into the local engine's batches (one row per batch, in order), so every actor
explains exactly the batches the local engine would, and the store gets the same rows and the same maps. Actors read
and preprocess their batch themselves (on a cluster the images must be at the same path on every node, e.g. a
shared file system); with several actors one reads while another computes.
"""

from __future__ import annotations

import json
import pickle
import sys
import time
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from vitlens.errors import VitlensError
from vitlens.scale.job import Job, collate, plan_batches, read_item
from vitlens.scale.listing import Item
from vitlens.scale.local import Summary, todo
from vitlens.scale.store import StoreWriter


def _ray() -> Any:
    try:
        import ray
        import ray.data  # noqa: F401
    except ImportError as e:
        raise VitlensError(f"--engine ray needs ray[data] ({e}); install vitlens[scale]") from None
    return ray


class ExplainActor:
    """A Ray Data actor holding the job's model and methods; each call reads and explains one planned batch."""

    def __init__(self, job: Job, device: str, threads: int) -> None:
        import torch

        if threads > 0:
            torch.set_num_threads(threads)
        self.explainer, _ = job.build(device=device)

    def __call__(self, rows: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """``rows['items']``: JSON lists of [index, key, source]; returns the pickled `BatchResult` of each."""
        out = []
        pre = self.explainer.preprocess
        for text in rows["items"]:
            items = [Item(int(i), str(k), str(s)) for i, k, s in json.loads(str(text))]
            out.append(pickle.dumps(self.explainer(collate([(it, read_item(it, pre)) for it in items]))))
        return {"result": np.array(out, dtype=object)}


def start_ray(address: str | None, workers: int) -> bool:
    """Connect to the cluster at ``address``, or start a local Ray (``workers`` CPUs, no dashboard) unless one is
    already initialised; returns whether this call started it (and so should shut it down)."""
    ray = _ray()
    if ray.is_initialized():
        return False
    try:
        if address:
            ray.init(address=address, log_to_driver=False)
        else:
            ray.init(num_cpus=max(workers, 1), include_dashboard=False, log_to_driver=False)
    except Exception as e:  # a wrong address or a failed local start: one line, no Ray traceback
        raise VitlensError(f"cannot start Ray ({'address ' + address if address else 'locally'}): "
                           f"{str(e).splitlines()[0][:200] if str(e) else type(e).__name__}") from None
    return True


def run_ray(job: Job, items: Sequence[Item], store: StoreWriter, batch_size: int = 16, workers: int = 2,
            address: str | None = None, progress: bool = True,
            after_commit: Callable[[int], None] | None = None) -> Summary:
    """Explain every item not yet in ``store`` on Ray Data with ``workers`` model actors; commits in listing order.
    ``workers`` actors of one CPU (and one GPU each when the job's device is CUDA)."""
    from tqdm.auto import tqdm

    if isinstance(workers, bool) or not isinstance(workers, int) or workers < 1:
        raise VitlensError(f"--workers must be at least 1 with --engine ray, got {workers!r}")
    ray = _ray()
    left = todo(items, store)
    summary = Summary(len(items), len(items) - len(left))
    plan = plan_batches(left, batch_size)
    started = start_ray(address, workers) if plan else False
    start = time.perf_counter()
    try:
        if plan:
            ctx = ray.data.DataContext.get_current()
            ctx.execution_options.preserve_order = True
            ctx.enable_progress_bars = False
            gpu = str(job.device).startswith("cuda")
            rows = [{"items": json.dumps([[it.index, it.key, it.source] for it in b])} for b in plan]
            ds = ray.data.from_items(rows, override_num_blocks=len(rows)).map_batches(
                ExplainActor, fn_constructor_kwargs={"job": job, "device": job.device, "threads": 1},
                batch_size=1, batch_format="numpy", compute=ray.data.ActorPoolStrategy(size=workers), num_cpus=1,
                num_gpus=1 if gpu else 0)
            with tqdm(total=len(items), initial=summary.skipped, desc="run (ray)", unit="image",
                      disable=not progress, file=sys.stderr, dynamic_ncols=True, smoothing=0.1) as bar:
                for k, row in enumerate(ds.iter_rows()):
                    result = pickle.loads(row["result"])
                    store.commit(result)
                    summary.add(result)
                    bar.update(result.images)
                    if after_commit is not None:
                        after_commit(k + 1)
    finally:
        if started:
            ray.shutdown()
    summary.seconds = time.perf_counter() - start
    return summary
