# One entry point for setup, tests and the demo. Everything installs into .venv/ at the repository root.
PYTHON ?= python3.11
VENV   := .venv
PY     := $(VENV)/bin/python
PIP    := $(VENV)/bin/pip
STAMP  := $(VENV)/.installed
# Torch threads for tests and the demo: on 2 shared cores 1 thread is often far faster than 2.
THREADS ?= 1

.PHONY: install test demo bench clean-venv

install: $(STAMP)

# Re-runs only when a requirements file or pyproject.toml changes; pip's wheel cache keeps the mmcv build,
# so a second run takes seconds.
$(STAMP): requirements-torch.txt requirements.txt requirements-test.txt requirements-oracle.txt pyproject.toml tools/cxx20
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q -r requirements-torch.txt
	CXX=$(CURDIR)/tools/cxx20 MMCV_WITH_OPS=1 MAX_JOBS=2 DS_BUILD_OPS=0 DS_BUILD_SHM_COMM=1 \
		$(PIP) install -q --no-build-isolation -r requirements.txt
	$(PIP) install -q -r requirements-test.txt
	$(PIP) install -q --no-deps -r requirements-oracle.txt
	$(PIP) install -q --no-deps --no-build-isolation -e .
	touch $(STAMP)

test: install
	OMP_NUM_THREADS=$(THREADS) DS_ACCELERATOR=cpu $(PY) -m pytest -q tests

demo: install
	OMP_NUM_THREADS=$(THREADS) DS_ACCELERATOR=cpu $(PY) code/demo.py --threads $(THREADS)

bench: install
	$(PY) code/benchmark.py --model beit3_tiny_patch8_64 --batch_size 16 --device cpu

clean-venv:
	rm -rf $(VENV)
