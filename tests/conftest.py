"""Test set-up. The PyPI torchvision wheel here is CUDA-linked and cannot load its ops against the CPU torch, which
breaks `import timm` and `import transformers`. Declaring the two op schemas first lets their pure-Python model code
import. This workaround lives in the test set-up only, never in the library."""

import torch

try:
    import torchvision  # noqa: F401
except Exception:
    import sys

    for name in [m for m in sys.modules if m == "torchvision" or m.startswith("torchvision.")]:
        del sys.modules[name]
    _lib = torch.library.Library("torchvision", "DEF")
    _lib.define("nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
    _lib.define("qnms(Tensor qdets, Tensor scores, float iou_threshold) -> Tensor")

torch.manual_seed(0)
