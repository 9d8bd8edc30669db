"""Benchmark set-up, imported first by every bench script (not part of the library).

Benchmarks run in the test environment (.venv-test, `make bench`), whose timm brings the CUDA-linked PyPI
torchvision that cannot load its ops against the CPU torch; the test set-up's workaround (tests/conftest.py, loaded
here by path so that it exists in one place) makes timm and transformers importable. Also pins the thread count so
that runs are comparable.
"""

from __future__ import annotations

import importlib.util
import os
import platform
from pathlib import Path

import torch

# the machine's cores (shared with other users: numbers are noisy, so scripts report ratios); VITLENS_BENCH_THREADS=1
# measures on one core while another job holds the other
THREADS = int(os.environ.get("VITLENS_BENCH_THREADS", "2"))

_SETUP = Path(__file__).resolve().parents[1] / "tests" / "conftest.py"
_spec = importlib.util.spec_from_file_location("_vitlens_test_setup", _SETUP)
assert _spec is not None and _spec.loader is not None, _SETUP
_test_setup = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_test_setup)  # declares torchvision's op schemas when its compiled ops do not load

torch.set_num_threads(THREADS)


def describe() -> str:
    """One line naming the machine, torch version and thread count, for the top of each benchmark's output."""
    return (
        f"torch {torch.__version__}, python {platform.python_version()}, {os.cpu_count()} CPU cores visible, "
        f"torch.set_num_threads({torch.get_num_threads()})"
    )
