"""The local engine: a torch DataLoader whose workers read and preprocess the next batches while the model explains
the current one in this process; each batch is committed to the store as soon as it is explained."""

from __future__ import annotations

import sys
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch.utils.data import DataLoader, Dataset

from vitlens.scale.job import BatchExplainer, Loaded, collate, plan_batches, read_item
from vitlens.scale.listing import Item
from vitlens.scale.store import BatchResult, StoreWriter


@dataclass
class Summary:
    """What a run did: images in the listing, already done before, explained now, unreadable now, maps written,
    wall seconds of this session."""

    total: int
    skipped: int
    explained: int = 0
    errors: int = 0
    maps: int = 0
    seconds: float = 0.0

    @property
    def images_per_second(self) -> float:
        """Images handled per second in this session."""
        return (self.explained + self.errors) / self.seconds if self.seconds > 0 else 0.0

    def add(self, result: BatchResult) -> None:
        """Count one committed batch."""
        self.explained += len(result.keys)
        self.errors += len(result.errors)
        self.maps += len(result.keys) * len(result.methods)


class _Items(Dataset):
    def __init__(self, items: Sequence[Item], preprocess: Any) -> None:
        self.items = list(items)
        self.preprocess = preprocess

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> tuple[Item, torch.Tensor | str]:
        return self.items[i], read_item(self.items[i], self.preprocess)


def load_batches(items: Sequence[Item], preprocess: Any, batch_size: int, workers: int) -> Iterator[Loaded]:
    """Batches of ``items`` (cut by `plan_batches`) read by ``workers`` DataLoader processes (0: in this one)."""
    loader = DataLoader(_Items(items, preprocess), batch_sampler=plan_batches(range(len(items)), batch_size),
                        num_workers=workers, collate_fn=collate,
                        prefetch_factor=2 if workers else None, persistent_workers=False)
    yield from loader


def todo(items: Sequence[Item], store: StoreWriter) -> list[Item]:
    """The items of no committed part."""
    done = store.done()
    return [it for it in items if it.key not in done]


def run_local(explainer: BatchExplainer, items: Sequence[Item], store: StoreWriter, batch_size: int = 16,
              workers: int = 2, progress: bool = True,
              after_commit: Callable[[int], None] | None = None) -> Summary:
    """Explain every item not yet in ``store`` and commit batch by batch; ``after_commit(k)`` runs after the k-th
    commit of this session. Returns the `Summary`."""
    from tqdm.auto import tqdm

    left = todo(items, store)
    summary = Summary(len(items), len(items) - len(left))
    start = time.perf_counter()
    with tqdm(total=len(items), initial=summary.skipped, desc="run", unit="image", disable=not progress,
              file=sys.stderr, dynamic_ncols=True, smoothing=0.1) as bar:
        for k, batch in enumerate(load_batches(left, explainer.preprocess, batch_size, workers)):
            result = explainer(batch)
            store.commit(result)
            summary.add(result)
            bar.update(result.images)
            if after_commit is not None:
                after_commit(k + 1)
    summary.seconds = time.perf_counter() - start
    return summary
