"""The user environment (.venv, built by `make demo`) still runs the README commands, whatever the test set-up did.

The tests run in their own environment (.venv-test) with timm and the CUDA-linked PyPI torchvision, made importable
by tests/conftest.py. That torchvision must never reach .venv: transformers imports it whenever it is installed, so
there `import transformers` succeeds but its model classes, and with them `vitlens explain --model vitlens:...`, fail.
These checks run .venv's own python in a subprocess (no shim, no test paths) and are skipped only where .venv does not
exist (a clean clone that ran `make test` alone).
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
USER_ENV = ROOT / ".venv"
USER_BIN = USER_ENV / "bin"
SCENE = ROOT / "src" / "vitlens" / "assets" / "scenes" / "ankleboot_dress.png"

pytestmark = pytest.mark.skipif(not (USER_BIN / "python").exists(),
                                reason="no user environment: .venv is built by `make demo`")

# What the README commands import: transformers' model classes (the lazy import that a broken torchvision breaks),
# scikit-image's SLIC (`vitlens lime`'s default segmentation) and the command line itself.
IMPORTS = """
import importlib.util
if importlib.util.find_spec("torchvision") is not None:
    import torchvision  # present only if it loads; an unloadable one breaks transformers
import transformers
from transformers import PreTrainedModel, ViTForImageClassification
from skimage.segmentation import slic
import vitlens.cli
print("imports ok")
"""


def _run_in_user_env(args: list[str], cwd: Path) -> subprocess.CompletedProcess[str]:
    """Run a program from .venv/bin with nothing of the test environment leaking in (no PYTHONPATH, no shim)."""
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV")}
    env["PATH"] = f"{USER_BIN}{os.pathsep}{env.get('PATH', '')}"
    return subprocess.run([str(USER_BIN / args[0]), *args[1:]], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=300)


def _explain(proc: subprocess.CompletedProcess[str]) -> str:
    return f"exit {proc.returncode}\nstdout: {proc.stdout[-2000:]}\nstderr: {proc.stderr[-2000:]}"


def test_user_env_imports_transformers_models_and_skimage(tmp_path: Path) -> None:
    proc = _run_in_user_env(["python", "-c", IMPORTS], tmp_path)
    assert proc.returncode == 0 and "imports ok" in proc.stdout, _explain(proc)


def test_user_env_runs_vitlens_models(tmp_path: Path) -> None:
    proc = _run_in_user_env(["vitlens", "models"], tmp_path)
    assert proc.returncode == 0, _explain(proc)
    assert "scenes-vit" in proc.stdout, _explain(proc)


def test_user_env_explains_with_the_embedded_transformers_model(tmp_path: Path) -> None:
    """The README command that failed with "transformers failed to import" once `make test` had shared .venv."""
    out = tmp_path / "rollout.png"
    proc = _run_in_user_env(["vitlens", "explain", str(SCENE), "--model", "vitlens:scenes-vit", "--method", "rollout",
                             "--out", str(out)], tmp_path)
    assert proc.returncode == 0, _explain(proc)
    assert out.stat().st_size > 0
