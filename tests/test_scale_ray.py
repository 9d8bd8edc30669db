"""`vitlens run --engine ray` on a local Ray instance started here (two CPUs, no dashboard, no network): the same
store as the local engine on 20 images (identical float16 maps, same rows)."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from vitlens.cli import main
from vitlens.scale.store import open_store

pytestmark = [pytest.mark.usefixtures("one_torch_thread"),
              pytest.mark.filterwarnings("ignore::DeprecationWarning:ray.data.context")]

REPO = Path(__file__).resolve().parents[1]
METHODS = "rollout,grad_rollout"


@pytest.fixture(scope="module")
def ray_local():
    """A local Ray for this module. Its worker processes get the test set-up's torchvision op schemas (the same
    workaround as tests/conftest.py, through Ray's worker set-up hook), then it is shut down."""
    ray = pytest.importorskip("ray")
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False,
             runtime_env={"env_vars": {"PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]),
                                       "OMP_NUM_THREADS": "1"},
                          "worker_process_setup_hook": "tests.conftest.declare_torchvision_ops"})
    yield ray
    ray.shutdown()


@pytest.fixture(scope="module")
def twenty(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("ray_images")
    rng = np.random.default_rng(3)
    for i in range(20):
        Image.fromarray((rng.random((36, 44, 3)) * 255).astype(np.uint8)).save(d / f"img{i:02d}.png")
    return d


def test_ray_engine_gives_the_local_engines_store(ray_local, vit3_dir, twenty, tmp_path, capsys):
    base = ["run", "--model", str(vit3_dir), "--data", str(twenty), "--methods", METHODS, "--batch-size", "4"]
    assert main([*base, "--out", str(tmp_path / "local"), "--workers", "0"]) == 0
    assert main([*base, "--out", str(tmp_path / "ray"), "--engine", "ray", "--workers", "2"]) == 0
    assert "explained 20 images" in capsys.readouterr().out and ray_local.is_initialized()  # Ray left as found
    a, b = open_store(tmp_path / "local"), open_store(tmp_path / "ray")
    assert a.table().drop_columns(["seconds"]).equals(b.table().drop_columns(["seconds"]))  # same rows, same parts
    keys = a.table(["image_id"]).column("image_id").to_pylist()
    assert len(keys) == 40 and len(set(keys)) == 20
    for m in METHODS.split(","):
        la, lb = a.maps(keys[::2], m), b.maps(keys[::2], m)
        assert la.dtype == lb.dtype == np.float16 and la.shape == (20, 4, 4)
        assert np.array_equal(la, lb)  # identical, bit for bit
