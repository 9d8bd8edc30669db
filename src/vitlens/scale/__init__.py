"""Dataset-scale runs (`vitlens run`): listing inputs, explaining them batch by batch on a local DataLoader or Ray
Data, and the resumable Parquet + Zarr store (`open_store`)."""

from vitlens.scale.store import Store, open_store

__all__ = ["Store", "open_store"]
