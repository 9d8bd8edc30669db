"""Dataset-scale throughput of `vitlens run`: images/s of rollout and grad rollout in one process (a plain loop, the
baseline), with the local engine (DataLoader workers reading, the store written), and on Ray Data with 1 and 2 local
model actors; plus the store's bytes per map.

Usage: ``python bench/bench_scale.py [--model vit-tiny|scenes-vit] [--images 256] [--batch-size 16] [--quick]``

Models: ``vit-tiny`` (default), a ViT-Ti/16 at 224 px (12 blocks, 3 heads, 192 wide, 1000 classes, random weights,
as a transformers folder: the shape of a real ImageNet run); ``scenes-vit``, the embedded `vitlens:scenes-vit` (a
trained 64 px ViT, 8x8 patches, so cheap per image that reading dominates). Data: ``--images`` held-out scenes
written as 500x375 JPEGs (quality 90), the size of an ImageNet validation image, so that decoding and resizing cost
what they cost on a real data set. Every variant reads the same files and writes float16 maps.

- baseline: one process, one torch thread, a plain loop: read and preprocess a batch, explain it, keep the maps.
- local: `run_local`, 2 DataLoader workers reading while the main process (one torch thread) explains and commits.
- ray N: `run_ray` with N model actors of one CPU and one torch thread each, on a local Ray of 2 CPUs.

Rates are images / wall time of the whole run (Ray: from submitting the job, actor start-up included), and the
steady rate: the images of the batches committed after the first two over the time from the second commit to the
last (by then every actor has started and explained a batch: start-up excluded), the same for every variant.
Ratios are against the baseline measured in the same run. The machine has 2 cores; the load average is printed before
and after.
"""

from __future__ import annotations

import argparse
import os
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

import _env  # noqa: F401  (test set-up: importable transformers, pinned threads)

MODELS = ("vit-tiny", "scenes-vit")
METHODS = ("rollout", "grad_rollout")
REPO = Path(__file__).resolve().parents[1]


def write_images(folder: Path, n: int) -> None:
    """``n`` held-out scenes as 500x375 JPEGs."""
    from vitlens.scale.listing import load_item

    for i in range(n):
        img = load_item(f"scenes:{i}").resize((500, 375), Image.Resampling.BICUBIC)
        img.save(folder / f"img{i:05d}.jpg", quality=90)


def model_spec(name: str, folder: Path) -> str:
    """The model spec of ``name`` (the ViT-Ti folder is written into ``folder``)."""
    if name == "scenes-vit":
        return "vitlens:scenes-vit"
    from transformers import ViTConfig, ViTForImageClassification

    torch.manual_seed(0)
    cfg = ViTConfig(image_size=224, patch_size=16, hidden_size=192, num_hidden_layers=12, num_attention_heads=3,
                    intermediate_size=768, num_labels=1000)
    ViTForImageClassification(cfg).save_pretrained(folder)
    return str(folder)


def baseline(explainer, items, batch_size: int, after_commit) -> None:
    """A plain loop in this process: read a batch, explain it, keep its maps."""
    from vitlens.scale.job import collate, read_item

    for k, s in enumerate(range(0, len(items), batch_size)):
        chunk = items[s : s + batch_size]
        explainer(collate([(it, read_item(it, explainer.preprocess)) for it in chunk]))
        after_commit(k + 1)


SKIP = 2  # batches left out of the steady rate: by the second commit every actor has started and explained one


def timed(fn, skip: int = SKIP) -> tuple[float, float]:
    """Run ``fn(after_commit)``; returns (wall seconds, seconds from the ``skip``-th commit to the last)."""
    stamps: list[float] = []
    start = time.perf_counter()
    fn(lambda k: stamps.append(time.perf_counter()))
    end = time.perf_counter()
    return end - start, (stamps[-1] - stamps[skip - 1]) if len(stamps) > skip else float("nan")


def folder_bytes(folder: Path) -> tuple[int, int, int]:
    """(files, apparent bytes, bytes on disk) under ``folder``."""
    files = apparent = disk = 0
    for root, _, names in os.walk(folder):
        for name in names:
            st = os.stat(Path(root) / name)
            files += 1
            apparent += st.st_size
            disk += st.st_blocks * 512
    return files, apparent, disk


def parquet_maps_bytes(store, path: Path) -> int:
    """The same maps as a Parquet column of fixed-size float16 lists (zstd): the layout the issue offers instead."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    t = store.table(["image_id", "method", "status"]).to_pydict()
    maps = np.stack([store.map(k, m) for k, m, s in zip(t["image_id"], t["method"], t["status"]) if s == "ok"])
    flat = pa.array(maps.reshape(len(maps), -1).view(np.uint16).ravel(), pa.uint16()).view(pa.float16())
    col = pa.FixedSizeListArray.from_arrays(flat, maps.shape[1] * maps.shape[2])
    pq.write_table(pa.table({"map": col}), path, compression="zstd")
    return path.stat().st_size


def measure(method: str, spec: str, items: list, data: Path, work: Path, batch_size: int) -> dict:
    """{variant: (wall seconds, steady seconds)} of one method."""
    from vitlens.scale.job import Job
    from vitlens.scale.local import run_local
    from vitlens.scale.ray_engine import run_ray
    from vitlens.scale.store import StoreWriter

    job = Job(spec, (method,))
    explainer, _ = job.build()
    baseline(explainer, items[:batch_size], batch_size, lambda k: None)  # warm-up
    results = {"baseline": timed(lambda cb: baseline(explainer, items, batch_size, cb))}

    def store(name: str) -> StoreWriter:
        out = work / f"{method}-{name}"
        shutil.rmtree(out, ignore_errors=True)
        return StoreWriter(out, job.settings(str(data), explainer))

    with store("local") as st:
        results["local (2 loader workers)"] = timed(lambda cb: run_local(
            explainer, items, st, batch_size, workers=2, progress=False, after_commit=cb))
    for w in (1, 2):
        with store(f"ray{w}") as st:
            results[f"ray, {w} actor{'s' if w > 1 else ''}"] = timed(lambda cb: run_ray(
                job, items, st, batch_size, workers=w, progress=False, after_commit=cb))  # noqa: B023
    return results


def main() -> None:
    """Measure and print."""
    import ray

    from vitlens.scale.listing import list_items

    ap = argparse.ArgumentParser()
    ap.add_argument("--model", choices=MODELS, default=MODELS[0])
    ap.add_argument("--images", type=int, default=256)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--quick", action="store_true", help="64 images, batch 16 (smoke run)")
    args = ap.parse_args()
    if args.quick:
        args.images, args.batch_size = 64, 16
    print(f"bench_scale: {_env.describe()}; load average before: {os.getloadavg()}")
    work = Path(tempfile.mkdtemp(prefix="bench_scale_"))
    try:
        data = work / "images"
        data.mkdir()
        write_images(data, args.images)
        items = list_items(data)
        spec = model_spec(args.model, work / "model")
        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False,
                 runtime_env={"env_vars": {"PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"},
                              "worker_process_setup_hook": "tests.conftest.declare_torchvision_ops"})
        ray.get(ray.remote(lambda: 0).remote())  # Ray's processes are up: let their start-up settle before timing
        time.sleep(5)
        torch.set_num_threads(1)
        rows = [(method, measure(method, spec, items, data, work, args.batch_size)) for method in METHODS]
        print(f"{args.model}, {args.images} JPEG images 500x375, batch {args.batch_size}, float16 maps; "
              f"load average after: {os.getloadavg()}")
        print(f"{'method':13} {'variant':26} {'wall s':>7} {'img/s':>7} {'x base':>7} {'steady img/s':>13} "
              f"{'x base':>7}")
        n_steady = args.images - SKIP * args.batch_size
        for method, results in rows:
            base_wall, base_steady = results["baseline"]
            base_rate = n_steady / base_steady
            for name, (wall, steady) in results.items():
                rate = n_steady / steady
                print(f"{method:13} {name:26} {wall:7.2f} {args.images / wall:7.1f} {base_wall / wall:7.2f} "
                      f"{rate:13.1f} {rate / base_rate:7.2f}")
            r1, r2 = results["ray, 1 actor"], results["ray, 2 actors"]
            print(f"{method:13} ray 2 actors / 1 actor: {r1[0] / r2[0]:.2f}x wall, {r1[1] / r2[1]:.2f}x steady")
        from vitlens.scale.store import open_store

        st = open_store(work / f"{METHODS[0]}-local")
        n_maps = sum(1 for s in st.table(["status"]).column("status").to_pylist() if s == "ok")
        files, apparent, disk = folder_bytes(st.path / "maps")
        pfiles, papparent, pdisk = folder_bytes(st.path / "parts")
        gh, gw = st.grid
        alt = parquet_maps_bytes(st, work / "alt.parquet")
        print(f"store ({METHODS[0]}, {n_maps} maps of {gh}x{gw}, raw float16 {2 * gh * gw} B): Zarr maps "
              f"{apparent / n_maps:.1f} B/map ({files} files; {disk / n_maps:.1f} B/map on disk in 4 KiB blocks); "
              f"Parquet table {papparent / n_maps:.1f} B/row ({pfiles} files); the same maps as one Parquet "
              f"fixed-size-list column: {alt / n_maps:.1f} B/map")
    finally:
        if ray.is_initialized():
            ray.shutdown()
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
