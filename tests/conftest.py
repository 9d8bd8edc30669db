"""Test set-up. The tests run in their own environment, .venv-test (`make test`), never in the user's .venv.

timm needs torchvision, and the PyPI torchvision wheel here is CUDA-linked: it cannot load its ops against the CPU
torch, which breaks `import timm` and (since transformers imports torchvision whenever it is installed) transformers'
model classes. Declaring the two op schemas first lets their pure-Python model code import. This workaround lives in
the test set-up only (bench/_env.py loads this file for the benchmarks), never in the library or the user environment.
"""

import os

import pytest
import torch


def declare_torchvision_ops() -> None:
    """Make torchvision importable when its compiled ops do not load: forget the half-imported modules and declare
    the `nms`/`qnms` schemas its Python code registers fake kernels for. Does nothing when torchvision loads."""
    try:
        import torchvision  # noqa: F401
    except Exception:
        import sys

        for name in [m for m in sys.modules if m == "torchvision" or m.startswith("torchvision.")]:
            del sys.modules[name]
        lib = torch.library.Library("torchvision", "DEF")
        lib.define("nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
        lib.define("qnms(Tensor qdets, Tensor scores, float iou_threshold) -> Tensor")
        _keep.append(lib)  # the schemas live as long as their Library object


_keep: list[torch.library.Library] = []
declare_torchvision_ops()
torch.manual_seed(0)

if os.environ.get("PYTEST_XDIST_WORKER"):
    # `make test` runs two pytest-xdist workers on the two cores: one intra-op thread each avoids oversubscription
    torch.set_num_threads(1)


@pytest.fixture(scope="module")
def one_torch_thread():
    """Tiny models: extra intra-op threads only add contention on a shared machine (test modules opt in with
    `pytestmark = pytest.mark.usefixtures("one_torch_thread")`)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def vit3_dir(tmp_path_factory):
    """A tiny transformers ViT classifier folder (save_pretrained; 32 px, patch 8, 2 blocks, 2 heads, 3 classes,
    seed 1), shared by the what-if and evaluation tests."""
    from transformers import ViTConfig, ViTForImageClassification

    torch.manual_seed(1)
    cfg = ViTConfig(image_size=32, patch_size=8, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                    intermediate_size=64, num_labels=3)
    path = tmp_path_factory.mktemp("models") / "vit3"
    ViTForImageClassification(cfg).save_pretrained(path)
    return path
