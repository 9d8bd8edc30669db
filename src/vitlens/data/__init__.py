"""Data for vitlens: Fashion-MNIST loading and seeded multi-object scenes built from it."""

from vitlens.data.fashion_mnist import (
    DEFAULT_ROOT,
    FASHION_MNIST_CLASSES,
    load_fashion_mnist,
    load_fixture_items,
    parse_idx,
    read_idx,
)
from vitlens.data.scenes import (
    BACKGROUND_KINDS,
    DemoScene,
    Scene,
    SceneConfig,
    SceneDataset,
    demo_scenes,
    load_background_photos,
    load_demo_scenes,
    make_background,
    make_scene,
    overlap_fraction,
    write_demo_scenes,
)

__all__ = [
    "BACKGROUND_KINDS",
    "DEFAULT_ROOT",
    "FASHION_MNIST_CLASSES",
    "DemoScene",
    "Scene",
    "SceneConfig",
    "SceneDataset",
    "demo_scenes",
    "load_background_photos",
    "load_demo_scenes",
    "load_fashion_mnist",
    "load_fixture_items",
    "make_background",
    "make_scene",
    "overlap_fraction",
    "parse_idx",
    "read_idx",
    "write_demo_scenes",
]
