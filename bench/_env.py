"""Benchmark set-up, imported first by every bench script (not part of the library).

The PyPI torchvision wheel here is CUDA-linked and cannot load its ops against the CPU torch, which breaks
`import timm` and `import transformers`. Declaring the two op schemas first lets their pure-Python model code import
(the same workaround as tests/conftest.py). Also pins the thread count so that runs are comparable.
"""

from __future__ import annotations

import os
import platform

import torch

THREADS = 2  # the machine's cores (shared with other users: numbers are noisy, so scripts report ratios)

try:
    import torchvision  # noqa: F401
except Exception:
    import sys

    for _name in [m for m in sys.modules if m == "torchvision" or m.startswith("torchvision.")]:
        del sys.modules[_name]
    _lib = torch.library.Library("torchvision", "DEF")
    _lib.define("nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
    _lib.define("qnms(Tensor qdets, Tensor scores, float iou_threshold) -> Tensor")

torch.set_num_threads(THREADS)


def describe() -> str:
    """One line naming the machine, torch version and thread count, for the top of each benchmark's output."""
    return (
        f"torch {torch.__version__}, python {platform.python_version()}, {os.cpu_count()} CPU cores visible, "
        f"torch.set_num_threads({torch.get_num_threads()})"
    )
