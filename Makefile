# One entry point for setup, tests and the demo. Everything installs into .venv/ at the repository root.
PYTHON ?= python3.11
VENV   := .venv
PY     := $(VENV)/bin/python
PIP    := $(VENV)/bin/pip
STAMP  := $(VENV)/.installed
# Torch threads for tests and the demo: on 2 shared cores 1 thread is often far faster than 2.
THREADS ?= 1

.PHONY: install test test-torch211 demo bench clean-venv

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

# The tests of the model and its GPU code paths (kernels, compile, training, inference) under torch 2.11, the GPU
# machines' version, in a second environment (README "Setup"). Not part of `make test`: the install downloads another
# torch with its CUDA libraries (several GB).
VENV211 := .venv-torch211
STAMP211 := $(VENV211)/.installed
TORCH211_TESTS := tests/test_modeling.py tests/test_checkpoint.py tests/test_loss.py tests/test_gelu.py \
	tests/test_kernels.py tests/test_optim.py tests/test_train.py tests/test_infer.py tests/test_extract_features.py \
	tests/test_search.py tests/test_retrieval.py tests/test_evaluate.py tests/test_benchmark.py

$(STAMP211): requirements-torch211.txt requirements.txt requirements-test.txt requirements-oracle.txt pyproject.toml
	test -x $(VENV211)/bin/python || $(PYTHON) -m venv $(VENV211)
	$(VENV211)/bin/pip install -q -r requirements-torch211.txt
	grep -vE '^(torch|torchvision|numpy|mmengine|mmcv|mmdet|deepspeed)==' requirements.txt > $(VENV211)/requirements.txt
	$(VENV211)/bin/pip install -q -r $(VENV211)/requirements.txt
	# DeepSpeed built against this torch: without --no-cache-dir pip reuses the wheel built for .venv's torch
	CXX=$(CURDIR)/tools/cxx20 DS_BUILD_OPS=0 DS_BUILD_SHM_COMM=1 $(VENV211)/bin/pip install -q --no-build-isolation \
		--no-cache-dir $$(grep -E '^deepspeed==' requirements.txt)
	$(VENV211)/bin/pip install -q -r requirements-test.txt
	$(VENV211)/bin/pip install -q --no-deps -r requirements-oracle.txt
	$(VENV211)/bin/pip install -q --no-deps --no-build-isolation -e .
	touch $(STAMP211)

test-torch211: $(STAMP211)
	OMP_NUM_THREADS=$(THREADS) DS_ACCELERATOR=cpu $(VENV211)/bin/python -m pytest -q $(TORCH211_TESTS)

demo: install
	OMP_NUM_THREADS=$(THREADS) DS_ACCELERATOR=cpu $(PY) code/demo.py --threads $(THREADS)

bench: install
	$(PY) code/benchmark.py --model beit3_tiny_patch8_64 --batch_size 16 --device cpu

clean-venv:
	rm -rf $(VENV)
