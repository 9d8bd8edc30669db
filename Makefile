VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip --quiet --disable-pip-version-check
# torch always comes through constraints.txt (the local CPU build); letting pip choose pulls CUDA wheels.
INSTALL := $(PIP) install -c constraints.txt

.PHONY: demo test lint bench clean models

$(PY):
	python3 -m venv $(VENV)
	$(INSTALL) torch==2.13.0

SUDO := $(shell [ "$$(id -u)" -eq 0 ] || echo sudo)
HF_ONLY = $(INSTALL) -e ".[hf]"; \
	$(PY) -c "import torchvision" >/dev/null 2>&1 || ! $(PY) -m pip show torchvision >/dev/null 2>&1 || \
		{ echo "removing torchvision: its build cannot load against this torch (make test puts it back)"; \
		  $(PIP) uninstall -y torchvision; }

# The demo needs the library and transformers only. timm's dependency torchvision, where its PyPI build cannot
# load against the CPU torch, also breaks `import transformers`; the demo environment then goes without it.
demo: $(PY)
	@$(HF_ONLY)
	$(VENV)/bin/vitlens demo --out out/demo

# Rebuilds the three embedded models from seed 0 (under 30 min each on one CPU thread). Training needs the full
# Fashion-MNIST, which the Debian package dataset-fashion-mnist installs under /usr/share/datasets/fashion-mnist.
models: $(PY)
	@test -f /usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz || \
		$(SUDO) apt-get install -y dataset-fashion-mnist
	@$(HF_ONLY)
	$(PY) -m vitlens.train.embedded --all --out src/vitlens/models/zoo --threads 1 --cache .cache/scenes

# The tests need timm and transformers; tests/conftest.py works around a torchvision that cannot load its ops.
test: $(PY)
	$(INSTALL) -e ".[test]"
	$(VENV)/bin/ruff check .
	$(PY) -m pytest

lint: $(PY)
	$(VENV)/bin/ruff check .

bench: $(PY)
	$(INSTALL) -e ".[test]"
	$(PY) bench/bench_rollout.py
	$(PY) bench/bench_memory.py
	$(INSTALL) -e ".[bench]"
	$(PY) bench/bench_lime.py

clean:
	rm -rf $(VENV) out build src/*.egg-info
